"""Where the detector runs: a child process of ``serve``, or ``modelfence detect`` workers.

Either way it runs outside the gateway's event loop (and outside its GIL) and executes
the same :class:`~modelfence.detect.service.DetectorService`:

- :class:`DetectorProcess` — the default on one machine. ``serve`` starts it at start-up
  and restarts it if it dies; it exits when ``serve`` does. Events reach it through a
  bounded ``multiprocessing`` queue (the telemetry pipeline's ``detector`` sink), verdicts
  go to the state database the gateway polls.
- :func:`run_worker` — ``modelfence detect --worker I --workers N`` with
  ``detection.feed: redis``; each worker owns a share of the Redis Stream partitions.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from modelfence.config import Config, ProcessPriority
from modelfence.detect.feeds import (
    EventFeed,
    QueueFeed,
    QueueSink,
    RedisStreamFeed,
    worker_partitions,
)
from modelfence.detect.metrics import ChildReports, DetectorMetrics
from modelfence.errors import ModelFenceError
from modelfence.heap import freeze_startup
from modelfence.redisconn import connect
from modelfence.redisurl import is_redis_url
from modelfence.store import create_tables, open_engine
from modelfence.telemetry.pipeline import EventPipeline, PipelineSettings
from modelfence.telemetry.sinks import SqlSink

if TYPE_CHECKING:
    from modelfence.detect.engine import DetectionEngine

log = logging.getLogger("modelfence.detect")

QUEUE_BATCHES = 200  # batches (of up to telemetry.batch_size events) waiting for the child
MAX_RESTART_BACKOFF_SECONDS = 60.0  # between restarts of a child that dies at start-up
REDIS_CONNECT_TIMEOUT = 2.0  # seconds; a dead Redis must not hang a poll or the detector
REDIS_TIMEOUT = 10.0  # seconds per command; above the stream read's block time
REPORT_SECONDS = 1.0  # how often the detector child sends its metrics to the gateway
LOW_NICE = 10  # detection.process_priority: low, added to the gateway's nice level
MAX_NICE = 19  # also idle's, where the OS has no SCHED_IDLE


def redis_client(config: Config) -> Redis | RedisCluster:
    """Detection's Redis client (streams and shared state), with connect and read timeouts."""
    return connect(
        redis_url(config),
        timeout_seconds=REDIS_TIMEOUT,
        connect_timeout_seconds=REDIS_CONNECT_TIMEOUT,
    )


def redis_url(config: Config) -> str:
    url = config.detection.redis_url or config.limits.backend
    if not is_redis_url(url):
        raise ValueError(
            "detection.feed: redis needs detection.redis_url (or a Redis limits.backend)"
        )
    return url


def build_engine(config: Config) -> DetectionEngine:
    # Imported here: the gateway process imports this module but never loads a detector.
    from threadpoolctl import threadpool_limits

    from modelfence.detect.embedding import load_embedder
    from modelfence.detect.engine import DetectionEngine
    from modelfence.detect.reference import Reference, check_embedder

    # One BLAS thread: the detector's matrices are small, and a multi-threaded BLAS on a
    # machine busy with the gateway spends most of its time waiting (8× slower, measured).
    threadpool_limits(1)
    detection = config.detection
    embedder = load_embedder(detection.embedder)
    reference = None
    if detection.reference_file:
        reference = Reference.load(detection.reference_file)
        check_embedder(reference, embedder.name, detection.reference_file)
    return DetectionEngine(detection, embedder=embedder, reference=reference)


async def run_service(
    config: Config,
    feed: EventFeed,
    *,
    shared: Redis | RedisCluster | None = None,
    on_ready: Callable[[], object] | None = None,
    metrics: DetectorMetrics | None = None,
) -> None:
    """Run one detector on ``feed`` until it closes; ``on_ready`` once it is reading."""
    from modelfence.detect.alerts import Alerter
    from modelfence.detect.service import DetectorService
    from modelfence.detect.state import RedisState, SqlState

    engine = open_engine(config.store)
    try:
        await create_tables(engine)
        detection = config.detection
        alerter = Alerter(
            engine,
            webhook_url=detection.webhook_url,
            public_url=detection.public_url,
            dedup_seconds=detection.alert_dedup_seconds,
        )
        metrics = metrics or DetectorMetrics()
        # The gateways send events here only: this detector writes its share of them.
        archive = EventPipeline(
            [
                SqlSink(
                    engine,
                    store_prompt_text=config.telemetry.store_prompt_text,
                    retention_days=config.telemetry.retention_days,
                )
            ],
            settings=PipelineSettings.of(config.telemetry),
            count=metrics.store_event,
        )
        service = DetectorService(
            build_engine(config),
            SqlState(engine),
            alerter,
            shared=RedisState(shared) if shared is not None else None,
            shadow=detection.shadow,
            metrics=metrics,
            archive=archive.emit,
        )
        await archive.start()
        log.info("detector running (pid %d)", os.getpid())
        if on_ready is not None:
            on_ready()
        try:
            await service.run(feed)
        finally:
            await archive.stop()
    finally:
        await engine.dispose()


