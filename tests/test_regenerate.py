"""`pipeline regenerate`: turn-by-turn greedy regeneration, resume after a crash, output the extractor reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import data as data_mod
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.regenerate import (
    HFGenerator,
    RegenerateConfig,
    RegenerateError,
    regenerate_command,
    run_regenerate,
    stop_token_ids,
)
from pipeline.store import StoreReader

NEW = 6


def conv(rid: str, *turns: tuple[str, str]) -> dict:
    return {"id": rid, "conversations": [{"from": r, "value": v} for r, v in turns]}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    records = [
        conv("two-turns", ("human", "Name a colour."), ("gpt", "Blue."), ("human", "And another?"), ("gpt", "Red.")),
        conv("sys", ("system", "Answer briefly."), ("human", "What is 2+2?"), ("gpt", "4")),
        conv("no-answer", ("human", "Hello?")),
        conv("one", ("human", "Say hi."), ("gpt", "hi")),
        conv("dup", ("human", "Count to three."), ("gpt", "1 2 3"), ("human", "Now backwards."), ("gpt", "3 2 1")),
        conv("last", ("human", "Bye."), ("gpt", "Bye!")),
    ]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"id": "broken", "conversations": [')  # a malformed line: skipped and counted
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def generator(tiny_llama_dir) -> HFGenerator:
    return HFGenerator(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def clean_run(tiny_llama_dir, chat_file, generator, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted greedy run over the whole file (several tests read it)."""
    out = tmp_path_factory.mktemp("clean") / "regen.jsonl"
    return out, regen(tiny_llama_dir, chat_file, out, generator)


def regen(model, data, out, generator=None, **kw) -> dict:
    cfg = RegenerateConfig(out=Path(out), model=str(model), data=str(data), progress=False,
                           **{"max_new_tokens": NEW, "batch_size": 3, "max_length": 512, **kw})  # fmt: skip
    return run_regenerate(cfg, generator=generator)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy_reference(model, tokenizer, history: list[dict], stops: list[int], max_new: int = NEW) -> str:
    """The model's own greedy continuation: full forward per step, no cache, no batching."""
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_greedy_turn_by_turn_equals_the_models_own_continuation(tiny_llama_dir, generator, clean_run):
    out, summary = clean_run
    assert summary["written"] == 5 and summary["selected"] == 7
    assert summary["skipped"] == {"malformed_json": 1, "no_assistant_turn": 1}
    recs = {r["id"]: r for r in read_jsonl(out)}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = generator.tokenizer
    two = recs["two-turns"]["messages"]
    assert [m["role"] for m in two] == ["user", "assistant", "user", "assistant"]
    assert (two[0]["content"], two[2]["content"]) == ("Name a colour.", "And another?")  # user turns kept
    # turn 1 from the user turn; turn 2 from the history *with the regenerated* answer 1
    assert two[1]["content"] == greedy_reference(model, tok, two[:1], generator.stops)
    assert two[3]["content"] == greedy_reference(model, tok, two[:3], generator.stops)
    assert two[1]["content"] != "Blue."
    sys_rec = recs["sys"]["messages"]
    assert sys_rec[0] == {"role": "system", "content": "Answer briefly."}
    assert sys_rec[2]["content"] == greedy_reference(model, tok, sys_rec[:2], generator.stops)
    meta = recs["two-turns"]["regenerated_by"]
    assert meta["model"]["path"] == str(Path(tiny_llama_dir).resolve()) and len(meta["model"]["config_sha256"]) == 64
    assert meta["sampling"] == {"temperature": 0.0, "greedy": True, "max_new_tokens": NEW, "seed": None}
    assert meta["backend"] == "hf" and meta["source"]["id"] == "two-turns" and len(meta["turns"]) == 2
    assert all(t["finish_reason"] in ("stop", "length") for t in meta["turns"])


def test_output_is_read_and_extracted(tiny_llama_dir, clean_run, tmp_path):
    out, _ = clean_run
    recs = list(data_mod.read_records(out))
    assert all(isinstance(r, data_mod.Record) for r in recs) and len(recs) == 5
    assert [r.record_id for r in recs] == ["two-turns", "sys", "one", "dup", "last"]
    summary = run_extract(ExtractConfig(out=tmp_path / "store", model=str(tiny_llama_dir), data=str(out),
                                        max_length=128, top_k=4, progress=False))  # fmt: skip
    assert summary["samples_written"] >= 4 and summary["loss_tokens"] > 0
    assert StoreReader(tmp_path / "store").fingerprint["data"]["format"] == "jsonl"


class CountingGenerator:
    """Wraps a generator; counts prompts and can crash on a given call (a killed run)."""

    def __init__(self, inner, crash_on_call: int | None = None):
        self.inner, self.crash_on_call, self.calls, self.prompts = inner, crash_on_call, 0, 0
        self.name, self.tokenizer, self.dtype_name = inner.name, inner.tokenizer, inner.dtype_name

    def generate(self, prompts, *args):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise KeyboardInterrupt("killed")
        self.prompts += len(prompts)
        return self.inner.generate(prompts, *args)


