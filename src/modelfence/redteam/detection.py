"""Detection verdicts read from the gateway's admin API, when the gateway has detection.

``GET /admin/v1/clients`` lists the clients a detector has scored; a gateway without a
detector (or with detection disabled) lists nobody, and every report then says
"detection not available" instead of pretending nobody was caught. For each client of
interest, ``GET /admin/v1/clients/{client}`` gives its current ``record`` and its audit
trail: the first audit row that raised the client above ``normal`` is its first flag,
and its time is compared with the harness's own send times to count the queries an
attacker got answered before anyone noticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from modelfence.detect.actions import LEVELS
from modelfence.redteam.runner import LiveGateway

NOT_AVAILABLE = "detection not available"
# Levels above normal. Audit rows also record pins that set no level (shadow, probation,
# allow, clear) and cut links: none of them is detection flagging the client.
FLAGGED = frozenset(LEVELS) - {"normal"}
# The detector sees events after the pipeline's flush and its own batch: give it a moment.
SETTLE_SECONDS = 1.5


@dataclass(frozen=True, slots=True)
class Flag:
    """A client's first move above ``normal``: the level and when (epoch seconds)."""

    client: str
    level: str
    at: float


async def detection_available(gateway: LiveGateway) -> bool:
    """Whether a detector is scoring this gateway's clients (after a short settle)."""
    for _ in range(2):
        await asyncio.sleep(SETTLE_SECONDS)
        status, body = await gateway.admin("GET", "/admin/v1/clients?limit=1")
        if status == 200 and isinstance(body, dict) and body.get("data"):
            return True
        if status != 200:
            return False
    return False


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def first_flag(client: str, detail: Any) -> Flag | None:
    """The first flag in one ``GET /admin/v1/clients/{client}`` answer, if any.

    The audit trail comes newest first; a client flagged now whose raising row has aged
    out of the trail is dated by its record's last update (an upper bound).
    """
    if not isinstance(detail, dict):
        return None
    raised = [
        (at, str(row.get("action")))
        for row in detail.get("audit") or []
        if str(row.get("action")) in FLAGGED and (at := _epoch(row.get("at"))) is not None
    ]
    if raised:
        at, level = min(raised)
        return Flag(client, level, at)
    record = detail.get("record")
    if isinstance(record, dict) and record.get("level") in FLAGGED:
        at = _epoch(record.get("updated_at"))
        if at is not None:
            return Flag(client, str(record["level"]), at)
    return None


async def flags(gateway: LiveGateway, clients: Iterable[str]) -> dict[str, Flag] | None:
    """First flags of the ``clients`` detection has flagged, or ``None`` without detection."""
    if not await detection_available(gateway):
        return None
    found: dict[str, Flag] = {}
    for client in clients:
        status, body = await gateway.admin("GET", f"/admin/v1/clients/{quote(client, safe='')}")
        flag = first_flag(client, body) if status == 200 else None
        if flag is not None:
            found[client] = flag
    return found
