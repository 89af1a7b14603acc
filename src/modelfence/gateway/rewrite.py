"""Response rewriting as a plain ASGI stage: the shape of hardening and watermarking.

A subclass decides in :meth:`ResponseRewriting.plan` (before the request runs, from the
request context) whether it may touch the answer at all; ``None`` means the stage steps
aside and the client gets the upstream's bytes untouched, at no cost. Otherwise ``send``
is wrapped: ``http.response.start`` is held back until the first body message, when
:meth:`~ResponseRewriting.transform_for` turns the plan into a payload transform (it may
await, e.g. to spend a budget) and the headers are decided — a whole body gets a new
``content-length``, a stream gets none. Bodies go through a :class:`BodyRewriter`, one
``feed(chunk, more_body)`` call per body message: JSON answers are rewritten whole,
server-sent events one ``data: {...}`` event at a time. An answer a stage has a plan for
but cannot read (another content type, or JSON its parser refuses) goes on as it came: the
stage's ``on_unread(reason)`` counts it (once per answer, however many of a stream's events
it could not read), so such a fail-open is never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import orjson

from modelfence.gateway.sse import event_data
from modelfence.types import ASGIApp, Headers, Message, Receive, Scope, Send

PayloadTransform = Callable[[Any], Any]
# An answer passed on (partly) unread, and why: content_type | not_json | too_deep (JSON
# nested deeper than orjson writes, though it reads it).
Unread = Callable[[str], None]
P = TypeVar("P")


def _ignore(reason: str) -> None:
    """No one counts: the rewriters' default (tests, benchmarks)."""


class BodyRewriter(Protocol):
    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        """Take the next body bytes; return what to send now (all of it when not more_body)."""
        ...


class JsonRewriter:
    """The whole JSON body through the transform. A transform with a ``rewrite_body(bytes)``
    method is offered the raw body first (it may edit a few byte spans instead of parsing
    and writing the whole answer); when that answers None, the body is parsed as usual."""

    __slots__ = ("_buffer", "_on_unread", "_transform")

    def __init__(self, transform: PayloadTransform, on_unread: Unread = _ignore) -> None:
        self._transform = transform
        self._on_unread = on_unread
        self._buffer: list[bytes] = []

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        self._buffer.append(chunk)
        if more_body:
            return b""
        body = b"".join(self._buffer)
        rewrite_body = getattr(self._transform, "rewrite_body", None)
        if rewrite_body is not None:
            rewritten: bytes | None = rewrite_body(body)
            if rewritten is not None:
                return rewritten
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._on_unread("not_json")
            return body
        payload = self._transform(payload)
        try:
            return orjson.dumps(payload)
        except orjson.JSONEncodeError:
            self._on_unread("too_deep")
            return body


class SSERewriter:
    """Server-sent events one at a time through the transform, as the proxy forwards them
    (LF line ends and ``data: `` fields: :mod:`.sse`); an event's other fields are kept."""

    __slots__ = ("_buffer", "_on_unread", "_transform")

    def __init__(self, transform: PayloadTransform, on_unread: Unread = _ignore) -> None:
        self._transform = transform
        self._on_unread: Unread | None = on_unread  # None once told: one count per answer
        self._buffer = b""

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        data = self._buffer + chunk
        complete, sep, self._buffer = data.rpartition(b"\n\n")
        out = b"".join(self._event(e) for e in complete.split(b"\n\n") if e) if sep else b""
        if not more_body:
            # An upstream that leaves its last event unterminated still has it read.
            rest, self._buffer = self._buffer, b""
            out += self._event(rest.rstrip(b"\n")) if rest.strip() else rest
        return out

    def _event(self, event: bytes) -> bytes:
        found = event_data(event)
        if found is None or not found[1].lstrip().startswith(b"{"):
            return event + b"\n\n"
        others, data = found
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._unread("not_json")
            return event + b"\n\n"
        payload = self._apply(payload)
        try:
            return others + b"data: " + orjson.dumps(payload) + b"\n\n"
        except orjson.JSONEncodeError:
            self._unread("too_deep")
            return event + b"\n\n"

    def _unread(self, reason: str) -> None:
        if self._on_unread is not None:
            self._on_unread(reason)
            self._on_unread = None

    def _apply(self, payload: Any) -> Any:
        return self._transform(payload)


