"""Distribution tricks: ways to spread one extraction so no single key looks guilty.

Each is a *sender* wrapping the gateway (``PlannedRequest -> Exchange``), so it composes
with any attack that queries through a sender, ART's included:

- ``sybil``: N accounts with distinct addresses and client libraries, round-robin;
- ``low_and_slow``: paced, with 4 honest-looking cover queries per extraction query;
- ``rotating``: a burnt account (401/403/429) is replaced by a fresh one and the query retried.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from modelfence.redteam.runner import BLOCKED, LiveGateway
from modelfence.redteam.traffic import DIGITS_INFER, Exchange, PlannedRequest, digits_body

Send = Callable[[PlannedRequest], Exchange]


def sybil(gateway: LiveGateway, identities: Sequence[str]) -> Send:
    turn = itertools.cycle(identities)

    def send(plan: PlannedRequest) -> Exchange:
        return gateway.blocking_send(replace(plan, client=next(turn)))

    return send


def low_and_slow(
    gateway: LiveGateway, client: str, cover: np.ndarray, rng: np.random.Generator,
    *, cover_per_query: int = 4, pause_seconds: float = 0.0,
) -> Send:
    """80/20 mix: ``cover_per_query`` in-distribution digit queries before each real one."""

    def send(plan: PlannedRequest) -> Exchange:
        for _ in range(cover_per_query):
            rows = cover[rng.integers(len(cover), size=int(rng.integers(1, 4)))]
            gateway.blocking_send(PlannedRequest(plan.at, client, DIGITS_INFER, digits_body(rows), "cover"))
            time.sleep(pause_seconds)
        return gateway.blocking_send(replace(plan, client=client))

    return send


def rotating(gateway: LiveGateway, client: str, max_rotations: int = 20) -> Send:
    def send(plan: PlannedRequest) -> Exchange:
        exchange = gateway.blocking_send(replace(plan, client=client))
        while (exchange.status in BLOCKED or exchange.status == 429) and gateway.rotations.get(client, 0) < max_rotations:
            assert gateway.loop is not None
            asyncio.run_coroutine_threadsafe(gateway.rotate(client), gateway.loop).result()
            exchange = gateway.blocking_send(replace(plan, client=client))
        return exchange

    return send
