"""SqlSink's driver-level inserts store what SQLAlchemy's insert of ``event_row`` stored.

Each case is written both ways into the same database and read back through SQLAlchemy:
the rows must be equal (on SQLite the stored ``ts`` text too, which queries compare), or
both ways must refuse the batch. Non-finite floats in ``detail`` are the one intended
difference: stored as null, where SQLite kept ``NaN`` (not JSON) and PostgreSQL refused it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import StoreError
from modelfence.store import create_tables, rejects_values, transaction
from modelfence.store.schema import request_events
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.pipeline import RejectedBatch
from modelfence.telemetry.sinks import SqlSink, detail_json, event_row

from .test_store_database import scratch_engine, store_url  # noqa: F401  (fixture)

NOW = 1_765_000_000.25
STORED = [c for c in request_events.columns if c.name != "id"]


def make_event(i: int, **fields: Any) -> RequestEvent:
    base: dict[str, Any] = {
        "ts": NOW + i * 0.001,
        "request_id": f"r{i}",
        "client": "acme",
        "key_id": "key_1",
        "tier": "default",
        "route": "/v1/chat/completions",
        "model": "llama-3.1-8b-instruct",
        "status": 200,
    }
    return RequestEvent(**(base | fields))


def realistic(i: int) -> RequestEvent:
    return make_event(
        i, account="acct-7", trust="established", ip_prefix="203.0.113.0/24",
        fingerprint="f" * 32, client_library="openai-python/1.54.0", user_agent="OpenAI/Python",
        temperature=0.7, top_p=0.9, max_tokens=256, n=2, logprobs=True, top_logprobs=5,
        stream=True, prompt_hash="a" * 64, frame_hash="b" * 64, prompt_len=42, turns=3,
        prompt_text="explain the difference between a list and a tuple", input_count=1,
        input_texts=["never stored"], input_rows=[[0.5]], output_margins=[0.25],
        tokens_in=31, tokens_out=900, latency_ms=123.456, limit_decision="allowed",
        extra={"purpose": "cover", "nested": {"tags": ["a", "b"], "weight": 1e-7}},
    )


CASES = {
    "realistic": [realistic(i) for i in range(3)],
    "odd text": [make_event(
        1, client="c\x00lient-ü" + "x" * 300, model="模型🙂\ud800", key_id="k" * 40,
        tier="\u202eevil", user_agent="ua\ttab", account="组织", prompt_text="p\x00\u202e🙂",
        extra={"ü": ["é", None, True], 3: "int key", "big": 2**70, "u64": 2**64 - 1},
    )],
    "none-heavy": [make_event(
        2, temperature=None, top_p=None, max_tokens=None, output_label=None, prompt_text=None,
        extra={}, ts=0.0,
    )],
    "a whole second": [make_event(3, ts=1_700_000_000.0)],  # SQLite text ends ".000000"
    # Fits SQLite's 64-bit INTEGER, not PostgreSQL's INTEGER: refused there both ways.
    "a big count": [make_event(4, tokens_in=2**40)],
    # Not UTF-8, so orjson refuses it: the standard library's encoder writes it escaped.
    "a lone surrogate in detail": [make_event(5, trust="t\ud800")],
}


async def _rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    """The rows of ``request_events`` in insertion order, then deleted (on SQLite with the
    stored ``ts`` text and ``detail`` as the JSON text parses)."""
    async with transaction(engine, write=True) as conn:
        rows = [
            dict(r)
            for r in (
                await conn.execute(select(*STORED).order_by(request_events.c.id))
            ).mappings()
        ]
        if engine.dialect.name == "sqlite":
            raw = await conn.exec_driver_sql("SELECT ts, detail FROM request_events ORDER BY id")
            for row, stored in zip(rows, raw.all(), strict=True):
                row["ts_text"] = stored.ts
                row["detail_text"] = json.loads(stored.detail)
        await conn.execute(delete(request_events))
    return rows


async def _old_write(
    engine: AsyncEngine, events: Sequence[RequestEvent], store_prompt_text: bool
) -> None:
    """What SqlSink.write did: ``event_row`` through SQLAlchemy's insert."""
    try:
        rows = [event_row(e, store_prompt_text=store_prompt_text) for e in events]
        async with transaction(engine, write=True) as conn:
            await conn.execute(request_events.insert(), rows)
    except Exception as exc:
        if isinstance(exc, StoreError) and not rejects_values(exc):
            raise
        raise RejectedBatch(str(exc)) from exc


async def _outcome(
    engine: AsyncEngine, write: Callable[[], Awaitable[None]]
) -> list[dict[str, Any]] | None:
    """The rows ``write`` stored (then deleted), or None when it refused the batch."""
    try:
        await write()
    except RejectedBatch:
        return None
    return await _rows(engine)


@pytest.mark.parametrize("store_prompt_text", [False, True], ids=["no-prompt", "prompt"])
@pytest.mark.parametrize("case", list(CASES))
async def test_the_sink_stores_what_the_sqlalchemy_insert_stored(
    store_url: str, case: str, store_prompt_text: bool  # noqa: F811
) -> None:
    events = CASES[case]
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        sink = SqlSink(engine, store_prompt_text=store_prompt_text)
        new = await _outcome(engine, lambda: sink.write(events))
        old = await _outcome(engine, lambda: _old_write(engine, events, store_prompt_text))
    assert new == old
    if new is not None:
        assert all(row["ts"].tzinfo is not None for row in new)
        assert all(("prompt_text" in row["detail"]) == store_prompt_text for row in new)


