"""A flood of made-up API keys through a running gateway: what it does to an honest client.

``bench/key_flood.py`` measures the key registry alone, on one event loop. This sends the
flood over HTTP to a real ``modelfence serve`` (memory limits, detection off, the fake
upstream), as a guesser spread over many addresses sends it: every request a new
well-formed made-up key from a new address (``X-Forwarded-For`` through a trusted proxy,
so the per-address failure limit never applies). An honest client sends chat requests at
200 a second, open loop, from a load generator of its own; its latency (bytes written to
answer complete) is measured alone and under the flood, the two windows interleaved run by
run. With ``--pin`` (the default) the gateway has core 1 to itself and the two load
generators and the upstream share core 0, as in ``bench/overhead.py``.

    python bench/key_flood_gateway.py                  # 1,000 made-up keys/s, 10 s windows, 3 runs
    python bench/key_flood_gateway.py --flood 2000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from overhead import (  # bench/overhead.py: the same processes, load generator and machine line
    CHAT_BODY,
    Target,
    machine,
    metrics,
    run_load,
    start_modelfence,
    start_upstream,
    summarize_us,
)

from modelfence.redteam.benchmarks import Footer

HONEST_RATE = 200.0
FLOOD_HEADERS = {"Authorization": "Bearer mf_@N@", "X-Forwarded-For": "@IP@"}
COUNTERS = ("modelfence_key_lookups_refused_total", "modelfence_auth_failures_total")
INDEX_SECONDS = 3.0  # the registry's first polls build the key index before the flood


def counters(base: str) -> dict[str, float]:
    """The flood's counters on ``/metrics`` (summed over their labels)."""
    samples = metrics(base)
    return {name: sum(v for k, v in samples.items() if k.startswith(name + "{"))
            for name in COUNTERS}


def one_window(honest: Target, flood: Target | None, args: argparse.Namespace) -> dict[str, Any]:
    """The honest client's open loop, with the flood running through all of it or not."""
    flood_result: dict[str, Any] = {}
    runner = None
    if flood is not None:
        def run_flood() -> None:
            flood_result.update(run_load(
                flood, "open", CHAT_BODY, args, {}, args.seconds + args.warmup + 2,
                rate=args.flood, expect_ok=False,
            ))

        runner = threading.Thread(target=run_flood)
        runner.start()
        time.sleep(1.0)  # the flood is under way before the honest client's warm-up ends
    before = counters(honest.base)
    result = run_load(honest, "open", CHAT_BODY, args, {"proxy": honest.proc.pid}, args.seconds,
                      rate=HONEST_RATE)
    after = counters(honest.base)
    if runner is not None:
        runner.join()
        if not flood_result:
            raise RuntimeError("the flood's load generator failed (see its traceback above)")
    result["latency_ms"] = summarize_us(result.pop("latency_us"))
    return {"honest": result, "flood": flood_result,
            "counters": {k: after[k] - before[k] for k in COUNTERS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=float, default=1_000.0, help="made-up keys per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--runs", type=int, default=3, help="pairs of windows (alone, flood)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="don't pin to cores")
    args = parser.parse_args()
    args.concurrency = 1  # run_load's closed-loop setting, unused in open loops
    footer = Footer()
    m = machine()
    print(f"# Key flood through a gateway — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print(f"flood {args.flood:,.0f} made-up keys/s from as many addresses, honest "
          f"{HONEST_RATE:.0f} req/s, {args.seconds:g} s windows, {args.runs} runs\n")
    with tempfile.TemporaryDirectory(prefix="modelfence-key-flood-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_proc = start_upstream(workdir, args.pin)
        honest = start_modelfence(upstream, "memory", workdir, args.pin, detection=False,
                                  trusted_proxies=("127.0.0.1/32",))
        flood = Target("flood", "flood", honest.base, FLOOD_HEADERS, honest.proc)
        try:
            time.sleep(INDEX_SECONDS)
            windows: dict[str, list[dict[str, Any]]] = {"alone": [], "flood": []}
            for _ in range(args.runs):
                windows["alone"].append(one_window(honest, None, args))
                windows["flood"].append(one_window(honest, flood, args))
        finally:
            honest.proc.stop()
            upstream_proc.stop()
    print("| window | honest p50 ms | honest p99 ms | honest answered 200 of sent (errors) | "
          "gateway CPU s per s | flood answered per s (errors) | flood answers | "
          "refused without a lookup (honest run) | auth failures (honest run) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, runs in windows.items():
        for w in runs:
            h, f, c = w["honest"], w["flood"], w["counters"]
            cpu = h["cpu_s"].get("proxy", float("nan")) / h["window_s"]
            answered = f"{sum(f['statuses'].values()) / f['window_s']:,.0f} ({f['errors']})" if f else "–"
            answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(f["statuses"].items())) if f else "–"
            print(f"| {name} | {h['latency_ms']['p50']:.2f} | {h['latency_ms']['p99']:.2f} | "
                  f"{h['statuses'].get('200', 0):,} of {h['sent']:,} ({h['errors']}) | {cpu:.2f} | "
                  f"{answered} | {answers} | {c[COUNTERS[0]]:,.0f} | {c[COUNTERS[1]]:,.0f} |")
    busy = {name: statistics.median(w["honest"]["cpu_s"]["proxy"] / w["honest"]["window_s"]
                                    for w in runs) for name, runs in windows.items()}
    per_request = (busy["flood"] - busy["alone"]) / args.flood * 1e6
    print(f"\ngateway CPU per flood request (refusals and the budgeted lookups), from the "
          f"medians: ({busy['flood']:.2f} - {busy['alone']:.2f}) s/s / {args.flood:,.0f}/s = "
          f"{per_request:.0f} µs")
    p99 = {name: statistics.median(w["honest"]["latency_ms"]["p99"] for w in runs)
           for name, runs in windows.items()}
    moved = p99["flood"] - p99["alone"]
    print(f"\nhonest p99, median of runs: alone {p99['alone']:.2f} ms, under the flood "
          f"{p99['flood']:.2f} ms: moved {moved:+.2f} ms (target ≤ 1 ms): "
          f"{'PASS' if moved <= 1.0 else 'FAIL'}")
    print(f"\n{footer}")


if __name__ == "__main__":
    main()
