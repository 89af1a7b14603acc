"""The record of marked classifier inputs: what verifying a suspect classifier replays.

DAWN's watermark set is keyed by the inputs a client actually sent, so the verifier
needs those inputs back; the digest alone cannot be queried. Marked rows are rare (≤ 0.5%
of inputs), so each is queued on the request path (never awaited; a full queue drops and
counts) and written by one background task, at most ``per_client`` rows per client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.periodic import OnError, Periodic
from modelfence.store import transaction
from modelfence.store.schema import watermark_ledger
from modelfence.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
STOP_SECONDS = 5.0  # at shutdown, how long queued marks may take to be written


@dataclass(frozen=True, slots=True)
class MarkedInput:
    client: str
    key_version: int
    digest: str  # hex
    features: list[float]  # [features]
    label: int  # the watermark label returned
    n_classes: int


class MarkLedger:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        per_client: int,
        queue_size: int = 10_000,
        on_error: OnError | None = None,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._per_client = per_client
        self._queue: asyncio.Queue[MarkedInput] = asyncio.Queue(queue_size)
        # A failed write backs off (the store is likely down) while new marks queue up.
        self._writer = Periodic(
            "watermark-ledger", self._write_next, interval=0.0, on_error=on_error
        )
        self._on_drop = on_drop
        self._drop_log = ThrottledLog(log, interval=10.0)
        self.dropped = 0

    def record(self, mark: MarkedInput) -> None:
        """Queue one marked input; never blocks (a full queue drops it and counts)."""
        try:
            self._queue.put_nowait(mark)
        except asyncio.QueueFull:
            self._drop("queue_full", 1)

    async def start(self) -> None:
        self._writer.start(first_delay=0.0)

    async def stop(self) -> None:
        """Write what is queued (for at most ``STOP_SECONDS``), then stop the writer.

        With the store down every write backs off, so waiting for the whole queue could
        hold shutdown for hours: what is left then is counted as dropped.
        """
        if self._writer.running:
            try:
                await asyncio.wait_for(self._queue.join(), STOP_SECONDS)
            except TimeoutError:
                pass
        await self._writer.stop()
        if (left := self._queue.qsize()) > 0:
            self._drop("shutdown", left)

    def _drop(self, reason: str, n: int) -> None:
        self.dropped += n
        if self._on_drop is not None:
            self._on_drop(reason, n)
        self._drop_log.warning("watermark ledger: %d marked inputs not recorded (%s)", n, reason)

    async def _write_next(self) -> None:
        mark = await self._queue.get()
        try:
            await self.write(mark)
        except Exception:
            self._drop("write_failed", 1)  # the writer logs and counts the error, backs off
            raise
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
