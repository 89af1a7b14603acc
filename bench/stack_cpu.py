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
    python bench/stack_cpu.py --route batch64 --requests 1000  # 64-row classifier batches
    PYTHONPATH=/path/to/other/checkout/src python bench/stack_cpu.py   # another commit
    python bench/stack_cpu.py --profile                     # cProfile of the measured loop
    python bench/stack_cpu.py --gc --no-freeze              # collector pauses, heap not frozen

Like ``modelfence serve``, it freezes start-up's objects out of the collector's reach
(``modelfence.heap``) before measuring; ``--no-freeze`` leaves them in, ``--gc`` prints
the collector's pauses during the measured rounds.

Pin it to a core (``taskset -c 1``) and compare the minimum over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from modelfence.app import create_app
from modelfence.config import Config
from modelfence.gateway.upstream import UpstreamRequest
from modelfence.heap import PauseWatch, freeze_startup

ANSWER = orjson.dumps({
    "id": "x", "object": "chat.completion", "created": 1, "model": "fake-chat",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello there, friend."}}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}})
# --route batch64: the 64-row classifier batch of bench/overhead.py (Open Inference Protocol),
# answered with 10 probabilities a row.
BATCH_PATH = "/v2/models/fake-digits/infer"
BATCH_ROWS = 64
BATCH_ANSWER = orjson.dumps({
    "model_name": "fake-digits", "outputs": [{"name": "probabilities", "datatype": "FP32",
                                              "shape": [BATCH_ROWS, 10],
                                              "data": [0.1] * 10 * BATCH_ROWS}]})
UNLIMITED = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000,
             "concurrent_requests": 1_000_000, "usd_per_day": 1e9}


class _Answer:
    status = 200

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = [(b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body))]

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    async def read(self) -> bytes:
        return self.body

    def close(self) -> None:
        """Nothing held."""


class MemoryUpstream:
    """A transport that answers every call at once, from memory."""

    name = "fake"

    async def send(self, request: UpstreamRequest) -> _Answer:
        return _Answer(BATCH_ANSWER if request.path.startswith("/v2/") else ANSWER)


# Built once: building 4,096 floats per request would be measured as the stack's CPU.
BATCH_BODIES = [orjson.dumps({"inputs": [{
    "name": "pixels", "datatype": "FP32", "shape": [BATCH_ROWS, 64],
    "data": [((i + n) * 37 % 17) / 16 for i in range(BATCH_ROWS * 64)]}]}) for n in range(17)]


def request_body(route: str, n: int) -> tuple[str, bytes]:
    if route == "batch64":
        return BATCH_PATH, BATCH_BODIES[n % len(BATCH_BODIES)]
    return "/v1/chat/completions", orjson.dumps({
        "model": "fake-chat", "max_tokens": 16,
        "messages": [{"role": "user", "content": f"Say hello, request {n}"}]})


async def call(app: Any, key: str, n: int, route: str) -> None:
    path, body = request_body(route, n)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
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


async def measure(args: argparse.Namespace, pauses: dict[int, list[float]]) -> list[float]:
    workdir = tempfile.mkdtemp(prefix="modelfence-stack-")
    config = Config.model_validate({
        "upstreams": [{"name": "fake", "url": "http://127.0.0.1:9", "kind": "openai",
                       "models": ["*"]},
                      {"name": "fake-oip", "url": "http://127.0.0.1:9", "kind": "oip",
                       "models": ["fake-digits"]}],
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
    for name in ("fake", "fake-oip"):
        app.services.transports[name] = MemoryUpstream()  # type: ignore[assignment]
    _, key = await app.services.store.create(client="bench", tier="default")
    results = []
    try:
        for n in range(300):  # warm caches, the key's first lookup, the limits' state
            await call(app, key, n, args.route)
        if args.no_freeze:
            gc.collect()  # the same starting point as freeze_startup's, without the freeze
        else:
            freeze_startup()  # what `modelfence serve` does once started
        if args.gc:
            PauseWatch(lambda g, s: pauses[g].append(s)).start()
        for _ in range(args.rounds):
            await asyncio.sleep(0.3)
            profile = cProfile.Profile() if args.profile else None
            cpu = time.process_time()
            if profile:
                profile.enable()
            for start in range(0, args.requests, args.concurrency):
                await asyncio.gather(*(call(app, key, start + i, args.route)
                                     for i in range(args.concurrency)))
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
    parser.add_argument("--route", choices=("chat", "batch64"), default="chat",
                        help="chat completions (default) or a 64-row classifier batch")
    parser.add_argument("--requests", type=int, default=5000, help="per round (5000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    parser.add_argument("--profile", action="store_true", help="cProfile each round")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave start-up's objects to the collector (serve freezes them)")
    parser.add_argument("--gc", action="store_true", help="print the collector's pauses")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    rounds = asyncio.run(measure(args, pauses))
    print(f"{args.route}, limits {args.backend}, telemetry {'off' if args.no_telemetry else 'on'}, "
          f"detection {'on' if args.detection else 'off'}, "
          f"heap {'not frozen' if args.no_freeze else 'frozen'}: "
          f"CPU µs per request min {min(rounds):.1f} (rounds: "
          + ", ".join(f"{r:.1f}" for r in rounds) + ")")
    if args.gc:
        served = args.requests * args.rounds
        for generation, seen in pauses.items():
            print(f"  generation {generation} collections: {len(seen)}, "
                  f"{sum(seen) * 1e6 / served:.1f} µs per request, "
                  f"longest {max(seen, default=0) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
