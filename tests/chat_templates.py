"""Chat templates of today's model families, written for these tests.

Each reproduces the behaviour of its family's public template that decides the loss mask (what the generation
prompt holds, how a turn ends, what later history rewrites), not its full text: Qwen3 (thinking on/off), a
DeepSeek-R1 distill (current and original generation prompt), gpt-oss (harmony channels), Gemma-2/3, Mistral,
Phi-4, Llama-3.1. Every newline is a Jinja string literal (``_t``), so that the Python source
shows exactly what each template emits (``_t``).
"""

from __future__ import annotations

import json


def _join(*parts: str) -> str:
    return "".join(parts)


def _t(text: str) -> str:
    """Literal text as a Jinja expression: transformers renders with trim_blocks, which would eat a newline right
    after a block tag, so every newline of these templates goes through here."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


_ARGS = "{{ c.function.arguments if c.function.arguments is string else c.function.arguments | tojson }}"

# Qwen3: reasoning is rendered only for assistant turns after the last user query (and always an empty block for
# the final turn); history turns lose their thinking. enable_thinking=false puts an empty think block into the
# generation prompt. Tool calls as <tool_call> JSON, tool results as a user turn of <tool_response>s.
QWEN3 = _join(
    "{% if tools %}<|im_start|>system", _t("\n"),
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}", _t("\n\n"), "{% endif %}",
    _t("# Tools\n\n<tools>"), "{% for t in tools %}", _t("\n"), "{{ t | tojson }}{% endfor %}",
    _t("\n</tools><|im_end|>\n"),
    "{% elif messages[0].role == 'system' %}", _t("<|im_start|>system\n"), "{{ messages[0].content }}",
    _t("<|im_end|>\n"), "{% endif %}",
    "{% set ns = namespace(last_query=-1) %}",
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}",
    "{% for m in messages %}",
    "{% if m.role == 'user' %}", _t("<|im_start|>user\n"), "{{ m.content }}", _t("<|im_end|>\n"),
    "{% elif m.role == 'assistant' %}",
    "{% set content = m.content %}{% set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}",
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}",
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}",
    _t("<|im_start|>assistant\n"),
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}",
    _t("<think>\n"), "{{ reasoning.strip('\n') }}", _t("\n</think>\n\n"), "{% endif %}",
    "{{ content }}",
    "{% for c in m.tool_calls or [] %}{% if (loop.first and content) or not loop.first %}", _t("\n"), "{% endif %}",
    _t('<tool_call>\n{"name": "'), "{{ c.function.name }}", '", "arguments": ', _ARGS, _t("}\n</tool_call>"),
    "{% endfor %}", _t("<|im_end|>\n"),
    "{% elif m.role == 'tool' %}",
    "{% if messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}",
    _t("\n<tool_response>\n"), "{{ m.content }}", _t("\n</tool_response>"),
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}", _t("<|im_end|>\n"), "{% endif %}",
    "{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}", _t("<|im_start|>assistant\n"),
    "{% if enable_thinking is defined and enable_thinking is false %}", _t("<think>\n\n</think>\n\n"),
    "{% endif %}{% endif %}",
)
QWEN3_SPECIALS = ["<|im_start|>", "<|im_end|>"]

# DeepSeek-R1 distills: every assistant turn keeps only what follows "</think>" (thinking never rendered);
# the current template opens "<think>\n" in the generation prompt, the original one did not.
_R1_BODY = _join(
    "{% set ns = namespace(system='') %}",
    "{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content %}{% endif %}{% endfor %}",
    "<｜begin▁of▁sentence｜>{{ ns.system }}",
    "{% for m in messages %}",
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}",
    "{% elif m.role == 'assistant' %}{% set content = m.content %}",
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}",
    "<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>",
    "{% endif %}{% endfor %}",
)
DEEPSEEK_R1 = _R1_BODY + "{% if add_generation_prompt %}" + _t("<｜Assistant｜><think>\n") + "{% endif %}"
DEEPSEEK_R1_ORIGINAL = _R1_BODY + "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]

# gpt-oss harmony: a fixed system message, the system prompt as developer instructions; assistant turns after the
# last user message carry their analysis channel (``thinking``), earlier ones only their final channel; the final
# message of the conversation ends with <|return|> (what the model emits), history finals with <|end|>; a tool
# call is a commentary message addressed to functions.NAME ending with <|call|>.
GPT_OSS = _join(
    _t("<|start|>system<|message|>You are a helpful model.\nReasoning: medium\n\n"),
    "# Valid channels: analysis, commentary, final.<|end|>",
    "{% set system = messages[0].content if messages[0].role == 'system' else '' %}",
    "{% if system or tools %}<|start|>developer<|message|>",
    "{% if system %}", _t("# Instructions\n\n"), "{{ system }}{% endif %}",
    "{% if tools %}{% if system %}", _t("\n\n"), "{% endif %}", _t("# Tools\n\nnamespace functions {"),
    "{% for t in tools %}", _t("\n// "), "{{ t.function.description }}", _t("\ntype "), "{{ t.function.name }}",
    " = (_: any) => any;{% endfor %}", _t("\n}"), "{% endif %}<|end|>{% endif %}",
    "{% set ns = namespace(last_user=-1, call='') %}",
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}",
    "{% for m in messages %}",
    "{% if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>",
    "{% elif m.role == 'assistant' %}",
    "{% if loop.index0 > ns.last_user and m.thinking %}",
    "<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}",
    "{% if m.tool_calls %}{% set c = m.tool_calls[0] %}{% set ns.call = c.function.name %}",
    "<|start|>assistant to=functions.{{ c.function.name }}<|channel|>commentary json<|message|>",
    _ARGS, "<|call|>",
    "{% else %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}",
    "{% if loop.last %}<|return|>{% else %}<|end|>{% endif %}{% endif %}",
    "{% elif m.role == 'tool' %}",
    "<|start|>functions.{{ ns.call }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>",
    "{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}",
)
GPT_OSS_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]

# Gemma: assistant turns are "model" turns, contents trimmed; Gemma-2 refuses a system turn, Gemma-3 folds it
# into the first user turn. Both raise on roles that do not alternate.
_GEMMA_LOOP = _join(
    "{% for m in loop_messages %}",
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}",
    "{% set prefix = first_user_prefix if loop.first else '' %}",
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}", _t("\n"), "{{ prefix + m.content | trim }}",
    _t("<end_of_turn>\n"), "{% endfor %}",
    "{% if add_generation_prompt %}", _t("<start_of_turn>model\n"), "{% endif %}",
)
GEMMA2 = _join(
    "<bos>{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
    "{% set loop_messages = messages %}{% set first_user_prefix = '' %}",
    _GEMMA_LOOP,
)
GEMMA3 = _join(
    "<bos>{% if messages[0].role == 'system' %}{% set first_user_prefix = messages[0].content + '\n\n' %}",
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}",
    "{% set loop_messages = messages %}{% endif %}",
    _GEMMA_LOOP,
)
GEMMA_SPECIALS = ["<bos>", "<start_of_turn>", "<end_of_turn>"]

# Mistral: no generation prompt (the prompt ends with [/INST]); the system prompt is folded into the *last* user
# turn, so history renders change as the conversation grows; tool calls and results in their own markers.
MISTRAL = _join(
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}",
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}",
    "{% endif %}",
    "{% set ns = namespace(last_user=-1) %}",
    "{% for m in loop_messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}",
    "{% endfor %}<s>",
    "{% for m in loop_messages %}",
    "{% if m.role == 'user' %}[INST] {% if system and loop.index0 == ns.last_user %}{{ system }}", _t("\n\n"),
    "{% endif %}{{ m.content }}[/INST]",
    "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] [",
    '{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "arguments": ', _ARGS,
    "}{% if not loop.last %}, {% endif %}{% endfor %}]</s>",
    "{% elif m.role == 'assistant' %} {{ m.content }}</s>",
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {\"content\": {{ m.content | tojson }}}[/TOOL_RESULTS]",
    "{% endif %}{% endfor %}",
)
MISTRAL_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]

# Phi-4: ChatML markers with <|im_sep|> after the role and nothing between turns.
PHI4 = _join(
    "{% for m in messages %}<|im_start|>{{ m.role }}<|im_sep|>{{ m.content }}<|im_end|>{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}",
)
PHI4_SPECIALS = ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]

# Llama-3.1: header ids, trimmed contents, a tool call as a JSON object with "parameters", tool results as
# "ipython" turns; tools and the system prompt in the system header.
LLAMA31 = _join(
    "<|begin_of_text|>",
    "{% set system = messages[0].content if messages[0].role == 'system' else '' %}",
    "{% if system or tools %}", _t("<|start_header_id|>system<|end_header_id|>\n\n"),
    "{% if tools %}", _t("Environment: ipython\n\n"), "{% for t in tools %}{{ t | tojson }}", _t("\n\n"),
    "{% endfor %}{% endif %}{{ system }}<|eot_id|>{% endif %}",
    "{% for m in messages %}",
    "{% if m.role == 'user' %}", _t("<|start_header_id|>user<|end_header_id|>\n\n"),
    "{{ m.content | trim }}<|eot_id|>",
    "{% elif m.role == 'assistant' %}", _t("<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "{% if m.tool_calls %}{% set c = m.tool_calls[0] %}",
    '{"name": "{{ c.function.name }}", "parameters": ', _ARGS, "}",
    "{% else %}{{ m.content | trim }}{% endif %}<|eot_id|>",
    "{% elif m.role == 'tool' %}", _t("<|start_header_id|>ipython<|end_header_id|>\n\n"),
    "{{ m.content }}<|eot_id|>",
    "{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}", _t("<|start_header_id|>assistant<|end_header_id|>\n\n"), "{% endif %}",
)
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

FAMILIES: dict[str, tuple[str, list[str]]] = {
    "qwen3": (QWEN3, QWEN3_SPECIALS),
    "deepseek-r1": (DEEPSEEK_R1, DEEPSEEK_SPECIALS),
    "deepseek-r1-original": (DEEPSEEK_R1_ORIGINAL, DEEPSEEK_SPECIALS),
    "gpt-oss": (GPT_OSS, GPT_OSS_SPECIALS),
    "gemma2": (GEMMA2, GEMMA_SPECIALS),
    "gemma3": (GEMMA3, GEMMA_SPECIALS),
    "mistral": (MISTRAL, MISTRAL_SPECIALS),
    "phi4": (PHI4, PHI4_SPECIALS),
    "llama3.1": (LLAMA31, LLAMA31_SPECIALS),
}
