"""An operator's decisions about clients: pinned actions and cut links, each audited.

One code path for every surface an operator acts through (the admin API and the
console), so a block set in either is published, shared with the other replicas and
written to the audit log the same way.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from redis.exceptions import RedisError
from sqlalchemy import delete, text
from sqlalchemy.dialects import postgresql, sqlite

from modelfence.detect.actions import Level, Policy
from modelfence.detect.state import ClientRecord, RedisState, SqlState
from modelfence.errors import ServiceUnavailable
from modelfence.store import transaction
from modelfence.store.schema import detection_overrides

log = logging.getLogger(__name__)

OverrideAction = Literal["allow", "normal", "alert", "tighten", "degrade", "block", "clear"]
# First key of the (int, int) advisory locks pins take on PostgreSQL ("mfpn"); the
# single-bigint locks (the schema lock) live in another key space.
_PIN_LOCK_SPACE = 0x6D66_706E


def _lock_key(client: str) -> int:
    """The client's second advisory-lock key: a signed 32-bit hash of its name."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=4).digest(), signed=True)


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

        The current record is read, the pin written, the level it implies published and the
        decision audited in one write transaction, taken in turn by every pin of the client
        (SQLite's write lock; a PostgreSQL advisory lock keyed by the client): two pins at
        once both succeed, and the last one's pin is the one the published level follows.
        """
        state = self.state
        pinned = None if action == "clear" else action
        async with transaction(state.engine, write=True) as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:space, :key)"),
                    {"space": _PIN_LOCK_SPACE, "key": _lock_key(client)},
                )
            now = datetime.now(UTC)  # once the lock is ours: the last pin is the newest
            record = await state.get_in(conn, client)
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
            level = self.policy.decide(client, base.risk, base.tier, pinned)
            published = replace(
                base,
                level=level,
                quota_share=self.policy.action(level, base.tier).quota_share,
                shadow=base.shadow and pinned is None,
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
