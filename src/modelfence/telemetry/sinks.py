"""Telemetry sinks: the state database, and OpenTelemetry GenAI spans.

Each implements :class:`~modelfence.telemetry.pipeline.Sink`: ``write`` raises on failure
and the pipeline retries the same batch, so a sink needs no retry logic of its own. A batch
the database refuses for its values raises :class:`~modelfence.telemetry.pipeline.RejectedBatch`
instead, and the pipeline isolates the events at fault.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson
from sqlalchemy import String, delete
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from modelfence.operations import Operation
from modelfence.store import rejects_values, transaction
from modelfence.store.schema import request_events
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.pipeline import RejectedBatch

# Columns of their own, in table order; everything else of the event goes into ``detail``.
_FIELD_COLUMNS = tuple(
    c.name for c in request_events.columns if c.name not in {"id", "ts", "detail"}
)
_INSERTED = ("ts", *_FIELD_COLUMNS, "detail")  # the order of SqlSink's records
_NEVER_STORED = frozenset({"input_texts", "input_rows", "output_margins"})  # large; detection gets them through its feed
_DETAIL_FIELDS = tuple(
    f.name
    for f in fields(RequestEvent)
    if f.name not in {"ts", *_FIELD_COLUMNS} and f.name not in _NEVER_STORED
)
_RETENTION_EVERY_SECONDS = 3600.0
# Sized text columns (position in _FIELD_COLUMNS, size): values are cut to fit, so odd but
# valid input is stored, not refused.
_TEXT_SIZES = tuple(
    (i, c.type.length)
    for i, c in enumerate(request_events.c[name] for name in _FIELD_COLUMNS)
    if isinstance(c.type, String) and c.type.length is not None
)
_field_values = attrgetter(*_FIELD_COLUMNS)
# What orjson would write where the standard library's encoder (the JSON column's) writes
# otherwise or refuses (datetimes, dataclasses, subclasses of str, int, dict and list) makes
# it raise instead, as do ints past 64 bits, lone surrogates and keys that are not strings;
# those details go to the standard library's encoder. Left to orjson: UUIDs and plain enums,
# which it writes and the standard library refused, and NaN and infinities (see detail_json).
_ORJSON_STRICT = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# Bind markers of the drivers' paramstyles (sqlite3: qmark, asyncpg: numeric_dollar).
_MARKERS: dict[str, Callable[[int], str]] = {
    "qmark": lambda _: "?",
    "numeric_dollar": lambda i: f"${i}",
}


def column_text(value: str, size: int) -> str:
    """``value`` as a ``VARCHAR(size)`` on either database takes it: no NUL byte (PostgreSQL
    refuses them in text), lone surrogates (not UTF-8) as U+FFFD, at most ``size`` characters."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value.replace("\x00", "")[:size]


def _detail_getter(store_prompt_text: bool) -> Callable[[RequestEvent], dict[str, Any]]:
    """Reads an event's ``detail``; the prompt text only when allowed."""
    names = tuple(n for n in _DETAIL_FIELDS if store_prompt_text or n != "prompt_text")
    values = attrgetter(*names)
    return lambda event: dict(zip(names, values(event)))


_DETAILS = {allowed: _detail_getter(allowed) for allowed in (False, True)}


def _column_values(event: RequestEvent) -> list[Any]:
    """The event's values for ``_FIELD_COLUMNS``, text cut to fit."""
    values = list(_field_values(event))
    for i, size in _TEXT_SIZES:
        value = values[i]
        if not value.isascii() or "\x00" in value or len(value) > size:  # else it fits as is
            values[i] = column_text(value, size)
    return values


def event_row(event: RequestEvent, *, store_prompt_text: bool) -> dict[str, Any]:
    """The ``request_events`` row of one event; the prompt text only when allowed."""
    row = dict(zip(_FIELD_COLUMNS, _column_values(event), strict=True))
    row["ts"] = _utc(event.ts)
    row["detail"] = _DETAILS[store_prompt_text](event)
    return row


def detail_json(detail: dict[str, Any]) -> str:
    """``detail`` as JSON text that reads back as the JSON column's own encoder (the standard
    library's) would have it, at a fraction of its cost. NaN and infinities are written as
    null: the standard library writes ``NaN``, which is not JSON (PostgreSQL refused it)."""
    try:
        return orjson.dumps(detail, option=_ORJSON_STRICT).decode()
    except TypeError:
        return json.dumps(detail)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _ts_binder(engine: AsyncEngine) -> Callable[[float], Any]:
    """``ts`` as the column's own type binds it on this database (SQLite keeps text, which
    is what queries on ``ts`` compare), so driver-level inserts store what SQLAlchemy's do."""
    column = request_events.c.ts.type
    bind = column.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    if bind is None:
        return _utc
    return lambda ts: bind(_utc(ts))


