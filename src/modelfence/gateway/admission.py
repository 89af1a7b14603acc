"""Admission: reserve before running, settle to real usage after, headers on every answer.

One backend call decides every dimension (requests, tokens, dollars, concurrency, per-IP
prefix, per-fingerprint). The reservation is the prompt estimate plus the most the request
may generate; when the response (or stream) really ends — client disconnects included —
it is settled to the usage the upstream reported and the concurrency lease is released.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from modelfence.config import PriceConfig, TierConfig
from modelfence.errors import PermissionDenied, RateLimited, ServiceUnavailable
from modelfence.gateway.context import RequestContext, Usage, context_of
from modelfence.gateway.routing import PatternTable
from modelfence.identity.base import ApiKeyRecord
from modelfence.identity.trust import Standing
from modelfence.limits.base import (
    AdmissionRequest,
    Allowance,
    Decision,
    Lease,
    LimitBackend,
    Quota,
)
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Headers, Message, Receive, Scope, Send

log = logging.getLogger("modelfence.limits")

QuotaResolver = Callable[[TierConfig, ApiKeyRecord], Quota]


class TrustSource(Protocol):
    def standing(
        self, key: ApiKeyRecord, risk_level: str = "normal", *, probation: bool = False
    ) -> Standing:
        """The key's account's trust level and allowance, from memory (every request);
        ``probation``: an operator put the key's client on probation."""
        ...


# A key without an account that an operator put on probation spends an allowance of its
# client's own, counted under this prefix and the client's name: a name no account can
# have (names are printable text), so no account's counters are shared.
_CLIENT_ALLOWANCE = "\x1fclient:"


def _charged_to(key: ApiKeyRecord, standing: Standing) -> str | None:
    """Whose allowance a request spends: its account's, on an operator's probation too (as
    when detection demotes the account: the account's use counts); a key without an
    account, only on an operator's probation, its client's own."""
    if key.account is None and standing.by_operator:
        return _CLIENT_ALLOWANCE + key.client
    return key.account


_DIMENSION_WORDS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent requests",
    "usd": "dollars per day",
    "ip_prefix": "requests per minute from this network",
    "fingerprint": "requests per minute from this client fingerprint",
    "account_rows": "rows (inputs × choices)",
    "account_tokens": "tokens",
}
_ACCOUNT_DIMENSIONS = {"account_rows": "rows", "account_tokens": "tokens"}


def cost(price: PriceConfig | None, prompt_tokens: int, completion_tokens: int) -> float:
    if price is None:
        return 0.0
    return (
        prompt_tokens * price.input_per_1k_tokens + completion_tokens * price.output_per_1k_tokens
    ) / 1000 + price.per_request


def _seconds(value: float) -> bytes:
    return f"{value:.3f}s".encode()


def rate_headers(decision: Decision) -> Headers:
    headers: Headers = []
    for suffix, state in ((b"requests", decision.requests), (b"tokens", decision.tokens)):
        if state is not None:
            headers += [
                (b"x-ratelimit-limit-" + suffix, str(state.limit).encode()),
                (b"x-ratelimit-remaining-" + suffix, str(max(state.remaining, 0)).encode()),
                (b"x-ratelimit-reset-" + suffix, _seconds(state.reset_seconds)),
            ]
    return headers


