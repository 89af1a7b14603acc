"""The watermark ledger with its store gone: shutdown is bounded and every lost mark counted."""

from __future__ import annotations

import time

import modelfence.watermark.ledger as ledger_module
from modelfence.store import open_engine
from modelfence.testing.processes import free_port
from modelfence.watermark.ledger import MarkedInput, MarkLedger


def _mark(i: int) -> MarkedInput:
    return MarkedInput("acme", 1, f"{i:064x}", [0.0] * 4, 3, 10)


async def test_stop_with_the_store_down_is_bounded_and_counts_what_is_left(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ledger_module, "STOP_SECONDS", 0.5)
    # Nothing listens there: each write fails the way asyncpg does (connection refused).
    engine = open_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    drops: list[tuple[str, int]] = []
    ledger = MarkLedger(engine, per_client=100, queue_size=5, on_drop=lambda r, n: drops.append((r, n)))
    await ledger.start()
    for i in range(8):  # 5 queued, 3 refused by the full queue
        ledger.record(_mark(i))
    started = time.monotonic()
    await ledger.stop()
    await engine.dispose()
    assert time.monotonic() - started < 5  # the writer backs off; shutdown must not wait on it
    reasons = {reason: sum(n for r, n in drops if r == reason) for reason, _ in drops}
    assert reasons["queue_full"] == 3
    assert reasons.get("write_failed", 0) + reasons["shutdown"] == 5
    assert ledger.dropped == 8
