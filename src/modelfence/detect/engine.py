"""The detection engine: events in, verdicts out — the same code live and in replay.

``DetectionEngine.process(events)`` is the whole detector: the child process of
``modelfence serve``, the ``modelfence detect`` workers and the red-team harness's replay
mode all call it with batches of :class:`~modelfence.telemetry.events.RequestEvent`::

    engine = DetectionEngine(config.detection, embedder=HashingEmbedder())
    for verdict in engine.process(events):
        print(verdict.client, verdict.level, verdict.risk, [r.text for r in verdict.reasons])

It embeds prompts in one batch, appends each query to its client's window, links clients
into entities, and every ``evaluate_every`` new queries of a client runs the detectors on
the client's window (and on its entity's pooled window, at one of every ⌈members / 8⌉ of
its members' evaluations: ``ENTITY_MEMBERS_PER_STEP``), accumulates risk (``risk.py``)
and maps it to an action level (``actions.py``). Time is the events' own ``ts``, so replay
at any speed gives the same verdicts as live traffic.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from modelfence.config import DetectionConfig
from modelfence.detect.actions import OVERRIDES, Action, Level, Policy, rank
from modelfence.detect.coactivity import SPAN_SECONDS, activity_of, lockstep_pairs
from modelfence.detect.detectors import Detector, Signal, Volume, all_detectors, signal
from modelfence.detect.detectors.timing import recent_queries
from modelfence.detect.embedding import Embedder, HashingEmbedder
from modelfence.detect.features import ClientState, Query, View, event_ts, space_of
from modelfence.detect.linking import Linker
from modelfence.detect.reference import Reference
from modelfence.detect.risk import Reason, RiskState
from modelfence.detect.traffic import TrafficWindows
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.prompts import elicits_reasoning

POPULATION_EVERY_SECONDS = 60.0  # tier medians move slowly; recomputing them costs O(clients)
LINK_EVERY_SECONDS = 15.0  # a botnet's keys should be joined within their first minute
# Links fade over hours (link_half_life_hours): rebuilding entities from all the evidence
# kept more often than this costs much and changes little (new links join at once anyway;
# an operator's cut rebuilds at once, see DetectorService).
REBUILD_EVERY_SECONDS = 600.0
# What a query is about shows in its opening; embedding cost grows with length.
EMBED_CHARS = 512
CLAMP = 1e15  # the largest magnitude a classifier input keeps (see queries_of)


@dataclass(frozen=True, slots=True)
class Verdict:
    client: str
    tier: str
    risk: float  # the client's own risk, or its entity's when that is higher
    level: Level
    action: Action
    reasons: tuple[Reason, ...]
    queries: int  # queries of this client seen by the detector
    entity: str
    entity_members: int
    entity_risk: float
    ts: float  # time of the latest event behind this verdict


def _texts_of(event: RequestEvent) -> list[str]:
    if event.input_texts:
        return event.input_texts
    return [event.prompt_text] if event.prompt_text else []


@dataclass(slots=True)
class _Entity:
    risk: RiskState
    members: tuple[str, ...] = ()
    due: int = 0  # member evaluations since its pooled view was last evaluated


# An entity's pooled view is evaluated at one in this many of its members' evaluations
# (at every one while it has at most this many members, and at once when its members
# change), and its risk then takes one step for each: a crowd of a thousand linked keys
# costs a pooled evaluation (merging the members' windows, every detector on four windows
# of queries, a verdict for every member) every ~1,250 of its queries instead of every 10,
# and its risk grows as fast.
ENTITY_MEMBERS_PER_STEP = 8


# A key with this many queries of its own and no evidence against it is judged on its own
# record: an honest client behind the same NAT as an attacker does not inherit the
# entity's action. Younger keys (a botnet's, typically) do.
ESTABLISHED_QUERIES = 20
OWN_EVIDENCE = 0.05
# Habits: how much and when a client sends, not what. Honest 24/7 streams, nightly jobs and
# busy agents show them as plainly as thieves do, so they alone may tighten an established
# client (and lower its account's trust) but never degrade or block it, and an entity's
# risk made of them is never inherited by its members.
HABITS = frozenset({"machine_timing", "around_the_clock", "volume_vs_tier"})
# Unusualness: queries unlike the reference traffic. A thief's are, but so are those of an
# honest customer from a domain calibration never saw, and an organisation's pooled traffic
# differs from everyone's. For an account with history (past probation) it is treated like
# a habit: it may tighten, and a block or a degraded answer needs extraction evidence
# (sweeps, coverage, harvesting, boundary probing, PRADA). Accounts never seen past
# probation, and keys whose account is unknown, have no history to vouch for them; an
# account demoted by detection keeps the history it had (ClientState.vouched), or one
# unusual stretch would demote it and the demotion would lift the ceiling.
UNUSUAL = frozenset({"mmd_shift", "out_of_distribution"})
LENSES = {"habits": HABITS, "unusual": HABITS | UNUSUAL}
CEILING: Level = "tighten"


class DetectionEngine:
    def __init__(
        self,
        config: DetectionConfig,
        *,
        embedder: Embedder | None = None,
        reference: Reference | None = None,
        detectors: Sequence[Detector] | None = None,
    ) -> None:
        self.config = config
        self.embedder = embedder or HashingEmbedder()
        self.reference = reference
        self.detectors = list(detectors) if detectors is not None else all_detectors()
        calibrated = reference.thresholds if reference is not None else {}
        self.thresholds = {
            d.code: calibrated.get(d.code, d.default_threshold) for d in self.detectors
        }
        self.policy = Policy(config)
        self.overrides: Mapping[str, str] = {}  # client -> override; set by the runner
        self.clients: dict[str, ClientState] = {}
        self.risks: dict[str, RiskState] = {}
        self.entities: dict[str, _Entity] = {}
        self.linker = Linker(half_life=config.link_half_life_hours * 3600.0)
        self._half_life = config.half_life_hours * 3600.0
        self._population_at = float("-inf")
        self._linked_at = float("-inf")
        self._rebuilt_at = float("-inf")
        # Client -> time of its latest request, for clients that may be busy enough to link
        # in lockstep (see _link_lockstep): a pass walks these, not every client kept.
        self._busy: dict[str, float] = {}
        self.clamped_rows = 0  # classifier rows with a value beyond ±CLAMP
        # What lockstep compares keys with in the spaces the reference has no cells for.
        self.traffic = TrafficWindows(skip=frozenset(reference.spaces) if reference else frozenset())
        # Called with the client's verdict at every evaluation, inside a batch too: replay
        # measures "queries before the first flag" with it, exactly, whatever the batching.
        self.listener: Callable[[Verdict], None] | None = None

    # -- ingestion -------------------------------------------------------------

    def queries_of(self, events: Sequence[RequestEvent]) -> list[Query]:
        """One query per prompt, per text of an embeddings batch, per classifier row."""
        texts: list[str] = []
        for event in events:
            if not event.cot and event.prompt_text:
                # The gateway reads every turn for a request for reasoning; an event recorded
                # before it did (or built elsewhere) has its last user turn read here, once,
                # rather than by each evaluation of every window it is in. The event is
                # updated in place: reading it again finds the same answer.
                event.cot = elicits_reasoning([event.prompt_text])
            if not event.input_rows:
                texts.extend(t[:EMBED_CHARS] for t in _texts_of(event))
        # Text embeddings are kept as float16 (half the memory of 200 × 384 values per
        # client; unit vectors lose nothing that matters). Classifier inputs stay float32:
        # rounding could turn an attacker's tiny perturbation into an "exact repeat".
        embedded = iter(self.embedder.embed(texts).astype(np.float16) if texts else ())
        out: list[Query] = []
        for event in events:
            space = space_of(event)
            if event.input_rows:
                # JSON allows up to 1.8e308: float32 reads 1e39 as inf, and squares of 1e20
                # overflow it. Rows beyond ±CLAMP (or not numbers, from another producer)
                # are clamped and counted: still far out, every distance, norm and mean
                # over them finite.
                with np.errstate(over="ignore"):
                    rows = np.asarray(event.input_rows, dtype=np.float32)
                beyond = ~(np.abs(rows) <= CLAMP).all(axis=1)
                if beyond.any():
                    self.clamped_rows += int(beyond.sum())
                    rows = np.clip(np.nan_to_num(rows, nan=0.0, posinf=CLAMP, neginf=-CLAMP), -CLAMP, CLAMP)
                margins = event.output_margins or []
                out.extend(
                    Query(event, space, row, margins[r] if r < len(margins) else None)
                    for r, row in enumerate(rows)
                )
            elif texts_of := _texts_of(event):
                out.extend(Query(event, space, next(embedded)) for _ in texts_of)
            else:
                out.append(Query(event, space, None))
        return out

    def process(self, events: Sequence[RequestEvent]) -> list[Verdict]:
        """Ingest a batch; verdicts for every client evaluated in it (see module docstring).

        A client is evaluated once its queries since the last evaluation reach
        ``evaluate_every`` (checked after each request, so a 64-row batch is evaluated
        once), inside the batch too: verdicts do not depend on how events were batched.
        """
        touched: set[str] = set()
        queries = self.queries_of(events)
        for i, query in enumerate(queries):
            event = query.event
            state = self.clients.get(event.client)
            if state is None:
                state = ClientState(event.client, event.tier, self.config.window)
                self.clients[event.client] = state
            state.add(query)
            self.traffic.add(query)
            last_row = i + 1 == len(queries) or queries[i + 1].event is not event
            if not last_row:
                continue
            self.linker.observe(event)
            self._busy[event.client] = event.ts
            if state.since_evaluation >= self.config.evaluate_every:
                state.since_evaluation = 0
                touched |= self._evaluate(event.client, event.ts)
        # A client evicted later in the same batch has nothing left to publish.
        return [self.verdict(c) for c in sorted(touched) if c in self.clients]

    def _evaluate(self, client: str, now: float) -> set[str]:
        """Evaluate a client and its entity; returns the clients whose verdict may change."""
        if now - self._population_at >= POPULATION_EVERY_SECONDS:
            self._evict_idle(now)
            self._update_population()
            self._population_at = now
        if now - self._linked_at >= LINK_EVERY_SECONDS:
            self._link_lockstep(now)
            self._linked_at = now
        self._evaluate_client(client, now)
        members = self._evaluate_entity(client, now)
        if self.listener is not None:
            self.listener(self.verdict(client))
        return {client, *members}

    # -- evaluation ------------------------------------------------------------

    def signals(self, view: View) -> list[Signal]:
        found = []
        for detector in self.detectors:
            threshold = self.thresholds[detector.code]
            if threshold is None:
                continue
            value = detector.statistic(view, self.reference)
            if value is not None:
                hit = signal(detector, value, threshold)
                if hit is not None:
                    found.append(hit)
        return found

    def _evaluate_client(self, client: str, now: float) -> None:
        risk = self.risks.get(client)
        if risk is None:
            risk = self.risks[client] = self._new_risk()
        state = self.clients[client]
        risk.update(self.signals(View(state.queries, state=state)), now)

    def _evaluate_entity(self, client: str, now: float) -> list[str]:
        """Evaluate the client's entity when due (see ``ENTITY_MEMBERS_PER_STEP``); returns
        its members then, else nothing."""
        members = self.linker.members(client)
        if len(members) < 2:
            return []
        entity = self.linker.entity_of(client)
        state = self.entities.get(entity)
        if state is None:
            state = self.entities[entity] = _Entity(self._new_risk())
        state.due += 1
        if state.members == members:
            if state.due < math.ceil(len(members) / ENTITY_MEMBERS_PER_STEP):
                return []
        elif not set(state.members) <= set(members):
            # Members left (a link faded or was cut): what the old group earned is not this
            # group's, least of all the risk copied from a member that is gone, nor the
            # steps it was due (a cut must not raise the rest's risk at once).
            state.risk, state.due = self._new_risk(), 1
        state.members = members
        steps, state.due = state.due, 0
        # The newest 4 windows of the members' queries, merged from the newest end: the cost
        # follows the view kept, not the entity's size (a lockstep surge can link hundreds).
        # A member's window is in arrival order, time order but for events that arrive late
        # (another replica's sink batch); those may leave a few queries out at the edge.
        newest = heapq.merge(
            *(reversed(self.clients[m].queries) for m in members if m in self.clients),
            key=event_ts, reverse=True,
        )
        # Oldest first again, so the rows of one batch (one timestamp) keep their order.
        view = View(list(itertools.islice(newest, 4 * self.config.window))[::-1])
        # Per-key habits (timing, volume) of a pooled view describe no one; the rest do.
        signals = [
            s for s in self.signals(view) if s.code not in ("machine_timing", "volume_vs_tier")
        ]
        state.risk.update(signals, now, steps=steps)
        # One member caught is evidence against the whole entity: its risk is never below
        # its riskiest member's own (which young members then inherit; see _implicated).
        # A member's habits are its own: they are not evidence against the others.
        known = [self.risks[m] for m in members if m in self.risks]
        if known:
            riskiest = max(known, key=lambda r: r.partial.get("habits", 0.0))
            state.risk.absorb(riskiest, "habits")
        return [m for m in members if m in self.clients]

    def _update_population(self) -> None:
        volume = next((d for d in self.detectors if isinstance(d, Volume)), None)
        if volume is None:
            return
        counts: dict[str, list[int]] = {}
        for state in self.clients.values():
            if state.burst[0] != state.total:
                state.burst = (state.total, recent_queries(state.queries))
            counts.setdefault(state.tier, []).append(state.burst[1])
        # A median of a handful of clients says little about a tier; wait for ten.
        live = {tier: float(statistics.median(c)) for tier, c in counts.items() if len(c) >= 10}
        volume.tier_median = {**live, **(self.reference.tier_medians if self.reference else {})}

    def _evict_idle(self, now: float) -> None:
        """Drop the query windows of clients idle for ``idle_evict_hours``: memory follows
        the active clients, not everyone ever seen. Risk (a few numbers) is kept."""
        cutoff = now - self.config.idle_evict_hours * 3600.0
        for client in [c for c, s in self.clients.items() if s.queries[-1].event.ts < cutoff]:
            del self.clients[client]

    def _link_lockstep(self, now: float) -> None:
        # activity_of passes over a client whose latest request is older than its span; a
        # pass's ``now`` only grows (LINK_EVERY_SECONDS), so those are dropped for good.
        since = now - SPAN_SECONDS
        self._busy = {c: t for c, t in self._busy.items() if t >= since and c in self.clients}
        activities = (activity_of(self.clients[c], now, self.reference, self.traffic) for c in self._busy)
        for a, b in lockstep_pairs(act for act in activities if act is not None):
            self.linker.link(a, b, now)
        if now - self._rebuilt_at >= REBUILD_EVERY_SECONDS:
            self.linker.rebuild(now)
            self._rebuilt_at = now

    def _new_risk(self) -> RiskState:
        return RiskState(self._half_life, without=LENSES)

    def seed(self, client: str, risk: float, reasons: Sequence[Reason], ts: float) -> None:
        """Resume a client's risk from its published record (a detector restart must not
        forgive an attacker); it decays from ``ts`` like any other. The record keeps reasons,
        not the lenses: a lens gets the whole score when a reason outside it is listed."""
        state = self._new_risk()
        state.cusum, state.last_ts = -math.log(1.0 - min(risk, 0.999)), ts
        state.reasons = {r.code: r for r in reasons}
        for lens, left_out in LENSES.items():
            state.partial[lens] = state.cusum if state.reasons.keys() - left_out else 0.0
        self.risks[client] = state

    def _implicated(self, state: ClientState, own: RiskState) -> bool:
        """Whether the entity's risk applies to this member (see ``ESTABLISHED_QUERIES``):
        an account on probation has no history to vouch for it, however many queries."""
        return (
            state.total < ESTABLISHED_QUERIES
            or own.risk > OWN_EVIDENCE
            or self.linker.on_probation(state.client)
        )

    def verdict(self, client: str) -> Verdict:
        state = self.clients[client]
        own = self.risks.get(client) or self._new_risk()
        entity_id = self.linker.entity_of(client)
        linked = self.linker.members(client)
        entity = self.entities.get(entity_id) if len(linked) > 1 else None
        members = len(linked) if entity else 1
        # What a member inherits never includes the entity's habits.
        entity_risk = 0.0
        if entity is not None and self._implicated(state, own):
            entity_risk = entity.risk.risk_without("habits")
        driver = entity.risk if entity is not None and entity_risk > own.risk else own
        risk = max(own.risk, entity_risk)
        override = self.overrides.get(client)
        if override not in OVERRIDES:  # shadow and probation pins leave the level to risk
            override = None
        level = self.policy.decide(client, risk, state.tier, override)
        if override is None and rank(level) > rank(CEILING) and state.total >= ESTABLISHED_QUERIES:
            lens = "unusual" if state.vouched else "habits"
            grounded = max(own.risk_without(lens), driver.risk_without(lens))
            found = self.policy.level_for(grounded, state.tier)
            level = found if rank(found) > rank(CEILING) else CEILING
        by_entity = driver is not own and rank(level) >= rank("tighten") and override is None
        action = self.policy.action(level, state.tier, members=members if by_entity else 1)
        reasons = tuple(driver.top_reasons())
        if driver is not own:
            reasons = tuple(
                replace(r, text=f"entity of {members} keys: {r.text}") for r in reasons
            )
        return Verdict(
            client=client,
            tier=state.tier,
            risk=risk,
            level=level,
            action=action,
            reasons=reasons,
            queries=state.total,
            entity=entity_id,
            entity_members=members,
            entity_risk=entity_risk,
            ts=state.queries[-1].event.ts,
        )
