"""Does lockstep linking without a reference tell the demo's honest keys from its botnet?

Lockstep links two young keys busy in the same moments when their queries agree (cosine of
their signatures ≥ ``MIN_COSINE``). This prints, for the digits queries the actors of
``modelfence demo`` send, the cosine of every pair under two signatures: the raw
per-dimension means and spreads of a key's queries (the rule before the traffic's
yardstick), and what ``activity_of`` uses now without a reference, how the key's queries
differ from the traffic's (``detect/traffic.py``, fed every actor's queries in the demo's
order, a request of each in turn, as the detector is). A pair at or above the line is
linked whenever its timing overlaps. Also three sets of real digits,
uniform noise, and random honest subsets of the digits (sizes 10-128) against each other
and against the thief, the rates at which they reach the line.

    python bench/lockstep_signatures.py              # the demo's actors
    python bench/lockstep_signatures.py --seed 7     # a fresh population of the same kinds

The bots here do not adapt to the rule: each draws from one script's distribution. A
botnet that gives each key its own distribution is not linked by this rule, nor by the
reference's cells.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from sklearn.datasets import load_digits

from modelfence.detect.coactivity import MIN_COSINE
from modelfence.detect.features import Query
from modelfence.detect.traffic import TrafficWindows
from modelfence.telemetry.events import RequestEvent

DIGITS = np.asarray(load_digits().data, dtype=np.float32)


def probes(seeds: range) -> np.ndarray:
    """The demo's extraction probes (``demo.scenario.probe``): a known digit, nudged."""
    return np.array([np.clip(DIGITS[s % 5] + np.random.default_rng(s).normal(0, 1.5, 64), 0, 16)
                     for s in seeds], dtype=np.float32)


def copied() -> np.ndarray:
    """The copycat's bought rows: every digit, and twice with pixel noise."""
    sets = [DIGITS]
    for seed in (1, 2):
        noise = np.random.default_rng(seed).normal(0, 1.0, DIGITS.shape)
        sets.append(np.clip(DIGITS + noise, 0, 16).astype(np.float32))
    return np.concatenate(sets)


def raw(rows: np.ndarray) -> np.ndarray:
    signature = np.concatenate([rows.mean(axis=0), rows.std(axis=0)])
    return signature / np.linalg.norm(signature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="0: the demo's own actors; another draws other probes, other honest "
                        "digits and other honest sets (a population no design choice looked at)")
    seed = parser.parse_args().seed
    at, start = seed * 10_000, (seed * 211) % 1_300  # the bots' probe seeds, the honest digits
    actors = {
        "thief": probes(range(at, at + 90)), "bot-1": probes(range(at + 1000, at + 1030)),
        "bot-2": probes(range(at + 2000, at + 2030)), "bot-3": probes(range(at + 3000, at + 3030)),
        "hydra": probes(range(at + 2000, at + 2024)), "trial-user": DIGITS[start : start + 10],
        "newcomer": DIGITS[start + 300 : start + 428], "bob": DIGITS[start : start + 32],
        "copycat": copied(),
    }
    traffic = TrafficWindows()
    events = {actor: RequestEvent(ts=0.0, request_id="r", key_id="k", client=actor, tier="default",
                                  model="digits", route="/v2/models/digits/infer", status=200)
              for actor in actors}
    # In the demo's order: a request of each actor in turn, of the demo's sizes (rows).
    sizes = {"newcomer": 32, "bob": 16, "copycat": 150}
    requests = {a: [rows[i : i + sizes.get(a, 1)] for i in range(0, len(rows), sizes.get(a, 1))]
                for a, rows in actors.items()}
    for turn in range(max(len(r) for r in requests.values())):
        for actor, batches in requests.items():
            for row in batches[turn] if turn < len(batches) else ():
                traffic.add(Query(events[actor], "vec64", row))

    def now(rows: np.ndarray) -> np.ndarray:
        deviation = traffic.deviation("digits:vec64", rows)
        assert deviation is not None
        return deviation / np.linalg.norm(deviation)

    honest = {"trial-user", "newcomer", "bob"}
    bots = {"thief", "bot-1", "bot-2", "bot-3", "hydra"}
    for name, signature in (("raw means and spreads", raw), ("deviation from the traffic", now)):
        signed = {actor: signature(rows) for actor, rows in actors.items()}
        print(f"\n{name}: cosine of each pair of the demo's digits actors (linked at ≥ {MIN_COSINE})")
        print(" " * 11 + "".join(f"{a:>11}" for a in actors))
        for a in actors:
            print(f"{a:>11}" + "".join(f"{float(signed[a] @ signed[b]):11.2f}" for b in actors))
        crossing = [float(signed[h] @ signed[b]) for h in honest for b in bots]
        print(f"honest actor with a bot: max {max(crossing):.2f}, "
              f"{sum(c >= MIN_COSINE for c in crossing)} of {len(crossing)} pairs at the line")

    rng = np.random.default_rng(1 + seed)
    subsets = [DIGITS[rng.choice(len(DIGITS), n, replace=False)] for n in (10, 16, 32, 64, 128) for _ in range(40)]
    noise = rng.uniform(0, 16, (50, 64)).astype(np.float32)
    print(f"\nraw: digits[0:300] vs digits[300:600] {float(raw(DIGITS[:300]) @ raw(DIGITS[300:600])):.2f}, "
          f"uniform noise vs digits {float(raw(noise) @ raw(DIGITS)):.2f}")
    for name, signature in (("raw", raw), ("deviation", now)):
        pairs = [float(signature(a) @ signature(b)) for a, b in itertools.combinations(subsets, 2)]
        thief = [float(signature(s) @ signature(actors["thief"])) for s in subsets]
        print(f"{name}: {len(subsets)} random honest subsets (10-128 digits): "
              f"{np.mean(np.array(pairs) >= MIN_COSINE):.1%} of pairs at the line, "
              f"{np.mean(np.array(thief) >= MIN_COSINE):.1%} of subsets at it with the thief")


if __name__ == "__main__":
    main()
