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
    """Shard k holds records [k * size, (k + 1) * size) of the plan; its samples are the first of them (sample id =
    record = selection index, as extraction writes them)."""
    size = max(4, *map(len, lengths_per_shard))
    plan = plan or {"records": size * len(lengths_per_shard), "shards": len(lengths_per_shard), "shard_size": size}
    size = plan["shard_size"]
    w = st.StoreWriter(root, fp, plan, target())
    written = {}
    for shard, lengths in enumerate(lengths_per_shard):
        sw = w.begin_shard(shard, (shard * size, min((shard + 1) * size, plan["records"])))
        for j, n in enumerate(lengths):
            sid = shard * size + j
            s = sample(n, sid, fp)
            assert sw.append(st.SampleMeta(sid, sid, f"r{sid}"), s)
            written[sid] = s
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
    crashed.claim.release()  # what the kernel does when the writer dies
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


# ---------------------------------------------------------------------------------------------------- integrity


def test_open_refuses_damage_and_never_reads_zeros(tmp_path):
    fp = fingerprint("bfloat16", "zstd", chunk=16)
    w, _ = write_store(tmp_path / "s", fp, [[10, 30], [8]])
    victim = w.shard_dir(0) / st.chunk_key("hidden_last", 1, 1)
    victim.rename(victim.with_name("moved"))
    with pytest.raises(st.StoreError, match=r"shard-00000/tensors/hidden_last/c/1/0: listed in the commit record"):
        st.StoreReader(tmp_path / "s")
    r = st.StoreReader(tmp_path / "s", skip_bad_shards=True, require_complete=False)
    assert list(r.bad_shards) == [0] and len(r) == 1
    victim.with_name("moved").rename(victim)
    r = st.StoreReader(tmp_path / "s")
    victim.unlink()  # gone after the store was opened: zarr would return the fill value
    with pytest.raises(st.StoreError, match="chunk 1 of hidden_last is missing"):
        r.read(1, ("hidden_last",))


def test_reads_check_sizes_checksums_and_token_ids(tmp_path):
    fp = fingerprint("float16", "none", chunk=16)
    w, _ = write_store(tmp_path / "s", fp, [[10, 30], [8]])
    chunk = w.shard_dir(1) / st.chunk_key("topk_logprobs", 0, 1)
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0x10
    chunk.write_bytes(bytes(data))
    assert st.StoreReader(tmp_path / "s").read(2)  # the cheap open checks cannot see a flipped byte...
    with pytest.raises(st.StoreError, match="changed after it was written"):  # ...the first read can
        st.StoreReader(tmp_path / "s", verify_reads=True).read(2)
    ids = w.shard_dir(0) / st.chunk_key("input_ids", 1, 0)
    data = bytearray(ids.read_bytes())
    data[4 * 3 + 3] = 0x7F  # row 19 of shard 0 = inside sample 1
    ids.write_bytes(bytes(data))
    with pytest.raises(st.StoreError, match=r"sample 1 of shard 0 \(record 'r1'\) holds token id \d+, outside"):
        st.StoreReader(tmp_path / "s").read(1)


def test_fingerprint_digest_is_recomputed(tmp_path):
    import pyarrow as pa

    fp = fingerprint()
    write_store(tmp_path / "s", fp, [[4]], plan={"records": 4, "shards": 1, "shard_size": 4})
    path = tmp_path / "s" / st.STORE_FILE
    t = st._read_arrow(path)
    row = t.to_pylist()[0]
    edited = copy.deepcopy(fp)
    edited["layers"]["aux"] = [2, 3, 4]
    row["fingerprint"] = st.canonical_json(edited)
    st._write_arrow(path, pa.Table.from_pylist([row], schema=t.schema))
    with pytest.raises(st.StoreError, match="does not match its recorded digest"):
        st.StoreReader(tmp_path / "s")
    assert any("does not match its recorded digest" in p for p in st.verify_store(tmp_path / "s"))
    row["fingerprint_digest"] = st.fingerprint_digest(edited)  # digest edited too: the shards disagree with it
    st._write_arrow(path, pa.Table.from_pylist([row], schema=t.schema))
    with pytest.raises(st.StoreError, match="committed under fingerprint digest"):
        st.StoreReader(tmp_path / "s")


