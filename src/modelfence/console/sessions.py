"""Console sessions: random ids kept server-side, bounded in number and in time.

A session id is 32 random bytes, given to the browser once in an HttpOnly cookie and
kept here only as its SHA-256, so neither a lookup's timing nor a memory dump of this
table hands out a live session. Every login makes a new id (a cookie planted before the
login is never adopted). A session ends when unused for ``idle`` seconds, ``lifetime``
seconds after its login, at logout, or when more than ``max_sessions`` logins push it
out (oldest first). Per process: a restart, or another replica, asks for a new login.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Session:
    """One logged-in browser: its CSRF token and when it ends."""

    csrf: str
    created: float
    last_seen: float


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    """Sessions by the digest of their id; ``clock`` is monotonic seconds."""

    def __init__(
        self,
        *,
        idle: float,
        lifetime: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()  # oldest login first

    def create(self) -> tuple[str, Session]:
        """A new session and the id to give the browser (the only time it exists in full)."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        self._sessions[_digest(session_id)] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """The live session of ``session_id`` (its idle clock restarted), or None."""
        digest = _digest(session_id)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.idle or now - session.created > self.lifetime:
            del self._sessions[digest]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(_digest(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)
