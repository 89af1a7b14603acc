"""Redis clients, for one server or a Redis Cluster (URLs: :mod:`modelfence.redisurl`).

    >>> client = connect("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", timeout_seconds=0.25)

Cluster clients raise :class:`~redis.exceptions.RedisClusterException` (no node reachable,
a slot not covered), which is not a ``RedisError``: catch :data:`REDIS_ERRORS`.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelfence.redisurl import cluster_nodes, is_cluster_url

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def connect(
    url: str,
    *,
    timeout_seconds: float,
    connect_timeout_seconds: float | None = None,
    decode_responses: bool = False,
    max_connections: int = 64,
) -> Redis | RedisCluster:
    """A client for ``url`` whose every command gives up after ``timeout_seconds``.

    Requests beyond ``max_connections`` (per node on a cluster) wait for a free connection
    rather than fail. One immediate retry replaces a connection the server closed
    (restart, fail-over) unseen; on a cluster it also re-reads the slot map once after a
    ``CLUSTERDOWN`` or a dead master, so an outage costs a caller two timeouts at most.
    """
    connect_timeout = timeout_seconds if connect_timeout_seconds is None else connect_timeout_seconds
    if is_cluster_url(url):
        parts = urlsplit(url)
        return WaitingCluster(
            wait_seconds=timeout_seconds,
            startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss+cluster",
            decode_responses=decode_responses,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=connect_timeout,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1),
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_seconds,
        decode_responses=decode_responses,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Redis.from_pool(pool)


class WaitingCluster(RedisCluster):
    """A cluster client whose commands wait up to ``wait_seconds`` for a free connection
    (as :class:`~redis.asyncio.BlockingConnectionPool` does for one server) instead of
    failing at once with ``MaxConnectionsError``: at most ``max_connections`` commands run
    at once in all, so no node's pool of that size runs dry."""

    def __init__(self, *, wait_seconds: float, max_connections: int, **kwargs: Any) -> None:
        # one spare per node: the stream sink's pipeline, which bypasses the semaphore
        super().__init__(max_connections=max_connections + 1, **kwargs)
        self._free = asyncio.Semaphore(max_connections)
        self._wait = wait_seconds

    async def initialize(self, *args: Any, **kwargs: Any) -> WaitingCluster:
        """Read the slot map and the command table. redis-py asks the default node (the
        first master of the map) for the table and, when that master is dead, fails every
        command from then on; here another master answers instead."""
        try:
            await super().initialize(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            if not self.nodes_manager.slots_cache:
                raise
            for node in self.get_primaries():
                try:
                    await self.commands_parser.initialize(node)
                except (RedisConnectionError, RedisTimeoutError):
                    continue
                self.set_default_node(node)
                self._initialize = False  # redis-py's own flag: the map and table are read
                return self
            raise
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self._wait):
                await self._free.acquire()
        except TimeoutError as exc:
            raise RedisConnectionError("No connection available.") from exc
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._free.release()


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)