def test_resume_after_a_crash_and_a_partial_line(tiny_llama_dir, chat_file, generator, clean_run, tmp_path):
    clean, _ = clean_run
    out = tmp_path / "resumed.jsonl"
    # killed during the second batch: the first batch's records are on disk, nothing of the second
    with pytest.raises(KeyboardInterrupt):
        regen(tiny_llama_dir, chat_file, out, CountingGenerator(generator, crash_on_call=3))
    first = read_jsonl(out)
    assert [r["id"] for r in first] == ["two-turns", "sys"]
    # and a write cut short leaves half a line behind
    with open(out, "a") as f:
        f.write('{"id": "one", "messages": [{"role": "user", "con')
    again = CountingGenerator(generator)
    summary = regen(tiny_llama_dir, chat_file, out, again)
    assert summary["repaired_partial_line"] and summary["already_done"] == 2 and summary["written"] == 3
    assert again.prompts == 4  # only the missing records' turns: one (1), dup (2), last (1)
    assert read_jsonl(out) == read_jsonl(clean)  # greedy: the resumed file equals an uninterrupted run
    # a finished file: nothing to do, no model needed
    summary = regen(tiny_llama_dir, chat_file, out, CountingGenerator(generator, crash_on_call=1))
    assert summary["written"] == 0 and summary["already_done"] == 5


def test_mixing_settings_is_refused_and_bad_lines_are_not_ours(tiny_llama_dir, chat_file, generator, tmp_path):
    out = tmp_path / "regen.jsonl"
    regen(tiny_llama_dir, chat_file, out, generator, limit=2)
    with pytest.raises(RegenerateError, match="sampling"):
        regen(tiny_llama_dir, chat_file, out, generator, temperature=0.8)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "x", "messages": []}\n')
    with pytest.raises(RegenerateError, match="line 1 is not a record written by"):
        regen(tiny_llama_dir, chat_file, other, generator)


def test_sampling_is_seeded_and_long_conversations_end_early(tiny_llama_dir, chat_file, generator, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    regen(tiny_llama_dir, chat_file, a, generator, temperature=1.0, seed=7, limit=2)
    regen(tiny_llama_dir, chat_file, b, generator, temperature=1.0, seed=7, limit=2)
    assert read_jsonl(a) == read_jsonl(b)
    assert read_jsonl(a)[0]["regenerated_by"]["sampling"]["seed"] == 7
    # room for the first turn of "two-turns" but not for the second: it ends after its first answer
    tok = generator.tokenizer
    first = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                    add_generation_prompt=True)  # fmt: skip
    limit = len(tok(first, add_special_tokens=False)["input_ids"]) + NEW + 2
    summary = regen(tiny_llama_dir, chat_file, tmp_path / "c.jsonl", generator, limit=1, max_length=limit)
    (rec,) = read_jsonl(tmp_path / "c.jsonl")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["regenerated_by"]["truncated_turns"] == 1 and summary["truncated_records"] == 1
    summary = regen(tiny_llama_dir, chat_file, tmp_path / "d.jsonl", generator, limit=1, max_length=NEW + 3)
    assert summary["skipped"] == {"prompt_too_long": 1} and summary["written"] == 0


