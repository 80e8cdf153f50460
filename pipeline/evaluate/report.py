"""The evaluation report: aggregation, JSON + PNG files, the printed summary and a side-by-side comparison."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

TAU_CONVENTION = (
    "tau = decode tokens / target verification forwards. Decode tokens: every new token except the first, which "
    "the prefill forward (not counted) produced; each verification emits accepted drafts + 1 bonus token (fewer "
    "only when a stop token or max_new_tokens cuts it). Plain decoding has tau = 1."
)


def _sum_lists(lists: list[list[int]]) -> list[int]:
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def build_report(records: list[dict[str, Any]], settings: dict[str, Any], draft: dict[str, Any],
                 target: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Overall numbers are token-weighted (sums over all turns), not means of per-turn ratios."""
    forwards = sum(r["target_forwards"] for r in records)
    decode_tokens = sum(r["decode_tokens"] for r in records)
    attempted = _sum_lists([r["attempted"] for r in records])
    accepted = _sum_lists([r["accepted"] for r in records])
    spec_tps = _rate(sum(r["new_tokens"] for r in records), sum(r["wall_s"] for r in records))
    base = [r["baseline"] for r in records]
    base_tps = _rate(sum(b["new_tokens"] for b in base), sum(b["wall_s"] for b in base))
    greedy = settings.get("temperature", 0) <= 0
    lengths = Counter(n for r in records for n in r["accept_lengths"])
    baselines = {"plain": {"tokens_per_s": base_tps, "tau": 1.0, "mismatches": 0 if greedy else None}}
    for name in sorted({n for r in records for n in r.get("baselines", {})}):
        runs = [r["baselines"][name] for r in records if name in r.get("baselines", {})]
        baselines[name] = {
            "tokens_per_s": _rate(sum(b["new_tokens"] for b in runs), sum(b["wall_s"] for b in runs)),
            "tau": _rate(sum(b["decode_tokens"] for b in runs), sum(b["target_forwards"] for b in runs)),
            "mismatches": sum(bool(b["mismatch"]) for b in runs) if greedy else None,
        }  # fmt: skip
    for b in baselines.values():
        b["speedup_of_head"] = _rate(spec_tps or 0.0, b["tokens_per_s"]) if b["tokens_per_s"] else None
    return {
        "acceptance_length": _rate(decode_tokens, forwards),
        "acceptance_length_convention": TAU_CONVENTION,
        "per_position_acceptance": [_rate(a, t) for a, t in zip(accepted, attempted, strict=True)],
        "per_position_acceptance_convention": "P(depth d accepted | depth d-1 accepted and a draft at depth d "
                                              "was there to try); chain: position d",
        "per_position_attempted": attempted,
        "per_position_accepted": accepted,
        "accept_length_histogram": {str(k): lengths[k] for k in sorted(lengths)},
        "mismatches": sum(bool(r["mismatch"]) for r in records) if greedy else None,
        "target_forwards": forwards,
        "prefill_forwards": sum(r["prefill_forwards"] for r in records),
        "decode_tokens": decode_tokens,
        "new_tokens": sum(r["new_tokens"] for r in records),
        "tokens_per_s": spec_tps,
        "baseline_tokens_per_s": base_tps,
        "baseline_target_forwards": sum(b["target_forwards"] for b in base),
        "speedup": _rate(spec_tps or 0.0, base_tps or 0.0) if base_tps else None,
        "baselines": baselines,
        "baselines_convention": "same prompts, same run: plain = our one-token-per-forward loop (the lossless "
                                "reference); generate = transformers generate; prompt_lookup = transformers "
                                "generate(prompt_lookup_num_tokens=10). speedup_of_head = head tok/s / baseline tok/s",
        "turns": len(records),
        "settings": settings,
        "draft": draft,
        "target": target,
        "prompts": records,
    }


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the JSON report and its PNG (same name, ``.png``); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    png = path.with_suffix(".png")
    plot_report(report, png)
    return path, png


