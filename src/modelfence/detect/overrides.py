"""An operator's decisions about clients: pinned actions and cut links, each audited.

One code path for every surface an operator acts through (the admin API and the
console), so a block set in either is published, shared with the other replicas and
written to the audit log the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from modelfence.detect.actions import OVERRIDES, Level, Policy, shadowed
from modelfence.detect.state import ClientRecord, RedisState, SqlState, lock_pins
from modelfence.errors import ServiceUnavailable
from modelfence.redisconn import REDIS_ERRORS
from modelfence.store import transaction
from modelfence.store.schema import detection_overrides

log = logging.getLogger(__name__)

OverrideAction = Literal[
    "allow", "normal", "alert", "tighten", "degrade", "block", "shadow", "probation", "clear"
]

def _pin_statement(
    dialect: str, client: str, pinned: str | None, note: str, now: datetime
) -> Any:
    """The statement that leaves ``pinned`` as the client's override (no row for None)."""
    table = detection_overrides
    if pinned is None:
        return delete(table).where(table.c.client == client)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values(client=client, action=pinned, note=note, updated_at=now)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.client],
        set_={"action": stmt.excluded.action, "note": stmt.excluded.note,
              "updated_at": stmt.excluded.updated_at},
    )


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
        """Pin a client's action (or ``clear`` the pin); audited, applied at the next poll.

        ``shadow`` and ``probation`` leave the level to detection (the published one stands,
        unless a pinned level is being lifted) and change what gateways do with it: nothing,
        or the probation allowance.

        The current record is read, the pin written, the level it implies published and the
        decision audited in one write transaction, taken in turn by every pin of the client
        (SQLite's write lock; a PostgreSQL advisory lock keyed by the client): two pins at
        once both succeed, and the last one's pin is the one the published level follows.
        """
        state = self.state
        pinned = None if action == "clear" else action
        async with transaction(state.engine, write=True) as conn:
            await lock_pins(conn, [client])
            now = datetime.now(UTC)  # once the lock is ours: the last pin is the newest
            record = await state.get_in(conn, client)
            before = await conn.scalar(
                select(detection_overrides.c.action).where(detection_overrides.c.client == client)
            )
            await conn.execute(_pin_statement(conn.dialect.name, client, pinned, note, now))
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
            level, quota_share = base.level, base.quota_share  # the detector's
            if pinned in OVERRIDES or before in OVERRIDES:
                level = self.policy.decide(client, base.risk, base.tier, pinned)
                quota_share = self.policy.action(level, base.tier).quota_share
            published = replace(
                base,
                level=level,
                quota_share=quota_share,
                shadow=shadowed(pinned, self.policy.config.shadow),
                probation=pinned == "probation",
                updated_at=now,
            )
            await state.publish_in(conn, [published])
            await state.audit_in(
                conn,
                client=client,
                entity=published.entity,
                previous=record.level if record else "normal",
                action=action,
                risk=base.risk,
                source="admin",
                shadow=False,
                reasons=[
                    {"code": "manual_override", "text": note or "set by an operator", "score": 1.0}
                ],
            )
        if self.shared is not None:
            try:
                await self.shared.publish([published])
            except REDIS_ERRORS as exc:
                log.error("admin: action of client %r saved but not shared: %s", client, exc)
                raise ServiceUnavailable(
                    "The action is saved but could not be shared with the other replicas "
                    "(Redis failed); send it again.",
                    code="shared_state_unavailable",
                ) from exc
        log.info("admin: detection action of client %r set to %s", client, action)
        return Pinned(override=pinned, level=level)

    async def cut(self, client: str, other: str, *, cut: bool, note: str) -> None:
        """Cut the link between two clients (never one entity again) or restore it; audited
        in the same write transaction, so no cut goes unaudited."""
        state = self.state
        async with transaction(state.engine, write=True) as conn:
            await state.set_cut_in(conn, client, other, cut=cut, note=note)
            record = await state.get_in(conn, client)
            await state.audit_in(
                conn,
                client=client,
                entity=record.entity if record else None,
                previous=record.level if record else "normal",
                action="cut_link" if cut else "restore_link",
                risk=record.risk if record else 0.0,
                source="admin",
                shadow=False,
                reasons=[{"code": "cut_link" if cut else "restore_link",
                          "text": f"link with {other}: {note or 'by an operator'}",
                          "score": 1.0}],
            )
        log.info("admin: link %r - %r %s", client, other, "cut" if cut else "restored")
