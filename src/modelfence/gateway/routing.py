"""Name → value tables keyed by model names or fnmatch patterns.

One mechanism serves model routing (model → upstream), tier model allow-lists and prices.
Exact names win over patterns; among patterns the first declared wins. Lookups are cached,
with the cache bounded because model names come from clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from modelfence.errors import NotFound

V = TypeVar("V")

_MISSING = object()


class PatternTable(Generic[V]):
    def __init__(self, entries: Iterable[tuple[str, V]], *, cache_size: int = 4096) -> None:
        self._exact: dict[str, V] = {}
        self._patterns: list[tuple[str, V]] = []
        for name, value in entries:
            if any(ch in name for ch in "*?["):
                self._patterns.append((name, value))
            else:
                self._exact.setdefault(name, value)
        self._cache: dict[str, object] = {}
        self._cache_size = cache_size

    def get(self, name: str) -> V | None:
        hit = self._cache.get(name, _MISSING)
        if hit is _MISSING:
            hit = self._lookup(name)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[name] = hit
        return hit  # type: ignore[return-value]

    def _lookup(self, name: str) -> V | None:
        if name in self._exact:
            return self._exact[name]
        for pattern, value in self._patterns:
            if fnmatchcase(name, pattern):
                return value
        return None

    def allows(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def exact_names(self) -> list[str]:
        return list(self._exact)


def allow_list(patterns: Iterable[str]) -> PatternTable[bool]:
    return PatternTable((pattern, True) for pattern in patterns)


class ModelAccess:
    """Which upstream serves a model, and whether a tier may use it: both or a 404.

    One answer for both cases, as OpenAI does, so keys cannot probe for hidden models.
    """

    def __init__(
        self, upstreams: PatternTable[str], tier_models: Mapping[str, PatternTable[bool]]
    ) -> None:
        self.upstreams = upstreams
        self.tier_models = tier_models

    def allowed(self, model: str, tier: str) -> bool:
        allowed = self.tier_models.get(tier)
        return allowed is not None and allowed.allows(model)

    def upstream_for(self, model: str, tier: str) -> str:
        upstream = self.upstreams.get(model)
        if upstream is None or not self.allowed(model, tier):
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return upstream
