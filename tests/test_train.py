"""The DeepSpeed trainer: runs, refusals, exact kill/resume, two gloo ranks, export round trip, real SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import want_optional

from pipeline import store as st
from pipeline.draft.export import load_export
from pipeline.train.loader import collate, pack_samples
from pipeline.train.metrics import read_metrics
from pipeline.train.trainer import TrainConfig, TrainError, train
from pipeline.train.variants import load_run, required_fields

FAST = dict(tokens_per_batch=512, lr=3e-3, progress=False)
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu")


def cli_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--feats", str(store), "--out", str(out),
            "--tokens-per-batch", "512", "--lr", "3e-3", "--no-progress", *extra]  # fmt: skip


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run) if r["kind"] == "train"]


def store_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_eagle1_run_writes_its_directory_and_never_the_store(tiny_store, tmp_path):
    before = store_snapshot(tiny_store)
    a = train(TrainConfig(feats=str(tiny_store), out=str(tmp_path / "a"), max_steps=12, val_fraction=0.2,
                          eval_every=6, **FAST))  # fmt: skip
    b = train(TrainConfig(feats=str(tiny_store), out=str(tmp_path / "b"), max_steps=12, seed=1,
                          **dict(FAST, lr=1e-3)))  # fmt: skip  a second run on the same store
    assert store_snapshot(tiny_store) == before
    for run, summary in ((tmp_path / "a", a), (tmp_path / "b", b)):
        record = json.loads((run / "config.json").read_text())
        assert record["store_fingerprint_digest"] == st.StoreReader(tiny_store).digest
        assert record["code_version"] and record["train"]["lr"] in (3e-3, 1e-3)
        assert (run / "curves.png").stat().st_size > 10_000 and (run / "final" / "model.safetensors").exists()
        assert summary["last"]["loss"] < summary["first"]["loss"]
        trained = [r for r in read_metrics(run) if r["kind"] == "train"]
        assert len(trained) == 12 and {"loss", "vloss", "ploss", "acc", "lr", "tokens_per_s",
                                       "loader_wait_s"} <= set(trained[0])  # fmt: skip
    val = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [6, 12] and all(r["tau"] >= 1 for r in val)
    assert (tmp_path / "a" / "best" / "model.safetensors").exists()


def test_eagle3_topk_and_full_targets(tiny_store, tmp_path):
    for target in ("topk", "full"):
        s = train(TrainConfig(feats=str(tiny_store), out=str(tmp_path / target), variant="eagle3", max_steps=8,
                              draft_vocab_size=2048, ttt_steps=3, target=target, **FAST))  # fmt: skip
        assert s["last"]["loss"] < s["first"]["loss"]
        assert {"acc_0", "acc_1", "acc_2", "loss_2"} <= set(s["last"])
    record = json.loads((tmp_path / "topk" / "config.json").read_text())
    assert 0.9 < record["draft"]["draft_vocab_coverage"] <= 1.0


def test_refusals_name_the_problem(tiny_store, tiny_llama_dir, tmp_path):
    from conftest import build_store

    only3 = build_store(tiny_llama_dir, tmp_path / "e3", limit=4, max_length=64, top_k=4, stored_for="eagle3")
    with pytest.raises(st.StoreError, match="needs hidden_last"):
        train(TrainConfig(feats=str(only3), out=str(tmp_path / "r1"), max_steps=1, **FAST))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_store, broken)
    victim = next((broken / "shards" / "shard-00001" / "tensors" / "input_ids" / "c").rglob("*"))
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    assert st.verify_store(broken)  # records the failure in verify.arrow
    with pytest.raises(st.StoreError, match="last `pipeline verify` failed"):
        train(TrainConfig(feats=str(broken), out=str(tmp_path / "r2"), max_steps=1, **FAST))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_store, partial)
    shutil.rmtree(partial / "shards" / "shard-00000")
    with pytest.raises(st.StoreError, match="shards not committed: 0"):
        train(TrainConfig(feats=str(partial), out=str(tmp_path / "r3"), max_steps=1, **FAST))
    run = tmp_path / "r4"
    train(TrainConfig(feats=str(tiny_store), out=str(run), max_steps=2, save_every=1, **FAST))
    (run / "summary.json").unlink()  # pretend it was interrupted, then change the recipe
    with pytest.raises(TrainError, match="lr: run has 0.003, now 0.01"):
        train(TrainConfig(feats=str(tiny_store), out=str(run), max_steps=2, **dict(FAST, lr=1e-2)))


def test_compressed_fp8_store_trains_with_the_window_shuffle(tiny_llama_dir, tmp_path):
    from conftest import build_store

    store = build_store(tiny_llama_dir, tmp_path / "fp8", limit=20, max_length=128, top_k=8, shard_size=10,
                        codec="zstd", hidden_dtype="float8_e4m3fn", logprob_dtype="float16", chunk_tokens=256)  # fmt: skip
    run = tmp_path / "run"
    s = train(TrainConfig(feats=str(store), out=str(run), max_steps=6, save_every=3, **FAST))
    record = json.loads((run / "config.json").read_text())
    info = next(r for r in read_metrics(run) if r["kind"] == "info")
    assert record["train"]["shuffle"] == "window" and info["shuffle"] == "window" and info["loader_cache_bytes"] > 0
    assert s["last"]["loss"] < s["first"]["loss"]
    # a run recorded before the shuffle option existed used the global shuffle: resuming it says so
    (run / "summary.json").unlink()
    for key in ("shuffle", "shuffle_window"):
        record["train"].pop(key)
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(TrainError, match="shuffle: run has 'global', now 'window'"):
        train(TrainConfig(feats=str(store), out=str(run), max_steps=6, **FAST))


def test_kill_and_resume_is_exact(tiny_store, tmp_path):
    args = ["--max-steps", "8", "--save-every", "4", "--val-fraction", "0.2", "--eval-every", "4"]
    whole = tmp_path / "whole"
    subprocess.run(cli_args(tiny_store, whole, *args), env=ENV, check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cli_args(tiny_store, cut, *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "step4"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == "step4" and not (cut / "summary.json").exists()
    resumed = subprocess.run(cli_args(tiny_store, cut, *args, "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 5-8 of a resumed run" in resumed.stdout and "(step 5) ->" in resumed.stdout
    assert losses(cut) == losses(whole) and len(losses(whole)) == 8
    assert losses(cut, "lr") == losses(whole, "lr")
    assert [r["tau"] for r in read_metrics(cut) if r["kind"] == "val"] == [
        r["tau"] for r in read_metrics(whole) if r["kind"] == "val"]  # fmt: skip
    a, b = load_run(whole)[0].state_dict(), load_run(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_ranks_with_zero2(tiny_store, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pipeline.cli", "train", "--feats", str(tiny_store), "--out", str(out), "--variant", "eagle3",
           "--max-steps", "4", "--zero-stage", "2", "--tokens-per-batch", "512", "--draft-vocab-size", "2048",
           "--ttt-steps", "2", "--save-every", "2", "--no-progress"]  # fmt: skip
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    record = json.loads((out / "config.json").read_text())
    assert record["deepspeed"]["zero_optimization"]["stage"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step2", "step4"]
    assert all(torch.isfinite(torch.tensor(losses(out))))


def test_export_reloads_identically(tiny_whole_store, tmp_path):
    """Bit for bit on whole features (a projected store's head is checked against its folded export, up to
    rounding, in tests/test_projection.py)."""
    from click.testing import CliRunner

    from pipeline.cli import main as cli

    tiny_store = tiny_whole_store
    reader = st.StoreReader(tiny_store)
    for variant, fmt in (("eagle1", "vllm"), ("eagle3", "vllm"), ("eagle3", "speculators")):
        run = tmp_path / variant
        if not run.exists():
            train(TrainConfig(feats=str(tiny_store), out=str(run), variant=variant, max_steps=2,
                              draft_vocab_size=2048, ttt_steps=2, **FAST))  # fmt: skip
        out = tmp_path / f"{variant}-{fmt}"
        res = CliRunner().invoke(cli, ["export", str(run), "--format", fmt, "--out", str(out), "--dtype", "fp32"])
        assert res.exit_code == 0, res.output
        trained, _ = load_run(run)
        exported, meta = load_export(out)
        cfg = TrainConfig(feats=str(tiny_store), out="", variant=variant)
        batch = collate(reader, pack_samples(reader.lengths, range(4), 512)[0], required_fields(cfg), 512)
        from pipeline.train import variants

        with torch.no_grad():
            a = variants.evaluate(cfg, trained, batch, variants.build(cfg, reader)[1])
            b = variants.evaluate(cfg, exported, batch, variants.build(cfg, reader)[1])
        assert a == b
        assert CliRunner().invoke(cli, ["export", str(run), "--out", str(out)]).exit_code != 0  # never overwrites


@pytest.mark.slow
def test_real_smollm2_eagle1_and_eagle3_from_one_store(smollm2_runs, smollm2_store, tmp_path):
    e1, e3 = smollm2_runs["eagle1"][1], smollm2_runs["eagle3"][1]
    assert e1["last"]["loss"] < e1["first"]["loss"] and e1["last"]["acc"] > e1["first"]["acc"] + 0.1
    assert e3["last"]["loss"] < e3["first"]["loss"] and e3["last"]["acc_0"] > e3["first"]["acc_0"] + 0.1
    record1 = json.loads((smollm2_runs["eagle1"][0] / "config.json").read_text())
    record3 = json.loads((smollm2_runs["eagle3"][0] / "config.json").read_text())
    assert record1["store_fingerprint_digest"] == record3["store_fingerprint_digest"]  # one extraction, two heads
    # EAGLE-3 trained on the projected store; the speculators package's loader of its export (fc·PᵀP folded,
    # whole features in) gives the head's logits on the store's projected rows, step by step
    model, _ = load_run(smollm2_runs["eagle3"][0])
    reader = st.StoreReader(smollm2_store)
    assert model.aux_projection is not None and torch.equal(model.aux_projection, reader.projection())
    if not want_optional("speculators", "PIPELINE_REQUIRE_SPECULATORS"):
        return
    from pipeline.draft.export import export_draft
    from pipeline.draft.speculators_check import compare_logits, load_with_speculators

    theirs = load_with_speculators(export_draft(model, None, tmp_path / "spec", "speculators", dtype=torch.float32))
    sample, n = reader.sample(0), 128
    row = {"input_ids": sample["input_ids"][:n].long()[None], "loss_mask": sample["loss_mask"][:n].float()[None],
           "position_ids": torch.arange(n)[None], "doc_ids": torch.zeros(1, n, dtype=torch.long),
           "hidden_aux": sample["hidden_aux"][:n].float()[None]}  # fmt: skip
    for step in compare_logits(model.float(), theirs, row, steps=3):
        assert step["rel_diff"] < 1e-4 and step["argmax_agree"] == 1.0, step


def test_dynamic_rope_targets_train_only_within_their_exact_length(smollm2_tokenizer, tmp_path):
    """transformers switches dynamic/longrope frequencies beyond the original length with the forward's length;
    the draft does not, so a store with longer samples is refused, naming the rope type; shorter ones train."""
    from conftest import build_store
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.draft.layers import rope_exact_length

    assert rope_exact_length({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) is None
    assert rope_exact_length({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                               "long_factor": [2.0] * 4, "original_max_position_embeddings": 32},
                              "rope_theta": 1e4, "max_position_embeddings": 128, "hidden_size": 64,
                              "num_attention_heads": 8}) == ("longrope", 32)  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "dynamic"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    long = build_store(model_dir, tmp_path / "long", limit=3, max_length=64, top_k=4)
    assert int(st.StoreReader(long).lengths.max()) > 48
    with pytest.raises(TrainError, match="rope_type 'dynamic' .* longer than 48 tokens.*--max-length 48"):
        train(TrainConfig(feats=str(long), out=str(tmp_path / "r-long"), max_steps=1, **FAST))
    short = build_store(model_dir, tmp_path / "short", limit=3, max_length=48, top_k=4)
    s = train(TrainConfig(feats=str(short), out=str(tmp_path / "r-short"), max_steps=1, **FAST))
    assert s["steps"] == 1


def test_compiled_layers_train_with_the_eager_losses(tiny_store, tmp_path):
    """``--compile`` (torch.compile of the layers' attention-free blocks) is the same function of the data: the
    first steps' losses of the compiled and the eager path agree within floating-point tolerance."""
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        train(TrainConfig(feats=str(tiny_store), out=str(out), variant="eagle3", max_steps=3, ttt_steps=2,
                          draft_vocab_size=64, compile_layers=compiled, **FAST))  # fmt: skip
        runs[compiled] = losses(out)
    assert counters["stats"]["unique_graphs"] >= 2  # both blocks went through torch.compile
    assert len(runs[True]) == 3 and runs[True] != [0.0] * 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)


