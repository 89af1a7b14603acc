"""Does ModelFence stay flat under hours of steady mixed load? A soak run, loopback only.

Starts the fake upstream and one ``modelfence serve`` with detection on (``feed: process``,
a child of the gateway) and an SQLite store, then sends a steady open-loop mix for
``--minutes``:

- ``chat``         non-streaming chat completions;
- ``stream``       streamed chat completions (a few chunks, a little delay between them);
- ``embed``        embeddings of a small batch of texts;
- ``oip``          Open Inference Protocol v2 classifier requests (8 rows of 64 features);
- ``limited``      chat from keys of a tier with a low requests-per-minute limit, at
                   ``LIMITED_OVERSEND`` times that rate (on top of ``--rate``): most get 429;
- ``unknown``      a fresh well-formed key the gateway never issued, every time: 401, no event.

Every minute it prints the RSS of the gateway and of its detector child, p50/p99 latency of
the answered requests, and the requests by status. At the end:

- RSS at the start (after the first minute) and at the end, per process;
- p99 per minute, and whether it stayed within ``--p99-drift`` times the first minute's;
- over-admission: for each limited key, the requests answered 200 beyond what its limit
  allows over the run (a full bucket plus the refill: ``rpm + rpm * minutes``);
- event accounting: requests from issued keys (each must give one event) against rows in
  ``request_events`` plus the events ``/metrics`` counts as dropped; ``uncounted`` must be 0.

A summary table goes to stdout and everything to ``--output`` as JSON::

    python bench/soak.py --minutes 30 --output bench/results/soak.json
    python bench/soak.py --minutes 3 --rate 30          # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import aiohttp
import psutil
import yaml
from overhead import (  # bench/overhead.py: the shared process and HTTP helpers
    ADMIN_TOKEN,
    Proc,
    machine,
    metrics,
    modelfence_command,
    pct,
    say,
    start_upstream,
    wait_ready,
)

from modelfence.config import EmbedderKind
from modelfence.identity.keys import new_api_key
from modelfence.testing.processes import free_port

LIMITED_RPM = 30
LIMITED_KEYS = 3
LIMITED_OVERSEND = 3  # limited keys send this many times their limit, on top of --rate
MAX_IN_FLIGHT = 2_000  # requests in flight at once; beyond it a send is skipped and counted
CHUNK_DELAY = 0.01

# share of --rate per traffic class
MIX = {"chat": 0.35, "stream": 0.25, "embed": 0.15, "oip": 0.15, "unknown": 0.10}

MESSAGES = [{"role": "user", "content": "Tell me about item {n}."}]


def request_for(kind: str, n: int) -> tuple[str, dict[str, Any]]:
    """(path, body) of request number ``n`` of a traffic class; bodies vary with ``n``."""
    text = f"Tell me about item {n % 5000}, please."
    chat = {"model": "fake-chat", "max_tokens": 16,
            "messages": [{"role": "user", "content": text}]}
    if kind == "stream":
        return "/v1/chat/completions", {**chat, "stream": True, "fake_chunks": 5,
                                        "fake_chunk_delay": CHUNK_DELAY,
                                        "stream_options": {"include_usage": True}}
    if kind == "embed":
        return "/v1/embeddings", {"model": "fake-embed",
                                  "input": [f"{text} part {i}" for i in range(4)]}
    if kind == "oip":
        rows = 8
        data = [((n * 31 + i) % 17) / 16 for i in range(rows * 64)]
        return "/v2/models/digits-fake/infer", {"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": data}]}
    return "/v1/chat/completions", chat


def gateway_config(upstream: str, port: int, workdir: Path, embedder: str,
                   shadow: bool) -> dict[str, Any]:
    big = {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000,
           "concurrent_requests": 10_000, "usd_per_day": 1_000_000}
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [
            {"name": "fake", "url": upstream, "kind": "openai",
             "models": ["fake-chat", "fake-embed"]},
            {"name": "fake-oip", "url": upstream, "kind": "oip", "models": ["digits-fake"]},
        ],
        "store": f"sqlite:///{workdir / 'soak.db'}",
        "admin_token": ADMIN_TOKEN,
        "secret": "soak-secret-" + secrets.token_hex(16),
        "limits": {"backend": "memory", "tiers": {
            "default": big,
            "limited": {**big, "requests_per_minute": LIMITED_RPM},
        }},
        "detection": {"enabled": True, "feed": "process", "embedder": embedder,
                      "shadow": shadow},
        "log_level": "warning",
    }


@dataclass
class Minute:
    """What one minute of the run saw."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)


@dataclass
class Tally:
    minutes: list[Minute] = field(default_factory=list)
    by_class: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    class_latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    admitted_by_key: Counter[str] = field(default_factory=Counter)
    from_issued_keys: int = 0  # answered requests that carried a key the gateway issued
    client_errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0


