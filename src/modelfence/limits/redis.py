"""Limits shared by every replica through Redis: one Lua call per admission, one per settle.

The scripts (``lua/admit.lua``, ``lua/settle.lua``) are shipped in the package and
registered once, when the backend is built; the client sends ``EVALSHA`` and reloads a
script the server has forgotten (``NOSCRIPT``, e.g. after a restart). One server is reached
over one pipelined connection (:mod:`modelfence.fastredis`: the scripts of many requests
share each round trip, at a fraction of redis-py's CPU per call); a cluster through
redis-py. Time comes from Redis ``TIME`` inside the script, so replicas with skewed clocks
still agree.

Keys (parts percent-escaped, so no two subjects share a name and none breaks a hash tag)::

    mf:{k:<key id>}:requests | :tokens      GCRA TAT, PX = until the bucket is full again
    mf:{k:<key id>}:leases                  ZSET lease id -> expiry, PX = lease TTL
    mf:{k:<key id>}:usd                     HASH {day, spent micro-dollars}, EX = 2 days
    mf:{k:<key id>}:abandoned:<lease id>    marker of an undone admission, PX = lease TTL
    mf:{ip:<prefix>}:ip_prefix              GCRA TAT of one client IP prefix
    mf:{fp:<digest>}:fingerprint            GCRA TAT of one client fingerprint
    mf:{a:<account>}:allowance              HASH r:<day> = rows, t:<day> = tokens of one
                                            account, EX = 31 days from the last write

Every key expires by itself. The only scan is an account's own fields, once it holds more
than 64 (the window needs 60): days that have left the window are dropped then. On Redis
Cluster all keys of one API key share a slot through the ``{k:...}`` tag, but the IP-prefix,
fingerprint and account keys carry their own tags. An admission that charges an account
allowance touches the account's hash and the key's keys in one script, so on a cluster
(``redis+cluster://``) the keys of a key that belongs to an account take the account's tag
instead, ``mf:{a:<account>}:k:<key id>:requests``, whether or not this admission charges
an allowance (the lease carries that tag, :attr:`Lease.key_account`): a key's counters
never move when its account's allowance switches on or off. Keys without an account keep
``{k:...}``, also when an operator's probation charges them an allowance of their
client's own (:attr:`AdmissionRequest.account` is then not the key's account): on a
cluster that allowance lives in the key's slot, ``mf:{k:<key id>}:allowance``, one per key.
One slot per account, the masters still share the load, and one server keeps the names
above. IP-prefix and fingerprint buckets are shared
by many keys and accounts, so no tag can join them; the configuration refuses
``per_ip_prefix`` and ``per_fingerprint`` with a cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib.resources import files
from typing import Any, cast
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from modelfence.config import LimitsConfig
from modelfence.errors import LimitBackendError
from modelfence.fastredis import PipelinedRedis, Script, supported
from modelfence.limits.base import (
    ALLOWANCE_WINDOW_DAYS,
    AccountUsage,
    AdmissionRequest,
    Decision,
    Dimension,
    Lease,
)
from modelfence.limits.dimensions import (
    DAY_SECONDS,
    LEASE_RETRY_SECONDS,
    RateCheck,
    abandoned_lease,
    allowance_checks,
    decide,
    lease_for,
    lease_id_of,
    micro_usd,
    rate_checks,
    settle_check,
    utc_day,
)
from modelfence.limits.gcra import SLACK_SECONDS
from modelfence.redisconn import REDIS_ERRORS, connect, is_cluster

NO_LIMIT = -1  # how the scripts are told a dimension is unlimited
ACCOUNT_TTL_SECONDS = (ALLOWANCE_WINDOW_DAYS + 1) * DAY_SECONDS  # outlives the window
ACCOUNT_MAX_FIELDS = 64  # two per day in the window, and a few days' slack before pruning


@lru_cache(maxsize=65_536)  # API keys, accounts, networks: a request names a few, seen before
def _tag(namespace: str, scope: str, subject: str) -> str:
    """``namespace:{scope:subject}``, the subject escaped: the hash tag of its keys."""
    return f"{namespace}:{{{scope}:{quote(subject, safe='')}}}"


def _script(name: str) -> str:
    return (files("modelfence.limits") / "lua" / name).read_text(encoding="utf-8")


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except REDIS_ERRORS as exc:
        raise LimitBackendError(f"Redis {action} failed: {exc}") from exc


class RedisBackend:
    """:class:`~modelfence.limits.base.LimitBackend` on Redis, safe across replicas.

    ``client`` must decode responses (``decode_responses=True``); :meth:`from_url` makes one:
    a :class:`~modelfence.fastredis.PipelinedRedis` for one server, redis-py for a cluster.
    """

    settles_at_once = False  # a round trip: settles are shielded in a task

    def __init__(
        self,
        client: Redis | RedisCluster | PipelinedRedis,
        *,
        lease_ttl_seconds: float = 900.0,
        namespace: str = "mf",
    ) -> None:
        self._client = client
        self._cluster = is_cluster(client)
        self._lease_ttl = lease_ttl_seconds
        self._namespace = quote(namespace, safe="")
        self._admit: AsyncScript | Script = client.register_script(_script("admit.lua"))
        self._settle: AsyncScript | Script = client.register_script(_script("settle.lua"))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_seconds: float = 0.25,
        lease_ttl_seconds: float = 900.0,
        namespace: str = "mf",
        max_connections: int = 64,
    ) -> RedisBackend:
        """A backend with its own connection(s); every call gives up after the timeout.

        One server is reached over one pipelined connection (:mod:`modelfence.fastredis`);
        a cluster, or a URL with options, through redis-py (:func:`modelfence.redisconn.
        connect`, at most ``max_connections`` per node).
        """
        client: Redis | RedisCluster | PipelinedRedis
        if supported(url):
            client = PipelinedRedis(url, timeout_seconds=timeout_seconds)
        else:
            client = connect(
                url, timeout_seconds=timeout_seconds, decode_responses=True,
                max_connections=max_connections,
            )
        return cls(client, lease_ttl_seconds=lease_ttl_seconds, namespace=namespace)

    @classmethod
    def from_config(cls, config: LimitsConfig) -> RedisBackend:
        return cls.from_url(
            config.backend,
            timeout_seconds=config.redis_timeout_seconds,
            lease_ttl_seconds=config.lease_ttl_seconds,
        )

    def key(self, scope: str, subject: str, name: str) -> str:
        """The Redis key of ``name`` for ``subject``; ``{scope:subject}`` is the hash tag."""
        return f"{_tag(self._namespace, scope, subject)}:{name}"

    async def admit(self, request: AdmissionRequest) -> Decision:
        quota, key_id = request.quota, request.key_id
        checks = rate_checks(request)
        windows = allowance_checks(request)
        account = request.account if windows else None
        lease_id = lease_id_of(request)
        home = request.key_account  # where a cluster keeps the key's counters, charged or not
        keys = [
            self._own(key_id, home, "leases"),
            self._own(key_id, home, "usd"),
            self._marker(key_id, home, lease_id),
            *(self._rate(check, home) for check in checks),
        ]
        if account is not None:
            keys.append(self._allowance(key_id, account, home))
        args: list[str | int | float] = [
            SLACK_SECONDS,
            lease_id,
            self._lease_ttl,
            NO_LIMIT if quota.concurrent_requests is None else quota.concurrent_requests,
            NO_LIMIT if quota.usd_per_day is None else micro_usd(quota.usd_per_day),
            micro_usd(request.usd),
            LEASE_RETRY_SECONDS,
            DAY_SECONDS,
            len(windows),
            request.rows,
            request.tokens,
            ALLOWANCE_WINDOW_DAYS,
            ACCOUNT_TTL_SECONDS,
            ACCOUNT_MAX_FIELDS,
        ]
        for check in checks:
            args += [check.dimension, check.rate.interval, check.rate.tolerance, check.cost]
        for window in windows:
            args += [window.dimension, window.days, window.limit]
        allowed, denied, retry_after, day, *rest = await self._run(self._admit, keys, args)
        usage = None if account is None else AccountUsage(*(int(float(n)) for n in rest[:4]))
        states = rest[4:]
        outcomes = [(int(float(states[i])), float(states[i + 1])) for i in range(0, len(states), 2)]
        if not allowed:
            denial = (cast(Dimension, denied), float(retry_after))
            return decide(checks, outcomes, [denial], account=usage)
        lease = lease_for(request, lease_id, int(day))
        return decide(checks, outcomes, [], lease, usage)

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Apply real usage and free the slot; a settled or expired lease is ignored."""
        await self._release(lease, tokens_used, usd_used, lease.rows_reserved, marker_ms=0)

    async def abandon(self, request: AdmissionRequest) -> None:
        """Settle the lease to no usage, rows included, if the admission ran; else mark it
        so it never does.

        Safe to repeat, and safe whichever of this and a late admission Redis runs first.
        """
        lease = abandoned_lease(request, utc_day(time.time()))
        await self._release(lease, 0, 0.0, 0, marker_ms=math.ceil(self._lease_ttl * 1000))

    async def _release(
        self, lease: Lease, tokens_used: int, usd_used: float, rows_used: int, *, marker_ms: int
    ) -> None:
        home = lease.key_account
        keys = [
            self._own(lease.key_id, home, "leases"),
            self._own(lease.key_id, home, "usd"),
            self._marker(lease.key_id, home, lease.lease_id),
        ]
        usd_delta = micro_usd(usd_used) - micro_usd(lease.usd_reserved)
        args: list[str | int | float] = [
            lease.lease_id,
            lease.day,
            "" if lease.quota.usd_per_day is None else usd_delta,
            marker_ms,
        ]
        check = settle_check(lease, tokens_used)
        if check is None:
            args += ["", 0]
        else:
            keys.append(self._rate(check, home))
            args += [check.rate.interval, check.cost]
        if lease.account is None:
            args += ["", 0]
        else:
            keys.append(self._allowance(lease.key_id, lease.account, home))
            args += [rows_used - lease.rows_reserved, tokens_used - lease.tokens_reserved]
        args += [ALLOWANCE_WINDOW_DAYS, DAY_SECONDS, ACCOUNT_TTL_SECONDS]
        await self._run(self._settle, keys, args)

    def _own(self, key_id: str, account: str | None, name: str) -> str:
        """A key of API key ``key_id``; on a cluster, in the slot of its ``account``, whose
        allowance the same script may charge. Tagged by the account whether or not an
        allowance is charged this time, so a trust change (probation ending, a demotion, an
        operator's pin) never moves the key to fresh buckets, dollars or leases."""
        if self._cluster and account is not None:
            return self.key("a", account, f"k:{quote(key_id, safe='')}:{name}")
        return self.key("k", key_id, name)

    def _rate(self, check: RateCheck, account: str | None) -> str:
        if check.scope == "k":
            return self._own(check.subject, account, check.dimension)
        return self.key(check.scope, check.subject, check.dimension)

    def _marker(self, key_id: str, account: str | None, lease_id: str) -> str:
        return self._own(key_id, account, f"abandoned:{quote(lease_id, safe='')}")

    def _allowance(self, key_id: str, account: str, home: str | None) -> str:
        """The hash of the allowance ``account`` names; on a cluster, one that is not the
        key's own account's (``home``) lives in the key's slot, beside the key's counters
        the same script touches."""
        if self._cluster and account != home:
            return self._own(key_id, home, "allowance")
        return self.key("a", account, "allowance")

    async def ping(self) -> None:
        with _translated("PING"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    async def _run(
        script: AsyncScript | Script, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        with _translated("limit script"):
            return await script(keys=keys, args=args)
