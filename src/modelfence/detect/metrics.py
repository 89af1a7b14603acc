"""Prometheus metrics of the detector: does detection keep up with the traffic?

:class:`DetectorMetrics` is what a running :class:`~modelfence.detect.service.DetectorService`
counts. No label names a client: the only label is an error's ``stage``. A
``modelfence detect`` worker serves the registry on ``detection.metrics_port``; the
detector child of ``serve`` runs in another process, so it sends snapshots of its
registry to the gateway (:class:`ChildReports`), which shows them on its own ``/metrics``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from modelfence.telemetry.events import RequestEvent

# Seconds from an event's arrival at the gateway to its verdict being published: a
# healthy detector sits well under a second; tens of seconds means it is falling behind.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STAGES = ("feed", "store")  # values of the errors' stage label
# Fates of the events the detector writes to ``request_events`` (the telemetry pipeline's,
# its sink's name taken off): a bounded label.
STORED_FATES = (
    "emitted", "written", "rejected", "sink_error", "dropped_queue_full",
    "dropped_queue_bytes", "dropped_sink", "dropped_shutdown", "dropped_build_error",
)


class DetectorMetrics:
    """One detector's metrics, in a registry of its own (several may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            "modelfence_detector_lag_seconds",
            "Time from an event's arrival at the gateway (its timestamp) to the publication "
            "of the verdicts computed from its batch; one observation per event.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "modelfence_detector_events",
            "Events read from the feed (the lag's count trails it by events whose batch failed).",
            registry=self.registry,
        )
        self.batches = Histogram(
            "modelfence_detector_batch_duration_seconds",
            "Time to process one batch of events, publication included; its count is the "
            "number of batches processed.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.verdicts = Counter(
            "modelfence_detector_verdicts_published",
            "Changed client records published to the state database (and shared Redis state).",
            registry=self.registry,
        )
        self.errors = Counter(
            "modelfence_detector_errors",
            "Failed detector steps, retried with backoff: feed (reading or acknowledging "
            "events) or store (publishing, auditing, alerting while handling a batch).",
            ["stage"],
            registry=self.registry,
        )
        self._errors = {stage: self.errors.labels(stage) for stage in STAGES}
        self.stored = Counter(
            "modelfence_detector_stored_events",
            "Events this detector handed to the state database's request_events, by fate: "
            "emitted, then written or rejected, or dropped (queue full, sink buffer full, "
            "shutdown); sink_error counts failed writes, retried.",
            ["fate"],
            registry=self.registry,
        )
        self._stored = {fate: self.stored.labels(fate) for fate in STORED_FATES}
        self.clamped_rows = Counter(
            "modelfence_detector_clamped_rows",
            "Classifier rows with a value beyond ±1e15 (JSON allows 1.8e308), clamped to it "
            "so that every distance, norm and mean the detectors take stays finite.",
            registry=self.registry,
        )

    def read(self, events: int) -> None:
        self.events.inc(events)

    def published(self, events: Sequence[RequestEvent], *, now: float | None = None) -> None:
        """The verdicts of ``events`` are out: observe each event's lag (clock skew: 0)."""
        now = time.time() if now is None else now
        for event in events:
            self.lag.observe(max(0.0, now - event.ts))

    def error(self, stage: str) -> None:
        self._errors[stage].inc()

    def store_event(self, fate: str, n: int) -> None:
        """The event pipeline's ``count`` (``written:store`` is counted as ``written``)."""
        self._stored[fate.partition(":")[0]].inc(n)

    def snapshot(self) -> list[Metric]:
        """The registry's current values, picklable (what the child sends the gateway)."""
        return list(self.registry.collect())


class ChildReports(Collector):
    """The latest snapshot a detector child sent, as a collector of the gateway's registry.

    The child calls :meth:`send` (never blocks; a report the gateway has not taken yet
    is kept and the new one skipped), the gateway :meth:`drain`\\ s; the queue holds one
    report, so nothing piles up when nobody scrapes. A child's counters start at zero
    again after a restart, which Prometheus reads as a counter reset.
    """

    def __init__(self, q: Any) -> None:  # a multiprocessing.Queue(1)
        self.queue = q
        self._latest: list[Metric] = []

    def send(self, metrics: DetectorMetrics) -> None:
        try:
            self.queue.put_nowait(metrics.snapshot())
        except queue.Full:
            pass  # the gateway takes the pending one first

    def drain(self) -> None:
        while True:
            try:
                self._latest = self.queue.get_nowait()
            except queue.Empty:
                return

    def collect(self) -> Iterable[Metric]:
        self.drain()
        return list(self._latest)
