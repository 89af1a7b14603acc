"""Calibration: every threshold from benign clients only, at a target false-positive rate.

Given the query histories of benign clients (real traffic from before an incident, or
the red-team harness's benign population), :func:`calibrate`

1. splits the clients in two halves (seeded): one builds the :class:`Reference` (the
   benign sample, the k-means cells, the OOD radius), the other is scored;
2. replays each scored client exactly as the live engine evaluates it (its last
   ``window`` queries at every ``evaluate_every``-th query) and keeps, per detector,
   the client's most suspicious value over all its windows;
3. sets each threshold at the ``1 - fpr`` quantile of those per-client values (``fpr``
   for detectors where small is suspicious), so at most ``fpr`` of benign *clients*
   would cross it — the figure that matters, not the per-window rate. A detector with a
   documented default keeps the stricter-for-benign of the two.
4. keeps, per input space, the scored clients' median coverage at the end of their
   history (what the console compares a client's coverage with).

With fewer than ``1 / fpr`` scored clients the quantile is the most extreme benign
client; the thresholds are only as good as the benign data behind them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from modelfence.config import DetectionConfig
from modelfence.detect.detectors import Volume
from modelfence.detect.detectors.coverage import shares
from modelfence.detect.detectors.timing import BURST_SECONDS
from modelfence.detect.embedding import Embedder
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.features import ClientState, View, query_count
from modelfence.detect.reference import Reference, fit_space
from modelfence.telemetry.events import RequestEvent


def calibrate(
    benign: Mapping[str, Sequence[RequestEvent]],
    *,
    config: DetectionConfig,
    embedder: Embedder,
    fpr: float | None = None,
    cells: int = 64,
    seed: int = 0,
) -> Reference:
    """A :class:`Reference` with thresholds, from ``{client: its events}`` of benign clients."""
    fpr = config.target_fpr if fpr is None else fpr
    clients = sorted(benign)
    random.Random(seed).shuffle(clients)
    half = max(1, len(clients) // 2)
    builder = DetectionEngine(config, embedder=embedder)
    vectors: dict[str, list[np.ndarray]] = {}
    for client in clients[:half]:
        for query in builder.queries_of(list(benign[client])):
            if query.space is not None and query.vector is not None:
                vectors.setdefault(query.space, []).append(query.vector)
    spaces = {
        space: fit_space(np.vstack(rows), cells=cells, seed=seed)
        for space, rows in vectors.items()
        if len(rows) >= 2 * 8
    }
    reference = Reference(spaces)
    scorer = DetectionEngine(config, embedder=embedder, reference=reference)
    _set_population(scorer, [benign[c] for c in clients[half:]])
    extremes: dict[str, list[float]] = {d.code: [] for d in scorer.detectors}
    coverage: dict[str, list[float]] = {}
    for client in clients[half:]:
        for code, value in _client_extremes(scorer, list(benign[client]), coverage).items():
            extremes[code].append(value)
    spaces = {
        name: replace(ref, coverage_median=float(np.median(coverage[name])))
        if coverage.get(name) else ref
        for name, ref in spaces.items()
    }
    thresholds = {}
    for detector in scorer.detectors:
        values = extremes[detector.code]
        if not values:
            continue
        q = 1.0 - fpr if detector.direction == 1 else fpr
        value = float(np.quantile(values, q, method="higher" if q > 0.5 else "lower"))
        if detector.default_threshold is not None:
            # Benign data may loosen a documented default, never tighten it: a behaviour
            # absent from the benign sample (threshold 0) must not make a hair trigger.
            pick = max if detector.direction == 1 else min
            value = pick(value, detector.default_threshold)
        thresholds[detector.code] = value
    volume = next(d for d in scorer.detectors if isinstance(d, Volume))
    return Reference(spaces, thresholds, dict(volume.tier_median), scorer.embedder.name)


def _client_extremes(
    engine: DetectionEngine,
    events: list[RequestEvent],
    coverage: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Per detector, the most suspicious value over the client's evaluation windows;
    appends the client's coverage at the end of its history to ``coverage``, per space."""
    queries = engine.queries_of(sorted(events, key=lambda e: e.ts))
    window, every = engine.config.window, engine.config.evaluate_every
    state = ClientState(events[0].client, events[0].tier, window)
    out: dict[str, float] = {}
    for end in range(every, len(queries) + 1, every):
        for query in queries[end - every : end]:
            state.add(query)
        view = View(state.queries, state=state)
        for detector in engine.detectors:
            value = detector.statistic(view, engine.reference)
            if value is not None:
                current = out.get(detector.code)
                worse = (
                    value
                    if current is None
                    else (max if detector.direction == 1 else min)(current, value)
                )
                out[detector.code] = worse
    if coverage is not None and events:
        for space, share in shares(View(state.queries), engine.reference).items():
            coverage.setdefault(space, []).append(share)
    return out


def _set_population(engine: DetectionEngine, histories: Sequence[Sequence[RequestEvent]]) -> None:
    """Tier medians of the volume statistic, as the live engine computes them."""
    counts: dict[str, list[int]] = {}
    for events in histories:
        if events:
            ordered = sorted(events, key=lambda e: e.ts)
            start = ordered[-1].ts - BURST_SECONDS
            recent = sum(query_count(e) for e in ordered if e.ts >= start)
            counts.setdefault(ordered[0].tier, []).append(recent)
    for detector in engine.detectors:
        if isinstance(detector, Volume):
            detector.tier_median = {t: float(np.median(c)) for t, c in counts.items()}
