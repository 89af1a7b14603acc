"""Console sessions: ids are random and new at each login, and sessions end when they should."""

from __future__ import annotations

from modelfence.console.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_end_when_idle_when_old_at_logout_and_when_pushed_out() -> None:
    clock = Clock()
    store = SessionStore(idle=60, lifetime=300, max_sessions=2, clock=clock)
    first, session = store.create()
    assert store.get(first) is session and len(first) >= 43 and len(session.csrf) >= 43
    clock.now += 59
    assert store.get(first) is session  # used: the idle clock restarts
    clock.now += 59
    assert store.get(first) is session
    clock.now += 61
    assert store.get(first) is None  # idle too long

    kept, _ = store.create()
    for _ in range(6):
        clock.now += 50
        assert store.get(kept) is not None
    clock.now += 50
    assert store.get(kept) is None  # 350 s after its login: past the lifetime, however used

    a, _ = store.create()
    b, _ = store.create()
    c, _ = store.create()
    assert store.get(a) is None and store.get(b) is not None and store.get(c) is not None
    store.end(b)
    assert store.get(b) is None and len(store) == 1
    assert store.get("not-an-id") is None


def test_every_session_has_its_own_id_and_csrf_token() -> None:
    store = SessionStore(idle=60, lifetime=300, max_sessions=1000)
    made = [store.create() for _ in range(200)]
    assert len({sid for sid, _ in made}) == 200
    assert len({s.csrf for _, s in made}) == 200
    assert not {sid for sid, _ in made} & {s.csrf for _, s in made}