def plot_report(report: dict[str, Any], png: Path) -> None:
    """Per-position acceptance bars, tokens-per-forward histogram, per-turn tau histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rates = [r if r is not None else 0.0 for r in report["per_position_acceptance"]]
    axes[0].bar(range(1, len(rates) + 1), rates, color="tab:blue")
    axes[0].set(title="acceptance per draft position / depth", xlabel="position (depth)", ylabel="P(accept | prev)",
                ylim=(0, 1))  # fmt: skip
    hist = {int(k): v for k, v in report["accept_length_histogram"].items()}
    axes[1].bar(list(hist), list(hist.values()), color="tab:green")
    tau = report["acceptance_length"]
    axes[1].set(title=f"tokens per target forward (tau = {tau:.2f})" if tau else "tokens per target forward",
                xlabel="tokens emitted (accepted + bonus)", ylabel="verification forwards")  # fmt: skip
    taus = [r["tau"] for r in report["prompts"] if r["tau"] is not None]
    axes[2].hist(taus, bins=min(20, max(len(taus), 1)), color="tab:orange")
    axes[2].set(title="tau per turn", xlabel="tau", ylabel="turns")
    s = report["settings"]
    fig.suptitle(f"{report['draft'].get('variant')} {s['mode']} depth={s['depth']} "
                 + (f"top_k={s['top_k']} total={s['total_tokens']} " if s["mode"] == "tree" else "")
                 + f"T={s['temperature']}  speedup {_fmt(report['speedup'], 'x')}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def cost_warning(report: dict[str, Any]) -> str | None:
    """A line for a report whose cost model disagrees with the plain decoding timed in the same run."""
    check = report.get("budget", {}).get("cost_check")
    if not check or not check["stale"]:
        return None
    if report["budget"].get("recalibrated"):
        return (f"the cost model, measured again before this evaluation, prices a 1-token target forward at "
                f"{1e3 * check['modelled_step_s']:.1f} ms, and this run's plain decoding took "
                f"{1e3 * check['observed_step_s']:.1f} ms per step: the machine's load changed during the run")
    return (f"the cost model prices a 1-token target forward at {1e3 * check['modelled_step_s']:.1f} ms, this run's "
            f"plain decoding took {1e3 * check['observed_step_s']:.1f} ms per step: it was probably measured under "
            f"another load, so drafting weighed wrong costs; `pipeline eval --recalibrate` measures it again (or "
            f"delete the cached models in $PIPELINE_CACHE/costs/)")  # fmt: skip


def recalibration_note(report: dict[str, Any]) -> str | None:
    """A line for a report whose cached cost model was found stale before drafting and measured again."""
    done = report.get("budget", {}).get("recalibrated")
    if not done:
        return None
    return (f"the cached cost model priced a 1-token target forward at {1e3 * done['old_verify_1_s']:.1f} ms, a plain "
            f"decoding step took {1e3 * done['probe']['observed_step_s']:.1f} ms here: measured again "
            f"({1e3 * done['new_verify_1_s']:.1f} ms), cached, and used for this evaluation")  # fmt: skip


def format_summary(report: dict[str, Any]) -> str:
    s = report["settings"]
    pos = " ".join(_fmt(r) for r in report["per_position_acceptance"])
    mism = report["mismatches"]
    lines = [
        f"draft      {report['draft'].get('path')} ({report['draft'].get('variant')})",
        f"target     {report['target'].get('path')}",
        f"settings   mode={s['mode']} depth={s['depth']} top_k={s['top_k']} total_tokens={s['total_tokens']} "
        f"temperature={s['temperature']} max_new_tokens={s['max_new_tokens']}",
        f"turns      {report['turns']} ({report['new_tokens']} new tokens)",
        f"tau        {_fmt(report['acceptance_length'])} tokens per target forward, bonus token included "
        f"({report['decode_tokens']} decode tokens / {report['target_forwards']} verification forwards; "
        f"prefill not counted)",
        f"accept     per position: {pos}",
        f"speed      {_fmt(report['tokens_per_s'], ' tok/s', 1)} speculative vs "
        f"{_fmt(report['baseline_tokens_per_s'], ' tok/s', 1)} plain -> speedup {_fmt(report['speedup'], 'x')}",
        "mismatches " + ("n/a (sampling)" if mism is None else f"{mism} turn(s) differ from plain greedy"),
    ]
    if "vllm" in report:  # served by vLLM: its own counters, as vLLM reports them
        v, c = report["vllm"], report["vllm"]["counters"]
        lines.append(f"vllm       {v['version']}: {c['drafts']} drafts, {c['draft_tokens']} draft tokens, "
                     f"{c['accepted']} accepted (per position {' '.join(map(str, c['accepted_per_pos']))}), mean "
                     f"acceptance length {_fmt(v['mean_acceptance_length'])}")  # fmt: skip
    for name, b in report.get("baselines", {}).items():
        if name == "plain":
            continue
        tau = f", tau {_fmt(b['tau'])}" if name == "prompt_lookup" else ""
        lines.append(f"baseline   {name:<14} {_fmt(b['tokens_per_s'], ' tok/s', 1)}{tau}; the head is "
                     f"{_fmt(b['speedup_of_head'], 'x')} of it" + (f" ({b['mismatches']} mismatching turns)"
                                                                    if b.get("mismatches") else ""))  # fmt: skip
    if report.get("budget"):
        d = report["budget"]["decisions"]
        lines.append(f"budget     cost-aware drafting: {d['skipped']} of {d['rounds']} rounds drafted nothing, "
                     f"{d['verified_drafts']} drafted tokens verified")  # fmt: skip
        if note := recalibration_note(report):
            lines.append(f"costs      {note}")
        if warning := cost_warning(report):
            lines.append(f"warning    {warning}")
    return "\n".join(lines)


COMPARE_ROWS = [
    ("tau", "acceptance_length"), ("speedup", "speedup"), ("tokens/s", "tokens_per_s"),
    ("plain tokens/s", "baseline_tokens_per_s"), ("target forwards", "target_forwards"),
    ("decode tokens", "decode_tokens"), ("mismatches", "mismatches"), ("turns", "turns"),
]  # fmt: skip


def compare_reports(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """A side-by-side table of two reports (B - A in the last column where both are numbers)."""
    rows: list[tuple[str, Any, Any]] = []
    for key in ("variant", "path"):
        rows.append((f"draft {key}", a["draft"].get(key), b["draft"].get(key)))
    for key in ("mode", "depth", "top_k", "total_tokens", "temperature", "max_new_tokens"):
        rows.append((key, a["settings"].get(key), b["settings"].get(key)))
    rows += [(label, a.get(key), b.get(key)) for label, key in COMPARE_ROWS]
    for name in sorted(set(a.get("baselines", {})) | set(b.get("baselines", {})) - {"plain"}):
        rows.append((f"{name} tok/s", a.get("baselines", {}).get(name, {}).get("tokens_per_s"),
                     b.get("baselines", {}).get(name, {}).get("tokens_per_s")))  # fmt: skip
    pa, pb = a["per_position_acceptance"], b["per_position_acceptance"]
    for i in range(max(len(pa), len(pb))):
        rows.append((f"accept @{i + 1}", pa[i] if i < len(pa) else None, pb[i] if i < len(pb) else None))

    def diff(x: Any, y: Any) -> str:
        numeric = isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool)
        return _fmt(y - x) if numeric else ""

    width = max(len(str(_fmt(v))) for r in rows for v in r[1:]) + 2
    width = min(max(width, 12), 60)
    out = [f"{'':<18}{names[0][:width - 1]:<{width}}{names[1][:width - 1]:<{width}}B - A"]
    for label, x, y in rows:
        out.append(f"{label:<18}{str(_fmt(x))[-(width - 1):]:<{width}}{str(_fmt(y))[-(width - 1):]:<{width}}{diff(x, y)}")
    return "\n".join(out)
