"""Extraction end to end: tiny random Llama for exactness and process tests, real SmolLM2 for the real path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline import store as st
from pipeline.cli import main as cli
from pipeline.extract.runner import ExtractConfig, run_extract

# The format-2 layout (whole features, bf16, fp32 log-probs, no codec): what these tests compare against the forward
# bit for bit; the compact default (projection, fp8, zstd) is tested in tests/test_projection.py.
WHOLE_BF16 = dict(hidden_dtype="bfloat16", logprob_dtype="float32", codec="none", aux_projection=None)


def extract(model, out, **kw) -> dict:
    cfg = ExtractConfig(out=Path(out), model=str(model), progress=False, **{**WHOLE_BF16, **kw})
    return run_extract(cfg)


def tensor_checksums(root: Path) -> dict[tuple[int, str], str]:
    """sha256 of every tensor chunk of every shard, from the commit records."""
    out = {}
    for shard in sorted((root / "shards").glob("shard-*")):
        rows = st._read_arrow(shard / st.COMMIT_FILE).to_pylist()
        for r in rows:
            if r["path"].startswith("tensors/") and not r["path"].endswith("zarr.json"):
                out[(int(shard.name.split("-")[1]), r["path"])] = r["sha256"]
    return out


def reference_forward(model_dir: Path, ids: torch.Tensor):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=ids[None].long(), output_hidden_states=True)


def check_against_single_forward(root: Path, model_dir: Path, n: int, atol: float) -> None:
    reader = st.StoreReader(root)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    aux = reader.aux_layers
    for i in range(min(n, len(reader))):
        s = reader.sample(i)
        with torch.inference_mode():
            out = model(input_ids=s["input_ids"][None].long(), output_hidden_states=True)
        hs = out.hidden_states
        dt = st.HIDDEN_DTYPES[reader.hidden_dtype][1]
        # the store holds fp32 activations cast once to the storage dtype: compare in that dtype's precision
        ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dt]
        for got, ref in [(s["hidden_last"], hs[-1][0])] + [(s["hidden_aux"][:, j], hs[a][0]) for j, a in enumerate(aux)]:
            tol = atol + ulp * ref.abs()
            assert ((got.float() - ref).abs() <= tol).all(), f"sample {i}: {(got.float() - ref).abs().max()}"
        lp = torch.log_softmax(out.logits[0].float(), -1)
        v, j = lp.topk(reader.fingerprint["top_k"], -1)
        torch.testing.assert_close(s["topk_logprobs"], v, atol=atol * 10, rtol=0)
        # ids may swap only between (near-)tied log-probs
        mismatch = s["topk_ids"].long() != j
        gap = (lp.gather(-1, s["topk_ids"].long()) - v).abs()[mismatch]
        assert gap.numel() == 0 or gap.max() < atol * 10


def test_store_matches_single_sample_forward(tiny_llama_dir, tmp_path):
    summary = extract(tiny_llama_dir, tmp_path / "f32", limit=10, max_length=96, hidden_dtype="float32", top_k=8,
                      shard_size=4, batch_tokens=300)
    assert summary["samples_written"] > 5
    check_against_single_forward(tmp_path / "f32", tiny_llama_dir, n=10, atol=2e-5)
    extract(tiny_llama_dir, tmp_path / "bf16", limit=10, max_length=96, top_k=8, shard_size=4, batch_tokens=300)
    check_against_single_forward(tmp_path / "bf16", tiny_llama_dir, n=10, atol=2e-5)
    r = st.StoreReader(tmp_path / "bf16")
    assert r.aux_layers == [2, 4, 5]  # {2, N//2, N-3} for the 8-layer test model
    w = r.target_weights()
    assert set(w) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    assert (r.tokenizer_dir / "tokenizer.json").exists()


def test_seeded_reruns_are_bit_identical_and_worker_count_free(tiny_llama_dir, tmp_path):
    kw = dict(limit=14, max_length=80, top_k=8, shard_size=3, batch_tokens=200)
    extract(tiny_llama_dir, tmp_path / "a", **kw)
    extract(tiny_llama_dir, tmp_path / "b", **kw)
    a = tensor_checksums(tmp_path / "a")
    assert a and a == tensor_checksums(tmp_path / "b")
    # two workers into one directory, one after the other (they never talk to each other)
    s1 = extract(tiny_llama_dir, tmp_path / "w", rank=1, world_size=2, **kw)
    with pytest.raises(st.StoreError, match="incomplete"):
        st.StoreReader(tmp_path / "w")
    s0 = extract(tiny_llama_dir, tmp_path / "w", rank=0, world_size=2, **kw)
    assert (s0["shards"]["written"], s1["shards"]["written"]) == (3, 2)
    assert tensor_checksums(tmp_path / "w") == a
    assert st.verify_store(tmp_path / "w") == []
    # re-running a finished extraction writes nothing
    again = extract(tiny_llama_dir, tmp_path / "w", **kw)
    assert again["shards"]["written"] == 0 and again["shards"]["already_committed"] == 5


def test_mismatched_rerun_is_refused(tiny_llama_dir, tmp_path):
    extract(tiny_llama_dir, tmp_path / "s", limit=4, max_length=64, top_k=8)
    with pytest.raises(st.StoreError) as e:
        extract(tiny_llama_dir, tmp_path / "s", limit=4, max_length=64, top_k=16, hidden_dtype="float16")
    assert "top_k" in str(e.value) and "dtypes.hidden" in str(e.value)


def test_stores_only_what_the_variant_needs(tiny_llama_dir, tmp_path):
    extract(tiny_llama_dir, tmp_path / "e1", limit=3, max_length=64, top_k=4, stored_for="eagle1")
    extract(tiny_llama_dir, tmp_path / "e3", limit=3, max_length=64, top_k=4, stored_for="eagle3", aux_layers=[1, 3])
    assert st.StoreReader(tmp_path / "e1").has == {"input_ids", "loss_mask", "topk_ids", "topk_logprobs", "hidden_last"}
    r3 = st.StoreReader(tmp_path / "e3")
    assert "hidden_last" not in r3.has and r3.aux_layers == [1, 3]
    assert r3.sample(0)["hidden_aux"].shape[1:] == (2, 64)


def test_kill_and_resume_gives_identical_tensors(tiny_llama_dir, tmp_path):
    args = ["--model", str(tiny_llama_dir), "--limit", "30", "--max-length", "200", "--top-k", "8",
            "--shard-size", "2", "--batch-tokens", "256", "--no-progress"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "--out", str(killed), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    shards = killed / "shards"
    while time.time() < deadline:  # kill once a shard is committed and another one is half written
        if shards.exists() and list(shards.glob("shard-*")) and list(shards.glob(".tmp-shard-*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20  # its tokenizer worker processes die with it
    while time.time() < deadline and _processes_mentioning(str(killed)):
        time.sleep(0.1)
    assert not _processes_mentioning(str(killed))
    committed = len(list(shards.glob("shard-*")))
    assert 0 < committed < 15, committed
    assert list(shards.glob(".tmp-shard-*"))  # the crash left a half-written shard behind
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--out", str(killed), "--json", *args],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
    summary = json.loads(resumed.stdout)
    assert summary["shards"]["already_committed"] >= committed and summary["shards"]["written"] == 15 - summary["shards"]["already_committed"]
    assert not list(shards.glob(".tmp-shard-*"))
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--out", str(clean), *args], env=env,
                   check=True, capture_output=True)  # fmt: skip
    assert tensor_checksums(killed) == tensor_checksums(clean)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_malformed_inputs_are_counted(tiny_llama_dir, tmp_path):
    good = {"id": "g1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"}]}
    records = [
        json.dumps(good).encode(),
        json.dumps({"id": "u1", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}).encode(),
        json.dumps({"id": "e1", "conversations": []}).encode(),
        b'{"id": "b1", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "ok"}]}',
        json.dumps({"id": "m1"}).encode(),
        json.dumps({"id": "n1", "conversations": [{"from": "human", "value": "only a question"}]}).encode(),
        json.dumps(dict(good, id="g2")).encode(),
    ]
    path = tmp_path / "bad.json"
    path.write_bytes(b"[" + b",\n".join(records) + b',\n{"id": "t1", "conversations": [{"from": "hu')
    summary = extract(tiny_llama_dir, tmp_path / "s", data=str(path), max_length=64, top_k=4)
    assert summary["samples_written"] == 2
    assert summary["skipped"] == {"empty_conversation": 1, "invalid_utf8": 1, "missing_field": 1,
                                  "no_assistant_turn": 1, "unknown_role": 1}  # fmt: skip
    assert summary["source"]["truncated"] and summary["source"]["records_seen"] == 7
    commit = st.StoreReader(tmp_path / "s").shards[0].stats
    unknown = [r for r in commit["skipped_records"] if r["reason"] == "unknown_role"][0]
    assert "bad.json" in unknown["detail"] and "u1" in unknown["detail"] and "robot" in unknown["detail"]


def test_fp8_zstd_extraction_and_convert_agree(tiny_llama_dir, tmp_path):
    """`extract --hidden-dtype fp8 --codec zstd --logprob-dtype fp16` and `convert` of an fp32 extraction write the
    same bytes (quantized from the same fp32 forward), `inspect --json` names the dtype, and precision only goes
    down."""
    kw = dict(limit=6, max_length=96, top_k=8, shard_size=3)
    extract(tiny_llama_dir, tmp_path / "fp32", hidden_dtype="float32", **kw)
    extract(tiny_llama_dir, tmp_path / "fp8", hidden_dtype="float8_e4m3fn", codec="zstd", logprob_dtype="float16",
            **kw)  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(tmp_path / "fp32"), "--out", str(tmp_path / "conv"), "--hidden-dtype",
                              "fp8", "--codec", "zstd", "--logprob-dtype", "fp16", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    direct, conv = st.StoreReader(tmp_path / "fp8"), st.StoreReader(tmp_path / "conv")
    assert direct.digest == conv.digest and direct.fields["topk_ids"][1] == "uint16"
    assert tensor_checksums(tmp_path / "fp8") == tensor_checksums(tmp_path / "conv")
    info = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / "fp8"), "--json"]).output)
    assert info["hidden_dtype"] == "float8_e4m3fn" and info["format_version"] == st.FORMAT_VERSION and info["codec"] == "zstd"
    assert 0 < info["bytes_per_token_total"] < st.inspect_store(tmp_path / "fp32")["bytes_per_token_total"] / 3
    res = runner.invoke(cli, ["convert", str(tmp_path / "fp8"), "--out", str(tmp_path / "up"), "--hidden-dtype",
                              "bf16"])  # fmt: skip
    assert res.exit_code == 2 and "float8_e4m3fn" in res.output and "re-extract" in res.output
    assert not (tmp_path / "up").exists()


def test_cli_inspect_and_verify(tiny_llama_dir, tmp_path):
    out = tmp_path / "s"
    runner = CliRunner()
    res = runner.invoke(cli, ["extract", "--model", str(tiny_llama_dir), "--out", str(out), "--limit", "6",
                              "--max-length", "64", "--top-k", "4", "--shard-size", "3", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "samples written" in res.output and "B/token" in res.output
    res = runner.invoke(cli, ["inspect", str(out), "--json"])
    info = json.loads(res.output)
    assert {"samples", "tokens", "loss_tokens", "bytes", "shards", "fingerprint"} <= set(info)
    assert info["complete"] and len(info["shards"]) == 2
    res = runner.invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 0 and "hidden_aux" in res.output and "B/token" in res.output
    assert runner.invoke(cli, ["verify", str(out)]).exit_code == 0
    victim = sorted((out / "shards" / "shard-00001" / "tensors" / "topk_ids").rglob("0"))[-1]
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 1 and "shard-00001" in res.output and "topk_ids" in res.output
    assert "shard-00000" not in res.output


@pytest.mark.slow
def test_real_smollm2_on_real_sharegpt(smollm2_dir, tmp_path):
    summary = extract(smollm2_dir, tmp_path / "s", limit=6, max_length=160, shard_size=3)
    assert summary["samples_written"] >= 4 and summary["loss_tokens"] > 0
    assert st.verify_store(tmp_path / "s") == []
    info = st.inspect_store(tmp_path / "s")
    assert info["fingerprint"]["layers"]["aux"] == [2, 15, 27] and info["fingerprint"]["top_k"] == 32
    check_against_single_forward(tmp_path / "s", smollm2_dir, n=2, atol=5e-4)
