"""How fast can request events be written into PostgreSQL? The telemetry write path, measured.

Creates a scratch database (``--database``, dropped again at the end) on a real PostgreSQL
(``--dsn``, default ``postgresql://postgres@127.0.0.1:5432``), creates the tables with
ModelFence's own ``create_tables``, and writes realistic request events into
``request_events`` from one writer, as one telemetry lane does, for ``--seconds`` per case:

- ``SqlSink``: the gateway's and detector's real sink (``modelfence.telemetry.sinks.SqlSink``:
  records in the driver's types, ``detail`` through orjson, one driver-level ``executemany``
  of the batch on asyncpg, one transaction per batch), at batch sizes ``--batches`` (default
  1, 100, 500, 2000; the configured ``telemetry.batch_size`` is 500);
- ``COPY``: the same rows (built by ``event_row``, ``detail`` through orjson) sent with
  asyncpg's ``copy_records_to_table``, one transaction per batch;
- both again with the two secondary indexes (``ts`` and ``(client, ts)``) dropped, to show
  what they cost on the write path.

Per case it reports events/s sustained, p50/p99 time per batch write (building the rows
included), CPU per event of this process and of the PostgreSQL backends, and the size of
``request_events`` (``pg_total_relation_size``: heap, TOAST and indexes) per event and per
million events. The table is truncated between cases. A markdown table goes to stdout
with the machine, date and command::

    python bench/event_writes.py                       # ~2 minutes
    python bench/event_writes.py --seconds 3           # a quick check
    python bench/event_writes.py --output bench/results/event_writes.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
from overhead import machine  # bench/overhead.py: the shared machine description

from modelfence.store.database import create_tables, open_engine
from modelfence.store.schema import request_events
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.sinks import SqlSink, event_row

POOL = 20_000  # distinct events, cycled
CLIENTS = 2_000
SECONDARY_INDEXES = ("ix_request_events_ts", "ix_request_events_client_ts")
COLUMNS = [c.name for c in request_events.columns if c.name != "id"]
WORDS = ("explain", "the", "difference", "between", "a", "list", "and", "tuple", "in",
         "python", "summarise", "this", "article", "about", "climate", "translate", "into",
         "french", "write", "haiku", "on", "autumn", "classify", "review", "sentiment")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine_line() -> str:
    """bench/overhead.py's machine description, on one line with the load at start."""
    m = machine()
    load = " / ".join(f"{x:.2f}" for x in m["load_avg"])
    return (f"{m['cpu']}, {m['cores']} cores, Python {m['python']} (Linux {m['kernel']}); "
            f"load average at start {load}")


def make_events(n: int, seed: int = 7) -> list[RequestEvent]:
    """Events shaped like the gateway's: chat (most), embeddings and OIP, a few refusals."""
    rnd = random.Random(seed)
    now = time.time()
    events = []
    for i in range(n):
        client = f"client-{rnd.randrange(CLIENTS):05d}"
        kind = rnd.random()
        prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 60)))
        common: dict[str, Any] = {
            "ts": now - (n - i) * 0.001,
            "request_id": f"{rnd.getrandbits(128):032x}",
            "client": client,
            "key_id": f"k{hash(client) & 0xFFFFFFFF:08x}{rnd.randrange(3)}",
            "tier": rnd.choice(("default", "default", "pro", "free")),
            "account": f"acct-{hash(client) % 500:04d}",
            "trust": rnd.choice(("new", "established", "verified")),
            "ip_prefix": f"203.0.{rnd.randrange(256)}.0/24",
            "fingerprint": f"{rnd.getrandbits(128):032x}",
            "client_library": rnd.choice(("openai-python/1.54.0", "httpx/0.27", "curl/8.5")),
            "user_agent": "OpenAI/Python 1.54.0",
            "prompt_hash": f"{rnd.getrandbits(256):064x}",
            "prompt_len": len(prompt),
            "latency_ms": rnd.lognormvariate(5.5, 0.8),
            "status": 200 if rnd.random() > 0.03 else rnd.choice((400, 429, 502)),
            "limit_decision": "allowed" if rnd.random() > 0.02 else "denied:requests_per_minute",
            "risk_level": "normal" if rnd.random() > 0.01 else "alert",
            "prompt_text": prompt,  # never stored: store_prompt_text is off by default
        }
        if kind < 0.75:
            events.append(RequestEvent(
                route="/v1/chat/completions", model="llama-3.1-8b-instruct",
                temperature=rnd.choice((None, 0.0, 0.7, 1.0)), top_p=rnd.choice((None, 0.9)),
                max_tokens=rnd.choice((None, 256, 1024)), stream=rnd.random() < 0.4,
                frame_hash=f"{rnd.getrandbits(256):064x}", turns=rnd.randint(1, 9),
                cot=rnd.random() < 0.05, input_count=1, tokens_in=len(prompt) // 4 + 20,
                tokens_out=rnd.randint(5, 900), **common))
        elif kind < 0.9:
            texts = [prompt[:40] + str(j) for j in range(rnd.randint(1, 8))]
            events.append(RequestEvent(
                route="/v1/embeddings", model="text-embedding-3-small", input_texts=texts,
                input_count=len(texts), tokens_in=sum(len(t) for t in texts) // 4,
                **common))
        else:
            rows = [[rnd.random() for _ in range(64)] for _ in range(rnd.randint(1, 8))]
            events.append(RequestEvent(
                route="/v2/models/{model}/infer", model="digits", input_rows=rows,
                input_count=len(rows), output_label=rnd.randrange(10),
                output_margins=[rnd.random() for _ in rows], **common))
    return events


