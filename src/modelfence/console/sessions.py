"""Console sessions: random ids kept in the state database, bounded in number and in time.

A session id is 32 random bytes, given to the browser once in an HttpOnly cookie and
stored only as its HMAC-SHA256 keyed by the SHA-256 of the admin token (table
``console_sessions``), so neither a lookup's timing nor a copy of the table hands out a
live session, and a new admin token ends every session: a gateway (or a replica) with
another token finds none of the rows made under the old one. The CSRF token is not stored at all: it is
an HMAC keyed by the session id, so only the holder of the id can compute it, and the
table cannot give it back. Every login makes a new id (a cookie planted before the login
is never adopted). A session ends when unused for ``idle`` seconds, ``lifetime`` seconds
after its login, at logout, or when more than ``max_sessions`` logins push it out (oldest
first). Replicas that share the database share sessions: a login on one is good on all,
and a logout on one ends the session on all.

A page view reads one row and writes nothing, unless the session's idle clock was last
restarted ``touch_every`` seconds ago or more (30 s, or a quarter of ``idle`` if that is
shorter): so a session in use ends between ``idle - touch_every`` and ``idle`` seconds
after its last use, never later. Expired rows are deleted when a request finds one, and
all of them at every login. Database failures raise
:class:`~modelfence.errors.StoreError` (the guard answers 503), never "no session".
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.keyedhash import KeyedHash, hmac_sha256
from modelfence.store import transaction
from modelfence.store.schema import console_sessions

TOUCH_SECONDS = 30.0
_CSRF_LABEL = b"modelfence console csrf v1"


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in browser: its CSRF token, and when it began and was last seen (UTC)."""

    csrf: str
    created: datetime
    last_seen: datetime


def csrf_token(session_id: str) -> str:
    """The session's CSRF token: HMAC-SHA256 keyed by its id, 43 URL-safe characters.

    It appears in every form; it neither reveals the id (HMAC is one-way) nor can be
    computed from the stored digest of the id.
    """
    mac = hmac_sha256(session_id.encode(), _CSRF_LABEL)
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class SessionStore:
    """Sessions in the state database; ``clock`` is seconds since the epoch.

    Every replica judges a session by the times stored in its row, so replicas' clocks
    should agree (NTP): one running ahead by a minute ends sessions a minute early.

    Usage, as ``create_console`` and the guard do it::

        sessions = SessionStore(
            engine, secret=admin_token, idle=1800, lifetime=8 * 3600, max_sessions=100
        )
        session_id, session = await sessions.create(replacing=old_cookie_values)
        found = await sessions.live([cookie_value, ...])   # (id, Session) or None
        await sessions.end(session_id)
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        secret: str,
        idle: float,
        lifetime: float,
        max_sessions: int,
        touch_every: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        # Hashed first so that the key is fixed-size whatever the token's length.
        self._mac = KeyedHash(hashlib.sha256(secret.encode()).digest())
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self.touch_every = min(TOUCH_SECONDS, idle / 4) if touch_every is None else touch_every
        self._clock = clock

    def _digest(self, session_id: str) -> str:
        """What the table holds for ``session_id``: 64 hex digits, bound to the admin token."""
        return self._mac.digest(session_id.encode()).hex()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _expired(self, now: datetime) -> ColumnElement[bool]:
        table = console_sessions.c
        return or_(
            table.last_seen < now - timedelta(seconds=self.idle),
            table.created_at < now - timedelta(seconds=self.lifetime),
        )

    async def create(self, *, replacing: Iterable[str] = ()) -> tuple[str, Session]:
        """A new session and the id to give the browser (the only time it exists in full).

        The sessions ``replacing`` names (what the browser brought) end in the same
        transaction; expired sessions are deleted, and the oldest past ``max_sessions``.
        """
        now = self._now()
        session_id = secrets.token_urlsafe(32)
        table = console_sessions
        ended = [self._digest(old) for old in replacing]
        async with transaction(self.engine, write=True) as conn:
            if ended:
                await conn.execute(delete(table).where(table.c.id_hash.in_(ended)))
            await conn.execute(delete(table).where(self._expired(now)))
            digest = self._digest(session_id)
            await conn.execute(table.insert().values(id_hash=digest, created_at=now, last_seen=now))
            # The new session stays, whatever the clocks say; of the others, the newest
            # max_sessions - 1 do.
            kept = (
                select(table.c.id_hash)
                .where(table.c.id_hash != digest)
                .order_by(table.c.created_at.desc(), table.c.id_hash)
                .limit(self.max_sessions - 1)
            )
            await conn.execute(
                delete(table).where(table.c.id_hash != digest, table.c.id_hash.not_in(kept))
            )
        return session_id, Session(csrf_token(session_id), now, now)

    async def live(self, session_ids: Sequence[str]) -> tuple[str, Session] | None:
        """The first of ``session_ids`` that names a live session, with it; else None.

        One read for all of them; a write only to delete expired ones or to restart the
        idle clock (at most once per ``touch_every`` seconds per session).
        """
        if not session_ids:
            return None
        table = console_sessions
        async with transaction(self.engine) as conn:
            query = select(table).where(table.c.id_hash.in_({self._digest(v) for v in session_ids}))
            rows = {row.id_hash: row for row in (await conn.execute(query)).all()}
        now = self._now()
        dead = [digest for digest, row in rows.items() if self._ended(row, now)]
        live = (value for value in session_ids if self._digest(value) in rows)
        chosen = next((value for value in live if self._digest(value) not in dead), None)
        row = None if chosen is None else rows[self._digest(chosen)]
        touch = row is not None and (now - row.last_seen).total_seconds() >= self.touch_every
        if dead or touch:
            async with transaction(self.engine, write=True) as conn:
                if dead:
                    await conn.execute(delete(table).where(table.c.id_hash.in_(dead)))
                if row is not None and touch:
                    # Never backwards, should another replica's clock run behind this one's.
                    await conn.execute(
                        update(table)
                        .where(table.c.id_hash == row.id_hash, table.c.last_seen < now)
                        .values(last_seen=now)
                    )
        if chosen is None or row is None:
            return None
        return chosen, Session(csrf_token(chosen), row.created_at, now if touch else row.last_seen)

    def _ended(self, row: Row[Any], now: datetime) -> bool:
        last_seen: datetime = row.last_seen
        created: datetime = row.created_at
        return (now - last_seen).total_seconds() > self.idle or (
            (now - created).total_seconds() > self.lifetime
        )

    async def get(self, session_id: str) -> Session | None:
        """The live session of ``session_id``, or None (see :meth:`live`)."""
        found = await self.live([session_id])
        return None if found is None else found[1]

    async def end(self, session_id: str) -> None:
        """End the session on every replica (logout)."""
        table = console_sessions
        async with transaction(self.engine, write=True) as conn:
            await conn.execute(delete(table).where(table.c.id_hash == self._digest(session_id)))

    async def count(self) -> int:
        """Sessions stored, expired ones not yet deleted included."""
        async with transaction(self.engine) as conn:
            query = select(func.count()).select_from(console_sessions)
            return int((await conn.execute(query)).scalar_one())