async def one(session: aiohttp.ClientSession, base: str, kind: str, n: int, key: str,
              tally: Tally) -> None:
    path, body = request_for(kind, n)
    started = time.perf_counter()
    try:
        async with session.post(base + path, json=body,
                                headers={"authorization": f"Bearer {key}"}) as response:
            await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.client_errors[type(exc).__name__] += 1
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    minute = tally.minutes[-1]
    minute.statuses[str(status)] += 1
    tally.by_class[kind][str(status)] += 1
    if status == 200:
        minute.latencies_ms.append(elapsed_ms)
        tally.class_latency[kind].append(elapsed_ms)
        tally.admitted_by_key[key] += 1
    if kind != "unknown":
        tally.from_issued_keys += 1


async def drive(base: str, keys: dict[str, list[str]], rate: float, seconds: float,
                tally: Tally, report: Any) -> None:
    """Open loop: each class on a fixed schedule, whatever the answers do."""
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=512)
    in_flight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def schedule(kind: str, class_rate: float) -> None:
            interval = 1.0 / class_rate
            start = time.monotonic()
            for n in range(int(class_rate * seconds)):
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    tally.skipped += 1
                    continue
                # unknown: a fresh well-formed key every time, as a key-guessing flood sends
                key = keys[kind][n % len(keys[kind])] if keys[kind] else new_api_key()
                task = asyncio.create_task(one(session, base, kind, n, key, tally))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)

        async def minutes() -> None:
            for _ in range(math.ceil(seconds / 60)):
                await asyncio.sleep(min(60.0, seconds))
                report(tally)
                tally.minutes.append(Minute())

        tally.minutes.append(Minute())
        ticker = asyncio.create_task(minutes())
        rates = {kind: rate * share for kind, share in MIX.items()}
        rates["limited"] = len(keys["limited"]) * LIMITED_RPM / 60 * LIMITED_OVERSEND
        await asyncio.gather(*(schedule(kind, class_rate) for kind, class_rate in rates.items()))
        if in_flight:
            await asyncio.wait(in_flight, timeout=35)
        await ticker


def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return float("nan")


def detector_pid(gateway_pid: int) -> int | None:
    try:
        children = psutil.Process(gateway_pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                return int(child.pid)
        except psutil.Error:
            continue
    return None


def telemetry_fates(samples: dict[str, float]) -> dict[str, float]:
    """The gateway's event fates, and the detector's (which writes ``request_events``) as
    ``store_<fate>``: drops in either count."""
    fates: dict[str, float] = {}
    for prefix, label in (('modelfence_telemetry_events_total{fate="', ""),
                          ('modelfence_detector_stored_events_total{fate="', "store_")):
        fates.update((label + name[len(prefix):-2], value) for name, value in samples.items()
                     if name.startswith(prefix))
    return fates


def stored_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM request_events").fetchone()[0])


def settle_events(base: str, db: Path, expected: int, timeout: float = 60.0) -> tuple[int, dict[str, float]]:
    """(rows, fates) once rows + drops reach ``expected`` or stop changing for 5 s."""
    deadline = time.monotonic() + timeout
    last, still_since = -1, time.monotonic()
    while True:
        rows, fates = stored_rows(db), telemetry_fates(metrics(base))
        dropped = sum(v for k, v in fates.items() if "dropped" in k)
        total = rows + int(dropped)
        if total != last:
            last, still_since = total, time.monotonic()
        if total >= expected or time.monotonic() - still_since > 5 or time.monotonic() > deadline:
            return rows, fates
        time.sleep(0.5)


def create_key(base: str, client: str, tier: str) -> str:
    import urllib.request

    request = urllib.request.Request(
        base + "/admin/v1/keys", method="POST",
        data=json.dumps({"client": client, "tier": tier}).encode(),
        headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # loopback
        return str(json.loads(response.read())["api_key"])


def summarize(tally: Tally, samples_rss: list[dict[str, Any]], args: argparse.Namespace,
              rows: int, fates: dict[str, float]) -> dict[str, Any]:
    minutes = [m for m in tally.minutes if m.statuses]
    p99s = [pct(m.latencies_ms, 0.99) for m in minutes]
    per_minute = [{"minute": i + 1, "p50_ms": pct(m.latencies_ms, 0.5), "p99_ms": p99s[i],
                   "statuses": dict(m.statuses)} for i, m in enumerate(minutes)]
    p99s = [p for p in p99s if not math.isnan(p)]
    run_minutes = args.minutes
    allowed = LIMITED_RPM + LIMITED_RPM * run_minutes + 1  # full bucket + refill (+1: rounding)
    limited = {f"limited-{i}": tally.admitted_by_key[key]
               for i, key in enumerate(args.limited_keys)}
    over = {name: max(0, admitted - math.floor(allowed)) for name, admitted in limited.items()}
    dropped = sum(v for k, v in fates.items() if "dropped" in k)
    first, last = samples_rss[0], samples_rss[-1]
    return {
        "machine": machine(),
        "minutes": run_minutes,
        "rate_per_s": args.rate,
        "mix": MIX,
        "embedder": args.embedder,
        "rss_mb": {"gateway": {"start": first["gateway"], "end": last["gateway"]},
                   "detector": {"start": first["detector"], "end": last["detector"]},
                   "samples": samples_rss},
        "latency_per_minute": per_minute,
        "p99_stable": bool(p99s) and max(p99s) <= args.p99_drift * max(p99s[0], 1.0),
        "latency_by_class_ms": {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)}
                                for k, v in tally.class_latency.items()},
        "statuses_by_class": {k: dict(v) for k, v in tally.by_class.items()},
        "over_admission": {"limit_rpm": LIMITED_RPM, "allowed_per_key": math.floor(allowed),
                           "admitted": limited, "over": over, "total_over": sum(over.values())},
        "events": {"from_issued_keys": tally.from_issued_keys, "rows": rows,
                   "dropped": dropped, "fates": fates,
                   "uncounted": tally.from_issued_keys - rows - int(dropped)},
        "client_errors": dict(tally.client_errors),
        "skipped_sends": tally.skipped,
    }


