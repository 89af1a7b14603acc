"""Replay: planned traffic turned straight into telemetry events, no model in the loop.

A false-positive rate of 0.02% needs tens of thousands of honest clients, far more than a
live gateway on a laptop can serve. Replay builds the ``RequestEvent`` each planned
request would produce (same clients, fingerprints, parameters, inputs and timing model),
without generating outputs, and feeds them in time order to any consumer — a detector, a
counter, or the limits-only baseline below. ``event_for`` builds each event with the
gateway's own event builder, and a test checks that a live gateway stores the same
fields for the same stream.

    consumer = LimitsBaseline(requests_per_minute=60)
    summary = replay(plans, profiles, consumer, start_ts=1.7e9)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from modelfence.gateway.context import RequestContext
from modelfence.gateway.telemetry import build_event
from modelfence.identity.base import ApiKeyRecord
from modelfence.identity.fingerprint import Fingerprinter, compute_fingerprint
from modelfence.limits.gcra import Rate, admit
from modelfence.operations import Operation
from modelfence.redteam.traffic import DIGITS_INFER, ClientProfile, PlannedRequest
from modelfence.telemetry.events import RequestEvent

Consumer = Callable[[Sequence[RequestEvent]], Any]
# The harness reaches the gateway from loopback and names each client's address in
# X-Forwarded-For; the gateway under test trusts loopback as a proxy.
_FINGERPRINTER = Fingerprinter(trusted_proxies=("127.0.0.0/8",))
# Replay has no gateway secret; any fixed key gives stable, comparable prompt hashes.
REPLAY_HASH_KEY = hashlib.blake2b(b"modelfence-redteam-replay").digest()[:32]
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def event_for(
    plan: PlannedRequest, profile: ClientProfile, *, ts: float, request_id: str,
    hash_key: bytes = REPLAY_HASH_KEY, host: str = "127.0.0.1:8080",
) -> RequestEvent:
    """The ``RequestEvent`` a gateway would record for ``plan`` sent by ``profile``.

    Built by the gateway's own ``build_event`` from a request context filled the way the
    gateway's stages fill it (same wire headers, same fingerprinter), so replay and live
    cannot drift apart field by field. Outcome fields (status, tokens, latency) are those
    of an answered request with no output.
    """
    body = orjson.dumps(plan.body)
    scope = {
        "headers": [(k.encode(), v.encode()) for k, v in profile.wire_headers("-", body, host)],
        "client": ("127.0.0.1", 0),
    }
    oip = plan.route == DIGITS_INFER
    ctx = RequestContext(
        route=Operation.OIP_INFER.route if oip else plan.route, started=0.0, request_id=request_id,
        key=ApiKeyRecord(f"replay-{profile.name}", profile.name, profile.tier, "replay", _EPOCH),
        fingerprint=compute_fingerprint(scope, _FINGERPRINTER), raw_body=body,
        body=dict(plan.body), model=plan.model,
    )
    event = build_event(ctx, 200, ts, 0.0, hash_key, None)
    event.input_count = plan.units  # as the gateway's parser counts them
    event.limit_decision = "allowed"
    event.extra = {"purpose": plan.purpose}
    return event


def replay_events(
    plans: Iterable[PlannedRequest], profiles: Mapping[str, ClientProfile], start_ts: float
) -> list[RequestEvent]:
    """Events for ``plans`` in time order, with ids that depend only on the plan."""
    ordered = sorted(plans, key=lambda p: (p.at, p.client))
    return [
        event_for(plan, profiles[plan.client], ts=start_ts + plan.at, request_id=f"replay-{i:08d}")
        for i, plan in enumerate(ordered)
    ]


def replay(
    plans: Iterable[PlannedRequest], profiles: Iterable[ClientProfile], consumer: Consumer,
    *, start_ts: float = 1_767_225_600.0, chunk: int = 5_000,
) -> list[Any]:
    """Feed the events of ``plans`` to ``consumer`` in time-ordered chunks; returns what
    each call returned. Chunking bounds memory and mirrors the pipeline's batches."""
    by_name = {p.name: p for p in profiles}
    events = replay_events(plans, by_name, start_ts)
    return [consumer(events[i : i + chunk]) for i in range(0, len(events), chunk)]


@dataclass
class EventCounter:
    """The simplest consumer: events per client and per route."""

    per_client: Counter[str] = field(default_factory=Counter)
    per_route: Counter[str] = field(default_factory=Counter)

    def __call__(self, events: Sequence[RequestEvent]) -> int:
        for event in events:
            self.per_client[event.client] += 1
            self.per_route[event.route] += 1
        return len(events)


@dataclass
class LimitsBaseline:
    """What limits alone would do: a per-client GCRA request rate, on event time.

    ``denied`` counts refusals per client; detection-free, it flags nobody — the
    "before" picture that detection must improve on.
    """

    requests_per_minute: float
    denied: Counter[str] = field(default_factory=Counter)
    allowed: Counter[str] = field(default_factory=Counter)
    _tat: dict[str, float] = field(default_factory=dict)

    def __call__(self, events: Sequence[RequestEvent]) -> int:
        rate = Rate(self.requests_per_minute)
        for event in events:
            verdict = admit(rate, tat=self._tat.get(event.client, 0.0), now=event.ts, cost=1)
            if verdict.allowed:
                self._tat[event.client] = verdict.tat
                self.allowed[event.client] += 1
            else:
                self.denied[event.client] += 1
        return len(events)
