"""The store format on synthetic tensors: round trips, atomic commits, fingerprints, verify, quarantine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline import store as st


class FakeTokenizer:
    def save_pretrained(self, path):
        import os

        os.makedirs(path, exist_ok=True)
        with open(f"{path}/tokenizer.json", "w") as f:
            f.write("{}")


H, A, K, V = 8, 3, 4, 50


def fingerprint(hidden="bfloat16", codec="none", chunk=16, stored=("hidden_last", "hidden_aux")) -> dict:
    return {
        "format_version": st.FORMAT_VERSION, "code_version": "test", "backend": "hf",
        "model": {"name": "fake", "config_sha256": "c", "weights_sha256": "w", "num_layers": 6, "hidden_size": H,
                  "vocab_size": V},
        "tokenizer": {"sha256": "t", "chat_template_sha256": "ct"},
        "layers": {"aux": [2, 3, 3], "last": 6, "stored": list(stored)},
        "dtypes": {"hidden": hidden, "topk_logprobs": "float32", "input_ids": "int32"},
        "top_k": K, "max_length": 64,
        "data": {"path": "x", "sha256": "d", "format": "sharegpt", "kind": "chat", "fim_tokens": None,
                 "selection": {"offset": 0, "limit": None, "ids_sha256": None}},
        "sharding": {"shard_size": 4, "chunk_tokens": chunk, "codec": codec},
    }  # fmt: skip


def target() -> st.TargetPieces:
    g = torch.Generator().manual_seed(0)
    w = {"embed_tokens.weight": torch.randn(V, H, generator=g), "norm.weight": torch.ones(H),
         "lm_head.weight": torch.randn(V, H, generator=g)}  # fmt: skip
    return st.TargetPieces(config={"hidden_size": H, "vocab_size": V}, weights=w, tokenizer=FakeTokenizer())


def sample(length: int, seed: int, fp: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "input_ids": torch.randint(0, V, (length,), generator=g, dtype=torch.int32),
        "loss_mask": torch.rand(length, generator=g) > 0.5,
        "topk_ids": torch.randint(0, V, (length, K), generator=g, dtype=torch.int32),
        "topk_logprobs": -torch.rand(length, K, generator=g) * 10,
    }
    if "hidden_last" in fp["layers"]["stored"]:
        out["hidden_last"] = torch.randn(length, H, generator=g) * 3
    if "hidden_aux" in fp["layers"]["stored"]:
        out["hidden_aux"] = torch.randn(length, A, H, generator=g) * 3
    return out


def write_store(root, fp, lengths_per_shard, plan=None):
    plan = plan or {"records": 4 * len(lengths_per_shard), "shards": len(lengths_per_shard), "shard_size": 4}
    w = st.StoreWriter(root, fp, plan, target())
    written = {}
    sid = 0
    for shard, lengths in enumerate(lengths_per_shard):
        sw = w.begin_shard(shard, (shard * 4, shard * 4 + 4))
        for n in lengths:
            s = sample(n, sid, fp)
            assert sw.append(st.SampleMeta(sid, sid, f"r{sid}"), s)
            written[sid] = s
            sid += 1
        sw.commit()
    return w, written


def expected_storage(t: torch.Tensor, logical: str) -> torch.Tensor:
    if logical in st.HIDDEN_DTYPES:
        return t.to(st.HIDDEN_DTYPES[logical][1])
    return t


@pytest.mark.parametrize("hidden", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("codec", ["none", "zstd", "blosc"])
def test_round_trip_across_chunks(tmp_path, hidden, codec):
    fp = fingerprint(hidden, codec, chunk=16)
    _, written = write_store(tmp_path / "s", fp, [[5, 30, 1, 17], [40]])  # samples straddle chunk edges
    r = st.StoreReader(tmp_path / "s")
    assert len(r) == 5 and int(r.lengths.sum()) == 93
    for i in range(len(r)):
        got = r.sample(i)
        ref = written[int(r.sample_ids[i])]
        for name, t in ref.items():
            logical = r.fields[name][1]
            assert got[name].dtype == expected_storage(t, logical).dtype
            assert torch.equal(got[name], expected_storage(t, logical)), name


def test_uncompressed_reads_are_memmap_views(tmp_path):
    fp = fingerprint("bfloat16", "none", chunk=64)
    write_store(tmp_path / "s", fp, [[10, 20]])
    r = st.StoreReader(tmp_path / "s")
    rows = r.read(1, ("hidden_aux",))["hidden_aux"]
    assert isinstance(rows.base, np.memmap) or isinstance(rows, np.memmap)
    assert rows.shape == (20, A, H) and rows.dtype == np.uint16


def test_fingerprint_mismatch_is_refused_naming_fields(tmp_path):
    fp = fingerprint()
    write_store(tmp_path / "s", fp, [[4]], plan={"records": 4, "shards": 1, "shard_size": 4})
    other = copy.deepcopy(fp)
    other["top_k"] = 8
    other["model"]["weights_sha256"] = "other"
    other["model"]["name"] = "renamed"  # informational: not a difference
    with pytest.raises(st.StoreError) as e:
        st.StoreWriter(tmp_path / "s", other, {"records": 4, "shards": 1, "shard_size": 4}, target())
    msg = str(e.value)
    assert "top_k" in msg and "model.weights_sha256" in msg and "model.name" not in msg


def test_incomplete_fingerprint_is_refused(tmp_path):
    fp = fingerprint()
    del fp["model"]["weights_sha256"]
    with pytest.raises(st.StoreError, match="model.weights_sha256"):
        st.StoreWriter(tmp_path / "s", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())


def test_uncommitted_shard_is_invisible_and_cleaned(tmp_path):
    fp = fingerprint()
    plan = {"records": 8, "shards": 2, "shard_size": 4}
    w = st.StoreWriter(tmp_path / "s", fp, plan, target())
    sw = w.begin_shard(0, (0, 4))
    sw.append(st.SampleMeta(0, 0, "a"), sample(7, 0, fp))
    sw.commit()
    crashed = w.begin_shard(1, (4, 8))
    crashed.append(st.SampleMeta(4, 4, "b"), sample(9, 1, fp))  # never committed: a crash
    assert crashed.tmp.exists()
    with pytest.raises(st.StoreError, match="shards not committed: 1"):
        st.StoreReader(tmp_path / "s")
    partial = st.StoreReader(tmp_path / "s", require_complete=False)
    assert len(partial) == 1 and not w.is_committed(1)
    redo = w.begin_shard(1, (4, 8))  # the next writer of shard 1 removes the leftovers
    assert not crashed.tmp.exists()
    redo.append(st.SampleMeta(4, 4, "b"), sample(9, 1, fp))
    redo.commit()
    assert len(st.StoreReader(tmp_path / "s")) == 2


def test_committed_shard_is_never_replaced(tmp_path):
    fp = fingerprint()
    w, _ = write_store(tmp_path / "s", fp, [[4]], plan={"records": 4, "shards": 1, "shard_size": 4})
    before = (w.shard_dir(0) / st.COMMIT_FILE).read_bytes()
    dup = w.begin_shard(0, (0, 4))
    dup.append(st.SampleMeta(0, 0, "x"), sample(6, 9, fp))
    with pytest.raises(st.StoreError, match="already committed"):
        dup.commit()
    assert (w.shard_dir(0) / st.COMMIT_FILE).read_bytes() == before
    assert not dup.tmp.exists()


def test_nonfinite_sample_is_quarantined(tmp_path):
    fp = fingerprint("float16")
    plan = {"records": 4, "shards": 1, "shard_size": 4}
    w = st.StoreWriter(tmp_path / "s", fp, plan, target())
    sw = w.begin_shard(0, (0, 4), expected_tokens=15)  # arrays sized for 3 samples, 1 is stored
    bad = sample(5, 1, fp)
    bad["hidden_aux"][2, 1, 3] = float("nan")
    overflow = sample(5, 2, fp)
    overflow["hidden_last"][0, 0] = 1e6  # finite in fp32, inf in fp16
    assert sw.append(st.SampleMeta(0, 0, "ok"), sample(5, 0, fp))
    assert not sw.append(st.SampleMeta(1, 1, "nan"), bad)
    assert not sw.append(st.SampleMeta(2, 2, "big"), overflow)
    stats = sw.commit()
    assert [q["record_id"] for q in stats["quarantined"]] == ["nan", "big"]
    assert stats["quarantined"][0]["field"] == "hidden_aux"
    r = st.StoreReader(tmp_path / "s")
    assert len(r) == 1 and st.verify_store(tmp_path / "s") == []


def test_verify_names_flipped_byte(tmp_path):
    fp = fingerprint()
    w, _ = write_store(tmp_path / "s", fp, [[10, 3], [8]])
    assert st.verify_store(tmp_path / "s") == []
    chunk = w.shard_dir(1) / "tensors" / "hidden_last" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = st.verify_store(tmp_path / "s")
    assert len(problems) == 1
    assert problems[0].startswith("shard-00001: tensors/hidden_last/c/0/0") and "checksum" in problems[0]
    assert st.StoreReader(tmp_path / "s").last_verify()["ok"] is False


def test_stored_subset_and_token_counts(tmp_path):
    fp = fingerprint(stored=("hidden_aux",))
    _, written = write_store(tmp_path / "s", fp, [[6, 7]])
    r = st.StoreReader(tmp_path / "s")
    assert "hidden_last" not in r.has and "hidden_aux" in r.has
    with pytest.raises(st.StoreError, match="hidden_last"):
        r.read(0, ("hidden_last",))
    expected = np.zeros(V, np.int64)
    for s in written.values():
        np.add.at(expected, s["input_ids"][s["loss_mask"]].numpy(), 1)
    assert np.array_equal(r.token_counts(), expected)
    info = st.inspect_store(tmp_path / "s")
    assert info["samples"] == 2 and info["tokens"] == 13 and set(info["bytes_per_field"]) >= {"hidden_aux"}
