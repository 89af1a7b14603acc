"""The record of marked classifier inputs: what verifying a suspect classifier replays.

DAWN's watermark set is keyed by the inputs a client actually sent, so the verifier
needs those inputs back; the digest alone cannot be queried. Marked rows are rare (≤ 0.5%
of inputs), so each is queued on the request path (never awaited; a full queue drops and
counts) and written by one background task, at most ``per_client`` rows per client.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import StoreError
from modelfence.store import transaction
from modelfence.store.schema import watermark_ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MarkedInput:
    client: str
    key_version: int
    digest: str  # hex
    features: list[float]  # [features]
    label: int  # the watermark label returned
    n_classes: int


class MarkLedger:
    def __init__(self, engine: AsyncEngine, *, per_client: int, queue_size: int = 10_000) -> None:
        self._engine = engine
        self._per_client = per_client
        self._queue: asyncio.Queue[MarkedInput] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def record(self, mark: MarkedInput) -> None:
        """Queue one marked input; never blocks (a full queue drops it and counts)."""
        try:
            self._queue.put_nowait(mark)
        except asyncio.QueueFull:
            self.dropped += 1

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watermark-ledger")

    async def stop(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            mark = await self._queue.get()
            try:
                await self.write(mark)
            except StoreError as exc:
                self.dropped += 1
                log.warning("could not record a marked input for client %r: %s", mark.client, exc)
            finally:
                self._queue.task_done()

    async def write(self, mark: MarkedInput) -> bool:
        """Insert one row unless the client's quota is full or the input is known already."""
        async with transaction(self._engine, write=True) as conn:
            count = await conn.scalar(
                select(func.count()).select_from(watermark_ledger)
                .where(watermark_ledger.c.client == mark.client)
            )
            if (count or 0) >= self._per_client:
                return False
            try:
                async with conn.begin_nested():
                    await conn.execute(watermark_ledger.insert().values(
                        client=mark.client, key_version=mark.key_version, digest=mark.digest,
                        features=mark.features, label=mark.label, n_classes=mark.n_classes,
                        at=datetime.now(UTC),
                    ))
            except IntegrityError:
                return False
        return True


async def marked_inputs(engine: AsyncEngine, client: str) -> list[MarkedInput]:
    """Every recorded marked input of ``client``, oldest first."""
    t = watermark_ledger.c
    async with transaction(engine) as conn:
        rows = await conn.execute(
            select(t.client, t.key_version, t.digest, t.features, t.label, t.n_classes)
            .where(t.client == client).order_by(t.id)
        )
        return [MarkedInput(*row) for row in rows]


async def ledger_clients(engine: AsyncEngine) -> list[str]:
    async with transaction(engine) as conn:
        rows = await conn.execute(select(watermark_ledger.c.client).distinct())
        return sorted(r[0] for r in rows)