def test_target_checksums(tmp_path):
    fp = fingerprint()
    write_store(tmp_path / "s", fp, [[4]], plan={"records": 4, "shards": 1, "shard_size": 4})
    weights = tmp_path / "s" / st.TARGET_DIR / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    assert st.verify_store(tmp_path / "s") == ["target/weights.safetensors: checksum mismatch (sha256 differs from "
                                               "the commit record)"]  # fmt: skip
    assert st.StoreReader(tmp_path / "s").target_weights()  # sizes only when opening...
    with pytest.raises(st.StoreError, match="weights.safetensors: changed after it was written"):
        st.StoreReader(tmp_path / "s", verify_reads=True).target_weights()  # ...the bytes when loading them
    weights.write_bytes(bytes(data[:-8]))
    with pytest.raises(st.StoreError, match="target/weights.safetensors: size"):
        st.StoreReader(tmp_path / "s")
    # The next writer sets the damaged copy aside and rewrites it.
    w = st.StoreWriter(tmp_path / "s", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())
    assert w.repaired_target and st.verify_store(tmp_path / "s") == []
    assert [x["state"] for x in st.find_leftovers(tmp_path / "s")] == ["set aside"]


def test_version_1_stores_still_read(tmp_path):
    import pyarrow as pa

    fp = fingerprint()
    fp["format_version"] = 1
    _, written = write_store(tmp_path / "s", fp, [[5, 6]], plan={"records": 4, "shards": 1, "shard_size": 4})
    root = tmp_path / "s"
    t = st._read_arrow(root / st.STORE_FILE)
    row = t.to_pylist()[0]
    row["format_version"] = 1
    st._write_arrow(root / st.STORE_FILE, pa.Table.from_pylist([row], schema=t.schema))
    (root / st.TARGET_DIR / st.COMMIT_FILE).unlink()  # version 1 recorded no target checksums
    r = st.StoreReader(root, verify_reads=True)
    assert r.format_version == 1 and len(r) == 2 and r.target_weights()
    assert torch.equal(r.sample(0)["input_ids"], written[0]["input_ids"])
    assert st.verify_store(root) == []


def test_incomplete_shard_is_never_committed(tmp_path):
    fp = fingerprint(chunk=8)
    w = st.StoreWriter(tmp_path / "s", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())
    sw = w.begin_shard(0, (0, 4), expected_tokens=20)
    sw.append(st.SampleMeta(0, 0, "a"), sample(20, 0, fp))
    sw._wait_writes()  # the pooled chunk writes have landed
    (sw.tmp / st.chunk_key("hidden_aux", 1, 2)).unlink()  # lost under the writer (another process, a bad disk)
    with pytest.raises(st.StoreError, match=r"incomplete, not committed: tensors/hidden_aux/c/1/0/0: missing"):
        sw.commit()
    assert not w.shard_dir(0).exists() and not sw.tmp.exists()
    assert w.claim(0, blocking=False) is not None  # the claim was released


def test_claims_exclude_and_die_with_their_process(tmp_path):
    import signal
    import subprocess
    import sys

    fp = fingerprint()
    w = st.StoreWriter(tmp_path / "s", fp, {"records": 8, "shards": 2, "shard_size": 4}, target())
    mine = w.claim(0)
    assert w.claim(0, blocking=False) is None and w.claim(1, blocking=False) is not None
    mine.release()
    code = ("import sys, time; from pipeline.locks import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(600)")  # fmt: skip
    lock = tmp_path / "s" / st.LOCKS_DIR / "shard-00000.lock"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert w.claim(0, blocking=False) is None and "pid" in w.claim_holder(0)
    tmp = tmp_path / "s" / st.SHARDS_DIR / ".tmp-shard-00000-otherhost-1-abcdef01"
    tmp.mkdir()
    assert [x["state"] for x in st.find_leftovers(tmp_path / "s")] == ["in use"]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert [x["state"] for x in st.find_leftovers(tmp_path / "s")] == ["dead"]
    assert w.claim(0, blocking=False) is not None  # the dead holder's claim is recovered
    st.StoreWriter(tmp_path / "s", fp, {"records": 8, "shards": 2, "shard_size": 4}, target())
    assert not tmp.exists()  # the next writer removed the dead one's leftovers