def test_cli(tiny_llama_dir, chat_file, tmp_path):
    out = tmp_path / "cli.jsonl"
    args = ["--model", str(tiny_llama_dir), "--data", str(chat_file), "--out", str(out), "--limit", "2",
            "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(regenerate_command, args)
    assert res.exit_code == 0, res.output
    assert "2 selected; 2 written" in res.output
    res = CliRunner().invoke(regenerate_command, args + ["--json"])
    assert json.loads(res.stdout)["already_done"] == 2
    res = CliRunner().invoke(regenerate_command, args + ["--temperature", "0.5"])
    assert res.exit_code == 2 and "refusing to mix" in res.output


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    res = CliRunner().invoke(regenerate_command, ["--model", str(tiny_llama_dir), "--data", str(chat_file), "--out",
                                                  str(tmp_path / "v.jsonl"), "--backend", "vllm", "--limit", "1"])  # fmt: skip
    assert res.exit_code == 2 and "pip install" in res.output, res.output


@pytest.mark.slow
def test_real_smollm2_on_real_sharegpt(smollm2_dir, tmp_path):
    out = tmp_path / "smol.jsonl"
    # the embedded defaults (SmolLM2, ShareGPT); records 1-2 have short prompts (this CPU is slow)
    res = CliRunner().invoke(regenerate_command, ["--out", str(out), "--offset", "1", "--limit", "2",
                                                  "--max-new-tokens", "16", "--no-progress", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["written"] == 2 and summary["turns_generated"] >= 2
    recs = list(data_mod.read_records(out))
    assert all(isinstance(r, data_mod.Record) for r in recs)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    first = read_jsonl(out)[0]
    assert first["regenerated_by"]["model"]["name"] == "SmolLM2-135M-Instruct"
    msgs = first["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    # a real chat model writes real text, and it is its own (unbatched, unpadded) greedy continuation
    ids = tok(tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True), add_special_tokens=False,
              return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.inference_mode():
        new = model.generate(input_ids=ids, do_sample=False, max_new_tokens=16)[0, ids.shape[1]:].tolist()
    stops = set(stop_token_ids(smollm2_dir, tok))
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    reference = tok.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert msgs[k]["content"] == reference and len(reference.split()) >= 3


def test_a_turn_ends_at_the_end_of_turn_token_even_when_eos_is_another(smollm2_tokenizer, tmp_path):
    """A model whose configured eos is ``<|endoftext|>`` still ends a chat turn at ``<|im_end|>``: regeneration
    stops where the evaluator does (one rule), instead of running on into an invented next turn."""
    from conftest import make_tiny_llama

    from pipeline.evaluate.target import stop_token_ids as eval_stop_ids
    from pipeline.regenerate import cut_at_stop

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer.name_or_path, eos_token="<|endoftext|>")
    model_dir = make_tiny_llama(tmp_path / "eos-is-endoftext", tok, layers=1, hidden=16)
    end_of_text, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert json.loads((model_dir / "config.json").read_text())["eos_token_id"] == end_of_text != im_end
    stops = stop_token_ids(model_dir, AutoTokenizer.from_pretrained(model_dir))
    assert {end_of_text, im_end} <= set(stops)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert set(stops) == eval_stop_ids(AutoTokenizer.from_pretrained(model_dir), model.generation_config, model.config)
    assert HFGenerator(model_dir, device="cpu").stops == stops
    comp = cut_at_stop([5, 7, im_end, 1, 9], set(stops))
    assert (comp.token_ids, comp.finish_reason) == ([5, 7], "stop")


class ScriptedGenerator:
    """Answers every prompt with the same text (as a thinking model would emit it) and records the prompts."""

    name = "scripted"
    dtype_name = "float32"

    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.prompts = tokenizer, []
        self.answer = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, max_new_tokens, temperature, seeds):
        from pipeline.regenerate import Completion

        self.prompts += [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        return [Completion(list(self.answer), "stop") for _ in prompts]


@pytest.mark.parametrize("thinking", ["keep", "drop"])
def test_tool_turns_are_kept_and_answers_replaced_with_thinking(tiny_llama_dir, tmp_path, thinking):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.chat_templates import QWEN3
    from tests.test_chat_templates import AGENT, TOOLS

    model = tmp_path / "qwen3-style"
    model.mkdir()
    for f in tiny_llama_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (model / f.name).symlink_to(f)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = QWEN3
    tok.save_pretrained(model)
    data = tmp_path / "agent.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "messages": AGENT, "tools": json.dumps(TOOLS)}]), data)
    gen = ScriptedGenerator(tok, "<think>\nLet me see.\n</think>\n\nDone.")
    out = tmp_path / "regen.jsonl"
    s = regen(model, data, out, generator=gen, thinking=thinking)
    assert s["written"] == 1 and s["turns_generated"] == 2
    (rec,) = read_jsonl(out)
    assert rec["tools"] == TOOLS and rec["regenerated_by"]["thinking_resolved"] == thinking
    answer = {"role": "assistant", "content": "Done.", **({"reasoning_content": "Let me see."} if thinking == "keep"
                                                           else {})}  # fmt: skip
    if thinking == "drop":  # the model's text is kept as it came when thinking is not kept apart
        answer["content"] = "<think>\nLet me see.\n</think>\n\nDone."
    assert rec["messages"] == [AGENT[0], answer, AGENT[2], answer]
    # The prompts a server would build: thinking on opens a plain assistant turn, off an empty think block.
    tail = "<|im_start|>assistant\n" + ("" if thinking == "keep" else "<think>\n\n</think>\n\n")
    assert all(p.endswith(tail) for p in gen.prompts) and "<tool_response>\n18 C, sunny" in gen.prompts[1]
    # What extraction then trains on: the regenerated answers, reasoning included where kept.
    (read,) = data_mod.read_records(out)
    t = data_mod.tokenize_chat(tok, read.messages, 4096, thinking=thinking, tools=read.tools)
    runs, cur = [], []
    for i, m in zip(t.input_ids, t.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    # (--thinking drop reads the inline think block as reasoning and drops it)
    expected = "<think>\nLet me see.\n</think>\n\nDone.<|im_end|>" if thinking == "keep" else "Done.<|im_end|>"
    assert runs == [expected, expected]