def table(result: dict[str, Any]) -> str:
    rss, ev, over = result["rss_mb"], result["events"], result["over_admission"]
    p99s = " ".join(format(m["p99_ms"], ".1f") for m in result["latency_per_minute"])
    errors = sum(result["client_errors"].values())
    rows = [
        ("gateway RSS start -> end (MB)", f"{rss['gateway']['start']:.1f} -> {rss['gateway']['end']:.1f}"),
        ("detector RSS start -> end (MB)",
         f"{rss['detector']['start']:.1f} -> {rss['detector']['end']:.1f}"),
        ("p99 per minute (ms)", p99s),
        ("p99 stable", str(result["p99_stable"])),
        ("over-admission (limited keys)", str(over["total_over"])),
        ("events: sent / rows / dropped", f"{ev['from_issued_keys']} / {ev['rows']} / {int(ev['dropped'])}"),
        ("events uncounted", str(ev["uncounted"])),
        ("client errors / skipped sends", f"{errors} / {result['skipped_sends']}"),
    ]
    width = max(len(value) for _, value in rows)
    lines = [f"{'measure':<32} {'value':>{width}}", f"{'-' * 32} {'-' * width}"]
    lines += [f"{label:<32} {value:>{width}}" for label, value in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s, all classes")
    parser.add_argument("--embedder", choices=get_args(EmbedderKind), default="auto",
                        help="the detector's query embedder")
    parser.add_argument("--enforce", action="store_true",
                        help="let detection act (default: shadow mode, it decides and records)")
    parser.add_argument("--p99-drift", type=float, default=2.0,
                        help="p99 is stable when no minute exceeds this times the first's")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "soak.json")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 2_000:
        parser.error("--minutes must be in (0, 1440] and --rate in (0, 2000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modelfence-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        upstream_url, upstream = start_upstream(workdir, pin=False)
        port = free_port()
        config = gateway_config(upstream_url, port, workdir, args.embedder, not args.enforce)
        config_path = workdir / "soak.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        gateway = Proc.start("gateway", [*modelfence_command(), "--config", str(config_path),
                                         "serve", "--port", str(port)], workdir)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + "/healthz", gateway, 120)
            keys = {kind: [create_key(base, f"soak-{kind}-{i}", "default") for i in range(2)]
                    for kind in ("chat", "stream", "embed", "oip")}
            keys["limited"] = [create_key(base, f"soak-limited-{i}", "limited")
                               for i in range(LIMITED_KEYS)]
            keys["unknown"] = []
            args.limited_keys = keys["limited"]
            rss_samples: list[dict[str, Any]] = []

            def report(tally: Tally) -> None:
                minute = tally.minutes[-1]
                child = detector_pid(gateway.pid)
                sample = {"minute": len(tally.minutes), "gateway": rss_mb(gateway.pid),
                          "detector": rss_mb(child) if child else float("nan")}
                rss_samples.append(sample)
                say(f"minute {sample['minute']}: RSS gateway {sample['gateway']:.1f} MB, "
                    f"detector {sample['detector']:.1f} MB; p50 "
                    f"{pct(minute.latencies_ms, 0.5):.1f} ms, p99 "
                    f"{pct(minute.latencies_ms, 0.99):.1f} ms; {dict(minute.statuses)}")

            say(f"soak: {args.minutes:g} min at {args.rate:g} req/s against {base} "
                f"(gateway pid {gateway.pid}, detector pid {detector_pid(gateway.pid)})")
            tally = Tally()
            asyncio.run(drive(base, keys, args.rate, args.minutes * 60, tally, report))
            rows, fates = settle_events(base, workdir / "soak.db", tally.from_issued_keys)
            result = summarize(tally, rss_samples, args, rows, fates)
        finally:
            gateway.stop()
            upstream.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    say(f"wrote {args.output}")
    ok = result["over_admission"]["total_over"] == 0 and result["events"]["uncounted"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
