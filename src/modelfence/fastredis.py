"""One pipelined Redis connection for the admission path.

Admission runs one Lua script per request and settling another. Through redis-py's
asyncio client each costs 120-200 µs of CPU (a pooled connection checked out and back, a
lock, a timeout context, packing and parsing in Python), which was most of what Redis
limits added to a request. Here every command goes out on one connection as it comes (the
commands of one event-loop turn leave in one write) and replies, which Redis sends in
command order, are parsed by hiredis and handed to their callers in that order: about
20 µs per command, and many requests share each round trip.

It raises redis-py's exceptions, so callers catch the same :data:`~modelfence.redisconn.
REDIS_ERRORS`: ``ConnectionError`` when the connection cannot be made or is lost,
``TimeoutError`` when a reply is late, ``ResponseError`` for an error reply.

A late reply would be taken for the next command's, so a timeout closes the connection:
the late command fails with ``TimeoutError``, those queued behind it with
``ConnectionError``, and the next command connects again. As with the redis-py client it
replaces, a command whose connection the server closed (a restart) is sent once more on a
new one (:class:`ConnectionLost`); one that timed out, or queued behind one that did, never
is, since it may yet run.

Single servers only (``redis://``, ``rediss://``, ``unix://``, no URL options but
``db``); :func:`supported` says whether a URL qualifies, a cluster keeps redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelfence.redisurl import SINGLE_SCHEMES

Arg = str | int | float | bytes


def supported(url: str) -> bool:
    """Whether ``url`` names one server with no options this client does not take."""
    parts = urlsplit(url)
    if parts.scheme not in SINGLE_SCHEMES:
        return False
    options = parse_qs(parts.query, keep_blank_values=True)
    return set(options) <= {"db"} and (parts.scheme == "unix" or not parts.query)


def _pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (built as text when it is ASCII, which
    halves the cost of a script call's thirty-odd arguments)."""
    parts = [arg if type(arg) is str else str(arg) for arg in args if type(arg) is not bytes]
    if len(parts) == len(args) and all(map(str.isascii, parts)):
        body = "".join([f"${len(part)}\r\n{part}\r\n" for part in parts])
        return f"*{len(parts)}\r\n{body}".encode()
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class ConnectionLost(RedisConnectionError):
    """The server closed the connection (a restart, a fail-over): the one error after which
    a command is sent again, as redis-py's one retry did."""


class _Connection(asyncio.Protocol):
    """One socket: writes commands, hands replies to the waiting futures in order."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one command; its reply (or error) completes the returned future."""
        future = self._loop.create_future()
        if self.closed:  # never written: safe to send again on a new connection
            future.set_exception(ConnectionLost("Redis connection already closed"))
            return future
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[0][1], self._check_deadline)
        return future

    def _flush(self) -> None:
        if self._out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._out))  # one send for the whole turn
        self._out = []

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"Redis sent a malformed reply: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:  # nothing asked for it: the stream is out of step
                self._fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future, _ = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if self._loop.time() >= deadline:
            late = RedisTimeoutError(f"Timeout reading from Redis ({self._timeout:g} s)")
            behind = RedisConnectionError("Redis connection closed: an earlier command timed out")
            self._fail(behind, first=late)
            return
        self._timer = self._loop.call_at(deadline, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"Redis closed the connection ({exc or 'end of stream'})"))

    def _fail(self, error: Exception, first: Exception | None = None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for index, (future, _) in enumerate(waiting):
            if not future.done():
                future.set_exception(first if index == 0 and first is not None else error)

    def close(self) -> None:
        self._fail(RedisConnectionError("Redis client closed"))


class Script:
    """A Lua script run by SHA; loaded again (``EVAL``) when Redis forgot it."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self._client = client
        self._source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # how Redis names scripts

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self._client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._client.execute("EVAL", self._source, len(keys), *keys, *args)


class PipelinedRedis:
    """A client of one Redis server over one pipelined connection (see module docstring).

    >>> client = PipelinedRedis("redis://127.0.0.1:6379/0", timeout_seconds=0.25)
    >>> admit = client.register_script(source)
    >>> await admit(keys=["mf:{k:1}:requests"], args=[1, 60])
    """

    def __init__(self, url: str, *, timeout_seconds: float) -> None:
        if not supported(url):
            raise ValueError(f"not a single-server Redis URL without options: {url!r}")
        parts = urlsplit(url)
        self._scheme = parts.scheme
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._path = unquote(parts.path)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            self._db = int(parse_qs(parts.query).get("db", ["0"])[0])
        else:
            self._db = int(parts.path.strip("/") or 0)
        self._timeout = timeout_seconds
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply; once more on a new connection if the
        one it went out on was lost (not if it timed out)."""
        packed = _pack(args)
        connection = await self._connected()
        try:
            return await connection.send(packed)
        except ConnectionLost:
            pass
        connection = await self._connected()
        return await connection.send(packed)

    async def ping(self) -> None:
        await self.execute("PING")

    async def aclose(self) -> None:
        """Close the connection; a connect under way is closed once made (its waiters see
        a closed connection and connect again, as any later command does)."""
        if self._connecting is not None:
            self._connecting.add_done_callback(_close_made)
            self._connecting = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connected(self) -> _Connection:
        """The open connection, made first if need be; every caller waiting meanwhile
        shares one connect, which no caller's cancellation interrupts."""
        while True:
            connection = self._connection
            if connection is not None and not connection.closed:
                return connection
            if self._connecting is None:
                connecting = asyncio.ensure_future(self._connect())
                connecting.add_done_callback(self._connect_done)
                self._connecting = connecting
            connection = await asyncio.shield(self._connecting)
            if not connection.closed:
                return connection

    def _connect_done(self, connecting: asyncio.Task[_Connection]) -> None:
        if self._connecting is not connecting:  # given up by aclose, which closes it
            return
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._connection = connecting.result()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        where = self._path if self._scheme == "unix" else f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(self._timeout):
                if self._scheme == "unix":
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(self._timeout), self._path
                    )
                else:
                    tls = ssl.create_default_context() if self._scheme == "rediss" else None
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self._timeout), self._host, self._port, ssl=tls
                    )
        except TimeoutError as exc:
            raise RedisTimeoutError(f"Timeout connecting to Redis at {where}") from exc
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to Redis at {where}: {exc}") from exc
        try:  # AUTH and SELECT go out together; each reply within the command timeout
            replies = await asyncio.gather(
                *(connection.send(_pack(command)) for command in self._handshake()),
                return_exceptions=True,
            )
        except BaseException:
            connection.close()
            raise
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            connection.close()
            if isinstance(errors[0], ResponseError):
                raise RedisConnectionError(
                    f"Redis at {where} refused the handshake: {errors[0]}"
                ) from errors[0]
            raise errors[0]
        return connection

    def _handshake(self) -> list[tuple[Arg, ...]]:
        commands: list[tuple[Arg, ...]] = []
        if self._password is not None:
            user = () if self._username is None else (self._username,)
            commands.append(("AUTH", *user, self._password))
        if self._db:
            commands.append(("SELECT", self._db))
        return commands


def _close_made(connecting: asyncio.Task[_Connection]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()
