"""Store-backed training data: a deterministic split, seeded per-epoch packing, rank sharding, prefetch.

A *pack* is one row of ``tokens_per_batch`` tokens holding whole samples back to back (first-fit over a shuffled
window); ``doc_ids`` mark the samples so attention and the EAGLE shift never cross them, and ``position_ids``
restart at 0 for each. Packs are a pure function of (store, seed, epoch, tokens_per_batch, shuffle), so the data a
run sees depends only on its config, and the position (epoch, pack) resumes exactly.

Two shuffles:

* ``global`` (uncompressed stores): every epoch permutes all samples, packs them, and rank r takes packs r, r+W, …
  Any sample is one memmap slice away, so a random order costs nothing.
* ``window`` (compressed stores, where a sample read decodes whole chunks): the unit is a Zarr chunk. Every epoch
  permutes the (shard, chunk) units that hold the first row of a training sample and deals them to ranks round
  robin; each rank walks its units in windows of ``window_chunks`` and shuffles the samples of one window among
  themselves before packing; first-fit bins close at the latest when the window after next starts, so a pack
  holds samples of two consecutive windows at most. A rank therefore decodes each of its chunks about once per
  epoch, and keeps at most
  ``cache_chunks(window)`` decoded chunks per array (the reader's LRU): the memory bound is
  ``cache_chunks x chunk rows x stored bytes/token of the arrays read`` (logged as ``loader_cache_bytes``).
  Ranks cut their pack lists to the shortest one, so every rank takes the same number of steps.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.store import SCALE_SUFFIX, StoreReader, storage_dtype

OPEN_BINS = 16  # first-fit window: more bins = less padding, more reordering
SHUFFLES = ("auto", "global", "window")


def cache_chunks(window_chunks: int) -> int:
    """Decoded chunks per array the window shuffle keeps: a pack mixes two consecutive windows at most, and each
    chunk of them may need its successor (samples straddle chunk edges); two spare."""
    return 4 * window_chunks + 2


def resolve_shuffle(shuffle: str, reader: StoreReader, fields: tuple[str, ...]) -> str:
    """``auto`` -> ``window`` when any array the run reads is compressed, else ``global``."""
    if shuffle not in SHUFFLES:
        raise ValueError(f"--shuffle {shuffle!r}: choose one of {', '.join(SHUFFLES)}")
    if shuffle != "auto":
        return shuffle
    names = ("input_ids", "loss_mask", *fields)
    return "window" if any(reader.compressed(n) for n in names) else "global"


def split_samples(reader: StoreReader, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices by a hash of the sample id: stable across runs, worker counts and store order."""
    if val_fraction <= 0:
        return np.arange(len(reader)), np.zeros(0, np.int64)
    keys = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{int(s)}".encode()).digest()[:8], "little")
                     for s in reader.sample_ids], dtype=np.uint64)  # fmt: skip
    val = keys < np.uint64(int(val_fraction * 2**64))
    return np.flatnonzero(~val), np.flatnonzero(val)


