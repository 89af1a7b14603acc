"""The per-request record every gateway stage reads and fills in.

Stored in ``scope["modelfence"]``; stages run in a fixed order (see ``app.py``), so each
field is set by exactly one stage and only read after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelfence.gateway.apis import ParsedRequest
from modelfence.identity.base import ApiKeyRecord, Fingerprint
from modelfence.limits.base import Decision
from modelfence.operations import Operation
from modelfence.types import Scope

SCOPE_KEY = "modelfence"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class RequestContext:
    route: str  # route template, e.g. "/v1/chat/completions" (a metrics label)
    started: float  # perf_counter() at arrival
    request_id: str
    path_model: str | None = None  # OIP routes name the model in the path
    # set by Authenticate
    key: ApiKeyRecord | None = None
    # set by Fingerprinting
    fingerprint: Fingerprint | None = None
    # set by ReadRequest: the client's request, exactly as sent; never changed afterwards
    raw_body: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)
    parsed: ParsedRequest | None = None
    # set by RequestPolicy and OutputHardening: fields to set (or OMIT) in the upstream body,
    # merged once by the proxy (modelfence.policy.request_policy.upstream_payload)
    upstream_overrides: dict[str, Any] = field(default_factory=dict)
    model: str = "-"
    upstream: str = ""
    # set by Enforce (detection verdicts); read by Admission and the hardening layer
    risk_level: str = "normal"
    # the account's own trust level (identity.trust), an operator's probation pin aside;
    # "" before Admission decides
    trust: str = ""
    quota_share: float = 1.0  # detection tightened this client's limits to this share
    degrade: bool = False  # output hardening should degrade this client's answers
    probation: bool = False  # an operator put this client on probation (Admission applies it)
    # set by Admission
    decision: Decision | None = None
    # set by SourceMarking: the gateway's own headers for the upstream call
    upstream_headers: tuple[tuple[str, str], ...] = ()
    # set by the endpoint
    usage: Usage | None = None
    outcome: str = "ok"

    @property
    def operation(self) -> Operation | None:
        """The inference operation of this route (None for health, metrics, listings)."""
        return Operation.for_route(self.route)

    @property
    def tier(self) -> str:
        return self.key.tier if self.key is not None else "-"


def context_of(scope: Scope) -> RequestContext:
    ctx: RequestContext = scope[SCOPE_KEY]
    return ctx
