"""Upstream calls behind a one-method async transport.

:class:`Transport` is the seam: :class:`AiohttpTransport` talks HTTP through the one pooled
``aiohttp`` session of the app; tests may put any object with the same ``send`` there.
Network failures are translated here into :class:`UpstreamError` / :class:`UpstreamTimeout`
so no aiohttp exception ever reaches a client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from modelfence import __version__
from modelfence.errors import UpstreamError, UpstreamTimeout
from modelfence.types import Headers

# Headers that describe one hop, or that we set ourselves; never copied through.
_HOP_HEADERS = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding",
        b"server", b"date",
    }
)


# What every upstream call says of itself. ``identity``: answers are parsed, rewritten and
# relayed as they come, so the session must not ask for compressed ones (aiohttp would ask
# for gzip by default, and the session leaves bodies as they arrive).
FIXED_HEADERS = (
    ("user-agent", f"modelfence/{__version__}"),
    ("accept", "*/*"),
    ("accept-encoding", "identity"),
)


def upstream_session() -> aiohttp.ClientSession:
    """The app's one pooled session: no headers of its own per request (building aiohttp's
    defaults was a tenth of a proxied call's CPU; :data:`FIXED_HEADERS` say it instead),
    bodies passed through undecoded."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One call upstream. ``headers`` are the gateway's own (e.g. ``x-modelfence-mark``):
    no header of the client's request is ever copied here, so none can be forged upstream."""

    method: str
    path: str  # built by the gateway, e.g. "/v1/chat/completions"; never the client's
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class UpstreamResponse(Protocol):
    status: int
    headers: Headers  # lower-case names, hop-by-hop headers removed

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; for streams, without waiting for the end."""
        ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class Transport(Protocol):
    name: str

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Start the call and return once the status and headers are in."""
        ...


class _AiohttpResponse:
    __slots__ = ("_response", "_upstream", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream
        self.status = response.status
        self.headers = [
            (name.lower(), value)
            for name, value in response.raw_headers
            if name.lower() not in _HOP_HEADERS
        ]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"upstream {self._upstream!r} broke off mid-response") from exc

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self._upstream!r} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {self._upstream!r} broke off mid-response") from exc

    def close(self) -> None:
        self._response.release()


class AiohttpTransport:
    """HTTP to one upstream server over a shared connection pool."""

    def __init__(
        self,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 120.0,
        connect_timeout_seconds: float = 5.0,
    ) -> None:
        self.name = name
        self._base_url = base_url.rstrip("/")
        self._session = session
        # Built once; the session adds none of its own (see upstream_session).
        self._fixed = dict(FIXED_HEADERS)
        if api_key:
            self._fixed["authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=connect_timeout_seconds
        )

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        headers = {**dict(request.headers), **self._fixed, "content-type": request.content_type}
        try:
            response = await self._session.request(
                request.method,
                self._base_url + request.path,
                data=request.body or None,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {self.name!r} is unreachable") from exc
        return _AiohttpResponse(response, self.name)
