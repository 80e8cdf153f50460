"""EAGLE-3's projected store (formats 3-4): P from a calibration slice, y = P·x stored, read as fc·Pᵀ in training,
fc·PᵀP at export; the same P for every worker, resume and conversion; older layouts still readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import want_optional

from pipeline import store as st
from pipeline.cli import main as cli
from pipeline.draft.export import export_draft, load_export
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.train import variants
from pipeline.train.trainer import TrainConfig, train

KW = dict(limit=8, max_length=96, top_k=8, shard_size=4, progress=False)
WHOLE = dict(hidden_dtype="float32", logprob_dtype="float32", codec="none", aux_projection=None)


def extract(model, out: Path, **kw) -> dict:
    return run_extract(ExtractConfig(out=out, model=str(model), **{**KW, **kw}))


def test_principal_projection_keeps_the_dominant_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0][:, :3]  # [12, 3]
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0]) @ basis.T
    x += 1e-3 * torch.randn(500, 12, generator=g, dtype=torch.float64)
    acc = st.GramAccumulator(12)
    acc.add(x[:200])
    acc.add(x[200:])
    p, energy = st.principal_projection(acc.gram, 3)
    assert p.shape == (3, 12) and torch.allclose(p @ p.T, torch.eye(3), atol=1e-5)
    assert energy > 0.9999
    assert torch.allclose(p.double().T @ (p.double() @ basis), basis, atol=1e-3)  # the span of the basis is kept
    again, _ = st.principal_projection(acc.gram.clone(), 3)
    assert torch.equal(p, again)  # signs fixed: a function of the matrix
    with pytest.raises(ValueError, match="must lie in"):
        st.principal_projection(acc.gram, 13)


def test_gram_accumulator_sums_whole_products_from_upper_triangles(monkeypatch):
    """Rows are buffered and multiplied in blocks (the upper triangle, mirrored): the sum is x^T x, exactly
    symmetric, whatever the split of the rows into samples."""
    from pipeline.store import projection

    monkeypatch.setattr(projection, "GRAM_ROWS", 64)
    monkeypatch.setattr(projection, "GRAM_BLOCK", 5)  # 12 columns: block rows of 5, 5 and 2
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 4.0, 12)
    for cuts in ((300,), (7, 90, 3, 200), (150, 150)):
        acc = st.GramAccumulator(12)
        for part in x.split(list(cuts)):
            acc.add(part)
        assert acc.rows == 300 and acc.gram.dtype == torch.float64 and torch.equal(acc.gram, acc.gram.T)
        assert torch.allclose(acc.gram, x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def test_projection_does_not_depend_on_the_thread_count():
    """P's sha256 is in the fingerprint: a process on 2 threads and one on 1 must estimate the same bits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 192, generator=g) * torch.linspace(0.01, 3.0, 192)
    threads, found = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            found.append(st.fit_projection([x[:2000], x[2000:]], 192, 128, 4000)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(found[0], found[1])


def test_projected_store_trains_and_exports_the_whole_fc(tiny_llama_dir, tmp_path, one_thread):
    """Default extraction = compact store with hidden_aux = P·x (k = 2H) divided by the component scale s (rms^0.5 of
    each component over the calibration tokens), q19 rows; the rows read back are P·x of the whole extraction's x; a head trained on it (fc in the whole basis, read as fc·Pᵀ) exports fc·PᵀP whose logits on the
    whole features equal the trained head's on the projected ones; inspect shows k and the kept energy."""
    whole = tmp_path / "whole"
    extract(tiny_llama_dir, whole, **WHOLE)
    exact = tmp_path / "exact"  # projected, fp32: the projection alone
    extract(tiny_llama_dir, exact, hidden_dtype="float32", aux_dtype="float32", logprob_dtype="float32", codec="none")
    compact = tmp_path / "compact"
    extract(tiny_llama_dir, compact)  # the defaults
    h, k = 64, 128
    for root in (exact, compact):
        r = st.StoreReader(root)
        rec = r.fingerprint["projection"]["hidden_aux"]
        assert r.format_version == 5 and rec["k"] == k and rec["input_width"] == 3 * h
        assert rec["component_scale"]["rms_power"] == 0.5 and r.component_scale().shape == (k,)
        assert r.fields["hidden_aux"][0] == (k,) and (root / st.PROJECTION_FILE).exists()
    assert st.StoreReader(compact).fingerprint["dtypes"]["hidden"] == st.FP8
    assert st.StoreReader(compact).fingerprint["dtypes"]["hidden_aux"] == st.Q19
    assert st.StoreReader(compact).fingerprint["sharding"]["codec"] == "auto"
    w, e = st.StoreReader(whole), st.StoreReader(exact)
    p = e.projection()
    c = st.StoreReader(compact)
    assert torch.equal(p, c.projection()) and torch.equal(e.component_scale(), c.component_scale())  # one slice
    ys = []
    for i in range(len(w)):
        x, y = w.sample(i)["hidden_aux"], e.sample(i)["hidden_aux"]
        assert torch.allclose(st.project(x, p), y, atol=1e-4, rtol=1e-4)
        q = c.sample(i)["hidden_aux"]  # q19 of y/s: half a step of the scaled row's scale at most, times s
        s = c.component_scale()
        assert ((q - y).abs() <= (y / s).abs().amax(-1, keepdim=True) / 18 * s + 1e-3).all()
        ys.append(y)
    rms = torch.cat(ys).double().square().mean(0).sqrt()  # every token is a calibration token here
    assert torch.allclose(e.component_scale().double(), rms.sqrt(), rtol=1e-3)
    assert st.inspect_store(compact)["bytes_per_token_total"] < st.inspect_store(whole)["bytes_per_token_total"] / 4

    cfg = TrainConfig(feats=str(exact), out=str(tmp_path / "run"), variant="eagle3", max_steps=3, draft_vocab_size=512,
                      ttt_steps=2, tokens_per_batch=256, lr=3e-3, progress=False)  # fmt: skip
    train(cfg)
    model, _ = variants.load_run(cfg.out)
    assert model.fc.weight.shape == (h, 3 * h) and torch.equal(model.aux_projection, p)
    out = export_draft(model, None, tmp_path / "head", "vllm")
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["fc.weight"].shape == (h, 3 * h) and "aux_projection" not in weights
    assert "aux_projection_dim" not in json.dumps(json.loads((out / "config.json").read_text())["pipeline"]) or \
        json.loads((out / "config.json").read_text())["pipeline"]["draft_config"]["aux_projection_dim"] == 0
    served, _ = load_export(out)
    x = w.sample(0)["hidden_aux"].reshape(1, -1, 3 * h)
    y = e.sample(0)["hidden_aux"].reshape(1, -1, k)
    assert torch.allclose(served.fuse(x), model.fuse(y), atol=1e-4)
    assert torch.allclose(model.fuse(x), model.fuse(y), atol=1e-4)  # a projected head also takes whole features

    if want_optional("speculators", "PIPELINE_REQUIRE_SPECULATORS"):  # the speculators package's loader: our logits
        from pipeline.draft.speculators_check import compare_logits, load_with_speculators

        theirs = load_with_speculators(export_draft(model, None, tmp_path / "spec", "speculators", dtype=torch.float32))
        n = y.shape[1]
        row = {"input_ids": e.sample(0)["input_ids"].long()[None], "loss_mask": e.sample(0)["loss_mask"].float()[None],
               "position_ids": torch.arange(n)[None], "doc_ids": torch.zeros(1, n, dtype=torch.long), "hidden_aux": y}
        for step in compare_logits(model.float(), theirs, row, steps=2):
            assert step["rel_diff"] < 1e-4 and step["argmax_agree"] == 1.0, step

    res = CliRunner().invoke(cli, ["inspect", str(compact)])
    assert res.exit_code == 0 and f"k={k} of {3 * h}" in res.output and "kept energy" in res.output
    assert "(aux q19)" in res.output and "/ s (s = rms^0.5 per component)" in res.output


def test_one_projection_for_every_worker_resume_and_conversion(tiny_llama_dir, tmp_path, one_thread):
    """Two ranks, a redone shard and `pipeline convert --compact` of a whole store all write with one published P;
    a different k into the same store is refused; a projected store cannot be converted back to whole."""
    root = tmp_path / "ranks"
    extract(tiny_llama_dir, root, rank=1, world_size=2)
    p = st.read_projection_file(root)[0]
    extract(tiny_llama_dir, root, rank=0, world_size=2)
    r = st.StoreReader(root)
    assert len(r.shards) == 2 and torch.equal(r.projection(), p)
    single = tmp_path / "single"
    extract(tiny_llama_dir, single)
    assert _chunk_checksums(single) == _chunk_checksums(root)  # the same bytes as one worker
    victim = next(f for f in (root / "shards" / "shard-00001" / "tensors" / "hidden_aux" / "c").rglob("*") if f.is_file())
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    summary = extract(tiny_llama_dir, root)  # the open checks miss a flipped byte: verify names it, re-run redoes
    assert summary["shards"]["written"] == 0
    assert CliRunner().invoke(cli, ["verify", str(root)]).exit_code != 0
    summary = extract(tiny_llama_dir, root)
    assert summary["shards"]["repaired"] and _chunk_checksums(root) == _chunk_checksums(single)
    with pytest.raises(st.StoreError, match="k=128 .* --aux-projection 32"):
        extract(tiny_llama_dir, root, aux_projection=32)

    whole = tmp_path / "whole"
    extract(tiny_llama_dir, whole, **WHOLE)
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(whole), "--out", str(tmp_path / "conv"), "--compact", "--no-progress"])
    assert res.exit_code == 0, res.output
    conv = st.StoreReader(tmp_path / "conv")
    assert conv.fingerprint["projection"]["hidden_aux"]["k"] == 128 and conv.fingerprint["dtypes"]["hidden"] == st.FP8
    assert conv.fingerprint["dtypes"]["hidden_aux"] == st.Q19 and conv.fingerprint["sharding"]["codec"] == "auto"
    # estimated from the stored fp32 values of the same calibration slice: P equal up to rounding
    assert torch.allclose(conv.projection().abs(), p.abs(), atol=1e-3)
    res = runner.invoke(cli, ["convert", str(root), "--out", str(tmp_path / "back"), "--aux-projection", "none"])
    assert res.exit_code == 2 and "re-extract" in res.output
    fmt3 = tmp_path / "format-3-layout"  # k = H, fp8: --compact keeps its P and s and re-encodes the rows as q19
    extract(tiny_llama_dir, fmt3, aux_projection=64, aux_dtype=st.FP8, codec="zstd")
    res = runner.invoke(cli, ["convert", str(fmt3), "--out", str(tmp_path / "fmt3-compact"), "--compact", "--no-progress"])
    again, src = st.StoreReader(tmp_path / "fmt3-compact"), st.StoreReader(fmt3)
    assert res.exit_code == 0 and again.fields["hidden_aux"] == ((64,), st.Q19), res.output
    assert torch.equal(again.projection(), src.projection()) and torch.equal(again.component_scale(), src.component_scale())
    y, q = src.sample(0)["hidden_aux"], again.sample(0)["hidden_aux"]  # stored / s once, read back * s once
    assert ((q - y).abs() <= (y / src.component_scale()).abs().amax(-1, keepdim=True) / 18 * src.component_scale()
            + 1e-3).all()


