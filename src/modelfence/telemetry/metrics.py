"""Prometheus metrics of the gateway.

Labels are route, model, tier, outcome and the like — never a key, client or address, so
cardinality stays bounded by configuration. Each :class:`Metrics` owns its registry, which
lets several gateways live in one process (tests) without clashing. Label children are
cached because ``labels()`` costs microseconds on every request otherwise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

# Sub-millisecond buckets at the low end: gateway overhead lives there.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelfence_requests",
            "Requests answered by the gateway.",
            ["route", "model", "tier", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelfence_request_duration_seconds",
            "Time from request start to the last byte sent, upstream included.",
            ["route", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.limit_decisions = Counter(
            "modelfence_limit_decisions",
            "Admission decisions, by the dimension that denied (none when allowed).",
            ["tier", "decision", "dimension", "source"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "modelfence_upstream_errors",
            "Upstream calls that failed: timeout, connection, or a 5xx status.",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.backend_failures = Counter(
            "modelfence_limit_backend_failures",
            "Admissions decided without the shared limit backend, by on_backend_error mode.",
            ["mode"],
            registry=self.registry,
        )
        self.key_refresh_errors = Counter(
            "modelfence_key_refresh_errors",
            "Failed polls of the key store; cached keys keep being served meanwhile.",
            registry=self.registry,
        )
        self.settle_errors = Counter(
            "modelfence_settle_errors",
            "Usage settlements that failed; the reservation stands instead of real usage.",
            registry=self.registry,
        )
        self.events = Counter(
            "modelfence_telemetry_events",
            "Request events by fate: emitted, written, dropped_queue_full (the queue was full), "
            "dropped_sink (a sink stayed down past its buffer).",
            ["fate"],
            registry=self.registry,
        )
        self.sink_errors = Counter(
            "modelfence_telemetry_sink_errors",
            "Failed batch writes to a telemetry sink; the batch is kept and retried.",
            ["sink"],
            registry=self.registry,
        )
        self.detection_actions = Counter(
            "modelfence_detection_enforced",
            "Requests on which a detection action applied, by action.",
            ["action"],
            registry=self.registry,
        )
        self.unmarked_rows = Counter(
            "modelfence_watermark_unmarked_rows",
            "Classifier rows chosen for a label mark that went out unmarked: a labels-only "
            "answer of a model whose class count is unknown (set watermark.labels.classes, or "
            "let the gateway see one probability answer of that model first).",
            ["model"],
            registry=self.registry,
        )
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def observe_request(
        self, route: str, model: str, tier: str, outcome: str, seconds: float
    ) -> None:
        self._child(self.requests, route, model, tier, outcome).inc()  # type: ignore[attr-defined]
        self._child(self.latency, route, outcome).observe(seconds)  # type: ignore[attr-defined]

    def observe_decision(self, tier: str, allowed: bool, dimension: str, source: str) -> None:
        decision = "allowed" if allowed else "denied"
        self._child(self.limit_decisions, tier, decision, dimension, source).inc()  # type: ignore[attr-defined]

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._child(self.upstream_errors, upstream, kind).inc()  # type: ignore[attr-defined]

    def backend_failure(self, mode: str) -> None:
        self._child(self.backend_failures, mode).inc()  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
