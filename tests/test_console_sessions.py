"""Console sessions in the state database, on SQLite and PostgreSQL: ids are random and new
at each login, nothing stored gives a session or its CSRF token back, sessions end when
they should (idle, absolute, logout, pushed out), expired rows are deleted, the idle clock
is written at most every ``touch_every`` seconds, and two stores on one database (two
replicas) share every session; then two real gateways on one PostgreSQL, and its outage."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.console.sessions import SessionStore, csrf_token
from modelfence.errors import StoreError
from modelfence.store import create_tables, open_engine, transaction
from modelfence.store.schema import console_sessions

from .conftest import GatewayFactory
from .console_client import ConsoleClient, location
from .services import private_postgres
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

TOKEN = "console-sessions-admin-token"


def stored_digest(session_id: str, token: str = TOKEN) -> str:
    """What the table should hold for a session id: HMAC-SHA256 keyed by SHA-256(token)."""
    key = hashlib.sha256(token.encode()).digest()
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


async def rows(engine: AsyncEngine) -> list[tuple[str, float, float]]:
    async with transaction(engine) as conn:
        result = await conn.execute(select(console_sessions))
        return [(r.id_hash, r.created_at.timestamp(), r.last_seen.timestamp()) for r in result]


async def test_sessions_end_when_idle_when_old_at_logout_and_when_pushed_out(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    store = SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=2, clock=clock)
    first, session = await store.create()
    assert len(first) >= 43 and len(session.csrf) >= 43 and session.csrf == csrf_token(first)
    assert await store.get(first) == session
    for _ in range(2):
        clock.now += 59
        assert await store.get(first) is not None  # used: the idle clock restarts
    clock.now += 61
    assert await store.get(first) is None  # idle too long
    assert await rows(engine) == []  # and its row is gone

    kept, _ = await store.create()
    for _ in range(6):
        clock.now += 50
        assert await store.get(kept) is not None
    clock.now += 50
    assert await store.get(kept) is None  # 350 s after its login: past the lifetime, however used

    a, _ = await store.create()
    clock.now += 1
    b, _ = await store.create()
    clock.now += 1
    c, _ = await store.create()
    assert await store.get(a) is None  # the oldest, pushed out by the third login
    assert await store.get(b) is not None and await store.get(c) is not None
    await store.end(b)
    assert await store.get(b) is None and await store.count() == 1
    assert await store.get("not-an-id") is None and await store.live([]) is None


async def test_nothing_stored_gives_back_a_session_or_its_csrf_token(engine: AsyncEngine) -> None:
    store = SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=1000)
    made = [await store.create() for _ in range(50)]
    assert len({sid for sid, _ in made}) == 50
    assert len({s.csrf for _, s in made}) == 50
    assert not {sid for sid, _ in made} & {s.csrf for _, s in made}
    stored = {digest for digest, _, _ in await rows(engine)}
    assert stored == {stored_digest(sid) for sid, _ in made}
    assert not stored & {hashlib.sha256(sid.encode()).hexdigest() for sid, _ in made}
    for sid, session in made:
        # The table holds a digest of each id: neither the id, nor its CSRF token, nor a
        # digest of the token.
        assert sid not in stored and session.csrf not in stored
        assert hashlib.sha256(session.csrf.encode()).hexdigest() not in stored
    # A stored digest used as a cookie is no session.
    assert await store.live(sorted(stored)[:16]) is None


async def test_a_login_ends_what_the_browser_brought_and_sweeps_expired_rows(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    store = SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=100, clock=clock)
    stale = [(await store.create())[0] for _ in range(5)]
    clock.now += 30
    planted, _ = await store.create()
    clock.now += 40  # the first five are idle for 70 s now; nobody asks for them
    assert await store.count() == 6
    fresh, _ = await store.create(replacing=[planted, "junk"])
    assert await store.get(planted) is None
    assert [digest for digest, _, _ in await rows(engine)] == [stored_digest(fresh)]
    for old in stale:
        assert await store.get(old) is None


async def test_page_views_write_the_idle_clock_at_most_every_touch_interval(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    store = SessionStore(
        engine, secret=TOKEN, idle=1800, lifetime=8 * 3600, max_sessions=10, clock=clock
    )
    assert store.touch_every == 30
    sid, _ = await store.create()
    login = clock.now
    for _ in range(29):
        clock.now += 1
        assert await store.get(sid) is not None
    assert [seen for _, _, seen in await rows(engine)] == [login]  # 29 views, no write
    clock.now += 1
    assert await store.get(sid) is not None
    assert [seen for _, _, seen in await rows(engine)] == [login + 30]  # one write at 30 s
    clock.now += 10
    assert (await store.get(sid)).last_seen.timestamp() == login + 30  # type: ignore[union-attr]
    assert [seen for _, _, seen in await rows(engine)] == [login + 30]
    # A short idle limit writes more often, so a session in use never lapses.
    quick = SessionStore(engine, secret=TOKEN, idle=1.2, lifetime=60, max_sessions=10, clock=clock)
    assert quick.touch_every == pytest.approx(0.3)
    sid, _ = await quick.create()
    for _ in range(20):
        clock.now += 0.5
        assert await quick.get(sid) is not None


async def test_two_stores_on_one_database_share_logins_and_logouts(engine: AsyncEngine) -> None:
    clock = Clock()
    one, two = (
        SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=3, clock=clock)
        for _ in range(2)
    )
    sid, session = await one.create()
    assert await two.get(sid) == session  # logged in on one, good on the other
    clock.now += 45
    assert await two.get(sid) is not None  # the other restarts the idle clock ...
    clock.now += 45
    assert await one.get(sid) is not None  # ... which the first sees
    await two.end(sid)
    assert await one.get(sid) is None  # logged out on the other: over here too
    made = []
    for store in (one, two, one, two):
        clock.now += 1
        made.append((await store.create())[0])
    assert await one.get(made[0]) is None  # the bound counts every replica's logins
    for later in made[1:]:
        assert await two.get(later) is not None


async def test_a_store_with_another_admin_token_finds_no_session(engine: AsyncEngine) -> None:
    clock = Clock()
    old = SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=10, clock=clock)
    rotated = SessionStore(
        engine, secret=TOKEN + "-rotated", idle=60, lifetime=300, max_sessions=10, clock=clock
    )
    sid, _ = await old.create()
    assert await rotated.get(sid) is None and await rotated.live([sid]) is None
    await rotated.end(sid)  # nor can it end the old token's session ...
    assert await old.get(sid) is not None  # ... which the old token still finds


async def test_a_database_made_before_gains_the_sessions_table_at_start_up(
    engine: AsyncEngine,
) -> None:
    async with transaction(engine, write=True) as conn:
        await conn.run_sync(lambda sync: console_sessions.drop(sync))
    await create_tables(engine)  # what every gateway runs at start-up
    store = SessionStore(engine, secret=TOKEN, idle=60, lifetime=300, max_sessions=10)
    sid, _ = await store.create()
    assert await store.get(sid) is not None


async def test_a_database_that_fails_raises_instead_of_saying_no_session(tmp_path: Path) -> None:
    unreachable = open_engine(f"sqlite:///{tmp_path / 'missing' / 'state.db'}")
    store = SessionStore(unreachable, secret=TOKEN, idle=60, lifetime=300, max_sessions=10)
    try:
        for call in (store.live(["x"]), store.create(), store.end("x")):
            with pytest.raises(StoreError):
                await call
    finally:
        await unreachable.dispose()


@pytest.mark.postgres
def test_two_gateways_on_one_postgresql_share_logins_logouts_and_outages(
    start_gateway: GatewayFactory,
) -> None:
    """Log in on one replica, use the cookie on the other, log out there and be refused on
    the first; with the database down, every page is a 503 page (not the login form), and
    the session outlives the outage. A private cluster: stopping it touches nobody else."""
    with private_postgres() as pg:
        first, second = (
            start_gateway(name=f"replica{i}", store=pg.url, detection={"enabled": False})
            for i in range(2)
        )
        on_first, on_second = ConsoleClient(first), ConsoleClient(second)
        try:
            assert location(on_first.get("/")) == "/console/login"
            assert location(on_first.login()) == "/console/"
            cookie = on_first.session_cookie()
            assert cookie is not None
            on_second.plant(cookie)  # the load balancer sends the next request elsewhere
            assert on_second.get("/clients").status_code == 200
            assert on_second.csrf() == on_first.csrf()  # one session, one token
            assert location(on_second.post("/logout", {})) == "/console/login"
            assert location(on_first.get("/")) == "/console/login"  # ended on every replica

            assert location(on_first.login()) == "/console/"
            on_second.plant(on_first.session_cookie() or "")
            pg.stop("fast")
            for browser in (on_first, on_second):
                down = browser.get("/clients")
                assert down.status_code == 503, down.text[:300]
                assert "state database" in down.text and down.headers["retry-after"] == "5"
                assert "postgres" not in down.text.lower()  # nothing of the failure leaks
                assert down.headers["x-frame-options"] == "DENY"
            refused = ConsoleClient(second)
            try:
                login = refused.login()
                assert login.status_code == 503 and "state database" in login.text
                assert "set-cookie" not in login.headers
            finally:
                refused.close()
            pg.start()
            deadline = time.monotonic() + 20
            statuses: list[int] = []
            while time.monotonic() < deadline and statuses[-1:] != [200]:
                statuses.append(on_second.get("/").status_code)
                time.sleep(0.2)
            assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
        finally:
            on_first.close()
            on_second.close()


def test_a_restart_keeps_sessions_and_a_new_admin_token_ends_them(
    start_gateway: GatewayFactory,
) -> None:
    """One state database, three gateways in turn: the same admin token after a restart
    finds the session; a rotated token sends the old cookie to the login form."""
    gateway = start_gateway(name="before", detection={"enabled": False})
    browser = ConsoleClient(gateway)
    try:
        assert location(browser.login()) == "/console/"
        cookie = browser.session_cookie()
        assert cookie is not None
    finally:
        browser.close()
    gateway.stop()
    for name, token, page in (
        ("restarted", gateway.admin_token, None),
        ("rotated", "a-new-admin-token-0123456789", "/console/login"),
    ):
        again = start_gateway(name=name, admin_token=token, detection={"enabled": False})
        browser = ConsoleClient(again)
        try:
            browser.plant(cookie)
            answer = browser.get("/clients")
            if page is None:
                assert answer.status_code == 200, answer.text[:300]
            else:
                assert location(answer) == page
                assert location(browser.login()) == "/console/"  # the new token logs in
        finally:
            browser.close()
        again.stop()