def test_a_replaced_component_scale_is_refused_by_readers_and_verify(tiny_llama_dir, tmp_path, one_thread):
    """s is part of what the rows mean: projection.safetensors with the same P but another s (a valid file) is
    refused on read, naming the file and the component scale, and `verify` reports it."""
    root = tmp_path / "s"
    extract(tiny_llama_dir, root)
    p, record, scale = st.read_projection_file(root)
    (root / st.PROJECTION_FILE).unlink()
    st.save_projection(root, p, {**record, "component_scale": {**record["component_scale"]}}, scale=scale * 2)
    with pytest.raises(st.StoreError, match="projection.safetensors: the projection of hidden_aux does not match .*"
                                            "component scale"):
        st.StoreReader(root).sample(0)
    assert st.StoreReader(root).sample(0, ("input_ids",))  # fields that do not need it still read
    problems = st.verify_store(root)
    assert any(st.PROJECTION_FILE in x and "component scale" in x for x in problems), problems


def test_the_calibration_forward_is_the_extractions_own(tiny_llama_dir, tmp_path, one_thread):
    """P is estimated from the first batches of the extraction's forward order, and those batches are written from
    the calibration's outputs: every token goes through the target once, on one worker."""
    from pipeline.extract.hf_backend import HFBackend

    backend = HFBackend(tiny_llama_dir, device="cpu")
    forward, tokens = backend.forward, []

    def counting(batch, *args, **kw):
        tokens.append(sum(len(x) for x in batch))
        return forward(batch, *args, **kw)

    backend.forward = counting
    cfg = ExtractConfig(out=tmp_path / "s", model=str(tiny_llama_dir), calibration_tokens=300, **KW)
    summary = run_extract(cfg, backend=backend)
    assert sum(tokens) == summary["tokens"] and summary["calibration_s"] > 0
    record = st.StoreReader(tmp_path / "s").fingerprint["projection"]["hidden_aux"]
    assert record["calibration"]["rows"] == 300 and 0 < record["calibration"]["records"] < 8


