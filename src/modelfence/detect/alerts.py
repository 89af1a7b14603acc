"""Alerts: a log line, a ``detection_alerts`` row and a Slack-compatible webhook post.

One alert per client and level within ``alert_dedup_seconds`` (a client flapping
around a threshold does not page anyone twice). The message carries the top reasons
in words and a link to the client's admin record, and says when the level is not enforced
(shadow mode, or the client's shadow pin; the row's ``shadow``). A webhook failure is
logged and the row records ``delivered = false``; it never stops detection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.detect.state import ClientRecord
from modelfence.store import transaction
from modelfence.store.schema import detection_alerts

log = logging.getLogger("modelfence.detect.alerts")

Post = Callable[[str, dict[str, Any]], Awaitable[None]]


def slack_message(record: ClientRecord, link: str) -> dict[str, Any]:
    """``{"text": ...}`` is what Slack, Mattermost and most chat webhooks accept."""
    reasons = "; ".join(r["text"] for r in record.reasons) or "no reason recorded"
    mode = " (shadow: recorded, not enforced)" if record.shadow else ""
    text = (
        f":rotating_light: ModelFence: client *{record.client}* (tier {record.tier}) is now "
        f"*{record.level}*{mode}, risk {record.risk:.2f} after {record.queries} queries. "
        f"Why: {reasons}. <{link}|admin record>"
    )
    return {"text": text}


async def _post_json(url: str, payload: dict[str, Any]) -> None:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, json=payload) as response,
    ):
        response.raise_for_status()


class Alerter:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        webhook_url: str | None,
        public_url: str,
        dedup_seconds: float,
        post: Post = _post_json,
    ) -> None:
        self.engine = engine
        self.webhook_url = webhook_url
        self.public_url = public_url.rstrip("/")
        self.dedup_seconds = dedup_seconds
        self.post = post
        self._last: dict[tuple[str, str], float] = {}

    async def alert(self, record: ClientRecord, now: float) -> bool:
        """Send unless the same client and level alerted recently; True when sent."""
        key = (record.client, record.level)
        last = self._last.get(key)
        if last is not None and now - last < self.dedup_seconds:
            return False
        self._last[key] = now
        link = f"{self.public_url}/admin/v1/clients/{record.client}"
        message = slack_message(record, link)
        log.warning("%s", message["text"])
        delivered = self.webhook_url is None
        if self.webhook_url is not None:
            try:
                await self.post(self.webhook_url, message)
                delivered = True
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.error("alert webhook failed: %s", exc)
        async with transaction(self.engine, write=True) as conn:
            await conn.execute(
                detection_alerts.insert().values(
                    at=datetime.now(UTC),
                    client=record.client,
                    entity=record.entity,
                    level=record.level,
                    risk=record.risk,
                    reasons=record.reasons,
                    delivered=delivered,
                    shadow=record.shadow,
                )
            )
        return True
