"""Results as JSON (for machines and later comparisons) and Markdown with PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelfence.redteam.context import ScenarioResult


def write_json(results: Sequence[ScenarioResult], meta: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps({"meta": meta, "scenarios": [r.to_dict() for r in results]}, indent=2, default=str),
                    encoding="utf-8")
    return path


def plot_curve(result: ScenarioResult, path: Path) -> Path | None:
    """Quality vs queries; ``None`` when there are fewer than two points to draw."""
    if len(result.curve) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=90)
    xs = [p.queries for p in result.curve]
    for key in result.curve[0].quality:
        ax.plot(xs, [p.quality[key] for p in result.curve], marker="o", label=key)
    ax.set_xlabel("queries")
    ax.set_ylabel(result.metric)
    ax.set_title(result.name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _defender_line(r: ScenarioResult) -> str:
    d = r.defender
    assert d is not None
    line = (f"Defender: {d.requests} requests, {d.answered} answered, {d.throttled} throttled (429), "
            f"{d.blocked} blocked (401/403); flagged: ")
    if d.flagged is None:
        return line + f"{r.details.get('detection', 'detection not available')}."
    if not d.flagged:
        return line + "no."
    return line + (f"yes, after {d.queries_before_first_flag} queries in {d.requests_before_first_flag} "
                   f"answered requests; clone {r.metric} at the flag: {_fmt(d.quality_at_first_flag)}.")


def markdown(results: Sequence[ScenarioResult], meta: dict[str, Any], images: dict[str, str]) -> str:
    lines = [f"# ModelFence red-team report ({meta.get('suite')})", "",
             f"Gateway `{meta.get('gateway')}`, seed {meta.get('seed')}, {meta.get('seconds')} s.", ""]
    for r in results:
        lines += [f"## {r.name}", "", r.description, ""]
        if r.curve:
            keys = list(r.curve[0].quality)
            lines += ["| queries | requests | " + " | ".join(keys) + " | cost (USD) |",
                      "|---:|---:|" + "---:|" * len(keys) + "---:|"]
            lines += [f"| {p.queries} | {p.requests} | " + " | ".join(_fmt(p.quality[k]) for k in keys)
                      + f" | {p.cost_usd:.4f} |" for p in r.curve]
            lines.append("")
        if r.defender:
            lines += [_defender_line(r), ""]
        if r.benign:
            b = r.benign
            flagged_share = "detection not available" if b.flagged_share is None else f"{b.flagged_share:.2%}"
            lines += [(f"Benign: {b.clients} clients; throttled {b.throttled_share:.1%}, blocked {b.blocked_share:.1%}, "
                       f"flagged {flagged_share}; latency p50 {b.latency_p50_ms:.0f} ms, p95 {b.latency_p95_ms:.0f} ms."), ""]
        if "markdown" in r.details:  # a scenario that renders its own tables
            lines += [str(r.details["markdown"]), ""]
        details = {k: v for k, v in r.details.items() if k not in ("detection", "markdown")}
        if "markdown" in r.details:
            details = {k: details[k] for k in ("seed", "events", "plans", "seconds") if k in details}
        if details:
            lines += ["Details: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in details.items()), ""]
        if r.name in images:
            lines += [f"![{r.name}]({images[r.name]})", ""]
    return "\n".join(lines)


def write_report(results: Sequence[ScenarioResult], meta: dict[str, Any], folder: Path) -> Path:
    """``results.json``, ``report.md`` and one PNG per curve in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(results, meta, folder / "results.json")
    images = {}
    for r in results:
        if plot_curve(r, folder / f"{r.name}.png"):
            images[r.name] = f"{r.name}.png"
    path = folder / "report.md"
    path.write_text(markdown(results, meta, images), encoding="utf-8")
    return path