def test_disk_full_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError
    from zarr.storage import LocalStore

    fp = fingerprint(chunk=8)
    plan = {"records": 4, "shards": 1, "shard_size": 4}
    # target/ on a full disk (safetensors reports it as its own error, without a path)
    import safetensors.torch

    def full_save(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')  # fmt: skip

    monkeypatch.setattr(safetensors.torch, "save_file", full_save)
    with pytest.raises(st.StoreError, match=r"s/target: writing the target pieces failed: No space left"):
        st.StoreWriter(tmp_path / "s", fp, plan, target())
    assert not list((tmp_path / "s").glob(".tmp-*"))
    monkeypatch.undo()
    # a chunk write on a full disk
    w = st.StoreWriter(tmp_path / "s", fp, plan, target())
    real = LocalStore._set

    async def full_set(self, key, value, exclusive=False):
        if "/c/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value, exclusive)

    monkeypatch.setattr(LocalStore, "_set", full_set)
    w.io_workers = 0  # writes in the appending thread: the append itself fails
    sw = w.begin_shard(0, (0, 4), expected_tokens=20)
    with pytest.raises(st.StoreError, match=r"writing tensors \(shard 0\) failed: No space left on device; free "):
        sw.append(st.SampleMeta(0, 0, "a"), sample(20, 0, fp))
    assert not sw.tmp.exists() and w.claim(0, blocking=False) is not None
    with pytest.raises(st.StoreError, match="abandoned after a failed write"):
        sw.commit()
    w.io_workers = 2  # pooled writes: the failure surfaces at the next append or, at the latest, at commit
    sw = w.begin_shard(0, (0, 4), expected_tokens=20)
    with pytest.raises(st.StoreError, match=r"\(shard 0\) failed: No space left on device; free "):
        sw.append(st.SampleMeta(0, 0, "a"), sample(20, 0, fp))
        sw.commit()
    assert not sw.tmp.exists() and w.claim(0, blocking=False) is not None
    monkeypatch.undo()
    # verify reports, then fails to record its result: nothing left behind

    def full_write(path, table):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.store.verify._write_arrow", full_write)
    problems = st.verify_store(tmp_path / "s", write_result=False)
    assert problems == ["shard-00000: not committed (store incomplete)"]
    with pytest.raises(st.StoreError, match="recording the verify result failed: No space left on device"):
        st.record_verify(tmp_path / "s", problems)
    assert not list((tmp_path / "s").glob(".tmp-*")) and not (tmp_path / "s" / st.VERIFY_FILE).exists()


# ---- format 2: fp8 hidden states, compact top-k, chunk-at-a-time decoding


def test_fp8_round_trip_is_per_row_e4m3(tmp_path):
    fp = fingerprint(st.FP8, "zstd", chunk=16)
    fp["dtypes"].update(topk_ids="uint16", topk_logprobs="float16")
    _, written = write_store(tmp_path / "s", fp, [[5, 30, 1, 17], [40]])
    r = st.StoreReader(tmp_path / "s")
    assert set(r.arrays) == set(r.fields) | {"hidden_last_scale", "hidden_aux_scale"}
    for i in range(len(r)):
        got, ref = r.sample(i), written[int(r.sample_ids[i])]
        for name in ("hidden_last", "hidden_aux"):
            x = ref[name]
            scale = x.abs().amax(-1, keepdim=True) / 448
            expected = (x / scale).to(torch.float8_e4m3fn).float() * scale
            assert got[name].dtype == torch.float32 and torch.allclose(got[name], expected, rtol=1e-6, atol=0)
            # e4m3 keeps 3 mantissa bits: at most half an ulp (1/16) off relative to each row's largest value
            assert ((got[name] - x).abs() <= x.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()
        assert got["topk_ids"].dtype == torch.int32 and torch.equal(got["topk_ids"], ref["topk_ids"])
        assert torch.equal(got["topk_logprobs"], ref["topk_logprobs"].half())
    rows = r.read(0, ("hidden_aux",))
    assert rows["hidden_aux"].dtype == np.uint8 and rows["hidden_aux_scale"].shape == (int(r.lengths[0]), A)
    assert st.verify_store(tmp_path / "s") == []
    info = st.inspect_store(tmp_path / "s")
    assert info["hidden_dtype"] == st.FP8 and info["format_version"] == st.FORMAT_VERSION
    assert info["bytes_per_token"]["hidden_aux_scale"] > 0 and info["bytes_per_token_total"] > 0


def test_fp8_nonfinite_rows_are_quarantined(tmp_path):
    fp = fingerprint(st.FP8)
    w = st.StoreWriter(tmp_path / "s", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())
    sw = w.begin_shard(0, (0, 4), expected_tokens=10)
    bad = sample(5, 1, fp)
    bad["hidden_last"][3, 0] = float("inf")
    assert sw.append(st.SampleMeta(0, 0, "ok"), sample(5, 0, fp))
    assert not sw.append(st.SampleMeta(1, 1, "inf"), bad)
    assert [q["field"] for q in sw.commit()["quarantined"]] == ["hidden_last"]


@pytest.mark.parametrize("aux", ["int7", "q19"])
def test_integer_aux_rows_round_trip_with_bit_shuffled_codes(tmp_path, aux):
    """Format 4-5: hidden_aux in its own dtype (int7 / q19: zigzag codes of round(x / scale), scale = max|row| / 63
    (/ 9), one fp32 scale per row), hidden_last fp8; codec auto stores the codes bit-shuffled (blosc) and the ids with
    zstd; a non-finite aux row is quarantined, never stored as codes."""
    top = st.CODE_MAX[aux]
    fp = fingerprint(st.FP8, "auto", chunk=16)
    fp["dtypes"].update(hidden_aux=aux, topk_ids="uint16", topk_logprobs="float16")
    _, written = write_store(tmp_path / "s", fp, [[5, 30, 1, 17], [40]])
    r = st.StoreReader(tmp_path / "s")
    assert r.fields["hidden_aux"][1] == aux and r.fields["hidden_last"][1] == st.FP8
    for i in range(len(r)):
        x, got = written[int(r.sample_ids[i])]["hidden_aux"], r.sample(i)["hidden_aux"]
        scale = x.abs().amax(-1, keepdim=True) / top
        assert torch.allclose(got, torch.round(x / scale) * scale, rtol=1e-6, atol=0)
        assert ((got - x).abs() <= scale / 2 + 1e-6).all()
    codes = r.read(0, ("hidden_aux",))["hidden_aux"]
    assert codes.dtype == np.uint8 and codes.max() <= 2 * top
    got = st.dequantize(np.array([[0, 1, 2, 2 * top - 1, 2 * top, 2 * top + 1]], np.uint8), np.ones(1, np.float32), aux)
    assert torch.equal(got[:, :5], torch.tensor([[0.0, -1, 1, -top, top]])) and got[0, 5].isnan()
    codecs = {n: [c["name"] for c in r.shards[0].arrays[n]["codecs"]] for n in ("hidden_aux", "topk_ids", "hidden_last")}
    assert codecs == {"hidden_aux": ["bytes", "blosc"], "topk_ids": ["bytes", "zstd"], "hidden_last": ["bytes", "zstd"]}
    assert st.verify_store(tmp_path / "s") == [] and st.inspect_store(tmp_path / "s")["aux_dtype"] == aux

    rows = st.ScaledRows.quantize(torch.tensor([[0.0, 0.0], [1.0, float("nan")], [-2.0, float("inf")]]), aux)
    q, s = rows.q, rows.scale
    assert q.tolist() == [[0, 0], [2, 127], [0, 127]] and s[0] == 1
    w = st.StoreWriter(tmp_path / "t", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())
    sw = w.begin_shard(0, (0, 4), expected_tokens=10)
    bad = sample(5, 1, fp)
    bad["hidden_aux"][2, 1, 0] = float("nan")
    assert sw.append(st.SampleMeta(0, 0, "ok"), sample(5, 0, fp))
    assert not sw.append(st.SampleMeta(1, 1, "nan"), bad)
    assert [q["field"] for q in sw.commit()["quarantined"]] == ["hidden_aux"]


def test_uint16_ids_refuse_out_of_range(tmp_path):
    fp = fingerprint()
    fp["dtypes"]["topk_ids"] = "uint16"
    w = st.StoreWriter(tmp_path / "s", fp, {"records": 4, "shards": 1, "shard_size": 4}, target())
    sw = w.begin_shard(0, (0, 4))
    s = sample(3, 0, fp)
    s["topk_ids"][0, 0] = 70000
    with pytest.raises(st.StoreError, match="uint16"):
        sw.append(st.SampleMeta(0, 0, "x"), s)
    sw.abort()


def test_format_1_stores_still_read(tmp_path, monkeypatch):
    fp = fingerprint("bfloat16", "zstd", chunk=16)
    fp["format_version"] = 1
    monkeypatch.setattr("pipeline.store.writer.FORMAT_VERSION", 1)  # what the previous code wrote: same layout, int32 ids
    _, written = write_store(tmp_path / "s", fp, [[5, 30], [12]])
    monkeypatch.undo()
    r = st.StoreReader(tmp_path / "s")
    assert r.format_version == 1 and r.fields["topk_ids"][1] == "int32"
    for i in range(len(r)):
        assert torch.equal(r.sample(i)["topk_ids"], written[int(r.sample_ids[i])]["topk_ids"])
    assert st.inspect_store(tmp_path / "s")["format_version"] == 1


def test_compressed_chunks_are_decoded_once_in_order(tmp_path):
    fp = fingerprint("bfloat16", "zstd", chunk=16)
    write_store(tmp_path / "s", fp, [[5, 30, 1, 17, 9, 20]])  # 82 rows: 6 chunks of 16 (one shard)
    r = st.StoreReader(tmp_path / "s")
    r.cache_chunks = 2
    for i in range(len(r)):
        r.read(i, ("hidden_aux",))
    assert r.decoded_chunks == 6  # each chunk once, although 3 samples straddle chunk edges
    assert r.home_chunks()[1].tolist() == [0, 0, 2, 2, 3, 3]
    for i in reversed(range(len(r))):  # a cache of 2 chunks cannot hold the store: re-decodes, same values
        assert np.array_equal(r.read(i, ("hidden_aux",))["hidden_aux"],
                              st.StoreReader(tmp_path / "s").read(i, ("hidden_aux",))["hidden_aux"])


def test_pooled_writes_equal_inline_writes(tmp_path):
    fp = fingerprint("bfloat16", "zstd", chunk=8)
    plan = {"records": 4, "shards": 1, "shard_size": 4}
    for workers in (0, 3):
        w = st.StoreWriter(tmp_path / f"w{workers}", fp, plan, target(), io_workers=workers)
        sw = w.begin_shard(0, (0, 4), expected_tokens=59)
        for sid, n in enumerate((5, 30, 7, 17)):
            sw.append(st.SampleMeta(sid, sid, f"r{sid}"), sample(n, sid, fp))
        sw.commit()
        w.close()
    a = st.StoreReader(tmp_path / "w0")
    b = st.StoreReader(tmp_path / "w3")
    for i in range(4):
        assert all(np.array_equal(x, y) for x, y in zip(a.read(i).values(), b.read(i).values(), strict=True))


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_direct_chunk_decode_equals_zarr(tmp_path, codec):
    import zarr

    fp = fingerprint(st.FP8, codec, chunk=16)
    write_store(tmp_path / "s", fp, [[5, 30, 1, 17]])
    r = st.StoreReader(tmp_path / "s")
    for name in r.arrays:
        arr = zarr.open_array(str(r.shards[0].path / st.TENSORS_DIR / name), mode="r")
        for c in range(-(-arr.shape[0] // 16)):
            direct = r._decode_chunk(0, name, c)
            assert direct.shape[0] == 16 and np.array_equal(direct[: arr.shape[0] - 16 * c], arr[16 * c:16 * c + 16])


def test_shards_are_bound_to_their_place(tmp_path):
    """A copied, swapped or re-labelled shard is internally consistent; its commit record's shard number and
    records, and the index's sample ids, bind it to its directory and the plan at every level."""
    import shutil

    import pyarrow as pa

    from pipeline.store.format import _meta_json, _read_arrow
    from pipeline.store.integrity import _write_commit_record

    fp = fingerprint("float16", "none", chunk=16)
    w, _ = write_store(tmp_path / "s", fp, [[10, 3], [8], [5]])

    def damaged(name: str, change) -> tuple[list[str], str]:
        root = tmp_path / name
        shutil.copytree(tmp_path / "s", root)
        change(root / st.SHARDS_DIR)
        with pytest.raises(st.StoreError) as opened:
            st.StoreReader(root)
        return st.verify_store(root, write_result=False), str(opened.value)

    def copy_0_over_2(shards):
        shutil.rmtree(shards / "shard-00002")
        shutil.copytree(shards / "shard-00000", shards / "shard-00002")

    problems, opened = damaged("copied", copy_0_over_2)
    assert problems == ["shard-00002: commit.arrow: the shard records itself as shard-00000, but lies in "
                        "shard-00002/ (a copied, moved or swapped shard directory)"]  # fmt: skip
    assert "shard-00002/commit.arrow" in opened and "shard 2 is damaged" in opened

    def swap_0_1(shards):
        (shards / "shard-00000").rename(shards / "x")
        (shards / "shard-00001").rename(shards / "shard-00000")
        (shards / "x").rename(shards / "shard-00001")

    problems, opened = damaged("swapped", swap_0_1)
    assert [p.split(":")[0] for p in problems] == ["shard-00000", "shard-00001"] and "shards 0-1 are damaged" in opened

    def recommit(shard, meta_change=None, index_change=None):
        """Rewrite a shard's commit record (after editing its index), as a writer with other ideas would."""
        meta = _meta_json(_read_arrow(shard / st.COMMIT_FILE))
        if index_change:
            index = _read_arrow(shard / st.INDEX_FILE).to_pylist()
            index_change(index)
            table = pa.Table.from_pylist(index, schema=st.INDEX_SCHEMA)
            with pa.OSFile(str(shard / st.INDEX_FILE), "wb") as f, pa.ipc.new_file(f, table.schema) as wr:
                wr.write_table(table)
        (shard / st.COMMIT_FILE).unlink()
        _write_commit_record(shard, meta_change(meta) if meta_change else meta)

    problems, _ = damaged("records", lambda shards: recommit(shards / "shard-00001",
                                                             lambda m: {**m, "records": [0, 4]}))  # fmt: skip
    assert problems == ["shard-00001: commit.arrow: holds records [0, 4), the plan gives shard-00001 [4, 8)"]

    def twice(index):
        index[1]["sample_id"] = index[0]["sample_id"]

    problems, _ = damaged("ids", lambda shards: recommit(shards / "shard-00000", index_change=twice))
    assert problems == ["shard-00000: index.arrow: sample ids 0..0 are not the shard's records [0, 4), each once"]
    # extraction's own check (what decides a repair) sees the same
    assert st.StoreWriter(tmp_path / "copied", fp, w.plan, target()).shard_state(2)[0] == "corrupt"