async def test_what_sqlite_keeps_of_odd_values(tmp_path: Any) -> None:
    """What the cases above store on SQLite: where PostgreSQL refuses a batch (both ways),
    SQLite keeps it, so there the rows are compared; odd text is cleaned and cut."""
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        sink = SqlSink(engine)
        for case in ("a big count", "a lone surrogate in detail", "odd text"):
            await sink.write(CASES[case])
        rows = await _rows(engine)
    assert [r["request_id"] for r in rows] == ["r4", "r5", "r1"]
    assert rows[0]["tokens_in"] == 2**40 and rows[1]["detail"]["trust"] == "t\ud800"
    assert rows[2]["detail"]["extra"] == {"ü": ["é", None, True], "3": "int key", "big": 2**70,
                                          "u64": 2**64 - 1}
    assert rows[2]["model"] == "模型🙂\ufffd" and rows[2]["client"] == "client-ü" + "x" * 192


def test_event_row_is_the_stored_row() -> None:
    event = realistic(0)
    assert event_row(event, store_prompt_text=False) == {
        "ts": datetime.fromtimestamp(NOW, UTC), "request_id": "r0", "client": "acme",
        "key_id": "key_1", "tier": "default", "route": "/v1/chat/completions",
        "model": "llama-3.1-8b-instruct", "status": 200, "ip_prefix": "203.0.113.0/24",
        "fingerprint": "f" * 32, "prompt_hash": "a" * 64, "prompt_len": 42, "tokens_in": 31,
        "tokens_out": 900, "latency_ms": 123.456, "limit_decision": "allowed",
        "risk_level": "normal",
        "detail": {
            "account": "acct-7", "trust": "established", "client_library": "openai-python/1.54.0",
            "user_agent": "OpenAI/Python", "temperature": 0.7, "top_p": 0.9, "max_tokens": 256,
            "n": 2, "logprobs": True, "top_logprobs": 5, "logit_bias_size": 0, "stream": True,
            "cot": False, "frame_hash": "b" * 64, "turns": 3, "input_count": 1,
            "output_label": None,
            "extra": {"purpose": "cover", "nested": {"tags": ["a", "b"], "weight": 1e-7}},
        },
    }
    with_prompt = event_row(event, store_prompt_text=True)["detail"]
    assert with_prompt["prompt_text"] == event.prompt_text


@pytest.mark.parametrize(
    "fields",
    [
        {"tokens_out": 2**70},  # no INTEGER column holds it, on either database
        {"status": 2**63},  # past SQLite's 64 bits as well
        {"model": None},  # not text: the row cannot be built
        {"ts": math.nan},
        {"extra": {"at": datetime.now(UTC)}},  # not JSON
    ],
    ids=["tokens", "status", "model", "ts", "extra"],
)
async def test_a_value_no_column_holds_rejects_the_batch_and_stores_none_of_it(
    store_url: str, fields: dict[str, Any]  # noqa: F811
) -> None:
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        sink = SqlSink(engine)
        with pytest.raises(RejectedBatch):
            await sink.write([make_event(1), make_event(2, **fields)])
        with pytest.raises(RejectedBatch):  # as the old path did
            await _old_write(engine, [make_event(1), make_event(2, **fields)], False)
        assert await _rows(engine) == []
        await sink.write([make_event(3)])  # and the sink carries on
        assert [r["request_id"] for r in await _rows(engine)] == ["r3"]


async def test_non_finite_floats_in_detail_are_stored_as_null(store_url: str) -> None:  # noqa: F811
    """Intended change: SQLite stored ``NaN`` (not JSON) and PostgreSQL refused the event."""
    event = make_event(1, temperature=math.nan, top_p=math.inf, extra={"x": [-math.inf, 1.5]})
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        await SqlSink(engine).write([event])
        [row] = await _rows(engine)
    assert row["detail"]["temperature"] is None and row["detail"]["top_p"] is None
    assert row["detail"]["extra"] == {"x": [None, 1.5]}


async def test_retention_deletes_what_is_older_than_the_cutoff_to_the_millisecond(
    store_url: str,  # noqa: F811
) -> None:
    now = time.time()
    cutoff = now - 86400
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        sink = SqlSink(engine, retention_days=1, clock=lambda: now)
        await sink.write([
            make_event(1, ts=cutoff - 0.001), make_event(2, ts=cutoff + 0.001),
            make_event(3, ts=now - 3 * 86400), make_event(4, ts=now),
        ])  # the first write also applies retention
        assert [r["request_id"] for r in await _rows(engine)] == ["r2", "r4"]
        await sink.write([make_event(5, ts=now - 3 * 86400)])  # within the hour: kept for now
        assert [r["request_id"] for r in await _rows(engine)] == ["r5"]
        await sink.write([make_event(6, ts=now - 3 * 86400)])
        assert await sink.apply_retention(now) == 1


def test_detail_json_reads_back_as_the_standard_library_wrote_it() -> None:
    class Count(int):
        pass

    details: list[dict[Any, Any]] = [
        {"a": 1, "b": [1.5, None, True, "ü🙂"], "c": {"d": 1e16, "e": -0.0, "f": 5e-324}},
        {"big": 2**70, "neg": -(2**63) - 1, "u64": 2**64 - 1},  # past orjson's 64 bits
        {"s": "lone \ud800 surrogate", "nul": "a\x00b"},
        {1: "int key", None: "none key", 1.5: "float key"},
        {"subclass": Count(3)},
    ]
    for detail in details:
        assert json.loads(detail_json(detail)) == json.loads(json.dumps(detail))
    with pytest.raises(TypeError):
        detail_json({"at": datetime.now(UTC)})