class Backends:
    """CPU time of the PostgreSQL backends serving the scratch database."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database
        self.seen: dict[int, float] = {}

    async def total(self) -> float | None:
        pids = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database)
        total = 0.0
        for row in pids:
            try:
                t = psutil.Process(row["pid"]).cpu_times()
            except (psutil.Error, OSError):
                return None
            self.seen[row["pid"]] = t.user + t.system
        for cpu in self.seen.values():
            total += cpu
        return total


def copy_record(row: dict[str, Any]) -> tuple[Any, ...]:
    row = dict(row)
    row["detail"] = orjson.dumps(row["detail"]).decode()
    return tuple(row[c] for c in COLUMNS)


async def run_case(kind: str, batch: int, seconds: float, events: list[RequestEvent],
                   engine: Any, copy_conn: asyncpg.Connection, backends: Backends,
                   admin: asyncpg.Connection) -> dict[str, Any]:
    sink = SqlSink(engine, retention_days=None)

    async def write(chunk: list[RequestEvent]) -> None:
        if kind == "sqlsink":
            await sink.write(chunk)
        else:
            records = [copy_record(event_row(e, store_prompt_text=False)) for e in chunk]
            async with copy_conn.transaction():
                await copy_conn.copy_records_to_table(
                    "request_events", records=records, columns=COLUMNS)

    # warm up: connections, prepared statements, the pool
    await write(events[:batch])
    await admin.execute("TRUNCATE request_events")
    server0 = await backends.total()
    cpu0 = time.process_time()
    start = time.perf_counter()
    times: list[float] = []
    written = 0
    pos = 0
    while time.perf_counter() - start < seconds:
        chunk = events[pos:pos + batch]
        if len(chunk) < batch:
            pos = 0
            chunk = events[:batch]
        pos += batch
        t0 = time.perf_counter()
        await write(chunk)
        times.append(time.perf_counter() - t0)
        written += len(chunk)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    server1 = await backends.total()
    await admin.execute("CHECKPOINT")
    size = await admin.fetchrow(
        "SELECT pg_total_relation_size('request_events') AS total, "
        "pg_relation_size('request_events') AS heap, "
        "pg_indexes_size('request_events') AS indexes, "
        "(SELECT count(*) FROM request_events) AS n")
    assert size["n"] == written, (size["n"], written)
    server = (server1 - server0) if server0 is not None and server1 is not None else None
    return {
        "kind": kind, "batch": batch, "events": written, "seconds": elapsed,
        "events_per_s": written / elapsed, "batches": len(times),
        "p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3,
        "client_cpu_us_per_event": cpu / written * 1e6,
        "server_cpu_us_per_event": server / written * 1e6 if server is not None else None,
        "bytes_per_event": size["total"] / written,
        "heap_bytes_per_event": size["heap"] / written,
        "index_bytes_per_event": size["indexes"] / written,
    }


async def main(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    header = machine_line()
    dsn = args.dsn.rstrip("/")
    admin0 = await asyncpg.connect(f"{dsn}/postgres")
    version = await admin0.fetchval("SHOW server_version")
    settings = {name: await admin0.fetchval(f"SHOW {name}") for name in
                ("synchronous_commit", "shared_buffers", "fsync", "wal_level")}
    await admin0.execute(f'DROP DATABASE IF EXISTS "{args.database}"')
    await admin0.execute(f'CREATE DATABASE "{args.database}"')
    engine = open_engine(f"{dsn}/{args.database}")
    results: list[dict[str, Any]] = []
    try:
        await create_tables(engine)
        admin = await asyncpg.connect(f"{dsn}/{args.database}")
        copy_conn = await asyncpg.connect(f"{dsn}/{args.database}")
        backends = Backends(admin, args.database)
        print(f"building {POOL:,} events...", file=sys.stderr)
        events = make_events(POOL)
        plan = [("sqlsink", b, True) for b in args.batches]
        plan += [("copy", b, True) for b in args.copy_batches]
        plan += [("sqlsink", 500, False), ("copy", max(args.copy_batches), False)]
        dropped = False
        for kind, batch, indexed in plan:
            if not indexed and not dropped:
                for name in SECONDARY_INDEXES:
                    await admin.execute(f"DROP INDEX {name}")
                dropped = True
            r = await run_case(kind, batch, args.seconds, events, engine, copy_conn,
                               backends, admin)
            r["indexes"] = indexed
            results.append(r)
            print(f"{kind:8} batch {batch:5} indexes {indexed!s:5}: "
                  f"{r['events_per_s']:9,.0f} events/s, p50 {r['p50_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms, {r['bytes_per_event']:.0f} B/event",
                  file=sys.stderr)
        await admin.close()
        await copy_conn.close()
    finally:
        await engine.dispose()
        await admin0.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        await admin0.close()

    command = "python bench/event_writes.py" + (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    print(f"Run {started:%Y-%m-%d %H:%M} UTC on {header}; PostgreSQL {version} on "
          f"{dsn.split('@')[-1]} (" + ", ".join(f"{k} {v}" for k, v in settings.items())
          + ").\n")
    print(f"Command: `{command}`\n")
    print(f"One writer, {args.seconds:g} s per case, {POOL:,} distinct events cycled "
          "(75% chat, 15% embeddings, 10% OIP; prompt text not stored); rows built in "
          "the writing process in every case; table truncated between cases.\n")
    print("| writer | batch | secondary indexes | events/s | p50 ms per batch | "
          "p99 ms per batch | client CPU µs/event | PostgreSQL CPU µs/event | "
          "bytes/event (heap + indexes) | MB per million events |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        server = r["server_cpu_us_per_event"]
        print(f"| {'SqlSink (insert)' if r['kind'] == 'sqlsink' else 'COPY'} | {r['batch']:,} | "
              f"{'ts, (client, ts)' if r['indexes'] else 'none'} | {r['events_per_s']:,.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['client_cpu_us_per_event']:.1f} | "
              f"{'—' if server is None else f'{server:.1f}'} | {r['bytes_per_event']:.0f} "
              f"({r['heap_bytes_per_event']:.0f} + {r['index_bytes_per_event']:.0f}) | "
              f"{r['bytes_per_event']:,.0f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(
            {"started": started.isoformat(), "machine": header, "postgres": version,
             "settings": settings, "command": command, "results": results}, indent=1))
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432",
                        help="server to use, without a database name")
    parser.add_argument("--database", default="modelfence_bench_events",
                        help="scratch database: created, then dropped")
    parser.add_argument("--seconds", type=float, default=12.0, help="per case")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 100, 500, 2000], help="SqlSink batch sizes")
    parser.add_argument("--copy-batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[500, 2000], help="COPY batch sizes")
    parser.add_argument("--output", help="write the results as JSON here")
    return asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(cli())
