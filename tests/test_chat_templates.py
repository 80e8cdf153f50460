"""The loss mask on today's template families (tests/chat_templates.py): the masked tokens of every assistant turn
are exactly the tokens the served model generates after the prompt a server renders for that turn (reasoning where
kept, tool calls, the end-of-turn token), at the same place, and nothing of the system, user or tool turns."""

from __future__ import annotations

import copy

import pytest

from pipeline import data as d
from tests.chat_templates import FAMILIES

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6.", "reasoning_content": "Three plus three is six."},
]
NO_SYSTEM = CONVERSATION[1:]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
AGENT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny.", "reasoning_content": "The tool answered."},
]  # fmt: skip
CALL = '{"city": "Paris"}'

# (family, messages, tools, --thinking, expected decoded masked runs (one per masked assistant turn), indices of the
# masked assistant turns). Written out by hand from what each family's model emits.
CASES = {
    "qwen3-thinking": ("qwen3", CONVERSATION, None, "keep",
                       ["<think>\nThree plus three is six.\n</think>\n\n6.<|im_end|>"], [4]),
    "qwen3-no-thinking": ("qwen3", CONVERSATION, None, "drop", ["4.<|im_end|>", "6.<|im_end|>"], [2, 4]),
    "qwen3-tools-thinking": ("qwen3", AGENT, TOOLS, "keep",
                             ["<think>\nI should call the tool.\n</think>\n\n<tool_call>\n"
                              '{"name": "weather", "arguments": ' + CALL + "}\n</tool_call><|im_end|>",
                              "<think>\nThe tool answered.\n</think>\n\nIt is 18 C and sunny.<|im_end|>"], [1, 3]),
    "qwen3-tools": ("qwen3", AGENT, TOOLS, "drop",
                    ['<tool_call>\n{"name": "weather", "arguments": ' + CALL + "}\n</tool_call><|im_end|>",
                     "It is 18 C and sunny.<|im_end|>"], [1, 3]),
    "deepseek-r1-original": ("deepseek-r1-original", CONVERSATION, None, "auto",
                             ["4.<｜end▁of▁sentence｜>", "6.<｜end▁of▁sentence｜>"], [2, 4]),
    "gpt-oss-thinking": ("gpt-oss", CONVERSATION, None, "keep",
                         ["<|channel|>analysis<|message|>Three plus three is six.<|end|>"
                          "<|start|>assistant<|channel|>final<|message|>6.<|return|>"], [4]),
    "gpt-oss-no-thinking": ("gpt-oss", CONVERSATION, None, "drop",
                            ["<|channel|>final<|message|>6.<|return|>"], [4]),
    "gpt-oss-tools-thinking": ("gpt-oss", AGENT, TOOLS, "keep",
                               ["<|channel|>analysis<|message|>I should call the tool.<|end|><|start|>assistant "
                                "to=functions.weather<|channel|>commentary json<|message|>" + CALL + "<|call|>",
                                "<|channel|>analysis<|message|>The tool answered.<|end|><|start|>assistant"
                                "<|channel|>final<|message|>It is 18 C and sunny.<|return|>"], [1, 3]),
    "gemma2": ("gemma2", NO_SYSTEM, None, "auto", ["4.<end_of_turn>", "6.<end_of_turn>"], [1, 3]),
    "gemma3": ("gemma3", CONVERSATION, None, "auto", ["4.<end_of_turn>", "6.<end_of_turn>"], [2, 4]),
    "mistral": ("mistral", CONVERSATION, None, "auto", [" 4.</s>", " 6.</s>"], [2, 4]),
    "mistral-tools": ("mistral", AGENT, TOOLS, "auto",
                      ['[TOOL_CALLS] [{"name": "weather", "arguments": ' + CALL + "}]</s>",
                       " It is 18 C and sunny.</s>"], [1, 3]),
    "phi4": ("phi4", CONVERSATION, None, "auto", ["4.<|im_end|>", "6.<|im_end|>"], [2, 4]),
    "llama3.1": ("llama3.1", CONVERSATION, None, "auto", ["4.<|eot_id|>", "6.<|eot_id|>"], [2, 4]),
    "llama3.1-tools": ("llama3.1", AGENT, TOOLS, "auto",
                       ['{"name": "weather", "parameters": ' + CALL + "}<|eot_id|>",
                        "It is 18 C and sunny.<|eot_id|>"], [1, 3]),
}  # fmt: skip


@pytest.fixture(scope="module")
def family_tokenizers(smollm2_tokenizer) -> dict:
    out = {}
    for name, (template, specials) in FAMILIES.items():
        tok = copy.deepcopy(smollm2_tokenizer)
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        out[name] = tok
    return out


def masked_runs(t: d.Tokenized) -> list[tuple[int, list[int]]]:
    """(start index, token ids) of each maximal run of loss tokens."""
    runs, start = [], None
    for i, m in enumerate([*t.loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, t.input_ids[start:i]))
            start = None
    return runs


