"""A small, cheap HTTP/1.1 load generator for bench/overhead.py.

Runs in its own process (bench/overhead.py pins it to a core of its own). It speaks raw
HTTP/1.1 over asyncio protocols on uvloop, parses responses with httptools (C), and sends
pre-built request bytes, so it costs a few tens of µs of CPU per request — far below what
the proxies under test cost, and comfortably fast enough for open-loop runs at 200 req/s.

Two modes:

- ``open``: requests start on a fixed schedule (``--rate`` per second) whatever the
  answers do (no coordinated omission); each request's latency is measured from the moment
  its bytes are written to the moment its response is complete, and the time to the first
  body byte is kept too (time to first chunk for ``stream: true``). Raw latencies come back.
- ``closed``: ``--concurrency`` keep-alive connections, each sending its next request as
  soon as the previous answer is complete: the throughput ceiling of the target.

Protocol with the parent: ``PHASE measure`` and ``PHASE done`` lines on stdout mark the
measured window (the parent samples CPU times there); the JSON result goes to ``--out``
and a ``RESULT`` line says it is there.

    python bench/loadgen.py --url http://127.0.0.1:9100/v1/chat/completions --mode open \\
        --rate 200 --duration 5 --out /tmp/result.json \\
        --body '{"model":"fake-chat","messages":[{"role":"user","content":"hi @N@"}]}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from array import array
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the project
    uvloop = None  # type: ignore[assignment]

now_ns = time.perf_counter_ns


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, int, int]] | None = None
        self.first_body_ns = 0
        self.usable = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by peer"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        if not self.first_body_ns and body:
            self.first_body_ns = now_ns()

    def on_message_complete(self) -> None:
        end = now_ns()
        if not self.parser.should_keep_alive():
            self.usable = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), end, self.first_body_ns or end))

    def _fail(self, exc: Exception) -> None:
        self.usable = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def send(self, payload: bytes) -> asyncio.Future[tuple[int, int, int]]:
        assert self.transport is not None
        if self.transport.is_closing():
            self.usable = False
            raise ConnectionResetError("connection already closed")
        self.first_body_ns = 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


class RequestMaker:
    """Pre-built request bytes; the user message carries a counter so no two are equal.

    Headers may carry placeholders too, for a flood of distinct callers: ``@N@`` becomes 43
    digits, this process's id and the counter (after ``mf_``, a well-formed made-up API
    key, new in every run), and ``@IP@`` an IPv4 address in 10.0.0.0/8 from the counter
    (an ``X-Forwarded-For`` from a different address each time)."""

    def __init__(self, url: str, body: dict[str, Any], headers: list[str]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", "User-Agent: modelfence-bench/1"]
        head += headers
        self.head = ("\r\n".join(head) + "\r\nContent-Length: ").encode()
        self.varying_head = b"@N@" in self.head or b"@IP@" in self.head
        self.pid = os.getpid() % 100_000_000
        raw = json.dumps(body, separators=(",", ":"))
        if "@N@" not in raw:
            raise SystemExit("body must contain the placeholder @N@")
        self.before, self.after = (p.encode() for p in raw.split("@N@", 1))

    def make(self, n: int) -> bytes:
        body = self.before + str(n).encode() + self.after
        head = self.head
        if self.varying_head:
            address = b"10.%d.%d.%d" % ((n >> 16) & 255, (n >> 8) & 255, n & 255)
            key = b"%08d%035d" % (self.pid, n)
            head = head.replace(b"@N@", key).replace(b"@IP@", address)
        return head + str(len(body)).encode() + b"\r\n\r\n" + body


async def connect(maker: RequestMaker) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, maker.host, maker.port)
    return conn


def phase(name: str) -> None:
    sys.stdout.write(f"PHASE {name}\n")
    sys.stdout.flush()


def conn_answered(exc: Exception) -> bool:
    """Whether a failure may have come after the server started answering."""
    return not isinstance(exc, (ConnectionError, RuntimeError, OSError))


async def open_loop(maker: RequestMaker, rate: float, duration: float, warmup: float,
                    preconnect: int, max_conns: int, grace: float) -> dict[str, Any]:
    idle: deque[Connection] = deque()
    for _ in range(preconnect):
        idle.append(await connect(maker))
    opened = preconnect
    latencies = array("q")
    ttfb = array("q")
    lags = array("q")
    statuses: dict[int, int] = {}
    errors: list[str] = []
    pending: set[asyncio.Task[None]] = set()

    async def get_connection() -> Connection | None:
        nonlocal opened
        while idle:
            conn = idle.pop()
            if conn.usable:  # the server may have closed an idle keep-alive connection
                return conn
        if opened >= max_conns:
            return None
        opened += 1
        return await connect(maker)

    async def one(n: int, scheduled: int, record: bool) -> None:
        payload = maker.make(n)
        for attempt in (1, 2):
            try:
                conn = await get_connection()
                if conn is None:
                    errors.append("connection pool exhausted")
                    return
                start = now_ns()
                status, end, first = await conn.send(payload)
                break
            except Exception as exc:  # noqa: BLE001 - counted, reported
                # a keep-alive connection closed by the server just as we wrote on it:
                # nothing was answered, so try once more on a fresh connection
                if attempt == 1 and not conn_answered(exc):
                    continue
                errors.append(f"{type(exc).__name__}: {exc}")
                return
        else:
            return
        if conn is not None and conn.usable:
            idle.append(conn)
        if record:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(end - start)
                ttfb.append(first - start)
                lags.append(start - scheduled)

    loop = asyncio.get_running_loop()
    warm_n = int(rate * warmup)
    total = warm_n + int(rate * duration)
    interval_ns = int(1e9 / rate)
    t0 = now_ns() + 20_000_000
    measure_started = False
    for i in range(total):
        if i == warm_n:
            # let the warm-up requests finish so the measured window holds only measured ones
            if pending:
                await asyncio.wait(pending, timeout=grace)
            t0 = now_ns() + 5_000_000 - i * interval_ns
            phase("measure")
            measure_started = True
        scheduled = t0 + i * interval_ns
        delay = (scheduled - now_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, scheduled, measure_started))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if not measure_started:
        phase("measure")
    timed_out = 0
    if pending:
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:  # a target that cannot keep up: stop waiting, count them
            task.cancel()
        timed_out = len(late)
    phase("done")
    for conn in idle:
        conn.close()
    return {
        "mode": "open",
        "rate": rate,
        "duration_s": duration,
        "sent": total - warm_n,
        "ok": len(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": len(errors) + timed_out,
        "timed_out": timed_out,
        "error_examples": errors[:5],
        "connections_opened": opened,
        "latency_us": [v // 1000 for v in latencies],
        "ttfb_us": [v // 1000 for v in ttfb],
        "send_lag_us": [v // 1000 for v in lags],
    }


async def closed_loop(maker: RequestMaker, concurrency: int, duration: float,
                      warmup: float, grace: float) -> dict[str, Any]:
    conns = [await connect(maker) for _ in range(concurrency)]
    latencies = array("q")
    statuses: dict[int, int] = {}
    errors: list[str] = []
    counter = 0
    window = {"start": 0, "end": 0}
    stop_at = now_ns() + int((warmup + duration) * 1e9)

    async def worker(conn: Connection) -> None:
        nonlocal counter
        while True:
            now = now_ns()
            if now >= stop_at:
                return
            counter += 1
            try:
                start = now_ns()
                status, end, _ = await conn.send(maker.make(counter))
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.usable = False
            if not conn.usable:
                try:
                    conn = await connect(maker)
                except OSError as exc:
                    errors.append(f"connect: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.1)
                    continue
            if window["start"] and window["start"] <= end <= stop_at:
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(end - start)

    async def mark() -> None:
        await asyncio.sleep(warmup)
        window["start"] = now_ns()
        phase("measure")

    marker = asyncio.ensure_future(mark())
    workers = [asyncio.ensure_future(worker(c)) for c in conns]
    _, late = await asyncio.wait(workers, timeout=warmup + duration + grace)
    for task in late:  # requests still unanswered long after the end: abandon them
        task.cancel()
    await marker
    window["end"] = now_ns()
    phase("done")
    for conn in conns:
        conn.close()
    elapsed = (min(window["end"], stop_at) - window["start"]) / 1e9
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else float("nan")

    ok = statuses.get(200, 0)
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "duration_s": elapsed,
        "completed": len(latencies),
        "ok": ok,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": len(errors),
        "abandoned": len(late),
        "error_examples": errors[:5],
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["open", "closed"], default="open")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop: requests/s")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=48, help="closed loop: connections")
    parser.add_argument("--preconnect", type=int, default=8, help="open loop: warm connections")
    parser.add_argument("--max-conns", type=int, default=512, help="open loop: connection cap")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to wait for answers after the last request is sent")
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", help="JSON body with an @N@ placeholder")
    body.add_argument("--body-file", help="the same, from a file (bodies past a command "
                      "line's 128 KB argument limit)")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--out", required=True, help="where the JSON result is written")
    args = parser.parse_args()

    if args.body_file:
        with open(args.body_file, encoding="utf-8") as handle:
            args.body = handle.read()
    maker = RequestMaker(args.url, json.loads(args.body), args.header)
    if args.mode == "open":
        coro = open_loop(maker, args.rate, args.duration, args.warmup, args.preconnect,
                         args.max_conns, args.grace)
    else:
        coro = closed_loop(maker, args.concurrency, args.duration, args.warmup, args.grace)
    if uvloop is not None:
        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    # through a file: a large line on a pipe the parent reads late can be cut short
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    sys.stdout.write("RESULT\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
