"""The detector service: a feed in, verdicts published, audited and alerted.

:class:`DetectorService` wraps :class:`~modelfence.detect.engine.DetectionEngine` with
what a running detector must do with verdicts: publish changed ones to the shared state,
write an audit row for every change of action, alert when a client climbs to ``alert``
or above, follow admin overrides, and keep what the console draws (each published change
also a risk-history row, query maps; ``detect/published.py``). ``run`` loops over an
:class:`~modelfence.detect.feeds.EventFeed` until it closes, surviving any error of the
feed or the stores (:class:`~modelfence.periodic.Periodic`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from modelfence.detect.actions import rank, shadowed
from modelfence.detect.alerts import Alerter
from modelfence.detect.engine import DetectionEngine, Verdict
from modelfence.detect.feeds import EventFeed
from modelfence.detect.metrics import DetectorMetrics
from modelfence.detect.published import OperatorViews
from modelfence.detect.risk import Reason
from modelfence.detect.state import ClientRecord, RedisState, SqlState, field_values, known
from modelfence.periodic import Done, Periodic, Sleep
from modelfence.telemetry.events import RequestEvent

RISK_STEP = 0.02  # smaller risk changes are not worth a database write
# A republished record keeps the links listed this recently (event time) if its entity is
# the same: every member of an entity is republished on each step of the entity's risk,
# and listing every member's links each time costs members² (links fade over hours).
LINKS_FRESH_SECONDS = 60.0
OVERRIDE_REFRESH_SECONDS = 2.0  # overrides, cuts and account metadata are read this often
TRAITS_OVERLAP = timedelta(seconds=5)  # changes stamped by a slow clock are still read


def entity_of(verdict: Verdict) -> str | None:
    """The entity a record names: none for a client on its own."""
    return verdict.entity if verdict.entity_members > 1 else None


def record_of(
    verdict: Verdict,
    *,
    shadow: bool,
    probation: bool = False,
    links: list[dict[str, Any]] | None = None,
) -> ClientRecord:
    return ClientRecord(
        client=verdict.client,
        tier=verdict.tier,
        entity=entity_of(verdict),
        risk=round(verdict.risk, 4),
        level=verdict.level,
        quota_share=verdict.action.quota_share,
        reasons=[field_values(r) for r in verdict.reasons],
        queries=verdict.queries,
        shadow=shadow,
        updated_at=datetime.now(UTC),
        links=links,
        probation=probation,
    )


class DetectorService:
    def __init__(
        self,
        engine: DetectionEngine,
        state: SqlState,
        alerter: Alerter,
        *,
        shared: RedisState | None = None,
        shadow: bool = False,
        metrics: DetectorMetrics | None = None,
        archive: Callable[[RequestEvent], object] | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.archive = archive  # takes each event read, for request_events; never waits
        self.state = state
        self.alerter = alerter
        self.shared = shared
        self.shadow = shadow
        self.metrics = metrics or DetectorMetrics()
        self._published: dict[str, ClientRecord] = {}
        self._links_at: dict[str, float] = {}  # client -> event time its links were listed
        self._unpublished: dict[str, ClientRecord] = {}
        self._overrides_at = 0.0
        self._clamped = 0  # the engine's clamped rows counted so far
        self._traits_since = datetime.fromtimestamp(0, UTC)
        self.loop: Periodic | None = None  # set by run(): its error counts
        self._sleep = sleep  # the backoff's clock
        # Risk history pruning and query maps, for the console (detect/published.py).
        self.views = OperatorViews(
            engine, state.engine, retention_days=engine.config.history_retention_days
        )

    def _links(self, before: ClientRecord | None, verdict: Verdict) -> list[dict[str, Any]]:
        """The links to publish with the client's new record (see ``LINKS_FRESH_SECONDS``)."""
        listed = self._links_at.get(verdict.client)
        if (
            before is not None
            and before.links is not None
            and before.entity == entity_of(verdict)
            and listed is not None
            and 0.0 <= verdict.ts - listed < LINKS_FRESH_SECONDS  # a clock ahead: relist
        ):
            return before.links
        self._links_at[verdict.client] = verdict.ts
        return [field_values(link) for link in self.engine.linker.links_of(verdict.client, verdict.ts)]

    async def handle(self, events: Sequence[RequestEvent]) -> list[ClientRecord]:
        """Process one batch; returns the records that changed and were published."""
        now = time.monotonic()
        if now - self._overrides_at >= OVERRIDE_REFRESH_SECONDS:
            await self._refresh_operator_state(events)
            self._overrides_at = now
        await self._resume({e.client for e in events} - self._published.keys())
        changed = []
        verdicts = self.engine.process(events)
        self.metrics.clamped_rows.inc(self.engine.clamped_rows - self._clamped)
        self._clamped = self.engine.clamped_rows
        for verdict in verdicts:
            # What the client's pin (shadow, probation) makes of the level, as published.
            pin = self.engine.overrides.get(verdict.client)
            shadow, probation = shadowed(pin, self.shadow), pin == "probation"
            before = self._published.get(verdict.client)
            # Compared before a record is built: an entity's evaluation re-verdicts every
            # member, and most of them are unchanged.
            if (
                before is None
                or before.level != verdict.level
                or abs(before.risk - round(verdict.risk, 4)) >= RISK_STEP
                or before.entity != entity_of(verdict)
                or (before.shadow, before.probation) != (shadow, probation)
            ):
                links = self._links(before, verdict)
                record = record_of(verdict, shadow=shadow, probation=probation, links=links)
                changed.append((before, record, verdict.ts))
        await self._publish([record for _, record, _ in changed])
        self.metrics.published(events)
        for before, verdict_record, ts in changed:
            record = self._published[verdict_record.client]  # as published
            previous = before.level if before else "normal"
            if previous != record.level:
                await self.state.audit(
                    client=record.client,
                    entity=record.entity,
                    previous=previous,
                    action=record.level,
                    risk=record.risk,
                    source="detector",
                    shadow=record.shadow,
                    reasons=record.reasons,
                )
                if rank(record.level) >= rank("alert") and rank(record.level) > rank(previous):
                    await self.alerter.alert(record, ts)
        await self.views.after({e.client for e in events})
        if len(self._published) > len(self.engine.clients):
            self._forget_evicted()
        self.metrics.batches.observe(time.monotonic() - now)
        return [self._published[record.client] for _, record, _ in changed]

    async def _refresh_operator_state(self, events: Sequence[RequestEvent]) -> None:
        """Overrides, cut links and account metadata, as operators and sign-ups left them."""
        self.engine.overrides = await self.state.overrides()
        linker = self.engine.linker
        if linker.set_cuts(await self.state.cuts()) and events:
            linker.rebuild(max(e.ts for e in events))
        read_at = datetime.now(UTC)
        for account, traits in (await self.state.account_traits(self._traits_since)).items():
            linker.set_traits(account, traits)
        self._traits_since = read_at - TRAITS_OVERLAP

    def _forget_evicted(self) -> None:
        """Drop what is kept of clients the engine evicted (idle for ``idle_evict_hours``):
        memory follows the active clients. One that returns is resumed from the store."""
        for client in self._published.keys() - self.engine.clients.keys():
            del self._published[client]
            self._links_at.pop(client, None)

    async def _resume(self, clients: set[str]) -> None:
        """Seed clients this process has not seen yet with their published risk (one it
        evicted keeps the risk the engine still holds, which is more exact)."""
        if not clients:
            return
        for record in await self.state.get_many(sorted(clients)):
            if record.client not in self.engine.risks:
                # Keys a reason did not have when published (value, threshold, since)
                # default; keys of a newer release are ignored.
                reasons = [Reason(**known(Reason, r)) for r in record.reasons]
                ts = record.updated_at.timestamp()
                self.engine.seed(record.client, record.risk, reasons, ts)
            self._published[record.client] = record

    async def _publish(self, records: list[ClientRecord]) -> None:
        # Records that failed to publish (store down) go out with the next attempt.
        self._unpublished.update((r.client, r) for r in records)
        pending = list(self._unpublished.values())
        if not pending:
            return
        # shadow and probation follow the pins as stored now, not the map read up to
        # OVERRIDE_REFRESH_SECONDS ago: an operator's fresh pin is never undone.
        published = await self.state.publish_following_pins(pending, shadow_mode=self.shadow)
        if self.shared is not None:
            await self.shared.publish(published)
        self._unpublished.clear()
        self.metrics.verdicts.inc(len(published))
        self._published.update((r.client, r) for r in published)

    async def run(self, feed: EventFeed, *, batch: int = 500, timeout: float = 0.5) -> None:
        """Process ``feed`` until it closes; a failing read or publish is retried with backoff.

        Records that could not be published are kept and go out with the next batch (or
        the next idle poll); the engine already has the events.
        """

        stage = "feed"  # where a failing step failed, for the errors' label

        async def step() -> None:
            nonlocal stage
            stage = "feed"
            events = await feed.read(batch, timeout)
            if events is None:
                raise Done
            self.metrics.read(len(events))
            if self.archive is not None:
                for event in events:
                    self.archive(event)
            try:
                stage = "store"
                if events:
                    await self.handle(events)
                else:
                    await self._publish([])  # retries what an outage held back
            finally:
                handling, stage = stage, "feed"
                await feed.ack()
                stage = handling  # an error of the handling itself is the one raised

        def count(_name: str, _exc: Exception) -> None:
            self.metrics.error(stage)

        self.loop = Periodic("detector", step, interval=0.0, on_error=count, sleep=self._sleep)
        await self.loop.run(first_delay=0.0)
