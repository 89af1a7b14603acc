"""Redis URLs, for one server or a Redis Cluster; pure parsing, so the configuration can
check them without importing redis.

A cluster is named by its own scheme, ``redis+cluster://`` (``rediss+cluster://`` for TLS),
followed by one or more seed nodes; the client learns the other masters from them::

    >>> is_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    True
    >>> cluster_nodes("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    [('10.0.0.1', 7000), ('10.0.0.2', 7000)]
"""

from __future__ import annotations

from urllib.parse import urlsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
ALLOWED_URLS = (
    "redis://HOST:PORT/DB, rediss://..., unix://..., "
    "redis+cluster://HOST:PORT[,HOST:PORT...], rediss+cluster://..."
)


def _scheme(url: str) -> str:
    return url.partition("://")[0] if "://" in url else ""


def is_redis_url(url: str) -> bool:
    return _scheme(url) in SINGLE_SCHEMES + CLUSTER_SCHEMES


def is_cluster_url(url: str) -> bool:
    return _scheme(url) in CLUSTER_SCHEMES


def check_url(url: str) -> str:
    """``url`` if it names a Redis server or cluster, else ValueError saying what is allowed."""
    if not is_redis_url(url):
        raise ValueError(f"allowed: {ALLOWED_URLS}")
    if is_cluster_url(url):
        cluster_nodes(url)
        return url
    try:
        port = urlsplit(url).port  # raises ValueError past 65535 or when not a number
    except ValueError as exc:
        raise ValueError(f"the port must be a number in 1..65535 ({exc})") from None
    if port == 0:
        raise ValueError("the port must be a number in 1..65535")
    return url


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes ``(host, port)`` of a cluster URL; a cluster has only database 0."""
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0") or parts.query:
        raise ValueError("a Redis Cluster URL takes no database and no options (database 0 only)")
    nodes = []
    for node in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {node!r} is not HOST:PORT")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"cluster node {node!r}: the port must be in 1..65535")
        nodes.append((host.strip("[]"), int(port)))
    return nodes