def _exit_with_parent() -> None:
    """End this process as soon as the gateway that started it is gone, even by SIGKILL."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.warning("the gateway (pid %s) is gone: detector exiting", parent.pid)
        os._exit(0)

    threading.Thread(target=watch, name="modelfence-parent-watch", daemon=True).start()


def _report_to_parent(reports: ChildReports, metrics: DetectorMetrics) -> None:
    """Send the gateway this child's metrics every ``REPORT_SECONDS``, from a thread of its
    own so that a busy event loop still reports (its lag is what matters then)."""
    reports.queue.cancel_join_thread()  # a report still in flight at exit is not waited for

    def report() -> None:
        while True:
            reports.send(metrics)
            time.sleep(REPORT_SECONDS)

    threading.Thread(target=report, name="modelfence-detector-metrics", daemon=True).start()


def _child_main(config: Config, q: Any, ready: Any, reports_queue: Any) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _yield_cpu(config.detection.process_priority)
    _exit_with_parent()
    metrics = DetectorMetrics()
    _report_to_parent(ChildReports(reports_queue), metrics)

    def started() -> None:
        freeze_startup()  # this process serves until the gateway stops it
        ready.set()

    asyncio.run(run_service(config, QueueFeed(q), on_ready=started, metrics=metrics))


def _yield_cpu(priority: ProcessPriority) -> None:
    """Lower this process's CPU priority (``detection.process_priority``), every thread's.

    The child shares the gateway's cores (and any pinning), and at an equal share requests
    that arrive while it embeds a batch wait for it. ``low`` adds 10 to the nice level it
    inherited, so the scheduler weighs the gateway about 9:1 against it; ``idle``
    (``SCHED_IDLE``, Linux; nice 19 elsewhere) gives it only time the gateway leaves,
    which keeps the gateway's latency as if alone but all but stops detection while the
    gateway saturates its cores. Either way the detector's lag, which it reports, absorbs
    the difference. Linux sets priorities per thread, and the BLAS threads numpy started
    on import already run: each is lowered; threads started later inherit. Windows has
    neither: the setting does nothing there (said once, at start).
    """
    if priority == "normal":
        return
    if not hasattr(os, "setpriority"):
        log.info("detection.process_priority %s has no effect on this platform", priority)
        return
    idle = priority == "idle" and hasattr(os, "SCHED_IDLE")
    refused: list[str] = []
    for thread in _threads():
        try:
            if idle:
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
            elif priority == "idle":
                os.setpriority(os.PRIO_PROCESS, thread, MAX_NICE)
            else:
                nice = os.getpriority(os.PRIO_PROCESS, thread)
                os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, nice + LOW_NICE))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:  # a sandbox that refuses
            refused.append(f"thread {thread}: {exc}")
    if refused:
        log.warning("could not lower the detector's CPU priority (%s) for %d thread(s): %s",
                    priority, len(refused), "; ".join(refused[:3]))


def _threads() -> list[int]:
    """This process's thread ids where the OS lists them (Linux), else 0: the process."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _start_without_main(process: Any) -> None:
    """Start a spawned child that does not run the program's main script first.

    ``spawn`` makes a child run the parent's ``__main__`` file (as ``__mp_main__``) before
    its target, so that objects defined there unpickle. Started as the ``modelfence``
    console script, that file imports the whole CLI: 0.1-0.3 s and 15-16 MiB more in every
    detector child, which needs nothing from it (its target and arguments live in
    modules). Without a ``__file__`` on ``__main__`` while the child starts, ``spawn`` runs
    no main file, as for an interactive session (``python -m modelfence`` runs none either:
    ``spawn`` leaves a package's ``__main__`` alone). The change is process-wide for that
    moment: here only the event loop's thread starts children.
    """
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        process.start()
    finally:
        if path is not None:
            main.__file__ = path


class DetectorDied(ModelFenceError):
    """The detector child had exited when the supervisor looked (it was restarted)."""


