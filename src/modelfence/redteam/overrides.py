"""Config overrides for the harness's own stack: one defence switched on over the baseline.

    >>> config_with({"limits": {"backend": "memory", "tiers": {"default": {"rpm": 600}}}},
    ...             {"limits": {"tiers": {"default": {"rpm": 60}}}})
    {'limits': {'backend': 'memory', 'tiers': {'default': {'rpm': 60}}}}

Mappings merge key by key, recursively; anything else (lists included) replaces what was
there, so an override can swap the whole ``upstreams`` list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_with(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new config: ``base`` deep-merged with ``overrides`` (neither is changed)."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = config_with(current, value)
        else:
            merged[key] = value
    return merged
