"""Sign-up surges on the honest week's real arrival process: false surges, and hydras.

For each seed, the sign-ups of the whole honest week (10,020 customers, the v2 population:
a week before it and seven days of it) go through a ``SignupWatch`` with the shipped
defaults, alone (every surge found is false), then with every hydra of the ``hydra``
library, then of the ``paced-hydra`` one, mixed in at its own start (an account signs up
at its first request). Printed per hydra: whether it
was found, how many of its accounts had signed up by then (they got their first answers),
how many it had in all, and how many honest newcomers signed up inside its surge (held
until they verify or pay). Also the watch's cost per sign-up.

    python bench/signup_surges.py --seeds 20
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np

from modelfence.config import SurgeConfig
from modelfence.identity.signups import SignupWatch
from modelfence.redteam.populations.week import FULL_COUNTS, RECENT_SIGNUP, HonestWeek
from modelfence.redteam.thieves import Scale, hydra_library, paced_hydra_library
from modelfence.redteam.thieves.base import DAY, Thief

START = 1_767_225_600.0


def honest_signups(seed: int) -> list[tuple[str, float]]:
    week = HonestWeek(FULL_COUNTS, days=7.0, seed=seed)
    found = ((c.name, week.account(c).signed_up) for c in week.customers())
    return sorted(((name, at) for name, at in found if at >= -RECENT_SIGNUP[0] * DAY), key=lambda s: s[1])


def hydra_signups(library: Callable[..., list[Thief]], seed: int) -> dict[str, list[float]]:
    """Each hydra's accounts' sign-ups: their first request."""
    out = {}
    for thief in library(Scale(), seed=seed):
        first: dict[str, float] = {}
        for plan in thief.plans():
            first.setdefault(plan.client, plan.at)
        out[thief.name] = sorted(first.values())
    return out


def watch(signups: list[tuple[str, float]]) -> tuple[SignupWatch, dict[str, int]]:
    """The watch after every sign-up in time order, and for each named crowd ("hydra:..."),
    how many of its accounts had signed up when its surge was first found."""
    found_after: dict[str, int] = {}
    seen: dict[str, int] = {}
    w = SignupWatch(SurgeConfig(), known_since=START + signups[0][1])
    for account, at in signups:
        crowd = account.rsplit("#", 1)[0] if "#" in account else None
        if crowd is not None:
            seen[crowd] = seen.get(crowd, 0) + 1
        w.observe(account, START + at)
        if crowd is not None and crowd not in found_after and w.held(START + at):
            found_after[crowd] = seen[crowd]
    return w, found_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    false_surges, honest_total, seconds, observed = 0, 0, 0.0, 0
    rows: dict[str, list[tuple[int | None, int, int]]] = {}
    for seed in range(args.seeds):
        honest = honest_signups(seed + 5_000)
        honest_total += sum(at >= 0 for _, at in honest)
        started = time.perf_counter()
        alone, _ = watch(honest)
        seconds += time.perf_counter() - started
        observed += len(honest)
        false_surges += len(alone.surges)
        for library in (hydra_library, paced_hydra_library):  # a run each, as the harness runs them
            hydras = hydra_signups(library, seed + 5_000)
            mixed = sorted(honest + [(f"{name}#{i}", at) for name, times in hydras.items()
                                     for i, at in enumerate(times)], key=lambda s: s[1])
            w, found_after = watch(mixed)
            for name, times in hydras.items():
                surge = w.held(START + times[-1]) or w.held(START + times[0])
                held_honest = 0 if surge is None else sum(surge.start <= START + at <= surge.end for _, at in honest)
                rows.setdefault(name, []).append((found_after.get(name), len(times), held_honest))
    print(f"honest week, {args.seeds} seeds: {honest_total / args.seeds:,.0f} sign-ups during the week, "
          f"false surges {false_surges} in {args.seeds} weeks; "
          f"{seconds / observed * 1e6:.1f} µs per sign-up observed")
    print("| hydra | found (seeds) | its accounts signed up by then: median / max | its accounts | honest sign-ups inside its surge (the unverified, unpaid ones held): median / max |")
    print("|---|---:|---:|---:|---:|")
    for name, results in rows.items():
        found = [r[0] for r in results if r[0] is not None]
        held = [r[2] for r in results]
        print(f"| {name} | {len(found)} of {len(results)} | "
              f"{int(np.median(found)) if found else '–'} / {max(found) if found else '–'} | "
              f"{int(np.median([r[1] for r in results])):,} | {int(np.median(held))} / {max(held)} |")


if __name__ == "__main__":
    main()