class DetectorProcess:
    """The detector as a supervised child process of the gateway, fed through a bounded queue.

    The gateway runs :meth:`supervise` periodically (a :class:`~modelfence.periodic.Periodic`
    loop): a dead child is replaced, with a fresh queue since the dead one may have held the
    old queue's lock; batches still in the old queue are lost. A child that dies before its
    detector ran (a crash at start-up) is restarted after 1, 2, 4 … up to
    ``MAX_RESTART_BACKOFF_SECONDS``; one that had run is restarted at once. The child ends
    itself when the gateway dies.
    """

    def __init__(self, config: Config, *, on_restart: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_restart = on_restart
        self.restarts = 0
        self._crashes = 0  # children in a row that died before their detector ran
        self._restart_at = 0.0  # monotonic time before which a dead child stays dead
        self._context = multiprocessing.get_context("spawn")  # no fork of a running event loop
        self._sink = QueueSink(self._context.Queue(QUEUE_BATCHES))
        # The child's metrics, for the gateway's registry (app.py registers it).
        self.metrics = ChildReports(self._context.Queue(1))
        self.process = self._new_process()

    def _new_process(self) -> Any:
        self._ready = self._context.Event()  # set by the child once its detector runs
        return self._context.Process(
            target=_child_main,
            args=(self.config, self._sink.queue, self._ready, self.metrics.queue),
            name="modelfence-detector",
            daemon=True,
        )

    @property
    def queue(self) -> Any:
        return self._sink.queue

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def start(self) -> None:
        _start_without_main(self.process)

    def sink(self) -> QueueSink:
        """The telemetry sink into the child; it follows the child across restarts."""
        return self._sink

    async def supervise(self) -> None:
        """Take the child's latest metrics; restart it if it died (raises
        :class:`DetectorDied` when it did)."""
        self.metrics.drain()
        if self.alive:
            return
        now = time.monotonic()
        if self._ready.is_set():
            self._crashes = 0  # it had run: restart at once
        elif now < self._restart_at:
            return  # it keeps dying at start-up: wait out the back-off
        else:
            self._crashes += 1
            self._restart_at = now + min(MAX_RESTART_BACKOFF_SECONDS, 2.0 ** (self._crashes - 1))
        exitcode = self.process.exitcode
        old = self._sink.queue
        self._sink.queue = self._context.Queue(QUEUE_BATCHES)
        old.cancel_join_thread()  # nobody reads it any more: do not wait to flush it
        old.close()
        # The dead child may have held the reports queue's lock too; its last report stays.
        self.metrics.queue.close()
        self.metrics.queue = self._context.Queue(1)
        self.process = self._new_process()
        _start_without_main(self.process)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        raise DetectorDied(f"the detector child exited with code {exitcode}; restarted it")

    def wait_ready(self, timeout: float) -> bool:
        """Block until the child runs its detector (True), dies or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            if self._ready.wait(0.1):
                return True
        return False

    async def probe(self) -> None:
        """Readiness: raises unless the child is up and running its detector."""
        if not self.alive:
            raise DetectorDied("the detector child is not running")
        if not self._ready.is_set():
            raise DetectorDied("the detector child is starting")

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the child to finish its queue and exit; terminate it after ``timeout``."""
        if self.process.is_alive():
            try:
                self.queue.put(None, timeout=1)
            except queue.Full:  # the child is stuck anyway
                log.warning("detector queue full at shutdown")
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(2)
        self.queue.close()
        self.queue.join_thread()


async def run_worker(
    config: Config, worker: int, workers: int, *, on_ready: Callable[[], object] | None = None
) -> None:
    """One ``modelfence detect`` worker consuming its partitions of the event streams;
    ``on_ready`` once it is reading (the CLI freezes the start-up heap there)."""
    redis = redis_client(config)
    partitions = worker_partitions(worker, workers, config.detection.partitions)
    log.info("detect worker %d/%d: partitions %s", worker, workers, partitions)
    metrics, server = DetectorMetrics(), None
    try:
        server = serve_metrics(config, metrics)
        feed = RedisStreamFeed(redis, partitions, consumer=f"worker-{worker}")
        await run_service(config, feed, shared=redis, on_ready=on_ready, metrics=metrics)
    finally:
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for its poll loop to notice
            server.server_close()
        await redis.aclose()


def serve_metrics(config: Config, metrics: DetectorMetrics) -> WSGIServer | None:
    """``/metrics`` of a worker on ``detection.metrics_port`` (a thread); None when unset."""
    host, port = config.detection.metrics_host, config.detection.metrics_port
    if port is None:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ValueError(
            f"detection.metrics_port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    log.info("detector metrics on http://%s:%d/metrics", host, port)
    return server
