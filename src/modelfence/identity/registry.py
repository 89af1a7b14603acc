"""The hot-path authenticator: API key -> record, from memory, in a few microseconds.

Wiring (``app.py``)::

    registry = KeyRegistry(store, secret, on_refresh_error=lambda exc: metrics.key_refresh_errors.inc())
    await registry.start()          # at start-up
    record = await registry.authenticate(api_key)   # per request
    await registry.stop()           # at shutdown

Known keys never reach the database: the key's HMAC is looked up in a dict. A key seen for
the first time costs one store lookup, shared by concurrent requests carrying it; unknown
keys are remembered briefly, so a flood of bad keys cannot hammer the database. A flood of
*different* made-up keys is stopped by the key index (``key_index.py``, a Bloom filter of
every issued key, kept by the same polls): a key in no index is looked up only within a
budget of ``unindexed_lookups_per_second`` (a key created since the last poll is one of
them, for at most ``poll_interval``); past it, it is refused (the gateway answers 503 with
``Retry-After``) and counted. A
background task polls :meth:`KeyStore.changed_since` so that revocations and overrides made
by any process (another replica, the CLI) reach every replica within about a second.
The accounts of cached keys are cached and refreshed the same way (:meth:`account`), and
every account's sign-up is shown to the sign-up surge watch (``signups.py``), the first
poll reaching back as far as its baseline reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from modelfence.errors import AccountNotFound, KeyLookupDeferred
from modelfence.identity.base import AccountRecord, ApiKeyRecord, KeyStore
from modelfence.identity.key_index import KeyIndex
from modelfence.identity.keys import looks_like_api_key
from modelfence.identity.secret import ServerSecret
from modelfence.identity.signups import SignupWatch
from modelfence.limits.gcra import Rate, admit
from modelfence.periodic import Periodic

log = logging.getLogger(__name__)


class _ExpiringSet:
    """Bounded set whose members expire: the least recently added go first when full."""

    def __init__(self, max_size: int, ttl: float) -> None:
        self._max_size = max_size
        self._ttl = ttl
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def add(self, member: str, now: float) -> None:
        self._expiry[member] = now + self._ttl
        self._expiry.move_to_end(member)
        if len(self._expiry) > self._max_size:
            self._expiry.popitem(last=False)

    def contains(self, member: str, now: float) -> bool:
        expiry = self._expiry.get(member)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[member]
            return False
        return True


class _Budget:
    """``rate`` units a second, ``rate`` at once: the limits' GCRA, on a clock that never
    goes back (one stepped back neither refills the budget nor drains it)."""

    def __init__(self, rate: float) -> None:
        self._rate = Rate(rate, period=1.0)
        self._tat = 0.0
        self._latest = 0.0

    def take(self, now: float) -> bool:
        self._latest = max(self._latest, now)
        verdict = admit(self._rate, self._tat, self._latest)
        if verdict.allowed:
            self._tat = verdict.tat
        return verdict.allowed


class KeyRegistry:
    """Authenticates API keys from a cache kept in step with a :class:`KeyStore`.

    ``clock`` (seconds since the epoch) drives the negative cache and the poll window;
    unknown keys are remembered for ``negative_ttl`` seconds, at most ``negative_max_size``
    of them (a new key is random, so nobody can have tried it before it was created);
    the poll window reaches ``overlap`` seconds back past the previous poll, so changes
    whose ``updated_at`` was stamped by a slightly slow clock, or committed late, are
    still seen. ``refresh_errors`` counts failed polls; ``on_refresh_error`` is called
    with each failure (a metrics hook). Meanwhile cached keys keep being served. Until the
    first poll has built the key index, every unknown key is looked up as before;
    ``on_lookup_refused`` is called for each key refused without one (a metrics hook).
    ``signups``: the watch every polled account's sign-up time is shown to.
    """

    def __init__(
        self,
        store: KeyStore,
        secret: ServerSecret,
        *,
        poll_interval: float = 0.5,
        overlap: float = 5.0,
        negative_ttl: float = 300.0,
        negative_max_size: int = 10_000,
        unindexed_lookups_per_second: float = 50.0,
        clock: Callable[[], float] = time.time,
        on_refresh_error: Callable[[Exception], None] | None = None,
        on_lookup_refused: Callable[[], None] | None = None,
        signups: SignupWatch | None = None,
    ) -> None:
        self._store = store
        self._signups = signups
        self._secret = secret
        self._poll_interval = poll_interval
        self._overlap = overlap
        self._clock = clock
        self._on_refresh_error = on_refresh_error
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self._hash_by_id: dict[str, str] = {}
        self._accounts: dict[str, AccountRecord] = {}
        self._unknown = _ExpiringSet(negative_max_size, negative_ttl)
        self._index: KeyIndex | None = None  # built by the first refresh
        self._unindexed = _Budget(unindexed_lookups_per_second)
        self._on_lookup_refused = on_lookup_refused
        self._lookups: dict[str, asyncio.Task[ApiKeyRecord | None]] = {}
        self._synced_at = clock()
        self._poller = Periodic(
            "key-refresh", self.refresh, interval=poll_interval, on_error=self._refresh_failed
        )

    def cached(self, api_key: str) -> ApiKeyRecord | None:
        """The record of ``api_key`` if this replica already knows it; never touches the store."""
        if not looks_like_api_key(api_key):
            return None
        return self._by_hash.get(self._secret.hash_api_key(api_key))

    def account(self, account_id: str) -> AccountRecord | None:
        """The account of a cached key, from memory (the identity layer's ``AccountLookup``)."""
        return self._accounts.get(account_id)

    def lookup_pending(self, api_key: str) -> bool:
        """Whether a store lookup of ``api_key`` is already in flight (a caller would join it)."""
        return looks_like_api_key(api_key) and self._secret.hash_api_key(api_key) in self._lookups

    async def authenticate(self, api_key: str) -> ApiKeyRecord | None:
        """The record of ``api_key`` (revoked ones included: check ``.active``), or None.

        Raises :class:`~modelfence.errors.StoreError` only for a key not yet cached while
        the store is down, and :class:`~modelfence.errors.KeyLookupDeferred` for a key in
        no key index while the budget of their lookups is spent: the caller should answer
        503 (retry), not 401, since the key may be good.
        """
        if not looks_like_api_key(api_key):
            return None
        # A dict lookup by HMAC is safe from timing attacks: the attacker cannot steer the
        # hash, so how long the lookup takes says nothing about any stored key.
        key_hash = self._secret.hash_api_key(api_key)
        record = self._by_hash.get(key_hash)
        if record is not None:
            return record
        now = self._clock()
        if self._unknown.contains(key_hash, now):
            return None
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            if (
                self._index is not None
                and key_hash not in self._index
                and not self._unindexed.take(now)
            ):
                if self._on_lookup_refused is not None:
                    self._on_lookup_refused()
                raise KeyLookupDeferred(
                    "too many keys this replica has not indexed yet (made-up keys, or one "
                    "created in the last second) are being looked up; retry in a second"
                )
            lookup = asyncio.create_task(self._look_up(api_key, key_hash))
            self._lookups[key_hash] = lookup
            lookup.add_done_callback(partial(self._lookup_done, key_hash))
        # Shielded: one caller giving up (client gone) must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    def _lookup_done(self, key_hash: str, lookup: asyncio.Task[ApiKeyRecord | None]) -> None:
        del self._lookups[key_hash]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here: if every caller gave up, nobody else will

    async def _look_up(self, api_key: str, key_hash: str) -> ApiKeyRecord | None:
        record = await self._store.find_by_secret(api_key)
        if record is None:
            self._unknown.add(key_hash, self._clock())
        else:
            await self._load_account(record)
            self._by_hash[key_hash] = record
            self._hash_by_id[record.key_id] = key_hash
        return record

    async def _load_account(self, record: ApiKeyRecord) -> None:
        if record.account is None or record.account in self._accounts:
            return
        try:
            self._accounts[record.account] = await self._store.get_account(record.account)
        except AccountNotFound:  # a key created before its account row: judged as new
            log.warning("key %s names account %r, which is not registered",
                        record.key_id, record.account)

    async def refresh(self) -> None:
        """Apply changes made anywhere since the last refresh to the cached records.

        Raises :class:`~modelfence.errors.StoreError`; the next refresh covers the gap.
        """
        started = self._clock()
        since = datetime.fromtimestamp(self._synced_at - self._overlap, UTC)
        if self._index is None or self._index.full:
            self._index = KeyIndex.of(await self._store.key_hashes())
        else:
            for key_hash in await self._store.key_hashes(since):
                self._index.add(key_hash)
        for record in await self._store.changed_since(since):
            key_hash = self._hash_by_id.get(record.key_id)
            if key_hash is not None:  # keys nobody used here are looked up when first used
                await self._load_account(record)
                self._by_hash[key_hash] = record
        reach = None
        if self._signups is not None and self._signups.known_since is None:
            # The first poll reaches back as far as the surge baseline reads.
            reach = started - self._signups.history_seconds
            since = min(since, datetime.fromtimestamp(reach, UTC))
        changed = await self._store.accounts_changed_since(since)
        for account in changed:
            if account.account_id in self._accounts:
                self._accounts[account.account_id] = account
        if self._signups is not None:
            # A sign-up dated in the future counts as now; the tests run off the event loop.
            signups = [(a.account_id, min(a.created_at.timestamp(), started)) for a in changed]
            await asyncio.to_thread(self._signups.observe_many, signups)
            if reach is not None:  # only once the week was read: a failed poll reads it again
                self._signups.known_since = reach
        self._synced_at = started

    async def start(self) -> None:
        """Start polling the store in the background (idempotent)."""
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    @property
    def refresh_errors(self) -> int:
        return self._poller.errors

    def _refresh_failed(self, _task: str, exc: Exception) -> None:
        # Any error, not only StoreError, is retried (with back-off) and counted: if the
        # loop died, revocations would silently stop reaching this replica.
        if self._on_refresh_error is not None:
            self._on_refresh_error(exc)