def served(tok, messages: list[dict], i: int, thinking: str, tools) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of assistant turn i as a server runs it: the template renders messages[:i]
    with the generation prompt (the request's messages as sent, reasoning under both names the families read, the
    thinking switch as a template kwarg), and the model emits the rest of messages[:i+1]'s render."""
    keep = thinking == "keep"

    def sent(ms):
        return [{k: v for k, v in m.items() if k != "reasoning_content"} | (
            {"reasoning_content": m["reasoning_content"], "thinking": m["reasoning_content"]}
            if keep and "reasoning_content" in m else {}) for m in ms]  # fmt: skip

    kwargs = {"enable_thinking": keep, **({"tools": tools} if tools else {})}
    prompt = tok.apply_chat_template(sent(messages[:i]), tokenize=False, add_generation_prompt=True, **kwargs)
    turn = tok.apply_chat_template(sent(messages[: i + 1]), tokenize=False, **kwargs)
    assert turn.startswith(prompt)
    # vLLM tokenizes the prompt on its own; the model's tokens follow. Template glue after the end-of-turn token
    # (a newline) is not generated.
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids, tok(turn[len(prompt) :].rstrip(), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_mask_is_exactly_what_the_served_model_generates(family_tokenizers, case):
    family, messages, tools, requested, expected, turns = CASES[case]
    tok = family_tokenizers[family]
    thinking = d.resolve_thinking(tok, requested)
    d.check_chat_template(tok, thinking)
    t = d.tokenize_chat(tok, messages, 4096, thinking=thinking, tools=tools)
    runs = masked_runs(t)
    assert [tok.decode(ids, skip_special_tokens=False) for _, ids in runs] == expected
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert t.context_turns == len(assistant_turns) - len(turns)
    for (start, ids), i in zip(runs, turns, strict=True):
        prompt_ids, generated = served(tok, messages, i, thinking, tools)
        assert ids == generated, f"turn {i}"
        if t.input_ids[: len(prompt_ids)] == prompt_ids:  # the conversation extends this turn's prompt: no shift
            assert start == len(prompt_ids), f"turn {i}"
    # Nothing of the system, user or tool turns; everything else is unmasked text.
    full = tok.decode(t.input_ids, skip_special_tokens=False)
    masked_text = "".join(tok.decode(ids, skip_special_tokens=False) for _, ids in runs)
    unmasked = tok.decode([x for x, m in zip(t.input_ids, t.loss_mask, strict=True) if not m],
                          skip_special_tokens=False)  # fmt: skip
    assert len(unmasked) + len(masked_text) == len(full)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] not in masked_text


def test_thinking_modes_per_family(family_tokenizers):
    resolved = {name: d.resolve_thinking(tok, "auto") for name, tok in family_tokenizers.items()}
    assert resolved == {"qwen3": "keep", "deepseek-r1": "drop", "deepseek-r1-original": "drop", "gpt-oss": "keep",
                        "gemma2": "drop", "gemma3": "drop", "mistral": "drop", "phi4": "drop",
                        "llama3.1": "drop"}  # fmt: skip
    with pytest.raises(ValueError, match="--thinking keep: this chat template does not render"):
        d.resolve_thinking(family_tokenizers["deepseek-r1-original"], "keep")
    assert d.resolve_thinking(family_tokenizers["qwen3"], "drop") == "drop"


def test_template_whose_generation_cannot_be_derived_is_refused(family_tokenizers):
    # The current DeepSeek-R1 distill template opens "<think>\n" in the generation prompt but renders a turn
    # without it (its thinking is always cut): what the model generated is not in any render. Refused, not guessed.
    with pytest.raises(ValueError, match=r"cannot be used for a loss mask: assistant turn 1: .*prompt ends "
                       r"'<think>\\n'.*cannot be derived"):  # fmt: skip
        d.check_chat_template(family_tokenizers["deepseek-r1"], "drop")


def test_gemma2_system_turn_is_a_render_error(family_tokenizers):
    with pytest.raises(d.RenderError, match="System role not supported"):
        d.tokenize_chat(family_tokenizers["gemma2"], CONVERSATION, 4096, thinking="drop")


def test_empty_thinking_block_is_never_a_loss_token(family_tokenizers):
    # A record without reasoning under --thinking keep renders with thinking off: Qwen3's empty think block goes
    # into the prompt (as a server puts it there with enable_thinking=false), only the answer is trained.
    tok = family_tokenizers["qwen3"]
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in NO_SYSTEM]
    t = d.tokenize_chat(tok, plain, 4096, thinking="keep")
    assert [tok.decode(ids, skip_special_tokens=False) for _, ids in masked_runs(t)] == ["4.<|im_end|>",
                                                                                         "6.<|im_end|>"]  # fmt: skip
    assert "<think>\n\n</think>\n\n6." in tok.decode(t.input_ids, skip_special_tokens=False)
    # Inline "<think></think>" in the data is read as no reasoning at all (tests/test_data_sources.py).
