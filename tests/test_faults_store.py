"""PostgreSQL stopped and started again under load: every request event is written or counted.

The gateway's store is a private cluster (tests/services.py ``private_postgres``) so that
stopping it touches nobody else. Requests keep arriving throughout; afterwards the number
of requests answered must equal the rows in ``request_events`` plus the events the gateway
counted as dropped — nothing may be lost uncounted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Self

import asyncpg
import pytest

from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .services import (
    PrivatePostgres,
    dropped_events,
    metric_sum,
    private_postgres,
    scrape_metrics,
)

pytestmark = [pytest.mark.postgres]

BODY = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


class SteadyLoad:
    """Chat requests from ``threads`` threads until stopped; counts answers by status."""

    def __init__(self, gateway: GatewayProcess, key: str, threads: int = 2) -> None:
        self.url = gateway.url + "/v1/chat/completions"
        self.headers = {"authorization": f"Bearer {key}"}
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _ = http_json("POST", self.url, BODY, headers=self.headers, timeout=10)
            except OSError as exc:  # counted: a request without an answer has no event either
                with self._lock:
                    self.errors.append(repr(exc))
                continue
            with self._lock:
                self.statuses[status] += 1
            time.sleep(0.01)

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


async def _rows(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM request_events"))
    finally:
        await conn.close()


def _settled(gateway: GatewayProcess, pg: PrivatePostgres, sent: int,
             timeout: float = 20.0) -> tuple[int, float]:
    """(rows, counted drops) once they add up to ``sent`` or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        rows = asyncio.run(_rows(pg.url))
        dropped = dropped_events(scrape_metrics(gateway.url))
        if rows + dropped >= sent or time.monotonic() > deadline:
            return rows, dropped
        time.sleep(0.2)


def _outage(
    start_gateway: GatewayFactory, pg: PrivatePostgres, *, stop_mode: str, down_seconds: float,
    telemetry: dict[str, object],
) -> tuple[GatewayProcess, SteadyLoad]:
    gateway = start_gateway(
        store=pg.url,
        telemetry={"retry_max_seconds": 0.5, "batch_size": 50, **telemetry},
        detection={"enabled": False},
    )
    key = gateway.create_key("steady")
    with SteadyLoad(gateway, key) as load:
        time.sleep(1.0)
        pg.stop(stop_mode)
        time.sleep(down_seconds)
        pg.start()
        time.sleep(1.5)
    return gateway, load


def test_events_during_a_store_restart_are_buffered_and_written(
    start_gateway: GatewayFactory,
) -> None:
    with private_postgres() as pg:
        gateway, load = _outage(start_gateway, pg, stop_mode="fast", down_seconds=2.0,
                                telemetry={})
        assert load.statuses.keys() == {200}, (load.statuses, load.errors[:3])
        rows, dropped = _settled(gateway, pg, load.answered)
        samples = scrape_metrics(gateway.url)
    assert metric_sum(samples, "modelfence_telemetry_sink_errors_total", sink="store") >= 1
    assert (rows, dropped) == (load.answered, 0), "buffered events must be written afterwards"


def test_events_past_the_buffer_during_a_store_crash_are_counted(
    start_gateway: GatewayFactory,
) -> None:
    with private_postgres() as pg:
        gateway, load = _outage(start_gateway, pg, stop_mode="immediate", down_seconds=2.0,
                                telemetry={"buffer_events": 10})
        rows, dropped = _settled(gateway, pg, load.answered)
    assert dropped >= 1, "the outage outlasted a 10-event buffer"
    assert rows + dropped == load.answered, (rows, dropped, load.statuses)