def pack_samples(lengths: np.ndarray, order: np.ndarray, budget: int,
                 windows: np.ndarray | None = None) -> list[list[tuple[int, int]]]:  # fmt: skip
    """First-fit packing of samples (in ``order``) into rows of ``budget`` tokens; returns [(sample, length)].

    ``windows`` (window index of each position of ``order``, non-decreasing): a bin still open when window
    ``g + 2`` starts is closed, so a pack mixes samples of two consecutive windows at most.
    """
    packs: list[list[tuple[int, int]]] = []
    bins: list[tuple[int, list[tuple[int, int]], int]] = []  # (free tokens, items, window it opened in)
    for pos, i in enumerate(order):
        g = 0 if windows is None else int(windows[pos])
        if windows is not None and bins and bins[0][2] < g - 1:
            packs.extend(items for _, items, opened in bins if opened < g - 1)
            bins = [b for b in bins if b[2] >= g - 1]
        n = min(int(lengths[i]), budget)  # a sample longer than a row is cut to it
        for b, (free, items, opened) in enumerate(bins):
            if n <= free:
                items.append((int(i), n))
                bins[b] = (free - n, items, opened)
                break
        else:
            if len(bins) == OPEN_BINS:  # close the fullest bin to make room
                fullest = min(range(len(bins)), key=lambda b: bins[b][0])
                packs.append(bins.pop(fullest)[1])
            bins.append((budget - n, [(int(i), n)], g))
    packs.extend(items for _, items, _ in bins)
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
    shuffle: str = "global"  # global | window (see the module docstring; resolve "auto" with resolve_shuffle)
    window_chunks: int = 8

    def __post_init__(self):
        if self.shuffle not in ("global", "window"):
            raise ValueError(f"shuffle {self.shuffle!r}: resolve it to global or window first (resolve_shuffle)")
        if self.window_chunks < 1:
            raise ValueError(f"--shuffle-window {self.window_chunks}: must be at least 1 chunk")
        if self.shuffle == "window":
            self.reader.cache_chunks = max(self.reader.cache_chunks, cache_chunks(self.window_chunks))

    def cache_bytes(self) -> int:
        """Upper bound of the reader's decoded-chunk cache for this loader's arrays (0 when nothing is decoded)."""
        fields = ("input_ids", "loss_mask", *self.fields)
        names = [a for a in self.reader.arrays if a in fields or a.removesuffix(SCALE_SUFFIX) in fields]
        per_token = sum(int(np.prod(self.reader.arrays[n][0], dtype=np.int64))
                        * storage_dtype(self.reader.arrays[n][1]).itemsize
                        for n in names if self.reader.compressed(n))  # fmt: skip
        rows = max((self.reader.chunk_rows(k) for k in range(len(self.reader.shards))), default=0)
        return self.reader.cache_chunks * rows * per_token

    def epoch_packs(self, epoch: int) -> list[list[tuple[int, int]]]:
        if self.shuffle == "window":
            return self._window_packs(epoch)[self.rank]
        rng = np.random.default_rng([self.seed, epoch])
        packs = self._pack(self.indices[rng.permutation(len(self.indices))])
        usable = len(packs) - len(packs) % self.world_size  # every rank takes the same number of steps
        return packs[self.rank:usable:self.world_size]

    def _window_packs(self, epoch: int) -> list[list[list[tuple[int, int]]]]:
        """Every rank's packs of one epoch under the window shuffle (each rank computes all: they are cheap and
        the shortest list sets the common length)."""
        shard, chunk = self.reader.home_chunks()
        units, unit_of = np.unique(np.stack([shard[self.indices], chunk[self.indices]], 1), axis=0,
                                   return_inverse=True)  # fmt: skip
        unit_of = unit_of.reshape(-1)
        by_unit = np.argsort(unit_of, kind="stable")  # storage order inside a unit
        bounds = np.searchsorted(unit_of[by_unit], np.arange(len(units) + 1))
        dealt = np.random.default_rng([self.seed, epoch]).permutation(len(units))
        per_rank = []
        for r in range(self.world_size):
            mine = dealt[r::self.world_size]
            order: list[np.ndarray] = []
            windows: list[np.ndarray] = []
            for g, w in enumerate(range(0, len(mine), self.window_chunks)):
                members = np.concatenate([by_unit[bounds[u]:bounds[u + 1]] for u in mine[w:w + self.window_chunks]])
                rng = np.random.default_rng([self.seed, epoch, r, g])
                order.append(self.indices[members[rng.permutation(len(members))]])
                windows.append(np.full(len(members), g))
            cat = np.concatenate(order) if order else np.zeros(0, np.int64)
            per_rank.append(self._pack(cat, np.concatenate(windows) if windows else None))
        common = min(len(p) for p in per_rank)
        return [p[:common] for p in per_rank]

    def _pack(self, order: np.ndarray, windows: np.ndarray | None = None) -> list[list[tuple[int, int]]]:
        if self.packing:
            return pack_samples(self.reader.lengths, order, self.tokens_per_batch, windows)
        return [[(int(i), min(int(self.reader.lengths[i]), self.tokens_per_batch))] for i in order]

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
    sizes = {name: math.prod(reader.fields[name][0]) for name in fields}  # hidden_aux: A*H, or k when projected
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
