"""Region marks on wide inputs: what the off-distribution test costs per answer, and what
measuring only ``rank`` principal directions (pooling the rest) changes in what it finds.

(a) cost, in process on one core (BLAS held to one thread, as on a loaded gateway): the
    profile's test (``InputProfile.off``) for a batch of 1 and of 32 rows, exact (rank =
    features) against the default rank, at 64, 384, 784 and 3,072 features; rows drawn
    from a factor model of 24 factors plus noise of each feature's own; and the time to
    fit each profile (gateway start-up).
(b) what it finds, on real 384-d inputs: MiniLM vectors of real texts of one kind. A
    profile is fitted on a random 60%; on the other 40% (real inputs it never saw) it
    should mark ``honest_rate``; it should mark noisy copies of them (the verifier's probe
    noise, 0.25 of the root mean variance, and 0.1) and texts of another kind, the
    surrogate data a thief buys with. Two populations, each the other's "other kind": the
    harness's prompts (freshqa, persistbench, writingbench, chatterbot), on which the
    choice of kept directions was made, and the evaluation corpora (agent tasks, threat
    reports, support tickets), which that choice never saw.

    python bench/watermark_region_width.py          # ~2 minutes on two cores
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import sys
import time

import numpy as np

from modelfence.models.embedder import TextEmbedder
from modelfence.redteam.benchmarks import Footer
from modelfence.redteam.prompts import load_evaluation_prompts, load_prompts
from modelfence.watermark.config import RegionsConfig
from modelfence.watermark.regions import InputProfile

DEFAULTS = RegionsConfig(profile_file="-")


def fit(rows: np.ndarray, rank: int) -> tuple[InputProfile, float]:
    started = time.perf_counter()
    profile = InputProfile.fit(rows, honest_rate=DEFAULTS.honest_rate, ridge=DEFAULTS.ridge,
                               rank=rank)
    return profile, time.perf_counter() - started


def timed(profile: InputProfile, rows: np.ndarray, runs: int) -> tuple[float, float]:
    """p50 / p99 µs of ``profile.off`` on ``rows``."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        profile.off(rows)
        samples.append(time.perf_counter_ns() - started)
    p50, p99 = np.percentile(samples, [50, 99]) / 1e3
    return float(p50), float(p99)


def cost(widths: list[int], runs: int, rng: np.random.Generator) -> list[str]:
    lines = ["| features | rank | fit s | batch 1 p50 / p99 µs | batch 32 p50 / p99 µs |",
             "|---:|---:|---:|---:|---:|"]
    for features in widths:
        loadings = rng.normal(size=(24, features))
        rows = rng.normal(size=(max(2_000, features + 500), 24)) @ loadings
        rows += rng.normal(0.0, 0.5, size=rows.shape)
        for rank in dict.fromkeys((features, min(DEFAULTS.rank, features))):
            profile, seconds = fit(rows, rank)
            one = timed(profile, rows[:1], runs)
            batch = timed(profile, rows[:32], runs)
            label = f"{rank} (exact)" if rank == features else str(rank)
            lines.append(f"| {features} | {label} | {seconds:.1f} | {one[0]:.0f} / {one[1]:.0f} "
                         f"| {batch[0]:.0f} / {batch[1]:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def efficacy(ranks: list[int], rng: np.random.Generator) -> list[str]:
    embedder = TextEmbedder.load()
    prompts = embedder.embed(list(load_prompts().all())).astype(np.float64)
    corpora = embedder.embed(list(load_evaluation_prompts().all())).astype(np.float64)
    return [*finds("harness prompts (design)", prompts, corpora, ranks, rng), "",
            *finds("evaluation corpora (fresh)", corpora, prompts, ranks, rng)]


def finds(name: str, real: np.ndarray, other: np.ndarray, ranks: list[int],
          rng: np.random.Generator) -> list[str]:
    order = rng.permutation(len(real))
    cut = int(0.6 * len(real))
    train, held = real[order[:cut]], real[order[cut:]]
    lines = [(f"real: {name}, {len(real)} texts ({len(train)} fitted, {len(held)} held out); "
              f"other kind: {len(other)}"), "",
             "| rank | real, held out | noisy 0.1 | noisy 0.25 | other kind | off() batch 32 p50 µs |",
             "|---:|---:|---:|---:|---:|---:|"]
    for rank in ranks:
        profile, _ = fit(train, rank)
        shares = [profile.off(held).mean()]
        for noise in (0.1, 0.25):
            shares.append(profile.off(held + rng.normal(0.0, noise * profile.scale, held.shape)).mean())
        shares.append(profile.off(other).mean())
        label = f"{rank} (exact)" if rank == real.shape[1] else str(rank)
        lines.append(f"| {label} | " + " | ".join(f"{100 * s:.2f}%" for s in shares)
                     + f" | {timed(profile, held[:32], 500)[0]:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 384, 784, 3072])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 384])
    parser.add_argument("--runs", type=int, default=1000, help="timed calls per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    footer = Footer()
    rng = np.random.default_rng(args.seed)
    print("\n".join(["## Cost of the off-distribution test", "", *cost(args.widths, args.runs, rng),
                     "", "## What it finds on 384-d MiniLM vectors", "", *efficacy(args.ranks, rng),
                     "", str(footer)]))


if __name__ == "__main__":
    main()
