"""Admission limits: GCRA rates, concurrency leases and daily dollar budgets.

>>> backend = build_backend(config.limits, on_fallback=print, on_release=print)
>>> quota = quota_for(config.limits.tiers["default"], record.overrides)
>>> decision = await backend.admit(AdmissionRequest(record.key_id, quota, tokens=1024))
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Protocol

from modelfence.config import LimitsConfig
from modelfence.limits.base import (
    AdmissionRequest,
    Decision,
    DecisionSource,
    Dimension,
    DimensionState,
    Lease,
    LimitBackend,
    Quota,
)
from modelfence.limits.guard import FallbackMode, GuardedBackend
from modelfence.limits.memory import MemoryBackend
from modelfence.limits.quota import Overrides, quota_for
from modelfence.limits.releases import DeferredReleases, ReleaseEvent
from modelfence.redisurl import is_redis_url

__all__ = [
    "BACKENDS",
    "AdmissionRequest",
    "Decision",
    "DecisionSource",
    "DeferredReleases",
    "Dimension",
    "DimensionState",
    "FallbackMode",
    "GuardedBackend",
    "Lease",
    "LimitBackend",
    "MemoryBackend",
    "Overrides",
    "Quota",
    "ReleaseEvent",
    "backend_name",
    "build_backend",
    "quota_for",
]

# backend name -> "module:class"; a module is imported only when its backend is chosen,
# so a single-process deployment never imports redis.
BACKENDS: dict[str, str] = {
    "memory": "modelfence.limits.memory:MemoryBackend",
    "redis": "modelfence.limits.redis:RedisBackend",
}


class _Configurable(Protocol):
    def from_config(self, config: LimitsConfig) -> LimitBackend: ...


def backend_name(config: LimitsConfig) -> str:
    """``memory``, or the backend a URL such as ``redis://host:6379/0`` names."""
    if config.backend in BACKENDS:
        return config.backend
    if is_redis_url(config.backend):  # every scheme redisurl knows, cluster included
        return "redis"
    raise KeyError(config.backend)


def build_backend(
    config: LimitsConfig,
    *,
    on_fallback: Callable[[str], None],
    on_release: Callable[[ReleaseEvent], None],
) -> LimitBackend:
    """The configured backend; a shared one is wrapped in the ``on_backend_error`` guard.

    ``on_fallback(mode)`` is called per admission decided without it, ``on_release(event)``
    per step of a release it failed at first (see :mod:`modelfence.limits.releases`).
    """
    name = backend_name(config)
    module, _, attribute = BACKENDS[name].partition(":")
    factory: _Configurable = getattr(import_module(module), attribute)
    backend = factory.from_config(config)
    if name == "memory":
        return backend
    return GuardedBackend(
        backend,
        mode=config.on_backend_error,
        share=config.degraded_share,
        on_fallback=on_fallback,
        on_release=on_release,
    )