def _insert_sql(conn: AsyncConnection) -> str:
    """The driver's own ``INSERT`` of one record, into the schema ``conn`` maps the table to
    (SQLAlchemy applies a ``schema_translate_map`` to its statements, not to driver SQL)."""
    assert conn.sync_connection is not None  # the connection is open
    preparer = conn.dialect.identifier_preparer
    table = preparer.quote(request_events.name)
    schema = conn.sync_connection.schema_for_object(request_events)
    if schema is not None:
        table = f"{preparer.quote_schema(schema)}.{table}"
    marker = _MARKERS[conn.dialect.paramstyle]
    markers = ", ".join(marker(i) for i in range(1, len(_INSERTED) + 1))
    return f"INSERT INTO {table} ({', '.join(_INSERTED)}) VALUES ({markers})"


class SqlSink:
    """Batched inserts into ``request_events``; deletes rows past retention once an hour.

    Records are tuples in the driver's own types, inserted with one driver-level
    ``executemany``: SQLAlchemy's per-value type processing (JSON through the standard
    library, datetimes) cost more CPU than the database's insert itself. What is stored is
    what ``event_row`` through ``request_events.insert()`` would store.
    """

    name = "store"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        store_prompt_text: bool = False,
        retention_days: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store_prompt_text = store_prompt_text
        self.retention_days = retention_days
        self.clock = clock
        self._next_retention = 0.0
        self._detail = _DETAILS[store_prompt_text]
        self._ts = _ts_binder(engine)

    def _record(self, event: RequestEvent) -> tuple[Any, ...]:
        """The values of ``_INSERTED`` for one event."""
        return (self._ts(event.ts), *_column_values(event), detail_json(self._detail(event)))

    async def write(self, events: Sequence[RequestEvent]) -> None:
        try:
            records = [self._record(e) for e in events]
        except Exception as exc:  # building rows is pure: it would fail again the same way
            raise RejectedBatch(f"unstorable event: {exc!r}") from exc
        try:
            async with transaction(self.engine, write=True) as conn:
                await conn.exec_driver_sql(_insert_sql(conn), records)
        except Exception as exc:
            if rejects_values(exc):
                raise RejectedBatch(str(exc)) from exc
            raise
        now = self.clock()
        if self.retention_days is not None and now >= self._next_retention:
            await self.apply_retention(now)
            self._next_retention = now + _RETENTION_EVERY_SECONDS

    async def apply_retention(self, now: float) -> int:
        """Delete events older than the retention period; returns how many."""
        assert self.retention_days is not None
        cutoff = datetime.fromtimestamp(now, UTC) - timedelta(days=self.retention_days)
        async with transaction(self.engine, write=True) as conn:
            result = await conn.execute(delete(request_events).where(request_events.c.ts < cutoff))
        return int(result.rowcount or 0)

    async def close(self) -> None:
        """The engine belongs to the application; nothing to close here."""


class OtelSink:
    """One span per request with OpenTelemetry GenAI attribute names (``gen_ai.*``).

    Spans are created after the fact with the request's real start and end times, so
    tracing costs the request path nothing. Without an OpenTelemetry SDK configured the
    API's no-op tracer makes this free.
    """

    name = "otel"

    def __init__(self) -> None:
        from opentelemetry import trace

        self._tracer = trace.get_tracer("modelfence")

    async def write(self, events: Sequence[RequestEvent]) -> None:
        for event in events:
            start = int(event.ts * 1e9)
            op = Operation.for_route(event.route)
            operation = GENAI_OPERATIONS[op] if op is not None else "chat"
            span = self._tracer.start_span(f"{operation} {event.model}", start_time=start)
            span.set_attributes(genai_attributes(event, operation))
            span.end(end_time=start + int(event.latency_ms * 1e6))

    async def close(self) -> None:
        """Spans are exported by the SDK's own processors."""


# OpenTelemetry GenAI ``gen_ai.operation.name`` values (OIP inference has none: "predict").
GENAI_OPERATIONS = {
    Operation.CHAT: "chat",
    Operation.COMPLETIONS: "text_completion",
    Operation.EMBEDDINGS: "embeddings",
    Operation.OIP_INFER: "predict",
}


def genai_attributes(event: RequestEvent, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": event.model,
        "gen_ai.usage.input_tokens": event.tokens_in,
        "gen_ai.usage.output_tokens": event.tokens_out,
        "http.response.status_code": event.status,
        "modelfence.client": event.client,
        "modelfence.risk_level": event.risk_level,
    }
    optional = {
        "gen_ai.request.temperature": event.temperature,
        "gen_ai.request.top_p": event.top_p,
        "gen_ai.request.max_tokens": event.max_tokens,
        "gen_ai.request.choice.count": event.n if event.n != 1 else None,
    }
    attributes.update({k: v for k, v in optional.items() if v is not None})
    return attributes
