"""The pipelined Redis client of the admission path, against real ``redis-server``s.

Replies must reach their own callers under concurrency, after cancellations and after
error replies; a stall must cost one timeout and never a command run twice; a restart
must go unseen; a password and a database must be honoured.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from urllib.parse import urlsplit

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelfence.fastredis import PipelinedRedis, _pack, supported
from tests.services import free_port, private_redis, wait_for_port

pytestmark = pytest.mark.redis


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://user:pw@10.0.0.1/3", True),
        ("rediss://cache.example:6380/0", True),
        ("unix:///run/redis.sock?db=2", True),
        ("redis://127.0.0.1:6379/0?health_check_interval=5", False),  # redis-py options
        ("unix:///run/redis.sock?db=2&socket_keepalive=1", False),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", False),
        ("http://127.0.0.1:6379", False),
    ],
)
def test_which_urls_it_takes(url: str, expected: bool) -> None:
    assert supported(url) is expected


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert _pack(["SET", "k", 1.5, 2]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n$1\r\n2\r\n"
    # lengths count bytes, not characters, and bytes pass through untouched
    assert _pack(["SET", "é", b"\x00\xff"]) == (
        b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$2\r\n\x00\xff\r\n"
    )


async def test_concurrent_callers_each_get_their_own_reply(redis_url: str) -> None:
    client = PipelinedRedis(redis_url, timeout_seconds=2.0)
    key = f"test:fast:{uuid.uuid4().hex}"
    try:
        values = await asyncio.gather(*(client.execute("INCR", key) for _ in range(500)))
        assert sorted(values) == list(range(1, 501))
        # and in the order they were sent: replies come back in command order
        assert values == list(range(1, 501))
        echoed = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(200)))
        assert echoed == [f"m{i}" for i in range(200)]
    finally:
        await client.execute("DEL", key)
        await client.aclose()


async def test_an_error_reply_is_raised_and_the_connection_stays_in_step(redis_url: str) -> None:
    client = PipelinedRedis(redis_url, timeout_seconds=2.0)
    key = f"test:fast:{uuid.uuid4().hex}"
    try:
        await client.execute("SET", key, "text")
        results = await asyncio.gather(
            client.execute("INCR", key), client.execute("ECHO", "after"), return_exceptions=True
        )
        assert isinstance(results[0], ResponseError) and "not an integer" in str(results[0])
        assert results[1] == "after"
    finally:
        await client.execute("DEL", key)
        await client.aclose()


async def test_a_cancelled_caller_does_not_take_the_next_reply(redis_url: str) -> None:
    client = PipelinedRedis(redis_url, timeout_seconds=2.0)
    try:
        await client.ping()  # connected, so both commands below go out at once
        slow = asyncio.ensure_future(client.execute("ECHO", "first"))
        fast = asyncio.ensure_future(client.execute("ECHO", "second"))
        await asyncio.sleep(0)  # both are queued (they leave in one write at the next turn)
        slow.cancel()
        assert await fast == "second"
        assert await client.execute("ECHO", "third") == "third"
    finally:
        await client.aclose()


async def test_a_forgotten_script_is_loaded_again(redis_url: str) -> None:
    client = PipelinedRedis(redis_url, timeout_seconds=2.0)
    script = client.register_script(f"return ARGV[1] .. '-{uuid.uuid4().hex}'")
    try:
        await client.execute("SCRIPT", "FLUSH")
        first = await script(keys=["k"], args=["a"])
        assert first.startswith("a-")
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await script(keys=["k"], args=["b"]) == "b" + first[1:]
    finally:
        await client.aclose()


async def test_nothing_listening_is_a_connection_error() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.5)
    with pytest.raises(RedisConnectionError, match="Error connecting to Redis"):
        await client.ping()
    await client.aclose()


async def test_a_stall_costs_one_timeout_and_runs_no_command_twice() -> None:
    with private_redis() as (url, server):
        client = PipelinedRedis(url, timeout_seconds=0.25)
        check = Redis.from_url(url, decode_responses=True)
        try:
            await client.execute("SET", "n", 0)
            server.send_signal(signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                results = await asyncio.gather(
                    client.execute("INCR", "n"), client.execute("INCR", "n"),
                    return_exceptions=True,
                )
                waited = loop.time() - started
            finally:
                server.send_signal(signal.SIGCONT)
            assert isinstance(results[0], RedisTimeoutError)
            assert isinstance(results[1], RedisConnectionError)
            assert not isinstance(results[1], RedisTimeoutError)
            assert 0.2 <= waited < 1.0
            # the next command connects again; the two sent in the stall ran once each at most
            assert await client.execute("INCR", "n") in (1, 2, 3)
            assert int(await check.get("n")) <= 3
        finally:
            await check.aclose()
            await client.aclose()


async def test_a_server_restart_goes_unseen() -> None:
    with private_redis() as (url, server):
        client = PipelinedRedis(url, timeout_seconds=1.0)
        try:
            assert await client.execute("ECHO", "before") == "before"
            server.kill()
            server.wait()
            restarted = subprocess.Popen(  # noqa: ASYNC220 - the server this test killed
                server.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                port = urlsplit(url).port
                assert port is not None
                wait_for_port("127.0.0.1", port, timeout=10)
                # the old connection is dead but not yet noticed: sent once more on a new one
                assert await client.execute("ECHO", "after") == "after"
            finally:
                restarted.kill()
                restarted.wait(timeout=10)
        finally:
            await client.aclose()


async def test_password_and_database_are_used() -> None:
    with private_redis("--requirepass", "s3cret") as (url, _):
        port = urlsplit(url).port
        client = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{port}/3", timeout_seconds=1.0)
        check = Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3", decode_responses=True)
        wrong = PipelinedRedis(f"redis://:nope@127.0.0.1:{port}/0", timeout_seconds=1.0)
        try:
            await client.execute("SET", "where", "db3")
            assert await check.get("where") == "db3"
            with pytest.raises(RedisConnectionError, match="refused the handshake"):
                await wrong.ping()
        finally:
            await check.aclose()
            await client.aclose()
            await wrong.aclose()


async def test_a_reply_nobody_asked_for_closes_the_connection() -> None:
    """A server that answers out of turn (not Redis, or a stream out of step) must not
    have its replies handed to the wrong callers."""

    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"+OK\r\n+EXTRA\r\n")  # two replies to one command
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(rogue, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_seconds=1.0)
    try:
        assert await client.execute("PING") == "OK"
        await asyncio.sleep(0.05)
        # a new connection answers this one: the stray reply went to nobody
        assert await client.execute("ECHO", "x") == "OK"
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


class SlowAuthServer:
    """Speaks just enough RESP: AUTH answered after ``delay`` seconds, PING at once; counts
    the connections it accepted."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    def drop(self) -> None:
        """Close every open connection, as a restarting server would."""
        for writer in self.writers:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(4096):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    if command[0].upper() == b"AUTH":
                        await asyncio.sleep(self.delay)
                        writer.write(b"+OK\r\n")
                    else:
                        writer.write(b"+PONG\r\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://:pw@127.0.0.1:{port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_callers_arriving_together_share_one_connect() -> None:
    server = SlowAuthServer(delay=0.05)
    async with server as url:
        client = PipelinedRedis(url, timeout_seconds=1.0)
        try:
            assert await asyncio.gather(*(client.execute("PING") for _ in range(20))) == [
                "PONG"
            ] * 20
            assert server.connections == 1
        finally:
            await client.aclose()


async def test_a_connect_whose_callers_all_left_is_not_reused_once_closed() -> None:
    """Every caller cancelled while the connect was under way: the connection it made is
    kept, and when it is lost later the next command connects again instead of queuing on
    the dead one until its deadline."""
    server = SlowAuthServer(delay=0.1)
    async with server as url:
        client = PipelinedRedis(url, timeout_seconds=0.5)
        try:
            waiting = asyncio.ensure_future(client.execute("PING"))
            await asyncio.sleep(0.02)
            waiting.cancel()
            await asyncio.sleep(0.2)  # the connect completes with nobody waiting
            assert await client.execute("PING") == "PONG"
            assert server.connections == 1
            server.drop()
            await asyncio.sleep(0.05)  # the client sees the connection closed
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await client.execute("PING") == "PONG"
            assert loop.time() - started < 0.4  # a new connect, not a wait for the deadline
            assert server.connections == 2
        finally:
            await client.aclose()


async def test_closing_during_a_connect_cancels_no_caller() -> None:
    server = SlowAuthServer(delay=0.1)
    async with server as url:
        client = PipelinedRedis(url, timeout_seconds=1.0)
        waiting = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0.02)
        await client.aclose()
        # the caller is answered on a connection of its own, not cancelled
        assert await waiting == "PONG"
        await client.aclose()
