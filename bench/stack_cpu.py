"""CPU per request of ModelFence's own request path, without sockets or the upstream client.

`bench/overhead.py` measures the gateway as users run it, where uvicorn and aiohttp (which
the floor proxy pays too) take half the CPU and a 2-core VM moves every figure by tens of
percent. This drives the real ASGI app (every stage: keys, fingerprints, limits, request
policy, hardening, watermarks, telemetry) in-process with an upstream transport that answers
from memory, so what it prints is the stack's own CPU per request (all threads of the gateway process:
the event builds and the store writes count; with ``--detection``, the detector child's
CPU does not), steady enough to compare two commits:

    python bench/stack_cpu.py                               # memory limits, telemetry on
    python bench/stack_cpu.py --backend redis://127.0.0.1:6379/0
    python bench/stack_cpu.py --no-telemetry --rounds 5
    python bench/stack_cpu.py --detection                   # events to a detector child
    PYTHONPATH=/path/to/other/checkout/src python bench/stack_cpu.py   # another commit
    python bench/stack_cpu.py --profile                     # cProfile of the measured loop

Pin it to a core (``taskset -c 1``) and compare the minimum over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson

from modelfence.app import create_app
from modelfence.config import Config
from modelfence.gateway.upstream import UpstreamRequest

ANSWER = orjson.dumps({
    "id": "x", "object": "chat.completion", "created": 1, "model": "fake-chat",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello there, friend."}}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}})
UNLIMITED = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000,
             "concurrent_requests": 1_000_000, "usd_per_day": 1e9}


class _Answer:
    status = 200
    headers: ClassVar = [(b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(ANSWER))]

    async def chunks(self) -> AsyncIterator[bytes]:
        yield ANSWER

    async def read(self) -> bytes:
        return ANSWER

    def close(self) -> None:
        """Nothing held."""


class MemoryUpstream:
    """A transport that answers every call at once, from memory."""

    name = "fake"

    async def send(self, request: UpstreamRequest) -> _Answer:
        return _Answer()


async def call(app: Any, key: str, n: int) -> None:
    body = orjson.dumps({"model": "fake-chat", "max_tokens": 16,
                         "messages": [{"role": "user", "content": f"Say hello, request {n}"}]})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"),
                         (b"authorization", b"Bearer " + key.encode()),
                         (b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(body))],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    if status != 200:
        raise SystemExit(f"request {n} answered {status}")


async def measure(args: argparse.Namespace) -> list[float]:
    workdir = tempfile.mkdtemp(prefix="modelfence-stack-")
    config = Config.model_validate({
        "upstreams": [{"name": "fake", "url": "http://127.0.0.1:9", "kind": "openai",
                       "models": ["*"]}],
        "store": f"sqlite:///{workdir}/modelfence.db", "admin_token": "a" * 32,
        "secret": "bench-secret-" + "s" * 32, "secret_file": f"{workdir}/secret",
        "limits": {"backend": args.backend, "tiers": {"default": UNLIMITED}},
        "detection": {"enabled": args.detection, "feed": "process", "embedder": "hashing",
                      "shadow": True},
        "telemetry": {"enabled": not args.no_telemetry},
        "log_level": "warning"})
    app = create_app(config)
    await app.startup()
    assert app.services is not None
    # The proxy stage looks its transport up in this mapping on every call.
    app.services.transports["fake"] = MemoryUpstream()  # type: ignore[assignment]
    _, key = await app.services.store.create(client="bench", tier="default")
    results = []
    try:
        for n in range(300):  # warm caches, the key's first lookup, the limits' state
            await call(app, key, n)
        for _ in range(args.rounds):
            await asyncio.sleep(0.3)
            profile = cProfile.Profile() if args.profile else None
            cpu = time.process_time()
            if profile:
                profile.enable()
            for start in range(0, args.requests, args.concurrency):
                await asyncio.gather(*(call(app, key, start + i) for i in range(args.concurrency)))
            if profile:
                profile.disable()
            await asyncio.sleep(0.3)  # events built and written count too
            results.append((time.process_time() - cpu) / args.requests * 1e6)
            if profile:
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    finally:
        await app.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="memory", help="limits.backend (memory)")
    parser.add_argument("--no-telemetry", action="store_true", help="telemetry.enabled: false")
    parser.add_argument("--detection", action="store_true",
                        help="detection on (shadow, a detector child fed through its queue)")
    parser.add_argument("--requests", type=int, default=5000, help="per round (5000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    parser.add_argument("--profile", action="store_true", help="cProfile each round")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    rounds = asyncio.run(measure(args))
    print(f"limits {args.backend}, telemetry {'off' if args.no_telemetry else 'on'}, "
          f"detection {'on' if args.detection else 'off'}: "
          f"CPU µs per request min {min(rounds):.1f} (rounds: "
          + ", ".join(f"{r:.1f}" for r in rounds) + ")")


if __name__ == "__main__":
    main()
