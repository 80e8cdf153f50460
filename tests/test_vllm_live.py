"""Real vLLM engines on the real SmolLM2 (vLLM's CPU build here and in CI, fp32, eager): extraction through the
project's connector against the HF backend; both trained heads (from the shared store, whose EAGLE-3 features are
projected) served by vLLM's speculative decoding against vLLM's own greedy output and against the project's HF
evaluator on the same prompts, verification forward for forward; regeneration against the HF backend.

Engine start-ups dominate (about a minute each on 2 cores): four engines (the extraction engine, the plain
baseline, one per head, the regeneration engine) plus the HF runs. Skipped without vllm, failed instead where CI
requires it."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import LIVE_REPORT, build_store, require_vllm
from safetensors import safe_open

require_vllm()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default (4) is more than needed here

from vllm_replay import compare_stores  # noqa: E402

from pipeline.cli import main as cli  # noqa: E402
from pipeline.store import StoreReader, verify_store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LIMIT, MAX_LEN, K, SHARD = 6, 256, 8, 3
DEPTH, NEW_TOKENS, QUESTIONS = 3, 48, (81, 82, 83)
REGEN_RECORDS, REGEN_TOKENS = 3, 32
# fp32 both sides; vLLM's CPU kernels (attention, fused norms) round differently from PyTorch eager.
HIDDEN_TOL = 2e-3  # atol and rtol per value
LOGPROB_TOL = 2e-3  # absolute, per top-k log-probability; ids must agree except between values this close


@pytest.fixture(scope="module")
def stores(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-stores")
    # whole fp32 features and log-probs: the two backends' values are compared, not a layout
    hf = build_store(smollm2_dir, root / "hf", limit=LIMIT, max_length=MAX_LEN, top_k=K, shard_size=SHARD,
                     hidden_dtype="float32", compute_dtype="float32", logprob_dtype="float32", codec="none",
                     aux_projection=None)  # fmt: skip
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["extract", "--backend", "vllm", "--model", str(smollm2_dir), "--out",
                                   str(root / "vllm"), "--limit", str(LIMIT), "--max-length", str(MAX_LEN),
                                   "--top-k", str(K), "--shard-size", str(SHARD), "--hidden-dtype", "fp32",
                                   "--logprob-dtype", "fp32", "--codec", "none", "--aux-projection", "none",
                                   "--dtype", "fp32", "--enforce-eager", "--no-progress", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.rindex('{\n  "store"'):])  # vLLM's log lines come first
    LIVE_REPORT.append(f"vllm live: extract --backend vllm of {summary['samples_written']} samples / "
                       f"{summary['tokens']} tokens took {time.perf_counter() - start:.0f} s (engine start-up incl.)")
    return hf, root / "vllm", summary


def test_vllm_extraction_matches_the_hf_store(stores):
    hf, vl, summary = stores
    assert summary["backend"] == "vllm" and summary["samples_written"] >= LIMIT - 1
    assert verify_store(vl) == []
    a, b = StoreReader(hf), StoreReader(vl)
    assert (a.fingerprint["backend"], b.fingerprint["backend"]) == ("hf", "vllm")
    assert a.fingerprint["model"] == b.fingerprint["model"]  # same weights, config and compute dtype (fp32)
    wa, wb = a.target_weights(), b.target_weights()
    assert all(wb[k].dtype == torch.float32 and torch.equal(wa[k], wb[k]) for k in wa)  # checkpoint precision

    worst = {"hidden_last": 0.0, "hidden_aux": 0.0, "max_abs": 0.0, "logprob": 0.0}
    ties = 0
    assert len(a) == len(b)
    for i in range(len(a)):
        sa, sb = a.sample(i), b.sample(i)
        assert torch.equal(sa["input_ids"], sb["input_ids"]) and torch.equal(sa["loss_mask"], sb["loss_mask"])
        for name in ("hidden_last", "hidden_aux"):
            x, y = sa[name].float(), sb[name].float()
            worst[name] = max(worst[name], float((x - y).norm() / x.norm()))  # relative, Frobenius
            worst["max_abs"] = max(worst["max_abs"], float((x - y).abs().max()))
        worst["logprob"] = max(worst["logprob"], float((sa["topk_logprobs"] - sb["topk_logprobs"]).abs().max()))
        ties += int((sa["topk_ids"] != sb["topk_ids"]).sum())
    # ids, masks equal above; values within tolerance; top-k ids equal except near ties (compare_stores checks it)
    assert compare_stores(hf, vl, atol=HIDDEN_TOL, rtol=HIDDEN_TOL, logprob_atol=LOGPROB_TOL) == []
    LIVE_REPORT.append(f"vllm live: vLLM vs HF store, {len(a)} samples: hidden_last {worst['hidden_last']:.2g} / "
                       f"hidden_aux {worst['hidden_aux']:.2g} relative (Frobenius), max |diff| "
                       f"{worst['max_abs']:.2g}; top-k log-prob max |diff| {worst['logprob']:.2g}; "
                       f"{ties} top-k id slots swapped (near ties)")  # fmt: skip


@pytest.fixture(scope="module")
def heads(smollm2_runs, tmp_path_factory):
    from pipeline.train.variants import export_run

    root = tmp_path_factory.mktemp("live-heads")
    heads = {v: export_run(run, root / v, "vllm", "final", torch.float32)[0] for v, (run, _) in smollm2_runs.items()}
    # EAGLE-3 trained on the projected store (k = P's rows read as fc·Pᵀ) and served folded: fc·PᵀP reads 3H values
    trained = json.loads((smollm2_runs["eagle3"][0] / "final" / "draft.json").read_text())["draft"]["config"]
    with safe_open(str(heads["eagle3"] / "model.safetensors"), "pt") as f:
        served = f.get_slice("fc.weight").get_shape()
    h = trained["hidden_size"]
    assert 0 < trained["aux_projection_dim"] < 3 * h and served == [h, 3 * h]
    return heads


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from pipeline.assets import mtbench_path

    rows = [json.loads(line) for line in mtbench_path().read_text().splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("live-prompts") / "mt-bench-first-turns.jsonl"
    path.write_text("".join(json.dumps({"id": r["question_id"], "prompt": r["turns"][0]}) + "\n"
                            for r in rows if r["question_id"] in QUESTIONS))  # fmt: skip
    return path


def test_heads_served_by_vllm_match_its_greedy_output_and_the_hf_evaluator(heads, prompts_file, smollm2_dir, tmp_path):
    from pipeline.evaluate.cli import evaluate
    from pipeline.evaluate.prompts import load_conversations
    from pipeline.evaluate.report import write_report
    from pipeline.evaluate.vllm_engine import engine_options, evaluate_vllm

    order = ["eagle1", "eagle3"]
    reports = evaluate_vllm([heads[v] for v in order], target_dir=smollm2_dir,
                            conversations=load_conversations(prompts=prompts_file), depth=DEPTH,
                            max_new_tokens=NEW_TOKENS, options=engine_options(dtype="float32", enforce_eager=True),
                            progress=False)  # fmt: skip
    for variant, rv in zip(order, reports, strict=True):
        write_report(rv, tmp_path / f"{variant}-vllm.json")  # the HF evaluator's files, PNG included
        c = rv["vllm"]["counters"]
        # loaded and served: it drafted DEPTH tokens per verification, and greedy stayed lossless
        assert rv["mismatches"] == 0 and rv["turns"] == len(QUESTIONS)
        assert c["drafts"] > 0 and c["draft_tokens"] == DEPTH * c["drafts"] == rv["target_forwards"] * DEPTH
        assert len(c["accepted_per_pos"]) == DEPTH and c["accepted"] == sum(c["accepted_per_pos"])
        assert rv["acceptance_length"] is not None and rv["vllm"]["mean_acceptance_length"] >= 1.0

        # vLLM drafts DEPTH tokens every step: the HF evaluator's fixed policy, no extra baselines
        rh, _, _ = evaluate(heads[variant], model=smollm2_dir, prompts=prompts_file, depth=DEPTH,
                            max_new_tokens=NEW_TOKENS, device="cpu", report_path=tmp_path / f"{variant}-hf.json",
                            policy="fixed", baselines=(), progress=False)  # fmt: skip
        assert rh["mismatches"] == 0
        # vLLM's plain greedy and HF's plain greedy answer the same prompts with the same tokens
        same = sum(a["new_tokens"] == b["new_tokens"] and a["text"] == b["text"]
                   for a, b in zip(rv["prompts"], rh["prompts"], strict=True))  # fmt: skip
        assert same == len(QUESTIONS)
        fv, fh = rv["target_forwards"], rh["target_forwards"]
        turns_v, turns_h = ([r["target_forwards"] for r in rep["prompts"]] for rep in (rv, rh))
        LIVE_REPORT.append(
            f"vllm live: {variant} depth {DEPTH}, MT-bench q{QUESTIONS[0]}-{QUESTIONS[-1]} first turns, "
            f"{NEW_TOKENS} tokens: vLLM {fv} drafts / {c['accepted']} accepted (per position "
            f"{c['accepted_per_pos']}), tau {rv['acceptance_length']:.3f}; HF evaluator {fh} verification forwards, "
            f"accepted per position {rh['per_position_accepted']}, tau {rh['acceptance_length']:.3f}; forwards per turn "
            f"{turns_v} (vLLM) vs {turns_h}; "
            f"engine start-up {rv['vllm']['startup_s']:.0f} s")  # fmt: skip
        # Step for step: every turn took the same verification forwards in both evaluators (the same tokens, so
        # the same accepted drafts). Per position, vLLM's counters may keep one draft accepted in a turn's last
        # step whose token max_tokens cuts (README), so those are reported, not asserted equal.
        assert turns_v == turns_h and fv == fh, (variant, turns_v, turns_h)


def test_regenerate_with_vllm_equals_the_hf_backend(smollm2_dir, tmp_path):
    """`pipeline regenerate --backend vllm` on real multi-turn ShareGPT records through the CLI (defaults: fp32 and
    eager on the CPU build): greedy, the same answers as the HF backend, turn by turn."""
    outs, facts = {}, {}
    for backend in ("hf", "vllm"):
        outs[backend] = tmp_path / f"{backend}.jsonl"
        start = time.perf_counter()
        res = CliRunner().invoke(cli, ["regenerate", "--model", str(smollm2_dir), "--out", str(outs[backend]),
                                       "--limit", str(REGEN_RECORDS), "--max-new-tokens", str(REGEN_TOKENS),
                                       "--max-length", "1024", "--backend", backend, "--no-progress", "--json"])  # fmt: skip
        assert res.exit_code == 0, res.output
        facts[backend] = (json.loads(res.output[res.output.rindex('{\n  "out"'):]), time.perf_counter() - start)
    rows = {b: [json.loads(line) for line in p.read_text().splitlines()] for b, p in outs.items()}
    assert [r["id"] for r in rows["hf"]] == [r["id"] for r in rows["vllm"]] and len(rows["hf"]) == REGEN_RECORDS
    assert {r["regenerated_by"]["dtype"] for r in rows["vllm"]} == {"float32"}
    summary = facts["vllm"][0]
    assert summary["backend"] == "vllm" and summary["turns_generated"] == facts["hf"][0]["turns_generated"] > 0
    for a, b in zip(rows["hf"], rows["vllm"], strict=True):
        assert a["messages"] == b["messages"], a["id"]  # every generated turn, and so every later prompt
    LIVE_REPORT.append(f"vllm live: regenerate {REGEN_RECORDS} records / {summary['turns_generated']} turns / "
                       f"{summary['new_tokens']} new tokens: vLLM {facts['vllm'][1]:.0f} s (engine start-up incl.), "
                       f"HF {facts['hf'][1]:.0f} s; identical greedy answers")  # fmt: skip
