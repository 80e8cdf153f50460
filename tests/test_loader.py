"""The store-backed loader: packing, document boundaries, determinism, rank split, resume position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.store import StoreReader
from pipeline.train.loader import LoaderState, PackedLoader, Prefetcher, pack_samples, split_samples


@pytest.fixture(scope="module")
def reader(tiny_store) -> StoreReader:
    return StoreReader(tiny_store)


def test_packing_keeps_waste_low_on_real_lengths():
    # lengths of real ShareGPT conversations rendered with SmolLM2's template (a spread from 40 to 2048 tokens)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.2, 0.9, size=600).astype(int), 40, 2048)
    packs = pack_samples(lengths, rng.permutation(600), 2048)
    used = sum(n for p in packs for _, n in p)
    assert 1 - used / (len(packs) * 2048) < 0.05
    assert sorted(i for p in packs for i, _ in p) == list(range(600))  # every sample exactly once
    assert all(sum(n for _, n in p) <= 2048 for p in packs)


def test_collate_marks_documents(reader):
    loader = PackedLoader(reader, np.arange(len(reader)), ("hidden_aux", "topk_ids", "topk_logprobs"), 512)
    pack = loader.epoch_packs(0)[0]
    batch = loader.batch(pack)
    doc, pos = batch["doc_ids"][0], batch["position_ids"][0]
    start = 0
    for d, (i, n) in enumerate(pack):
        assert (doc[start:start + n] == d).all()
        assert torch.equal(pos[start:start + n], torch.arange(n))
        s = reader.sample(i)
        assert torch.equal(batch["input_ids"][0, start:start + n], s["input_ids"][:n].long())
        assert torch.equal(batch["hidden_aux"][0, start:start + n], s["hidden_aux"][:n].reshape(n, -1).float())
        start += n
    assert (doc[start:] == -1).all() and (batch["loss_mask"][0, start:] == 0).all()
    assert batch["hidden_aux"].dtype == torch.float32 and batch["topk_ids"].dtype == torch.long


def test_epochs_are_seeded_and_ranks_disjoint(reader):
    idx = np.arange(len(reader))
    one = PackedLoader(reader, idx, ("hidden_last",), 512, seed=3)
    assert one.epoch_packs(0) == PackedLoader(reader, idx, ("hidden_last",), 512, seed=3).epoch_packs(0)
    assert one.epoch_packs(0) != one.epoch_packs(1)
    r0 = PackedLoader(reader, idx, ("hidden_last",), 512, seed=3, rank=0, world_size=2).epoch_packs(0)
    r1 = PackedLoader(reader, idx, ("hidden_last",), 512, seed=3, rank=1, world_size=2).epoch_packs(0)
    assert len(r0) == len(r1)
    s0, s1 = {i for p in r0 for i, _ in p}, {i for p in r1 for i, _ in p}
    assert not s0 & s1
    assert s0 | s1 <= set(idx.tolist())


def test_resume_position_reproduces_the_stream(reader):
    idx = np.arange(len(reader))
    full = PackedLoader(reader, idx, ("hidden_last",), 256, seed=1)
    n = full.packs_per_epoch()
    stream = [(s.as_dict(), b["input_ids"]) for (s, b), _ in zip(full, range(n + 3), strict=False)]
    resumed = PackedLoader(reader, idx, ("hidden_last",), 256, seed=1,
                           state=LoaderState(**stream[n - 2][0]))  # fmt: skip
    for (state, batch), (want_state, want_ids) in zip(resumed, stream[n - 1:], strict=False):
        assert state.as_dict() == want_state and torch.equal(batch["input_ids"], want_ids)


def test_prefetcher_forwards_errors():
    def broken():
        yield 1
        raise ValueError("bad sample in shard 3")

    pre = Prefetcher(broken(), depth=2)
    assert next(pre) == 1
    with pytest.raises(ValueError, match="shard 3"):
        next(pre)
    pre.close()


def test_validation_split_is_stable(reader):
    train, val = split_samples(reader, 0.25, seed=0)
    assert len(val) > 0 and not set(train) & set(val) and len(train) + len(val) == len(reader)
    assert np.array_equal(val, split_samples(reader, 0.25, seed=0)[1])