def test_format_2_store_reads_and_extracting_into_it_names_convert(tiny_llama_dir, tmp_path, monkeypatch, one_thread):
    """A store written as format 2 (whole features, no projection record) still trains; extracting the format-3
    default into it is refused with the `pipeline convert` command that upgrades it."""
    import pipeline.extract.runner as runner_mod
    import pipeline.store.writer as writer_mod

    old = tmp_path / "v2"
    with monkeypatch.context() as m:
        m.setattr(runner_mod, "FORMAT_VERSION", 2)
        m.setattr(writer_mod, "FORMAT_VERSION", 2)
        extract(tiny_llama_dir, old, hidden_dtype="bfloat16", logprob_dtype="float32", codec="none",
                aux_projection=None)  # fmt: skip
    r = st.StoreReader(old)
    assert r.format_version == 2 and r.fields["hidden_aux"][0] == (3, 64)
    with pytest.raises(st.StoreError, match=f"pipeline convert {old} --out NEW"):
        extract(tiny_llama_dir, old, hidden_dtype="bfloat16", logprob_dtype="float32", codec="none",
                aux_projection=None)  # fmt: skip


def test_format_4_store_reads_and_converts_without_a_component_scale(tiny_llama_dir, tmp_path, monkeypatch,
                                                                      one_thread):  # fmt: skip
    """A format-4 projected store (int7 rows of P·x, no component scale: what that code wrote) reads its rows as
    stored and trains; `convert --compact` keeps its P and int7; q19 without a component scale is refused."""
    import pipeline.extract.runner as runner_mod
    import pipeline.store.writer as writer_mod

    def format_4(*args, **kw):  # the format-4 estimate: P and its record, no s
        p, _, record = st.fit_projection(*args, **kw)
        return p, None, st.describe_projection(p, record["energy"], record["calibration"])

    old = tmp_path / "v4"
    with monkeypatch.context() as m:
        m.setattr(runner_mod, "FORMAT_VERSION", 4)
        m.setattr(writer_mod, "FORMAT_VERSION", 4)
        m.setattr(runner_mod, "fit_projection", format_4)
        extract(tiny_llama_dir, old, aux_dtype=st.INT7)
    r = st.StoreReader(old)
    assert r.format_version == 4 and r.fields["hidden_aux"] == ((128,), st.INT7) and r.component_scale() is None
    y = r.sample(0)["hidden_aux"]
    assert y.abs().amax() > 10 * r.read(0, ("hidden_aux",))["hidden_aux_scale"].min()  # values, not codes
    cfg = TrainConfig(feats=str(old), out=str(tmp_path / "run"), variant="eagle3", max_steps=2, draft_vocab_size=512,
                      ttt_steps=1, tokens_per_batch=256, progress=False)  # fmt: skip
    train(cfg)
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(old), "--out", str(tmp_path / "c"), "--compact", "--no-progress"])
    conv = st.StoreReader(tmp_path / "c")
    assert res.exit_code == 0 and conv.format_version == 5 and conv.fields["hidden_aux"] == ((128,), st.INT7)
    assert conv.component_scale() is None and torch.equal(conv.sample(0)["hidden_aux"], y)
    res = runner.invoke(cli, ["convert", str(old), "--out", str(tmp_path / "q"), "--aux-dtype", "q19", "--no-progress"])
    assert res.exit_code != 0 and "component scale" in res.output


def _chunk_checksums(root: Path) -> dict:
    out = {}
    for shard in sorted((root / "shards").glob("shard-*")):
        for row in st._read_arrow(shard / st.COMMIT_FILE).to_pylist():
            if row["path"].startswith("tensors/"):
                out[(shard.name, row["path"])] = row["sha256"]
    return out
