"""Prometheus metrics of the gateway.

Labels are route, model, tier, outcome and the like — never a key, client or address.
Some values still come from clients (a model name, a tier of an admin-made key), and every
new value is a new series for the life of the process, so each label goes through a
:class:`LabelCap`: models are labelled only when configured by exact name or once served
successfully, and no label takes more than a few dozen values; the rest is ``other``.
Each :class:`Metrics` owns its registry, which lets several gateways live in one process
(tests) without clashing. Label children are cached because ``labels()`` costs
microseconds on every request otherwise.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:
    from modelfence.identity.signups import Surge

# Sub-millisecond buckets at the low end: gateway overhead lives there.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)

# Young generations take tens of microseconds; a full collection of a large heap, 100 ms.
_GC_PAUSE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)

OTHER = "other"
SPARE_LABEL_VALUES = 64  # distinct values a label takes beyond the known ones
MAX_LABEL_CHARS = 128


class LabelCap:
    """One label's values, bounded: the ``known`` ones and the first ``spare`` others are
    kept as they are, any further one (or an over-long one) becomes ``other``.

    With ``learn=False`` a value is kept only once :meth:`learn` was called for it, which
    lets a caller decide what deserves a series (a model the upstream served)::

        tiers = LabelCap({"default"}, spare=1)
        [tiers(t) for t in ("default", "gold", "x", "gold")]  # default, gold, other, gold
    """

    def __init__(
        self, known: Iterable[str] = (), *, spare: int = SPARE_LABEL_VALUES, learn: bool = True
    ) -> None:
        self._values = {v for v in known if len(v) <= MAX_LABEL_CHARS}
        self._limit = len(self._values) + spare
        self._learn_on_sight = learn

    def learn(self, value: str) -> None:
        if len(self._values) < self._limit and len(value) <= MAX_LABEL_CHARS:
            self._values.add(value)

    def __call__(self, value: str) -> str:
        if value in self._values:
            return value
        if self._learn_on_sight:
            self.learn(value)
            if value in self._values:
                return value
        return OTHER


class Metrics:
    """The gateway's metrics; ``models`` are the model names configured exactly (not by
    pattern): those are labelled from the start, others once the gateway served them."""

    def __init__(self, *, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = LabelCap(models, learn=False)
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
        self.key_lookups_refused = Counter(
            "modelfence_key_lookups_refused",
            "Keys in no key index answered 503 (key_lookup_deferred) without a store lookup: "
            "the lookups of keys missing from the index were over their budget.",
            registry=self.registry,
        )
        self.signup_surges = Counter(
            "modelfence_signup_surges",
            "Sign-up surges found or extended: unverified accounts created in them are held "
            "(accounts.surge).",
            registry=self.registry,
        )
        self.signup_surge_accounts = Gauge(
            "modelfence_signup_surge_accounts",
            "Accounts created in the latest sign-up surge, as of its last extension.",
            registry=self.registry,
        )
        self.settle_errors = Counter(
            "modelfence_settle_errors",
            "Usage settlements that failed at first; they are retried in the background.",
            registry=self.registry,
        )
        self.releases_deferred = Counter(
            "modelfence_limit_releases_deferred",
            "Lease releases the limit backend failed at first, queued for background retry: "
            "settle_failed, or admit_failed (an admission whose answer was lost, undone).",
            ["reason"],
            registry=self.registry,
        )
        self.release_retries = Counter(
            "modelfence_limit_release_retries",
            "Background attempts at a deferred lease release.",
            registry=self.registry,
        )
        self.releases_recovered = Counter(
            "modelfence_limit_releases_recovered",
            "Deferred lease releases that succeeded on a retry.",
            registry=self.registry,
        )
        self.release_failures = Counter(
            "modelfence_limit_release_failures",
            "Deferred lease releases given up; the lease is held until limits.lease_ttl_seconds.",
            registry=self.registry,
        )
        self.events = Counter(
            "modelfence_telemetry_events",
            "Request events by fate: emitted, written, dropped_queue_full / dropped_queue_bytes "
            "(the queue held telemetry.queue_size events / queue_bytes bytes), dropped_sink (a "
            "sink stayed down past its buffer), rejected (a sink refused the event's values; "
            "the rest of its batch was written), dropped_build_error, dropped_shutdown.",
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
        self.allowance_denials = Counter(
            "modelfence_account_allowance_denials",
            "Requests refused because the account's allowance was spent, by trust level "
            "(probation: code probation_limit; others: account_budget).",
            ["trust"],
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
        self.answers_unread = Counter(
            "modelfence_answers_unread",
            "Answers a response stage meant to rewrite (harden or mark) but passed on, wholly "
            "or in part (stream events), as they came; once per answer and stage: a content "
            "type it does not read (content_type), JSON its parser refused (not_json), or JSON "
            "nested deeper than it writes (too_deep). Such a client got the upstream's answer, "
            "not the one its risk level or marks called for.",
            ["stage", "reason"],
            registry=self.registry,
        )
        self.region_rows = Counter(
            "modelfence_watermark_region_rows",
            "Classifier rows answered by a client's region mark: off the distribution of the "
            "model's profile (watermark.labels.regions), label moved by the client's keyed "
            "shift. Real users' share should stay near the profile's honest_rate.",
            ["model"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "modelfence_connections_closed",
            "Connections the server closed on a slow or oversized client: head or body not "
            "complete within server.header_timeout_seconds / body_timeout_seconds, or "
            "head_size (a request head over server.max_header_bytes).",
            ["reason"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "modelfence_auth_failures",
            "Failed credential checks by surface (api: API keys, admin: the admin token) and "
            "outcome: rejected (401), or refused (429 without checking: too many failures "
            "from that client address, server.auth_failures_per_minute).",
            ["surface", "outcome"],
            registry=self.registry,
        )
        self.task_errors = Counter(
            "modelfence_background_task_errors",
            "Failed runs of a background loop: detection-state (reading published actions), "
            "detector-supervisor (the detector child had died and was restarted), "
            "watermark-ledger (a marked input not recorded). The loop backs off and retries.",
            ["task"],
            registry=self.registry,
        )
        self.ledger_dropped = Counter(
            "modelfence_watermark_ledger_dropped",
            "Marked classifier inputs not recorded in the watermark ledger (verification of a "
            "suspect replays fewer of them): queue_full, write_failed, or shutdown (still "
            "queued when the gateway stopped).",
            ["reason"],
            registry=self.registry,
        )
        self.detector_restarts = Counter(
            "modelfence_detector_restarts",
            "Times the gateway restarted its detector child process after it died.",
            registry=self.registry,
        )
        gc_pause = Histogram(
            "modelfence_gc_pause_seconds",
            "Pauses of the Python garbage collector in the gateway process, by generation "
            "(0-2). What start-up built is frozen out of their reach (modelfence.heap); "
            "generation 2 pauses of tens of milliseconds mean the live heap has grown.",
            ["generation"],
            buckets=_GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self._gc_pauses = tuple(gc_pause.labels(str(g)) for g in range(3))
        Gauge(
            "modelfence_gc_frozen_objects",
            "Objects built at start-up and frozen out of the garbage collector's reach "
            "(modelfence.heap); 0 in a process that did not freeze them.",
            registry=self.registry,
        ).set_function(gc.get_freeze_count)
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        # One cap per label of each metric; model labels share the model cap.
        self._caps: dict[int, tuple[LabelCap, ...]] = {}
        self._caps[id(self.requests)] = (LabelCap(), self.models, LabelCap(), LabelCap())
        self._caps[id(self.unmarked_rows)] = (self.models,)
        self._caps[id(self.region_rows)] = (self.models,)

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        # A value a cap kept as it is stays kept, so a hit on the raw values is the child
        # the capped ones would find (and a value the cap turns into ``other`` never hits).
        child = self._children.get((id(metric), *labels))
        if child is not None:
            return child
        caps = self._caps.get(id(metric))
        if caps is None:
            caps = self._caps[id(metric)] = tuple(LabelCap() for _ in labels)
        # Cached by the capped values: a cache keyed by raw ones would grow without bound.
        key = (id(metric), *(cap(value) for cap, value in zip(caps, labels, strict=True)))
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*key[1:])
            self._children[key] = child
        return child

    def observe_request(
        self, route: str, model: str, tier: str, outcome: str, seconds: float
    ) -> None:
        if outcome == "ok":  # served: a real model, not a name a client made up
            self.models.learn(model)
        self._child(self.requests, route, model, tier, outcome).inc()  # type: ignore[attr-defined]
        self._child(self.latency, route, outcome).observe(seconds)  # type: ignore[attr-defined]

    def observe_decision(self, tier: str, allowed: bool, dimension: str, source: str) -> None:
        decision = "allowed" if allowed else "denied"
        self._child(self.limit_decisions, tier, decision, dimension, source).inc()  # type: ignore[attr-defined]

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._child(self.upstream_errors, upstream, kind).inc()  # type: ignore[attr-defined]

    def signup_surge(self, surge: Surge) -> None:
        self.signup_surges.inc()
        self.signup_surge_accounts.set(surge.accounts)

    def backend_failure(self, mode: str) -> None:
        self._child(self.backend_failures, mode).inc()  # type: ignore[attr-defined]

    def limit_release(self, event: str) -> None:
        """One step of a deferred lease release (see ``modelfence.limits.releases``)."""
        if event in ("settle_failed", "admit_failed"):
            if event == "settle_failed":
                self.settle_errors.inc()
            self._child(self.releases_deferred, event).inc()  # type: ignore[attr-defined]
        elif event == "retried":
            self.release_retries.inc()
        elif event == "released":
            self.releases_recovered.inc()
        else:
            self.release_failures.inc()

    def connection_closed(self, reason: str) -> None:
        self._child(self.connections_closed, reason).inc()  # type: ignore[attr-defined]

    def auth_failure(self, surface: str, outcome: str) -> None:
        self._child(self.auth_failures, surface, outcome).inc()  # type: ignore[attr-defined]

    def task_error(self, task: str, exc: Exception) -> None:
        """``on_error`` of a :class:`~modelfence.periodic.Periodic` loop."""
        self._child(self.task_errors, task).inc()  # type: ignore[attr-defined]

    def ledger_drop(self, reason: str, n: int) -> None:
        self._child(self.ledger_dropped, reason).inc(n)  # type: ignore[attr-defined]

    def unmarked_row(self, model: str) -> None:
        self.models.learn(model)  # only answers the upstream served (200) get here
        self._child(self.unmarked_rows, model).inc()  # type: ignore[attr-defined]

    def answer_unread(self, stage: str, reason: str) -> None:
        """``on_unread`` of a response stage (``stage`` and ``reason`` come from code, never
        from a request: the labels stay bounded)."""
        self._child(self.answers_unread, stage, reason).inc()  # type: ignore[attr-defined]

    def region_row(self, model: str) -> None:
        self.models.learn(model)
        self._child(self.region_rows, model).inc()  # type: ignore[attr-defined]

    def gc_pause(self, generation: int, seconds: float) -> None:
        """``observe`` of a :class:`~modelfence.heap.PauseWatch`."""
        self._gc_pauses[generation].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
