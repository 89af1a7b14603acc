"""``GET /admin/v1/capabilities``: what this gateway runs, in one answer.

Operators and tooling read which layers are on and how strong they are before trusting a
dashboard: the limit backend, detection's feed and shadow mode, the watermark channels,
and the confidential layer's key broker with its ``security_level`` (``simulated`` when
it accepts evidence from the ``sim`` platform, which no hardware protects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter

from modelfence.admin.errors import error_responses


def capabilities_router(capabilities: Mapping[str, Any]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["capabilities"], responses=error_responses(401, 503))
    frozen = dict(capabilities)

    @router.get("/capabilities")
    async def describe() -> dict[str, Any]:
        return frozen

    return router
