"""Does the detector catch the same thieves, and spare the same customers, with each embedder?

Runs the red-team harness's population-scale replay (``replay-detection``:
:func:`modelfence.redteam.replay_detection.detection_at_scale`) once per embedder, on the
same seed, so every run calibrates on the same honest population and scores the same other
honest population and the same attackers; only the query embedder differs. Sizes are the
``full`` suite's (2,000 calibration clients; 10,000 honest clients and 40 heavy ones, with
100 attackers of every replayable kind and 10 Sybil campaigns) unless ``--clients`` and
``--attackers`` shrink them. Each embedder runs in a process of its own, one at a time unless
``--parallel``, on one BLAS thread.

Prints, per embedder: honest clients flagged (alert or above at any time) and blocked, per
attack kind the share of keys flagged and the queries answered before the first flag, the
events/s of the replay and the texts the model embedded.

    python bench/detection_embedders.py                                  # minilm, minilm-int8
    python bench/detection_embedders.py --clients 2000 --attackers 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, get_args

import numpy as np
from threadpoolctl import threadpool_limits

from modelfence.config import EmbedderKind
from modelfence.detect.embedding import load_embedder
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.replay_detection import detection_at_scale
from modelfence.redteam.suites import SUITES


def run(embedder: str, seed: int, clients: int, attackers: int, calibration: int) -> dict[str, Any]:
    """One replay, as the harness's ``replay-detection`` scenario runs it, with ``embedder``."""
    def rng(purpose: str) -> np.random.Generator:  # the harness's Context.rng
        return np.random.default_rng([seed, *purpose.encode()])

    started = time.perf_counter()
    with threadpool_limits(1):
        details = detection_at_scale(
            load_prompts(), rng, clients=clients, calibration_clients=calibration,
            attackers=attackers, sybils=max(1, attackers // 10), embedder=load_embedder(embedder))
    details["wall_seconds"] = round(time.perf_counter() - started, 1)
    return details


def lines(embedder: str, d: dict[str, Any]) -> list[str]:
    b, t = d["benign"], d["throughput"]
    cache = f"{t.get('texts_embedded', 0):,} texts embedded, {t.get('embedder_cache_hits', 0):,} cache hits"
    thresholds = {k: round(v, 3) for k, v in d["calibration"]["thresholds"].items()}
    heavy = sum(v != "normal" for v in b["heavy_users"].values())
    out = [
        (f"## {embedder} ({d['wall_seconds']:.0f} s wall; replay {t['events']:,} events in "
         f"{t['seconds']:.0f} s, {t['events_per_second']:,} events/s; {cache})"),
        f"thresholds: {json.dumps(thresholds)}",
        (f"honest: {b['flagged']} of {b['clients']:,} flagged ({b['flagged_share']:.3%}), "
         f"{b['blocked']} blocked; heavy users not normal: {heavy}"),
        "",
        "| attack | keys | flagged | blocked | queries before the first flag: median / p90 / max | largest entity |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for kind, a in d["attacks"].items():
        q = a["queries_before_first_flag"]
        first = f"{q['median']:.0f} / {q['p90']:.0f} / {q['max']:.0f}" if q else "—"
        out.append(f"| {kind} | {a['keys']} | {a['detection_rate']:.0%} | {a['blocked']} | "
                   f"{first} | {a['largest_entity']} |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--embedders", default="minilm,minilm-int8",
                        help="comma-separated: minilm, minilm-int8, hashing")
    full = SUITES["full"]
    parser.add_argument("--seed", type=int, default=2041)
    parser.add_argument("--clients", type=int, default=full.replay_clients)
    parser.add_argument("--attackers", type=int, default=full.replay_attackers,
                        help="attackers of each replayable kind")
    parser.add_argument("--calibration", type=int, default=full.calibration_clients)
    parser.add_argument("--parallel", action="store_true", help="all embedders at once")
    args = parser.parse_args(argv)
    embedders = args.embedders.split(",")
    allowed = [k for k in get_args(EmbedderKind) if k != "auto"]
    if unknown := sorted(set(embedders) - set(allowed)):
        parser.error(f"--embedders: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")

    print(f"# detection by embedder, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: python bench/detection_embedders.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"seed {args.seed}; {args.calibration:,} calibration clients, {args.clients:,} honest "
          f"clients, {args.attackers} attackers of each kind\n")
    sizes = (args.seed, args.clients, args.attackers, args.calibration)
    workers = len(embedders) if args.parallel else 1
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, max_tasks_per_child=1) as pool:
        futures = {e: pool.submit(run, e, *sizes) for e in embedders}
        results = {e: f.result() for e, f in futures.items()}
    for embedder, details in results.items():
        print("\n".join(lines(embedder, details)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
