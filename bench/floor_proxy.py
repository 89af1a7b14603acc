"""The Python floor: the least a reverse proxy in ModelFence's stack can do.

Raw ASGI (no framework), served by uvicorn with uvloop + httptools, forwarding every
request to one upstream through one pooled aiohttp ``ClientSession``. No auth, no limits,
no parsing of bodies, no telemetry. Responses with a Content-Length are sent in one piece;
anything else (SSE streams) is relayed chunk by chunk as it arrives.

Whatever ModelFence adds on top of this is the price of its features; what this costs
over a direct call is the price of being a Python proxy at all.

    python bench/floor_proxy.py --upstream http://127.0.0.1:9100 --port 9200
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

# Not forwarded in either direction (RFC 9110 §7.6.1) plus the ones the client stack sets.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                    auto_decompress=False,
                    timeout=aiohttp.ClientTimeout(total=120, sock_connect=5),
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in scope["headers"] if k not in _HOP]
        url = self.upstream + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        assert self.session is not None
        try:
            async with self.session.request(scope["method"], url, data=body,
                                            headers=headers) as upstream:
                out = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _HOP]
                if upstream.content_length is not None:
                    data = await upstream.read()
                    out.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": upstream.status,
                                "headers": out})
                    await send({"type": "http.response.body", "body": data})
                    return
                await send({"type": "http.response.start", "status": upstream.status,
                            "headers": out})
                async for piece in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except aiohttp.ClientError as exc:
            payload = b'{"error":{"message":"upstream unreachable: %s","type":"upstream_error"}}' % (
                type(exc).__name__.encode())
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args()
    uvicorn.run(FloorProxy(args.upstream), host=args.host, port=args.port, loop="uvloop",
                http="httptools", lifespan="on", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
