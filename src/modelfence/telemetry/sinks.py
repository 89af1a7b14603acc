"""Telemetry sinks: the state database, and OpenTelemetry GenAI spans.

Each implements :class:`~modelfence.telemetry.pipeline.Sink`: ``write`` raises on failure
and the pipeline retries the same batch, so a sink needs no retry logic of its own. A batch
the database refuses for its values raises :class:`~modelfence.telemetry.pipeline.RejectedBatch`
instead, and the pipeline isolates the events at fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, delete
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.operations import Operation
from modelfence.store import rejects_values, transaction
from modelfence.store.schema import request_events
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.pipeline import RejectedBatch

# Columns of their own; everything else of the event goes into ``detail``.
_COLUMNS = frozenset(c.name for c in request_events.columns) - {"id", "detail"}
_NEVER_STORED = frozenset({"input_texts", "input_rows", "output_margins"})  # large; detection gets them through its feed
_RETENTION_EVERY_SECONDS = 3600.0
# Sized text columns: values are cut to fit, so odd but valid input is stored, not refused.
_TEXT_SIZES = {
    c.name: c.type.length
    for c in request_events.columns
    if isinstance(c.type, String) and c.type.length is not None
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


def event_row(event: RequestEvent, *, store_prompt_text: bool) -> dict[str, Any]:
    """The ``request_events`` row of one event; the prompt text only when allowed."""
    data = event.to_dict()
    row = {name: data[name] for name in _COLUMNS if name != "ts"}
    for name, size in _TEXT_SIZES.items():
        row[name] = column_text(row[name], size)
    row["ts"] = datetime.fromtimestamp(event.ts, UTC)
    detail = {k: v for k, v in data.items() if k not in _COLUMNS and k not in _NEVER_STORED}
    if not store_prompt_text:
        detail.pop("prompt_text", None)
    row["detail"] = detail
    return row


class SqlSink:
    """Batched inserts into ``request_events``; deletes rows past retention once an hour."""

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

    async def write(self, events: Sequence[RequestEvent]) -> None:
        try:
            rows = [event_row(e, store_prompt_text=self.store_prompt_text) for e in events]
        except Exception as exc:  # building rows is pure: it would fail again the same way
            raise RejectedBatch(f"unstorable event: {exc!r}") from exc
        try:
            async with transaction(self.engine, write=True) as conn:
                await conn.execute(request_events.insert(), rows)
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
