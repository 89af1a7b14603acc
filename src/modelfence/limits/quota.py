"""Resolving the :class:`Quota` of one request from configuration."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from modelfence.config import PerSourceLimit, TierConfig
from modelfence.limits.base import Quota

OVERRIDABLE = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "usd_per_day")


class Overrides(Protocol):
    """Per-key replacements for tier limits (the identity layer's ``LimitOverrides``)."""

    @property
    def requests_per_minute(self) -> float | None: ...

    @property
    def tokens_per_minute(self) -> float | None: ...

    @property
    def concurrent_requests(self) -> int | None: ...

    @property
    def usd_per_day(self) -> float | None: ...


def _per_minute(limit: PerSourceLimit | None) -> float | None:
    return None if limit is None else limit.requests_per_minute


def quota_for(
    tier: TierConfig,
    overrides: Overrides | None = None,
    *,
    per_ip_prefix: PerSourceLimit | None = None,
    per_fingerprint: PerSourceLimit | None = None,
) -> Quota:
    """The tier's limits, each replaced by its override where one is set (not ``None``).

    ``per_ip_prefix`` and ``per_fingerprint`` limit all keys seen from one IP prefix or one
    client fingerprint together (``None``: unlimited).

    >>> limits = LimitsConfig(per_ip_prefix={"requests_per_minute": 600})
    >>> quota = quota_for(limits.tiers["default"], per_ip_prefix=limits.per_ip_prefix)
    >>> quota.ip_prefix_requests_per_minute
    600.0
    """
    quota = Quota(
        requests_per_minute=tier.requests_per_minute,
        tokens_per_minute=tier.tokens_per_minute,
        concurrent_requests=tier.concurrent_requests,
        usd_per_day=tier.usd_per_day,
        ip_prefix_requests_per_minute=_per_minute(per_ip_prefix),
        fingerprint_requests_per_minute=_per_minute(per_fingerprint),
    )
    if overrides is None:
        return quota
    changes = {name: getattr(overrides, name) for name in OVERRIDABLE}
    return replace(quota, **{name: value for name, value in changes.items() if value is not None})
