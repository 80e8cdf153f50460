"""`pipeline eval`: prompts, target resolution, report/PNG/compare, the click command on a tiny target, and the
whole path on the real SmolLM2 with briefly trained heads (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.draft.export import export_draft
from pipeline.evaluate.cli import eval_command, evaluate
from pipeline.evaluate.prompts import load_conversations, render
from pipeline.evaluate.report import build_report, compare_reports, write_report
from pipeline.evaluate.runner import resolve_target_path
from pipeline.evaluate.target import TargetError, stop_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT_KEYS = {"acceptance_length", "per_position_acceptance", "mismatches", "target_forwards", "tokens_per_s",
               "baseline_tokens_per_s", "speedup", "settings", "draft", "target", "prompts",
               "acceptance_length_convention"}  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_sources(tmp_path):
    mt = load_conversations("mt-bench")
    assert len(mt) == 80 and all(len(c.turns) == 2 for c in mt) and mt[0].id == "81"
    assert len(load_conversations(None, limit=3)) == 3
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi"}, {"id": "x", "turns": ["a", "b"]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "dropped"}]}])  # fmt: skip
    convs = load_conversations(prompts=path)
    assert [c.turns for c in convs] == [["hi"], ["a", "b"], []] and convs[1].id == "x"
    assert [m["role"] for m in convs[2].messages] == ["system", "user"]
    with pytest.raises(ValueError, match="p.jsonl:2: expected"):
        load_conversations(prompts=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no"}]))


def test_chat_rendering_and_stop_tokens(smollm2_tokenizer):
    ids = render(smollm2_tokenizer, [{"role": "user", "content": "Hello"}])
    text = smollm2_tokenizer.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant") and "Hello" in text
    stops = stop_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


def test_target_resolution(tmp_path, tiny_llama_dir, smollm2_dir):
    meta = {"target": {"name_or_path": str(tiny_llama_dir)}, "draft_config": {}}
    assert resolve_target_path(meta, None) == tiny_llama_dir
    assert resolve_target_path(meta, tiny_llama_dir) == tiny_llama_dir
    gone = {"target": {"name_or_path": "/elsewhere/models/SmolLM2-135M-Instruct"}, "draft_config": {}}
    assert resolve_target_path(gone, None) == smollm2_dir
    with pytest.raises(TargetError, match="pass --model"):
        resolve_target_path({"target": {"name_or_path": "/nowhere/other-model"}, "draft_config": {}}, None)
    with pytest.raises(TargetError, match="no config.json"):
        resolve_target_path(meta, tmp_path)


def fake_record(i: int, tau_steps: list[int], attempted: list[int], accepted: list[int]) -> dict:
    new = 1 + sum(tau_steps)
    return {"id": str(i), "turn": 0, "category": None, "prompt_tokens": 10, "new_tokens": new,
            "decode_tokens": new - 1, "target_forwards": len(tau_steps), "prefill_forwards": 1, "wall_s": 1.0,
            "tokens_per_s": float(new), "tau": (new - 1) / len(tau_steps), "accept_lengths": tau_steps,
            "attempted": attempted, "accepted": accepted,
            "baseline": {"new_tokens": new, "decode_tokens": new - 1, "target_forwards": new - 1,
                         "prefill_forwards": 1, "wall_s": 2.0, "tokens_per_s": new / 2.0},
            "speedup": 2.0, "mismatch": False, "first_difference": None, "text": "x"}  # fmt: skip


def test_report_aggregation_files_and_compare(tmp_path):
    settings = {"mode": "chain", "depth": 3, "top_k": 8, "total_tokens": 60, "temperature": 0.0,
                "max_new_tokens": 16}  # fmt: skip
    records = [fake_record(0, [3, 1, 2], [3, 2, 1], [2, 1, 0]), fake_record(1, [1, 4], [2, 1, 1], [1, 1, 1])]
    rep = build_report(records, settings, {"path": "d", "variant": "eagle1"}, {"path": "t"})
    assert REPORT_KEYS <= set(rep)
    assert rep["acceptance_length"] == 11 / 5 and rep["target_forwards"] == 5 and rep["mismatches"] == 0
    assert rep["per_position_acceptance"] == [3 / 5, 2 / 3, 1 / 2]
    assert rep["accept_length_histogram"] == {"1": 2, "2": 1, "3": 1, "4": 1}
    assert rep["speedup"] == pytest.approx(2.0)
    path, png = write_report(rep, tmp_path / "a" / "report.json")
    assert json.loads(path.read_text())["acceptance_length"] == 11 / 5 and png.stat().st_size > 5_000
    other = build_report(records[:1], {**settings, "mode": "tree"}, {"path": "d2", "variant": "eagle3"}, {})
    table = compare_reports(rep, other)
    assert "tau" in table and "2.20" in table and "accept @3" in table and "tree" in table
    b, _ = write_report(other, tmp_path / "b.json")
    res = CliRunner().invoke(eval_command, ["--compare", str(path), str(b)])
    assert res.exit_code == 0 and "speedup" in res.output and "b.json" in res.output, res.output
    assert CliRunner().invoke(eval_command, []).exit_code == 2  # --draft or --compare is required


def test_cli_on_a_tiny_target(tmp_path, tiny_llama_dir):
    from synthetic_draft import tiny_draft

    from pipeline.evaluate.target import load_target

    target, _ = load_target(tiny_llama_dir)
    head = tiny_draft(target, "eagle3", aux_layer_ids=(2, 4, 5), draft_vocab_size=4096)
    head.config.target_name = str(tiny_llama_dir)
    draft = export_draft(head, None, tmp_path / "e3", dtype=torch.float32)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"turns": ["Hi there", "And then?"]}, {"prompt": "Why?"}])
    out = tmp_path / "rep" / "eval.json"
    res = CliRunner().invoke(eval_command, ["--draft", str(draft), "--prompts", str(prompts), "--mode", "tree",
                                            "--depth", "3", "--top-k", "3", "--total-tokens", "8",
                                            "--max-new-tokens", "6", "--report", str(out), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert REPORT_KEYS <= set(rep) and rep["turns"] == 3 and rep["mismatches"] == 0
    assert rep["target"]["path"] == str(tiny_llama_dir.resolve()) and rep["target"]["config_matches_recorded"]
    assert [(r["id"], r["turn"]) for r in rep["prompts"]] == [("p.jsonl:1", 0), ("p.jsonl:1", 1), ("p.jsonl:2", 0)]
    # the second turn is asked after the first answer: a longer prompt
    assert rep["prompts"][1]["prompt_tokens"] > rep["prompts"][0]["prompt_tokens"] + 3
    assert out.with_suffix(".png").exists() and "tau" in res.output and "mismatches 0" in res.output
    # the cost model against the plain decoding timed in the same run (its decoding forwards, the prefill apart)
    check, plain = rep["budget"]["cost_check"], [r["baseline"] for r in rep["prompts"]]
    assert all(0 < b["prefill_s"] < b["wall_s"] for b in plain)
    assert check["observed_step_s"] == pytest.approx(sum(b["wall_s"] - b["prefill_s"] for b in plain)
                                                     / sum(b["target_forwards"] for b in plain))  # fmt: skip
    assert check["ratio"] == pytest.approx(check["observed_step_s"] / check["modelled_step_s"])
    assert ("warning    the cost model" in res.output) == check["stale"]
    head.config.target_name = "/nowhere/tiny"
    lost = export_draft(head, None, tmp_path / "lost", dtype=torch.float32)
    res = CliRunner().invoke(eval_command, ["--draft", str(lost), "--prompts", str(prompts)])
    assert res.exit_code == 1 and "pass --model" in res.output


# ---- the real SmolLM2 -----------------------------------------------------------------------------------------


def export_run(run: Path, tmp: Path, variant: str) -> Path:
    from pipeline.train.variants import load_run

    model, _ = load_run(run)
    return export_draft(model, None, tmp / f"export-{variant}", dtype=torch.float32)


@pytest.mark.slow
def test_real_smollm2_end_to_end(smollm2_runs, tmp_path):
    # one thread (the autouse fixture): on this shared 2-core machine a second thread mostly waits on the first
    e1 = export_run(smollm2_runs["eagle1"][0], tmp_path, "eagle1")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?"},
                                                 {"prompt": "Write a haiku about the sea."}])  # fmt: skip
    reports = {}
    for mode in ("chain", "tree"):
        rep, path, png = evaluate(e1, prompts=prompts, mode=mode, depth=4, top_k=4, total_tokens=16,
                                  max_new_tokens=24, report_path=tmp_path / f"{mode}.json", progress=False,
                                  baselines=())  # fmt: skip
        assert rep["mismatches"] == 0 and rep["turns"] == 2 and png.exists()
        assert rep["acceptance_length"] == rep["decode_tokens"] / rep["target_forwards"] >= 1.0
        for r in rep["prompts"]:
            assert r["tau"] == r["decode_tokens"] / r["target_forwards"] and sum(r["accept_lengths"]) == r["decode_tokens"]
            assert r["baseline"]["target_forwards"] == r["baseline"]["decode_tokens"]  # plain decoding: tau = 1
        reports[mode] = path
        print(f"\nSmolLM2 eagle1 {mode}: tau={rep['acceptance_length']:.3f} speedup={rep['speedup']:.3f} "
              f"accept={rep['per_position_acceptance']} mismatches={rep['mismatches']}")
    e3 = export_run(smollm2_runs["eagle3"][0], tmp_path, "eagle3")
    out = tmp_path / "e3.json"
    res = CliRunner().invoke(eval_command, ["--draft", str(e3), "--bench", "mt-bench", "--limit", "1", "--depth", "4",
                                            "--max-new-tokens", "24", "--report", str(out), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert REPORT_KEYS <= set(rep) and rep["mismatches"] == 0 and rep["turns"] == 2
    assert rep["acceptance_length"] == rep["decode_tokens"] / rep["target_forwards"] >= 1.0
    assert rep["draft"]["variant"] == "eagle3" and rep["draft"]["aux_layer_ids"] == [2, 15, 27]
    assert out.with_suffix(".png").stat().st_size > 10_000
    print(f"SmolLM2 eagle3 chain (MT-bench q81, 2 turns): tau={rep['acceptance_length']:.3f} "
          f"speedup={rep['speedup']:.3f} accept={rep['per_position_acceptance']}")
    res = CliRunner().invoke(eval_command, ["--compare", str(reports["chain"]), str(out)])
    assert res.exit_code == 0 and "eagle1" in res.output and "eagle3" in res.output, res.output


def test_a_stale_cached_cost_model_is_measured_again_and_used(tmp_path, tiny_llama_dir, monkeypatch):
    """A cost model cached under another load (here: every price x20) is found by the probe before drafting,
    measured again, cached, and used; the report and the summary say so."""
    from synthetic_draft import tiny_draft

    from pipeline.evaluate.target import load_target

    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    target, _ = load_target(tiny_llama_dir)
    head = tiny_draft(target, "eagle1")
    head.config.target_name = str(tiny_llama_dir)
    draft = export_draft(head, None, tmp_path / "e1", dtype=torch.float32)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Why?"}])
    args = ["--draft", str(draft), "--prompts", str(prompts), "--mode", "chain", "--depth", "3", "--linears",
            "stock", "--max-new-tokens", "6", "--baselines", "", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(eval_command, [*args, "--report", str(tmp_path / "first.json")])
    assert res.exit_code == 0, res.output
    (cached,) = (tmp_path / "cache" / "costs").glob("*.json")
    stale = json.loads(cached.read_text())
    stale["verify_s"] = {n: 20 * s for n, s in stale["verify_s"].items()}
    stale["draft_s"] *= 20
    cached.write_text(json.dumps(stale))
    res = CliRunner().invoke(eval_command, [*args, "--report", str(tmp_path / "second.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "second.json").read_text())
    done = rep["budget"]["recalibrated"]
    assert done["old_verify_1_s"] == stale["verify_s"]["1"] and done["probe"]["stale"]
    assert done["probe"]["observed_step_s"] < stale["verify_s"]["1"] / 4
    fresh = json.loads(cached.read_text())  # cached again, and what this evaluation drafted by
    assert fresh["verify_s"] != stale["verify_s"] and done["new_verify_1_s"] == fresh["verify_s"]["1"]
    assert rep["budget"]["costs"]["verify_s"] == fresh["verify_s"]
    assert rep["budget"]["cost_check"]["modelled_step_s"] == fresh["verify_s"]["1"]
    assert "costs      the cached cost model priced a 1-token target forward at" in res.output
