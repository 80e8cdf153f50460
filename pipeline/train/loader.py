"""Store-backed training data: a deterministic split, seeded per-epoch packing, rank sharding, prefetch.

A *pack* is one row of ``tokens_per_batch`` tokens holding whole samples back to back (first-fit over a shuffled
window); ``doc_ids`` mark the samples so attention and the EAGLE shift never cross them, and ``position_ids``
restart at 0 for each. Packs are a pure function of (store, seed, epoch, tokens_per_batch), and rank r takes packs
r, r+W, r+2W, … so the data a run sees depends only on its config, and the position (epoch, pack) resumes exactly.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.store import StoreReader

OPEN_BINS = 16  # first-fit window: more bins = less padding, more reordering


def split_samples(reader: StoreReader, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices by a hash of the sample id: stable across runs, worker counts and store order."""
    if val_fraction <= 0:
        return np.arange(len(reader)), np.zeros(0, np.int64)
    keys = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{int(s)}".encode()).digest()[:8], "little")
                     for s in reader.sample_ids], dtype=np.uint64)  # fmt: skip
    val = keys < np.uint64(int(val_fraction * 2**64))
    return np.flatnonzero(~val), np.flatnonzero(val)


def pack_samples(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[list[tuple[int, int]]]:
    """First-fit packing of samples (in ``order``) into rows of ``budget`` tokens; returns [(sample, length)]."""
    packs: list[list[tuple[int, int]]] = []
    bins: list[tuple[int, list[tuple[int, int]]]] = []  # (free tokens, items)
    for i in order:
        n = min(int(lengths[i]), budget)  # a sample longer than a row is cut to it
        for b, (free, items) in enumerate(bins):
            if n <= free:
                items.append((int(i), n))
                bins[b] = (free - n, items)
                break
        else:
            if len(bins) == OPEN_BINS:  # close the fullest bin to make room
                fullest = min(range(len(bins)), key=lambda b: bins[b][0])
                packs.append(bins.pop(fullest)[1])
            bins.append((budget - n, [(int(i), n)]))
    packs.extend(items for _, items in bins)
    return packs


@dataclass
class LoaderState:
    epoch: int = 0
    pack: int = 0  # next pack index (in this rank's list) within the epoch

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "pack": self.pack}


@dataclass
class PackedLoader:
    """Yields packed batches for one data-parallel rank, forever (epochs roll over)."""

    reader: StoreReader
    indices: np.ndarray
    fields: tuple[str, ...]
    tokens_per_batch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    packing: bool = True
    state: LoaderState = field(default_factory=LoaderState)

    def epoch_packs(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = self.indices[rng.permutation(len(self.indices))]
        if self.packing:
            packs = pack_samples(self.reader.lengths, order, self.tokens_per_batch)
        else:
            packs = [[(int(i), min(int(self.reader.lengths[i]), self.tokens_per_batch))] for i in order]
        usable = len(packs) - len(packs) % self.world_size  # every rank takes the same number of steps
        return packs[self.rank:usable:self.world_size]

    def packs_per_epoch(self) -> int:
        return len(self.epoch_packs(0))

    def waste(self, epoch: int = 0) -> float:
        """Share of padding tokens in this rank's packs of one epoch."""
        packs = self.epoch_packs(epoch)
        used = sum(n for p in packs for _, n in p)
        return 1.0 - used / (len(packs) * self.tokens_per_batch) if packs else 0.0

    def batch(self, pack: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return collate(self.reader, pack, self.fields, self.tokens_per_batch)

    def __iter__(self):
        while True:
            packs = self.epoch_packs(self.state.epoch)
            if not packs:
                raise ValueError(f"{self.reader.root}: no training pack for rank {self.rank} of {self.world_size} "
                                 f"({len(self.indices)} training samples)")  # fmt: skip
            while self.state.pack < len(packs):
                pack = packs[self.state.pack]
                yield LoaderState(self.state.epoch, self.state.pack + 1), self.batch(pack)
                self.state.pack += 1
            self.state = LoaderState(self.state.epoch + 1, 0)


def collate(reader: StoreReader, pack: list[tuple[int, int]], fields: tuple[str, ...], width: int) -> dict:
    """One [1, width] row in the batch format of pipeline/draft (fp32 features, int64 ids)."""
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.zeros(1, width, dtype=torch.long),
        "loss_mask": torch.zeros(1, width),
        "position_ids": torch.zeros(1, width, dtype=torch.long),
        "doc_ids": torch.full((1, width), -1, dtype=torch.long),
    }
    fp = reader.fingerprint
    h, k, a = fp["model"]["hidden_size"], fp["top_k"], len(fp["layers"]["aux"])
    sizes = {"hidden_last": h, "hidden_aux": a * h, "topk_ids": k, "topk_logprobs": k}
    for name in fields:
        dtype = torch.long if name == "topk_ids" else torch.float32
        out[name] = torch.zeros(1, width, sizes[name], dtype=dtype)
    pos = 0
    want = ("input_ids", "loss_mask", *fields)
    for doc, (i, n) in enumerate(pack):
        s = reader.sample(i, want)
        out["input_ids"][0, pos:pos + n] = s["input_ids"][:n].long()
        out["loss_mask"][0, pos:pos + n] = s["loss_mask"][:n].float()
        out["position_ids"][0, pos:pos + n] = torch.arange(n)
        out["doc_ids"][0, pos:pos + n] = doc
        for name in fields:
            out[name][0, pos:pos + n] = s[name][:n].reshape(n, -1).to(out[name].dtype)
        pos += n
    return out


class Prefetcher:
    """Runs the loader in a background thread, ``depth`` batches ahead; records how long the consumer waited."""

    def __init__(self, iterable, depth: int = 4):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, it) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self.queue.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self.queue.put(("error", e))

    def __next__(self):
        t = time.perf_counter()
        kind, item = self.queue.get()
        self.wait_s += time.perf_counter() - t
        if kind == "error":
            raise item
        return item

    def __iter__(self):
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