def test_one_writer_per_run_directory(tiny_store, tmp_path):
    from pipeline.locks import FileLock

    run = tmp_path / "held"
    other = FileLock(run / ".train.lock")  # another writer (a lock conflicts within one process too)
    assert other.acquire(blocking=False)
    with pytest.raises(TrainError, match=rf"being written by another `pipeline train` \(pid {os.getpid()} on "):
        train(TrainConfig(feats=str(tiny_store), out=str(run), max_steps=1, **FAST))
    assert sorted(p.name for p in run.iterdir()) == [".train.lock"]  # the refused run wrote nothing
    other.release()
    s = train(TrainConfig(feats=str(tiny_store), out=str(run), max_steps=1, **FAST))
    assert s["steps"] == 1 and FileLock(run / ".train.lock").is_free()  # released when the run ends


def test_full_disk_while_saving_is_one_line_and_the_run_resumes(tiny_store, tmp_path, monkeypatch):
    """A full disk while training writes final/ (safetensors) or a checkpoint (torch's zip writer): one `error:`
    line naming the file, exit 2, nothing half written kept; the run resumes from a moved store (same
    fingerprint) and ends as a run that never failed."""
    import safetensors.torch
    from click.testing import CliRunner
    from safetensors import SafetensorError

    from pipeline.cli import main as cli
    from pipeline.train import rundir

    store = tmp_path / "store-a"
    shutil.copytree(tiny_store, store)
    run = tmp_path / "run"
    args = ["train", "--feats", str(store), "--out", str(run), "--tokens-per-batch", "512", "--lr", "3e-3",
            "--max-steps", "4", "--save-every", "2", "--no-progress"]  # fmt: skip

    def full_save(*a, **k):
        Path(a[1]).write_bytes(b"\0" * 100)  # what a full disk leaves: a partial file
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")  # fmt: skip

    monkeypatch.setattr(safetensors.torch, "save_file", full_save)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {run / 'final' / 'model.safetensors'}: saving the final/ weights failed: "
                                "No space left on device; free space on that file system, then re-run the same "
                                "`pipeline train` command"), lines[-1]  # fmt: skip
    assert not list(run.glob("final*")) and not (run / "summary.json").exists()
    monkeypatch.undo()

    (run / "final.tmp-999999").mkdir()  # what a writer killed while saving final/ leaves
    (run / "final.tmp-999999" / "model.safetensors").write_bytes(b"\0" * 4096)
    moved = tmp_path / "store-b"
    store.rename(moved)
    args[2] = str(moved)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "moved since the run started" in res.stdout and "cleaned          1 temporary file(s)" in res.stdout
    assert not (run / "final.tmp-999999").exists() and (run / "final" / "model.safetensors").exists()
    whole = tmp_path / "whole"
    train(TrainConfig(feats=str(tiny_store), out=str(whole), max_steps=4, save_every=2, **FAST))
    assert losses(run) == losses(whole)
    a, b = load_run(whole)[0].state_dict(), load_run(run)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def full_torch_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1180")

    monkeypatch.setattr(torch, "save", full_torch_save)
    monkeypatch.setattr(rundir, "_free_bytes", lambda path: 0)
    run2 = tmp_path / "run2"
    args[4] = str(run2)
    res = CliRunner().invoke(cli, args)
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: {run2 / 'checkpoints' / 'step2'}: saving checkpoint step2 failed: No space left on device; free "
        "space on that file system")  # fmt: skip
