"""An operator's decisions about clients: pinned actions and cut links, each audited.

One code path for every surface an operator acts through (the admin API and the
console), so a block set in either is published, shared with the other replicas and
written to the audit log the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from redis.exceptions import RedisError
from sqlalchemy import delete

from modelfence.detect.actions import Level, Policy
from modelfence.detect.state import ClientRecord, RedisState, SqlState
from modelfence.errors import ServiceUnavailable
from modelfence.store import transaction
from modelfence.store.schema import detection_overrides

log = logging.getLogger(__name__)

OverrideAction = Literal["allow", "normal", "alert", "tighten", "degrade", "block", "clear"]


@dataclass(frozen=True, slots=True)
class Pinned:
    """The outcome of :meth:`OperatorActions.pin`: the pin in force and the level applied."""

    override: OverrideAction | None
    level: Level


class OperatorActions:
    """Pins and cuts, written to the state database (and Redis, with several replicas)."""

    def __init__(self, state: SqlState, policy: Policy, *, shared: RedisState | None = None) -> None:
        self.state = state
        self.policy = policy
        self.shared = shared

    async def pin(self, client: str, action: OverrideAction, note: str) -> Pinned:
        """Pin a client's action (or ``clear`` the pin); audited, applied at the next poll."""
        state = self.state
        record = await state.get(client)
        previous = record.level if record else "normal"
        now = datetime.now(UTC)
        async with transaction(state.engine, write=True) as conn:
            await conn.execute(
                delete(detection_overrides).where(detection_overrides.c.client == client)
            )
            if action != "clear":
                await conn.execute(
                    detection_overrides.insert().values(
                        client=client, action=action, note=note, updated_at=now
                    )
                )
        base = record or ClientRecord(
            client=client,
            tier="default",
            entity=None,
            risk=0.0,
            level="normal",
            quota_share=1.0,
            reasons=[],
            queries=0,
            shadow=False,
            updated_at=now,
        )
        pinned = None if action == "clear" else action
        level = self.policy.decide(client, base.risk, base.tier, pinned)
        published = replace(
            base,
            level=level,
            quota_share=self.policy.action(level, base.tier).quota_share,
            shadow=base.shadow and pinned is None,
            updated_at=now,
        )
        await state.publish([published])
        await state.audit(
            client=client,
            entity=published.entity,
            previous=previous,
            action=action,
            risk=base.risk,
            source="admin",
            shadow=False,
            reasons=[{"code": "manual_override", "text": note or "set by an operator", "score": 1.0}],
        )
        if self.shared is not None:
            try:
                await self.shared.publish([published])
            except RedisError as exc:
                log.error("admin: action of client %r saved but not shared: %s", client, exc)
                raise ServiceUnavailable(
                    "The action is saved but could not be shared with the other replicas "
                    "(Redis failed); send it again.",
                    code="shared_state_unavailable",
                ) from exc
        log.info("admin: detection action of client %r set to %s", client, action)
        return Pinned(override=pinned, level=level)

    async def cut(self, client: str, other: str, *, cut: bool, note: str) -> None:
        """Cut the link between two clients (never one entity again) or restore it; audited."""
        state = self.state
        await state.set_cut(client, other, cut=cut, note=note)
        record = await state.get(client)
        await state.audit(
            client=client,
            entity=record.entity if record else None,
            previous=record.level if record else "normal",
            action="cut_link" if cut else "restore_link",
            risk=record.risk if record else 0.0,
            source="admin",
            shadow=False,
            reasons=[{"code": "cut_link" if cut else "restore_link",
                      "text": f"link with {other}: {note or 'by an operator'}", "score": 1.0}],
        )
        log.info("admin: link %r - %r %s", client, other, "cut" if cut else "restored")