def _retry_headers(wait: float) -> Headers:
    return [
        (b"retry-after", str(max(math.ceil(wait), 1)).encode()),
        (b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
    ]


def _windows(allowance: Allowance, measure: str) -> str:
    day = getattr(allowance, f"{measure}_per_day")
    month = getattr(allowance, f"{measure}_per_30_days")
    parts = [f"{day:,} {measure} a day"] if day is not None else []
    if month is not None:
        parts.append(f"{month:,} over 30 days")
    return " and ".join(parts)


def _account_denial(
    decision: Decision, standing: Standing, allowance: Allowance, headers: Headers
) -> RateLimited:
    """429 ``probation_limit`` (or ``account_budget``): the allowance, the use, when it widens."""
    measure = _ACCOUNT_DIMENSIONS[decision.denied_by or "account_rows"]
    usage = decision.account
    used = ""
    if usage is not None:
        today, month = (
            (usage.rows_today, usage.rows_30_days)
            if measure == "rows"
            else (usage.tokens_today, usage.tokens_30_days)
        )
        has_month = getattr(allowance, f"{measure}_per_30_days") is not None
        used = f" Used: {today:,} today" + (f", {month:,} over 30 days." if has_month else ".")
    limits = _windows(allowance, measure)
    if standing.by_operator:
        code = "probation_limit"
        widens = " The allowance widens when the operator lifts the probation."
        head = f"The API operator put this client on probation: it may use {limits}."
    elif standing.level == "probation":
        code = "probation_limit"
        if standing.widens_at is not None:
            widens = (
                f" The allowance widens on {standing.widens_at:%Y-%m-%d %H:%M} UTC, or sooner "
                "once the organisation is verified or the account has paid."
            )
        else:
            widens = " The allowance widens when the account's risk clears."
        head = f"This account is on probation ({standing.reason}): it may use {limits}."
    else:
        code, widens = "account_budget", ""
        head = f"This account ({standing.level}) has reached its allowance of {limits}."
    trust = [(b"x-modelfence-trust", standing.level.encode())]
    if 0 in (getattr(allowance, f"{measure}_per_day"), getattr(allowance, f"{measure}_per_30_days")):
        held = (  # no request is small enough: a held account, or a level allowed none
            f"This account is on probation ({standing.reason}): it gets no answers yet."
            if standing.level == "probation" and not standing.by_operator
            else f"{head} No request fits it."
        )
        return RateLimited(f"{held}{widens}", code=code, headers=[*headers, *trust])
    if math.isinf(decision.retry_after):
        return RateLimited(
            f"{head} This request alone needs more {measure} than that; send fewer inputs "
            f"per request.{widens}",
            code=code,
            headers=[*headers, *trust],
        )
    wait = max(decision.retry_after, 0.001)
    return RateLimited(
        f"{head}{used} Retry in {wait / 3600:.1f} h.{widens}",
        code=code,
        headers=[*headers, *trust, *_retry_headers(wait)],
    )


def _denial(decision: Decision, ctx: RequestContext, headers: Headers) -> RateLimited:
    what = _DIMENSION_WORDS.get(decision.denied_by or "", "limit")
    if math.isinf(decision.retry_after):
        return RateLimited(
            f"Request too large: it needs more than the {what} of your tier allow at once; "
            "lower max_tokens or the prompt size.",
            code="request_too_large",
            headers=headers,
        )
    wait = max(decision.retry_after, 0.001)
    return RateLimited(
        f"Rate limit reached for {what} on key {ctx.key.key_id if ctx.key else '-'} "
        f"(tier {ctx.tier}); retry in {wait:.2f}s.",
        headers=[*headers, *_retry_headers(wait)],
    )


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        *,
        backend: LimitBackend,
        tiers: Mapping[str, TierConfig],
        resolve_quota: QuotaResolver,
        prices: PatternTable[PriceConfig],
        metrics: Metrics,
        trust: TrustSource,
    ) -> None:
        self.app = app
        self.backend = backend
        self.tiers = tiers
        self.resolve_quota = resolve_quota
        self.prices = prices
        self.metrics = metrics
        self.trust = trust
        self._quotas: dict[str, tuple[ApiKeyRecord, Allowance | None, Quota]] = {}
        self._settling: set[asyncio.Task[None]] = set()

    def _quota(self, key: ApiKeyRecord, allowance: Allowance | None) -> Quota:
        cached = self._quotas.get(key.key_id)
        if cached is not None and cached[0] is key and cached[1] is allowance:
            return cached[2]
        tier = self.tiers.get(key.tier)
        if tier is None:
            raise PermissionDenied(
                f"this key's tier {key.tier!r} is not configured; ask the operator",
                code="unknown_tier",
            )
        quota = replace(self.resolve_quota(tier, key), allowance=allowance)
        if len(self._quotas) > 100_000:
            self._quotas.clear()
        self._quotas[key.key_id] = (key, allowance, quota)
        return quota

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        assert ctx.key is not None and ctx.parsed is not None
        price = self.prices.get(ctx.model)
        parsed = ctx.parsed
        fingerprint = ctx.fingerprint
        standing = self.trust.standing(ctx.key, ctx.risk_level, probation=ctx.probation)
        # Telemetry carries the account's own trust: an operator's pin says nothing about
        # the account, and detection links accounts on probation to one another.
        own = self.trust.standing(ctx.key, ctx.risk_level) if standing.by_operator else standing
        ctx.trust = own.level
        quota = self._quota(ctx.key, standing.allowance)
        if ctx.quota_share < 1.0:  # tightened by detection
            quota = quota.scaled(ctx.quota_share)
        decision = await self.backend.admit(
            AdmissionRequest(
                key_id=ctx.key.key_id,
                quota=quota,
                tokens=parsed.prompt_tokens + parsed.max_output_tokens,
                usd=cost(price, parsed.prompt_tokens, parsed.max_output_tokens),
                ip_prefix=fingerprint.ip_prefix if fingerprint else None,
                fingerprint=fingerprint.digest if fingerprint else None,
                account=_charged_to(ctx.key, standing),
                key_account=ctx.key.account,
                rows=parsed.answers,
            )
        )
        self.metrics.observe_decision(
            ctx.tier, decision.allowed, decision.denied_by or "none", decision.source
        )
        headers = rate_headers(decision)
        if not decision.allowed:
            if decision.denied_by == "backend":
                raise ServiceUnavailable(
                    "The rate-limit backend is unavailable and this gateway is configured to "
                    "fail closed; retry shortly.",
                    code="limit_backend_unavailable",
                    headers=[(b"retry-after", b"1")],
                )
            if decision.denied_by in _ACCOUNT_DIMENSIONS and quota.allowance is not None:
                self.metrics.allowance_denials.labels(standing.level).inc()
                raise _account_denial(decision, standing, quota.allowance, headers)
            raise _denial(decision, ctx, headers)
        ctx.decision = decision

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if decision.lease is not None:
                usage = ctx.usage or Usage()
                used_usd = cost(price, usage.prompt_tokens, usage.completion_tokens)
                settling = self._settle(decision.lease, usage.total, used_usd)
                if self.backend.settles_at_once:
                    await settling  # never waits, so a cancellation cannot cut it short
                else:
                    # Settling must survive the request task being cancelled mid-stream.
                    task = asyncio.ensure_future(settling)
                    self._settling.add(task)
                    task.add_done_callback(self._settling.discard)
                    await asyncio.shield(task)

    async def _settle(self, lease: Lease, tokens: int, usd: float) -> None:
        try:
            await self.backend.settle(lease, tokens, usd)
        except Exception as exc:  # noqa: BLE001 - the answer is sent: count and log, go on
            self.metrics.settle_errors.inc()
            log.warning("usage settlement failed: %s", exc)
