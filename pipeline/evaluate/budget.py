"""Cost-aware drafting: verify only as many drafted tokens as pay for themselves.

On a CPU a target forward over ``n`` new tokens costs far more than over one (its matmuls stop being pure weight
reads), and every draft step costs time too, so a drafted token is worth verifying only if it is likely to be
accepted. This module holds the two pieces of that decision:

* :class:`CostModel` — measured seconds of a target forward over ``n = 1..N`` new tokens and of one draft step,
  cached per machine / target / draft (``$PIPELINE_CACHE/costs``) so that every run decides the same way;
* :class:`AcceptanceModel` — P(a drafted token is accepted | its parent was) as a function of the draft's own
  probability for it, learned online from the verifications (binned, with a prior at the identity), so that an
  over- or under-confident head is read correctly after a few rounds;

and :class:`Budget`, which turns them into decisions: the number of tree nodes / chain tokens ``n`` that
maximises the expected rate ``(1 + sum of the selected nodes' acceptance probabilities) / (draft time +
verify(1 + n))``, whether drafting deeper can still beat the best rate so far, and whether to draft at all this
round. None of this changes what is emitted (verification decides that), only what it costs: greedy stays
token-identical to plain decoding and sampling stays distribution-exact.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MEASURED_TOKENS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
COSTS_VERSION = 2  # part of the cache key: a new way of measuring re-measures


@dataclass
class CostModel:
    """``verify_s[n]``: seconds of one target forward over ``n`` new tokens after a cached prefix (measured at the
    ``MEASURED_TOKENS`` counts, linear in between and beyond); ``draft_s``: one draft step over one new row."""

    verify_s: dict[int, float]
    draft_s: float
    source: dict = field(default_factory=dict)

    def verify(self, n: int) -> float:
        pts = sorted(self.verify_s)
        if n in self.verify_s:
            return self.verify_s[n]
        lo = max([p for p in pts if p < n], default=pts[0])
        hi = min([p for p in pts if p > n], default=None)
        if hi is None:  # beyond the table: the slope of its last two points
            lo, hi = pts[-2], pts[-1]
        slope = (self.verify_s[hi] - self.verify_s[lo]) / (hi - lo)
        return self.verify_s[lo] + slope * (n - lo)

    def to_json(self) -> dict:
        return {"version": COSTS_VERSION, "verify_s": {str(k): v for k, v in self.verify_s.items()},
                "draft_s": self.draft_s, "source": self.source}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> CostModel:
        return cls({int(k): float(v) for k, v in d["verify_s"].items()}, float(d["draft_s"]), d.get("source", {}))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _after_prefix(target, device: torch.device, prefix: int, max_new: int):
    """A target KV cache holding ``prefix`` random tokens, the prefill's hidden states, and ``forward(n)``: one
    forward over ``n`` new tokens after that cache, which is then compacted back to the prefix (what a verification
    of ``n`` costs)."""
    from pipeline.evaluate.target import compact_cache, new_cache, sync, target_forward

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(target.config.vocab_size), (1, prefix + max_new), generator=gen).to(device)
    cache = new_cache(target)
    _, hs = target_forward(target, ids[:, :prefix], torch.arange(prefix, device=device)[None], cache, hidden=True)

    def forward(n: int) -> None:
        target_forward(target, ids[:, prefix:prefix + n], torch.arange(prefix, prefix + n, device=device)[None],
                       cache, hidden=True)  # fmt: skip
        compact_cache(cache, prefix, [])
        sync(device)  # on a GPU the kernels run asynchronously: time them, not their launch

    return ids, hs, forward


@torch.no_grad()
def measure_costs(target, drafter, prefix: int = 128, reps: int = 5, max_tokens: int = 32) -> CostModel:
    """Time target forwards over ``n`` new tokens after a ``prefix``-token cache, and one draft step, on this
    machine (median of ``reps``; the first call of each shape is a discarded warm-up)."""
    from pipeline.draft.layers import KVCache, causal_mask
    from pipeline.evaluate.target import sync

    device = drafter.device
    ids, hs, forward = _after_prefix(target, device, prefix, max_tokens)
    verify_s = {}
    for n in (m for m in MEASURED_TOKENS if m <= max_tokens):
        forward(n)
        verify_s[n] = _median_time(lambda n=n: forward(n), reps)

    dcache = KVCache()
    rows = drafter.row_inputs(hs)
    drafter.step(rows, ids[:, 1:prefix + 1], torch.arange(prefix, device=device)[None], dcache,
                 causal_mask(prefix, 0, device), last_only=True)  # fmt: skip
    one = torch.ones(1, prefix + 1, dtype=torch.bool, device=device)

    def draft() -> None:
        drafter.step(rows[:, -1:], ids[:, prefix:prefix + 1], torch.tensor([[prefix]], device=device), dcache, one,
                     last_only=True)  # fmt: skip
        dcache.crop(prefix)
        sync(device)

    def draft_after_forward() -> float:
        # Timed right after a target forward, as in decoding: that forward evicts the draft's weights from the CPU's
        # caches. Timed back to back instead (warm), a step cost 0.57x (EAGLE-3) / 0.83x (EAGLE-1) of this on a
        # 2-core CPU, and cost-aware drafting then verified drafts that did not pay.
        forward(1)
        start = time.perf_counter()
        draft()
        return time.perf_counter() - start

    draft()
    draft_s = statistics.median(draft_after_forward() for _ in range(reps * 2))
    return CostModel(verify_s, draft_s, {"measured_at": time.time(), "prefix": prefix, "reps": reps,
                                         "threads": torch.get_num_threads(), "device": str(device)})  # fmt: skip


@torch.no_grad()
def pick_linears(target, drafter, prefix: int = 128, counts: tuple[int, ...] = (2, 4, 8),
                 reps: int = 3) -> tuple[str, dict[str, dict[int, float]]]:  # fmt: skip
    """``skinny`` or ``stock``, whichever runs target forwards over ``counts`` new tokens (what verification
    feeds) faster on this machine, measured interleaved; leaves target and draft set to the winner. Also returns
    the medians in ms. Off the CPU ``stock`` (the skinny path only applies there)."""
    from pipeline.evaluate.target import set_linears

    if drafter.device.type != "cpu":
        return "stock", {}
    _, _, forward = _after_prefix(target, drafter.device, prefix, max(counts))
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in counts} for k in ("stock", "skinny")}
    for rep in range(reps + 1):  # round 0 warms both up and is discarded
        for kind in times:
            set_linears(kind, target, drafter.model)
            for n in counts:
                start = time.perf_counter()
                forward(n)
                if rep:
                    times[kind][n].append(time.perf_counter() - start)
    ms = {k: {n: 1e3 * statistics.median(v) for n, v in per.items()} for k, per in times.items()}
    best = min(ms, key=lambda k: sum(ms[k].values()))
    set_linears(best, target, drafter.model)
    return best, ms


def costs_key(target, drafter, dtype: str) -> str:
    """What a cached measurement is valid for: this machine, torch, threads, device, dtype, target and draft."""
    from pipeline.store import config_sha256

    dc = drafter.model.config
    key = {"version": COSTS_VERSION, "host": platform.node(), "cpu": platform.processor(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": str(drafter.device), "dtype": dtype,
           "target": config_sha256(target.config.to_dict()), "draft": drafter.variant,
           "draft_vocab": getattr(dc, "draft_vocab_size", dc.vocab_size), "hidden": dc.hidden_size}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


STALE_RANGE = (0.8, 1.25)  # observed / modelled plain-step time outside this: the cost model was probably measured
# under another load (cached while the CPU was busy, or the CPU is busier now) and decides on wrong prices


def check_costs(costs: CostModel, records: list[dict]) -> dict | None:
    """The cost model's 1-token forward against what this run's plain decoding took per decoding forward (its wall
    time less the prefill, over its forwards); None when the plain decoding made no decoding forward."""
    plain = [r["baseline"] for r in records]
    forwards, modelled = sum(b["target_forwards"] for b in plain), costs.verify(1)
    if forwards == 0 or modelled <= 0:
        return None
    observed = sum(b["wall_s"] - b["prefill_s"] for b in plain) / forwards
    ratio = observed / modelled
    return {"modelled_step_s": modelled, "observed_step_s": observed, "ratio": ratio,
            "stale": not STALE_RANGE[0] <= ratio <= STALE_RANGE[1]}  # fmt: skip


def probe_costs(target, prompt: torch.Tensor, costs: CostModel, tokens: int = 32, reps: int = 2) -> dict | None:
    """:func:`check_costs` against a plain greedy decoding of ``tokens`` new tokens after ``prompt`` (no stop token;
    the fastest of ``reps``, so the first may warm up): a cost model measured under another load is found before
    the evaluation drafts by it, in about ``reps x tokens`` target forwards."""
    from pipeline.evaluate.target import target_generate

    best = None
    for _ in range(reps):
        g = target_generate(target, prompt, tokens, set(), 0.0)
        best = g if best is None or g.wall_s < best.wall_s else best
    return check_costs(costs, [{"baseline": {"target_forwards": best.target_forwards, "wall_s": best.wall_s,
                                             "prefill_s": best.prefill_s}}])  # fmt: skip


def load_costs(target, drafter, dtype: str, path: str | Path | None = None, recalibrate: bool = False) -> CostModel:
    """The cost model from ``path`` (a JSON file written by an earlier run), else the per-machine cache, measuring
    (and caching) it when absent or when ``recalibrate``."""
    from pipeline.assets import cache_dir

    file = Path(path) if path else cache_dir() / "costs" / f"{costs_key(target, drafter, dtype)}.json"
    if file.exists() and not recalibrate:
        return CostModel.from_json(json.loads(file.read_text()))
    costs = measure_costs(target, drafter)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(costs.to_json(), indent=2))
    tmp.replace(file)
    return costs


class AcceptanceModel:
    """P(accepted | parent accepted) for a drafted token of draft probability ``q``: ``bins`` equal-width bins of
    ``q``, each a Beta posterior whose prior (``prior`` pseudo-counts) sits at the bin's centre."""

    def __init__(self, bins: int = 10, prior: float = 4.0):
        centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        self.bins = bins
        self.hits = centres * prior
        self.tries = torch.full((bins,), prior, dtype=torch.float64)

    def _bin(self, q: torch.Tensor) -> torch.Tensor:
        return (q.double().clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        b = self._bin(q.cpu())
        return (self.hits[b] / self.tries[b]).to(torch.float32)

    def update(self, q: list[float], accepted: list[bool]) -> None:
        if not q:
            return
        b = self._bin(torch.tensor(q))
        self.tries.index_add_(0, b, torch.ones(len(q), dtype=torch.float64))
        self.hits.index_add_(0, b, torch.tensor(accepted, dtype=torch.float64))

    def state(self) -> dict:
        return {"bins": self.bins, "rate": (self.hits / self.tries).tolist(), "tries": self.tries.tolist()}


@dataclass
class Budget:
    """Decisions of cost-aware drafting (see the module docstring). When drafting looks unprofitable the draft
    still runs now and then (a probe), so that a context where the head does well is noticed: after
    ``probe_every`` skipped rounds, twice as many after each refused probe (at most ``probe_max``)."""

    costs: CostModel
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    probe_every: int = 4  # skipped rounds before the first probe; doubled after each refused probe ...
    probe_max: int = 32  # ... up to this, and back to probe_every once a probe is accepted
    probe_interval: int = field(init=False)  # skipped rounds before the next probe
    probing: bool = field(default=False, init=False)  # this round drafts only to probe
    recent_first: float = 0.5  # running estimate of the first drafted token's acceptance probability
    skipped: int = 0
    decisions: dict = field(default_factory=lambda: {"rounds": 0, "skipped": 0, "probes": 0, "verified_drafts": 0})

    def __post_init__(self) -> None:
        self.probe_interval = self.probe_every

    def rate(self, expected: float, n: int, draft_steps: int) -> float:
        """Expected tokens per second of verifying ``n`` drafted tokens worth ``expected`` accepted tokens."""
        return (1.0 + expected) / (draft_steps * self.costs.draft_s + self.costs.verify(1 + n))

    def best_count(self, probs_sorted: list[float], draft_steps: int) -> tuple[int, float]:
        """``(n, rate)`` maximising :meth:`rate` over the ``n`` most likely nodes (``probs_sorted`` descending,
        an ancestor-closed order); ``n = 0`` verifies the root alone (a plain decoding step)."""
        best_n, best = 0, self.rate(0.0, 0, draft_steps)
        expected = 0.0
        for n, p in enumerate(probs_sorted, 1):
            expected += p
            r = self.rate(expected, n, draft_steps)
            if r > best:
                best_n, best = n, r
        return best_n, best

    def can_improve(self, expected: float, n: int, draft_steps: int, best: float, bound: float, more: int) -> bool:
        """Whether up to ``more`` further nodes, each accepted with probability at most ``bound`` and one more draft
        step each, could beat ``best`` when ``n`` nodes worth ``expected`` are selected now."""
        return any(self.rate(expected + j * bound, n + j, draft_steps + j) > best for j in range(1, more + 1))

    def should_draft(self, max_depth: int) -> bool:
        """Draft this round unless even a geometric chain at the recent first-token acceptance cannot beat plain
        decoding; then skip, but probe after ``probe_interval`` skipped rounds (backing off while probes fail, so
        that a head that never pays costs almost nothing)."""
        self.decisions["rounds"] += 1
        a = self.recent_first
        expected, cum, plain = 0.0, 1.0, self.rate(0.0, 0, 0)
        pays = False
        for k in range(1, max_depth + 1):
            cum *= a
            expected += cum
            if self.rate(expected, k, k) > plain:
                pays = True
                break
        self.probing = not pays
        if pays or self.skipped + 1 >= self.probe_interval:
            self.skipped = 0
            return True
        self.skipped += 1
        self.decisions["skipped"] += 1
        return False

    def observe(self, drafted, verified, verdict, emitted: list[int], temperature: float) -> None:
        """Learn from one verification: the tried drafts' probabilities and verdicts. Greedy verdicts are known for
        every drafted node the target's tokens decide (verified or not); sampled ones only for verified tries."""
        if temperature <= 0:
            tried = drafted.greedy_verdicts(emitted)
            roots = [i for i, p in enumerate(drafted.parents) if p < 0]
            first = emitted[0] in drafted.tokens[roots].tolist() if roots else None
        else:
            children = verified.children()
            tried = [(verified.probs[i], True) for i in verdict.path]
            last = verdict.path[-1] + 1 if verdict.path else 0
            if len(verdict.path) < verdict.attempted:  # every child of the last accepted node was tried and refused
                tried += [(verified.probs[c], False) for c in children[last]]
            first = bool(verdict.path) if children[0] else None
        self.acceptance.update([q for q, _ in tried], [a for _, a in tried])
        self.decisions["verified_drafts"] += len(verified)
        if first is not None:
            self.recent_first = 0.7 * self.recent_first + 0.3 * float(first)
            if self.probing:
                self.probed(first)

    def probed(self, accepted: bool) -> None:
        """A probe's outcome: an accepted first draft resets the probe interval, a refused one doubles it."""
        self.probe_interval = self.probe_every if accepted else min(2 * self.probe_interval, self.probe_max)
        self.decisions["probes"] += 1

    def report(self) -> dict:
        return {"costs": {"verify_s": {str(k): v for k, v in sorted(self.costs.verify_s.items())},
                          "draft_s": self.costs.draft_s, "source": self.costs.source},
                "decisions": dict(self.decisions), "acceptance_model": self.acceptance.state()}  # fmt: skip