class ClosedEvents(SSERewriter):
    """Server-sent events through a transform that may hold text back between events:
    ``held()`` gives the choices it still holds (and forgets them), which go out as one more
    event, made like the stream's last one, before ``data: [DONE]`` or at the end of a body
    that has none."""

    __slots__ = ("_held", "_last")

    def __init__(
        self, transform: PayloadTransform, held: Callable[[], list[dict[str, Any]]],
        on_unread: Unread = _ignore,
    ) -> None:
        super().__init__(transform, on_unread)
        self._held = held
        self._last: dict[str, Any] = {}  # the last event with choices: the closing one's model

    def _apply(self, payload: Any) -> Any:
        if isinstance(payload, dict) and payload.get("choices"):
            self._last = payload
        return self._transform(payload)

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        out = super().feed(chunk, more_body)
        return out if more_body else out + self._close()

    def _event(self, event: bytes) -> bytes:
        found = event_data(event)
        if found is not None and found[1] == b"[DONE]":
            return self._close() + event + b"\n\n"
        return super()._event(event)

    def _close(self) -> bytes:
        choices = self._held()
        if not choices:
            return b""
        template = {k: v for k, v in self._last.items() if k not in ("choices", "usage")}
        try:
            return b"data: " + orjson.dumps({**template, "choices": choices}) + b"\n\n"
        except orjson.JSONEncodeError:  # a template too deep to write: the choices alone
            self._unread("too_deep")
            return b"data: " + orjson.dumps({"choices": choices}) + b"\n\n"


def _rewriter(headers: Headers, transform: PayloadTransform, on_unread: Unread) -> BodyRewriter | None:
    content_type = dict(headers).get(b"content-type", b"").lower()  # media types ignore case
    if content_type.startswith(b"application/json"):
        return JsonRewriter(transform, on_unread)
    if content_type.startswith(b"text/event-stream"):
        return SSERewriter(transform, on_unread)
    return None


class ResponseRewriting(Generic[P]):
    def __init__(self, app: ASGIApp, *, on_unread: Unread | None = None) -> None:
        """``on_unread(reason)``: an answer this stage meant to rewrite went on unread."""
        self.app = app
        self.on_unread = on_unread or _ignore

    def plan(self, scope: Scope) -> P | None:
        """What this request's answer needs, or None to pass it through untouched."""
        raise NotImplementedError

    async def transform_for(self, scope: Scope, plan: P, status: int) -> PayloadTransform | None:
        """The payload transform, decided when the answer starts; None: leave it alone."""
        raise NotImplementedError

    def body_rewriter(self, headers: Headers, transform: PayloadTransform) -> BodyRewriter | None:
        """How the body goes through ``transform`` (override for state across a stream);
        None: a content type no rewriter reads."""
        return _rewriter(headers, transform, self.on_unread)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plan = self.plan(scope)
        if plan is None:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        rewriter: BodyRewriter | None = None

        async def rewriting_send(message: Message) -> None:
            nonlocal start, rewriter
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            more = bool(message.get("more_body", False))
            if start is not None:
                held, start = start, None
                transform = await self.transform_for(scope, plan, held["status"])
                headers: Headers = list(held.get("headers", ()))
                rewriter = self.body_rewriter(headers, transform) if transform is not None else None
                if rewriter is None:
                    if transform is not None:
                        self.on_unread("content_type")
                    await send(held)
                    await send(message)
                    return
                body = rewriter.feed(message.get("body", b""), more)
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                if not more:
                    headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": more})
                return
            if rewriter is not None:
                message = {**message, "body": rewriter.feed(message.get("body", b""), more)}
            await send(message)

        await self.app(scope, receive, rewriting_send)
        if start is not None:  # a start with no body at all
            await send(start)
