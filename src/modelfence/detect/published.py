"""What the detector publishes for operators beside ``client_risk``, kept bounded.

- ``client_risk_history``: one row per published change of a client's record (risk, level),
  written with the record itself (:meth:`~modelfence.detect.state.SqlState.publish_in`);
  the console draws it as the client's risk over time.
- ``reference_maps`` (once per loaded reference) and ``client_query_maps`` (one row per
  client, overwritten): where a client's recent queries fall against the honest reference
  (``detect/querymap.py`` computes them).

:func:`prune` deletes history and maps older than ``detection.history_retention_days``,
and reference maps no client map is drawn against any more; the detector runs it hourly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.store import transaction
from modelfence.store.schema import client_query_maps, client_risk_history, reference_maps

if TYPE_CHECKING:
    from modelfence.detect.engine import DetectionEngine
    from modelfence.detect.querymap import SpaceMap
    from modelfence.detect.reference import Reference

MAP_EVERY_SECONDS = 60.0  # a client's query map is rewritten at most this often
PRUNE_EVERY_SECONDS = 3600.0


class OperatorViews:
    """The detector's side: after each batch, the query maps due, and an hourly prune.

    Maps need the engine's reference (none without one); their projection is computed
    once, the first time one is due. ``clock`` is monotonic seconds (tests move it).
    """

    def __init__(
        self,
        engine: DetectionEngine,
        db: AsyncEngine,
        *,
        retention_days: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.db = db
        self.retention = timedelta(days=retention_days)
        self.clock = clock
        self._maps: dict[str, SpaceMap] | None = None
        self._mapped_reference: Reference | None = None
        self._references_written = False
        self._mapped_at: dict[str, float] = {}
        self._prune_at = float("-inf")

    async def after(self, clients: Iterable[str]) -> None:
        """Publish the maps of ``clients`` (the batch's) that are due, then prune if due."""
        now = self.clock()
        await self.publish_maps(clients, now)
        if now >= self._prune_at:
            await prune(self.db, datetime.now(UTC) - self.retention)
            self._prune_at = now + PRUNE_EVERY_SECONDS
            self._references_written = False  # written again, in case none was in use
            live = self.engine.clients
            self._mapped_at = {c: t for c, t in self._mapped_at.items() if c in live}

    async def publish_maps(self, clients: Iterable[str], now: float) -> None:
        reference = self.engine.reference
        if reference is None:
            return
        from modelfence.detect.features import View
        from modelfence.detect.querymap import client_row, space_maps

        if self._maps is None or self._mapped_reference is not reference:
            self._maps = space_maps(reference)  # once per loaded reference
            self._mapped_reference = reference
            self._references_written = False
        at = datetime.now(UTC)
        rows, mapped = [], []
        for client in sorted(set(clients)):
            state = self.engine.clients.get(client)
            last = self._mapped_at.get(client, float("-inf"))
            if state is None or now - last < MAP_EVERY_SECONDS:
                continue
            row = client_row(self._maps, client, View(state.queries).vectors,
                             queries=state.total, now=at)
            if row is not None:
                rows.append(row)
                mapped.append(client)
        references = [] if self._references_written else [
            m.reference_row(at) for m in self._maps.values()
        ]
        await write_maps(self.db, references=references, clients=rows)
        self._references_written = True
        self._mapped_at.update((client, now) for client in mapped)


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


async def write_maps(
    engine: AsyncEngine,
    *,
    references: Sequence[dict[str, Any]] = (),
    clients: Sequence[dict[str, Any]] = (),
) -> None:
    """Write reference maps (kept as first written) and client maps (overwritten)."""
    if not references and not clients:
        return
    async with transaction(engine, write=True) as conn:
        insert = _insert(conn.dialect.name)
        if references:
            await conn.execute(
                insert(reference_maps).values(list(references)).on_conflict_do_nothing(
                    index_elements=[reference_maps.c.reference]
                )
            )
        if clients:
            stmt = insert(client_query_maps).values(list(clients))
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[client_query_maps.c.client],
                    set_={
                        c.name: stmt.excluded[c.name]
                        for c in client_query_maps.columns
                        if c.name != "client"
                    },
                )
            )


async def prune(engine: AsyncEngine, before: datetime) -> int:
    """Delete history rows and client maps older than ``before``, and reference maps made
    before it that no client map uses; returns how many rows went."""
    maps = client_query_maps.c
    async with transaction(engine, write=True) as conn:
        history = await conn.execute(
            delete(client_risk_history).where(client_risk_history.c.at < before)
        )
        clients = await conn.execute(delete(client_query_maps).where(maps.updated_at < before))
        references = await conn.execute(
            delete(reference_maps).where(
                reference_maps.c.created_at < before,
                reference_maps.c.reference.not_in(select(maps.reference).distinct()),
            )
        )
    return sum(int(r.rowcount or 0) for r in (history, clients, references))
