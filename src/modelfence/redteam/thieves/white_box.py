"""A thief with the calibrated reference in hand, checking itself against the real detector.

An insider (or a leaked ``reference.npz``) knows every threshold, the honest tier
medians and the reference's k-means cells, and the detector's code is open. This thief

- reads the deployment's default tier from ``modelfence.example.yaml`` and paces at 85%
  of each limit and of the calibrated volume line (calibrated threshold × calibrated
  tier median), with exponential gaps, in two blocks of hours a day whose nights are
  shorter than the detector's idle eviction (so its query window is never reset and its
  private replay below sees the same windows the gateway's detector will);
- sends only in-distribution data (real digits, then digits moved by part of a pixel, each
  within 90% of the out-of-distribution radius; the public texts) in an order whose
  reference cells follow the honest sample's mix (MMD) while the distinct cells of any
  hundred queries stay under 70% of the coverage threshold;
- runs every request it plans through a private ``DetectionEngine`` (default detection
  settings, the same reference and embedder) before committing to it: a request whose
  evaluation would lift its own risk past half the alert line is delayed when timing or
  volume is to blame and dropped when its content is (another batch is tried instead).
  ``self_check`` says what that cost.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from modelfence.config import DetectionConfig
from modelfence.detect.detectors import Volume
from modelfence.detect.embedding import CachedEmbedder, Embedder
from modelfence.detect.engine import EMBED_CHARS, DetectionEngine
from modelfence.detect.features import ClientState, View
from modelfence.detect.reference import Reference, SpaceReference
from modelfence.detect.risk import RiskState
from modelfence.redteam.replay import event_for
from modelfence.redteam.replay_attacks import SUBNET_BASE, answer_classifier, shows_margins
from modelfence.redteam.replay_detection import START_TS
from modelfence.redteam.tariff import example_config
from modelfence.redteam.thieves.base import Asset, Budget, Knowledge
from modelfence.redteam.thieves.campaign import GENEROUS_USD, Campaign
from modelfence.redteam.thieves.inputs import (
    SHIFTS,
    Requests,
    digit_rounds,
    digits,
    pool_texts,
    task_texts,
)
from modelfence.redteam.thieves.pacing import ACTIVE_HOURS, Pace, Pacer
from modelfence.redteam.traffic import ClientProfile, PlannedRequest
from modelfence.telemetry.events import RequestEvent

SHARE = 0.85  # of every line
GUARD_SHARE = 0.5  # of the alert line: the own risk the thief allows itself
COVERAGE_SHARE = 0.7  # of the coverage threshold: distinct cells per query it allows itself
COVERAGE_WINDOW = 100  # queries the coverage detector looks at
OOD_SHARE = 0.9  # of the out-of-distribution radius
MAX_DROPS = 25  # requests dropped in a row for their content before the thief stops
DEFER_SECONDS = 900.0  # mean wait when timing or volume would give it away
TIMING = frozenset({"volume_vs_tier", "machine_timing", "around_the_clock"})


@dataclass
class SelfCheckCost:
    """What checking itself cost the thief."""

    checked: int = 0  # requests run through the private engine (sent or not)
    sent: int = 0
    deferred: int = 0
    dropped: int = 0
    seconds: float = 0.0  # wall time of ordering and checking
    worst_risk: float = 0.0  # the highest own risk the private engine gave it


class ReferenceOrder:
    """Orders inputs so the running mix of reference cells follows the honest sample's
    while the distinct cells of the last ``COVERAGE_WINDOW`` stay under ``coverage_cap``
    per query. State carries over between calls (rounds of one stream)."""

    def __init__(self, space: SpaceReference, coverage_cap: float | None, rng: np.random.Generator) -> None:
        cells = len(space.centroids)
        honest = np.bincount(space.cells(space.sample), minlength=cells).astype(np.float64)
        self.share = honest / honest.sum()
        self.cap = coverage_cap
        self.rng = rng
        self.picked = np.zeros(cells)
        self.recent: deque[int] = deque(maxlen=COVERAGE_WINDOW)
        self.in_recent = np.zeros(cells, dtype=np.int64)

    def order(self, cells: np.ndarray) -> np.ndarray:
        """Indices of ``cells`` (each input's cell) in sending order."""
        buckets = [list(self.rng.permutation(np.flatnonzero(cells == c))) for c in range(len(self.share))]
        left = np.array([len(b) for b in buckets])
        out = []
        while left.any():
            deficit = self.share * (self.picked.sum() + 1) - self.picked + self.rng.uniform(0, 1e-6, len(left))
            allowed = left > 0
            if self.cap is not None:
                distinct = int((self.in_recent > 0).sum())
                seen = allowed & (self.in_recent > 0)
                if distinct + 1 > self.cap * (len(self.recent) + 1) and seen.any():
                    allowed = seen
            cell = int(np.argmax(np.where(allowed, deficit, -np.inf)))
            out.append(buckets[cell].pop())
            left[cell] -= 1
            self.picked[cell] += 1
            if len(self.recent) == self.recent.maxlen:
                self.in_recent[self.recent[0]] -= 1
            self.recent.append(cell)
            self.in_recent[cell] += 1
        return np.asarray(out, dtype=np.int64)


class SelfCheck:
    """The thief's private detector: one account's events, scored as the gateway would."""

    def __init__(self, profile: ClientProfile, reference: Reference, embedder: Embedder,
                 config: DetectionConfig) -> None:
        self.embedder = embedder if isinstance(embedder, CachedEmbedder) else CachedEmbedder(embedder)
        self.engine = DetectionEngine(config, embedder=self.embedder, reference=reference)
        for detector in self.engine.detectors:  # what the engine sets at its first evaluation
            if isinstance(detector, Volume):
                detector.tier_median = dict(reference.tier_medians)
        self.profile = profile
        self.config = config
        self.line = GUARD_SHARE * config.tier(profile.tier).alert
        self.cost = SelfCheckCost()

    def event(self, plan: PlannedRequest) -> RequestEvent:
        event = event_for(plan, self.profile, ts=START_TS + plan.at, request_id=f"self-{self.cost.checked:08d}")
        if event.input_rows and shows_margins(plan.body):
            answer_classifier([event])
        return event

    def predict(self, event: RequestEvent) -> tuple[float, set[str]]:
        """Own risk if the engine evaluated right after ``event``, and the detectors firing."""
        self.cost.checked += 1
        engine, client = self.engine, self.profile.name
        trial = ClientState(client, self.profile.tier, self.config.window)
        state = engine.clients.get(client)
        if state is not None:
            trial.first_ts = state.first_ts
            trial.hours.extend(state.hours)
            trial.queries.extend(state.queries)
        for query in engine.queries_of([event]):
            trial.add(query)
        signals = engine.signals(View(trial.queries, state=trial))
        own = engine.risks.get(client)
        risk = RiskState(self.config.half_life_hours * 3600.0)
        if own is not None:
            risk.cusum, risk.last_ts = own.cusum, own.last_ts
        return risk.update(signals, event.ts), {s.code for s in signals}

    def commit(self, event: RequestEvent) -> None:
        self.cost.sent += 1
        self.engine.process([event])
        own = self.engine.risks.get(self.profile.name)
        self.cost.worst_risk = max(self.cost.worst_risk, own.risk if own else 0.0)


class WhiteBoxThief(Campaign):
    strategy = "white-box"

    def __init__(self, asset: Asset, knowledge: Knowledge, embedder: Embedder, *, config_path: Path | None = None,
                 seed: int = 0, target: int | None = None, days: float = 7.0, name: str | None = None,
                 subnet_base: int = SUBNET_BASE) -> None:
        if knowledge.reference is None:
            raise ValueError("a white-box thief needs Knowledge.white_box(reference)")
        super().__init__(asset, name=name or f"{self.strategy}/{asset}", seed=seed, target=target,
                         budget=Budget(days=days, usd=GENEROUS_USD), subnet_base=subnet_base)
        self.reference = knowledge.reference
        self.thresholds = knowledge.thresholds
        self.embedder = embedder
        hours = min(ACTIVE_HOURS, int(knowledge.thresholds.get("around_the_clock", 20.0)) - 4)
        tier = example_config(config_path).limits.tiers["default"]
        self.pace = Pace.of_tier(tier, knowledge.volume_line, SHARE, active_hours=hours, split_day=True)
        self.self_check: SelfCheckCost | None = None

    def _plan(self) -> list[PlannedRequest]:
        started = time.perf_counter()
        rng = self.rng("plan")
        profile = self.accounts()[0]
        check = SelfCheck(profile, self.reference, self.embedder, DetectionConfig.model_validate({}))
        low, high = self.pace.batches(self.asset)
        requests = Requests(self.asset, self._inputs(rng, check.embedder), rng, self.seed)
        pacer = Pacer(self.pace, rng, horizon=self.horizon, mean_units=(low + high) / 2)
        plans: list[PlannedRequest] = []
        bought, drops, spent = 0, 0, 0.0
        request = requests.extraction(int(rng.integers(low, high + 1)))
        while request is not None and bought < self.target and drops <= MAX_DROPS:
            tokens, price = self.tariff.charge(request)
            at = pacer.propose(request.units, tokens, price)
            if at is None or spent + price > self.budget.usd:
                break
            planned = replace(request, at=at, client=profile.name)
            event = check.event(planned)
            risk, codes = check.predict(event)
            if risk < check.line:
                check.commit(event)
                pacer.commit(at, planned.units, tokens, price)
                plans.append(planned)
                bought, drops, spent = bought + planned.units, 0, spent + price
            elif codes & TIMING or not codes:  # time will help: wait and send it then
                check.cost.deferred += 1
                pacer.defer(at + float(rng.exponential(DEFER_SECONDS)))
                continue
            else:  # its content would give it away: try another batch
                check.cost.dropped += 1
                drops += 1
            request = requests.extraction(int(rng.integers(low, high + 1)))
        check.cost.seconds = time.perf_counter() - started
        self.self_check = check.cost
        return plans

    def _inputs(self, rng: np.random.Generator, embedder: Embedder) -> np.ndarray | list[str]:
        """Every input it could send, safest first (see module docstring)."""
        space_name = "vec64" if self.asset == "classifier" else "text"
        space = self.reference.spaces.get(space_name)
        coverage = self.thresholds.get("coverage_growth")
        rounds: Sequence[np.ndarray | list[str]]
        if self.asset == "classifier":
            rounds = digit_rounds(self.seed, len(digits(self.seed).pool) * len(SHIFTS), rng)
            if space is not None:
                rounds = [r[space.distance_to_reference(r) <= OOD_SHARE * space.ood_radius] for r in rounds]
        else:
            rounds = [task_texts(self.seed, max(len(pool_texts(self.seed)), self.target), rng)]
        if space is None:
            return _joined(rounds)
        order = ReferenceOrder(space, None if coverage is None else COVERAGE_SHARE * coverage, rng)
        ordered: list[np.ndarray | list[str]] = []
        for items in rounds:
            if isinstance(items, np.ndarray):
                ordered.append(items[order.order(space.cells(items))])
            else:
                vectors = embedder.embed([text[:EMBED_CHARS] for text in items])
                ordered.append([items[int(i)] for i in order.order(space.cells(vectors))])
        return _joined(ordered)


def _joined(rounds: Sequence[np.ndarray | list[str]]) -> np.ndarray | list[str]:
    if rounds and isinstance(rounds[0], np.ndarray):
        return np.concatenate([np.asarray(r) for r in rounds])
    return [text for items in rounds for text in items]
