"""The HTTP server under the gateway: uvicorn, with deadlines for slow clients.

uvicorn closes idle keep-alive connections, but nothing bounds how long a client may take
to send a request head or body: a few hundred sockets dribbling one header byte every few
seconds ("slowloris") hold connections, and with them ``limit_concurrency``, forever.
:class:`DeadlineHttpProtocol` closes such connections, and a head far larger than
``server.max_header_bytes`` is refused while it arrives, before it is held in memory.

Client addresses come only from the socket: uvicorn's ``proxy_headers`` would believe
``X-Forwarded-For`` from loopback, so it is off, and the gateway's fingerprinting applies
``server.trusted_proxies`` instead.

    gateway = create_app(config)
    run_gateway(gateway, config.server, on_close=gateway.metrics.connection_closed,
                host=config.server.host, port=config.server.port, log_level="info")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from modelfence.config import ServerConfig
from modelfence.heap import PauseWatch, freeze_startup
from modelfence.throttled_log import ThrottledLog
from modelfence.types import ASGIApp

log = logging.getLogger(__name__)

Phase = Literal["head", "body", "head_size"]

_REFUSALS: dict[Phase, bytes] = {
    "head": b"HTTP/1.1 408 Request Timeout\r\n",
    "head_size": b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}
_DESCRIPTIONS: dict[Phase, str] = {
    "head": "head not complete in time",
    "body": "body not complete in time",
    "head_size": "head over twice server.max_header_bytes",
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection deadlines (seconds) and the largest request head (bytes)."""

    head_seconds: float
    body_seconds: float
    max_head_bytes: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        # Twice the limit: the gateway answers ordinary oversized heads with a JSON 431 once
        # they are complete; this only stops heads that would never end.
        return cls(
            server.header_timeout_seconds, server.body_timeout_seconds, 2 * server.max_header_bytes
        )


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request head and body.

    The head deadline runs from the connection (or the first byte of the next request on
    a kept-alive connection) to the end of the head; the body deadline from there to the
    end of the body, paused while the gateway itself has stopped reading (flow control).
    ``on_close(phase, client)`` is called for each connection closed here.
    """

    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits,
        on_close: Callable[[Phase, str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._on_close = on_close
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # between the first byte of a request and the end of its head
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self._limits.head_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        oversized = self._head_bytes > self._limits.max_head_bytes
        if oversized and self._in_head and not self.transport.is_closing():
            self._close("head_size")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._deadline is None:
            self._arm("head", self._limits.head_seconds)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False  # a complete head, however large, gets the gateway's JSON 431
        self._arm("body", self._limits.body_seconds)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, phase: Phase, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "body" and self.flow.read_paused:
            # The gateway, not the client, is holding the body back: wait for it.
            self._arm("body", self._limits.body_seconds)
            return
        self._close(phase)

    def _close(self, phase: Phase) -> None:
        self._disarm()
        refusal = _REFUSALS.get(phase)
        if refusal is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(refusal + b"content-length: 0\r\nconnection: close\r\n\r\n")
        self._on_close(phase, f"{self.client[0]}:{self.client[1]}" if self.client else "unknown")
        self.transport.close()


def run_gateway(
    app: ASGIApp,
    server: ServerConfig,
    *,
    on_close: Callable[[Phase], None],
    host: str,
    port: int,
    log_level: str,
    on_gc_pause: Callable[[int, float], None] | None = None,
) -> None:
    """Serve ``app`` until interrupted; ``on_close(phase)`` counts slow connections closed.

    Once the app's start-up is done, what it built is frozen out of the garbage collector's
    reach (:func:`~modelfence.heap.freeze_startup`) and each collection's pause goes to
    ``on_gc_pause(generation, seconds)``.
    """
    import numpy  # noqa: F401 - its BLAS must be loaded for the limit below to reach it
    from threadpoolctl import threadpool_limits

    # The gateway's numpy work (label, region and embedding marks) is small matrices on the
    # event loop: one BLAS thread. A multi-threaded BLAS on a machine busy with other
    # processes spins waiting for its threads, at many times the one-thread cost.
    threadpool_limits(1, user_api="blas")
    slow_log = ThrottledLog(log, interval=60.0)

    def closed(phase: Phase, client: str) -> None:
        on_close(phase)
        slow_log.warning("closed a connection from %s: request %s", client, _DESCRIPTIONS[phase])

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http=functools.partial(  # type: ignore[arg-type]
            DeadlineHttpProtocol, limits=ConnectionLimits.from_config(server), on_close=closed
        ),
        ws="none",  # no WebSocket routes: an upgrade request is served as plain HTTP
        lifespan="on",
        access_log=False,
        log_level=log_level,
        proxy_headers=False,  # only server.trusted_proxies decides (identity/fingerprint.py)
        limit_concurrency=server.limit_concurrency,
        backlog=server.backlog,
        timeout_graceful_shutdown=10,
    )
    gateway = _SettledServer(config, on_gc_pause=on_gc_pause)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        gateway.run()
    if not gateway.started:
        sys.exit(STARTUP_FAILURE)


class _SettledServer(uvicorn.Server):
    """uvicorn's server, with the heap frozen once the app has started (see run_gateway)."""

    def __init__(
        self, config: uvicorn.Config, *, on_gc_pause: Callable[[int, float], None] | None
    ) -> None:
        super().__init__(config)
        self._on_gc_pause = on_gc_pause

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)  # a failed start-up exits in there
        if self.should_exit:  # stopped by a signal while starting
            return
        # Its full collection (~0.1 s) holds the first connections once; no collection
        # walks these objects again.
        frozen = freeze_startup()
        log.debug("froze %d objects of start-up out of the collector's reach", frozen)
        if self._on_gc_pause is not None:
            PauseWatch(self._on_gc_pause).start()
