"""The edge under hostile clients: forged client addresses, slow sockets, key and token floods.

Each test drives a real ``modelfence serve`` process over real sockets, on the fake upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from typing import Any

import orjson

from modelfence.identity import new_api_key
from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

CHAT = orjson.dumps({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]})


def post_chat(gateway: GatewayProcess, key: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=CHAT, headers={
            "authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {}),
        })
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, orjson.loads(data)
    finally:
        conn.close()


PER_IP_ONE_A_MINUTE = {"limits": {"per_ip_prefix": {"requests_per_minute": 1}}}


def test_forwarded_for_from_loopback_is_ignored_without_trusted_proxies(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**PER_IP_ONE_A_MINUTE)
    key = gateway.create_key("acme")
    assert post_chat(gateway, key)[0] == 200
    status, headers, body = post_chat(gateway, key, {"x-forwarded-for": "203.0.113.9"})
    # The header names another network, but nobody vouches for it: still 127.0.0.1's limit.
    assert status == 429, body
    assert "retry-after" in headers


def test_forwarded_for_is_believed_from_a_trusted_proxy(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(server={"trusted_proxies": ["127.0.0.1/32"]}, **PER_IP_ONE_A_MINUTE)
    key = gateway.create_key("acme")
    assert post_chat(gateway, key)[0] == 200
    assert post_chat(gateway, key, {"x-forwarded-for": "203.0.113.9"})[0] == 200
    assert post_chat(gateway, key, {"x-forwarded-for": "198.51.100.7, 203.0.113.9"})[0] == 429


def _metric(gateway: GatewayProcess, line_start: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:  # closed with our unread bytes still in its buffer
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {seconds} s")


def test_slow_request_heads_and_bodies_are_cut_off(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(server={"header_timeout_seconds": 1, "body_timeout_seconds": 1})
    key = gateway.create_key("acme")
    slow_heads = []
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: 1")
        slow_heads.append(sock)
    silent = socket.create_connection(("127.0.0.1", gateway.port))  # connects, sends nothing
    slow_body = socket.create_connection(("127.0.0.1", gateway.port))
    slow_body.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\":"
    )
    try:
        for sock in [*slow_heads, silent]:
            assert _closed_within(sock, 6).startswith(b"HTTP/1.1 408 ")
        _closed_within(slow_body, 6)
        # Meanwhile, and afterwards, an ordinary client is served.
        assert post_chat(gateway, key)[0] == 200
    finally:
        for sock in [*slow_heads, silent, slow_body]:
            sock.close()
    assert _metric(gateway, 'modelfence_connections_closed_total{reason="head"}') == 7
    assert _metric(gateway, 'modelfence_connections_closed_total{reason="body"}') == 1


def test_a_head_that_never_ends_is_refused_while_it_arrives(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()  # max_header_bytes 8192 in the test config
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
        with contextlib.suppress(OSError):  # the server may close while we still write
            for n in range(200):
                sock.sendall(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000))
        _closed_within(sock, 6)
    finally:
        sock.close()
    assert _metric(gateway, 'modelfence_connections_closed_total{reason="head_size"}') == 1


def test_failed_authentication_floods_are_refused_per_address(start_gateway: GatewayFactory) -> None:
    # Behind a trusted proxy, so that X-Forwarded-For can play several client addresses.
    gateway = start_gateway(server={"trusted_proxies": ["127.0.0.1/32"], "auth_failures_per_minute": 5})
    key = gateway.create_key("acme")
    attacker, neighbour = {"x-forwarded-for": "203.0.113.9"}, {"x-forwarded-for": "198.51.100.7"}
    statuses = [post_chat(gateway, new_api_key(), attacker)[0] for _ in range(40)]
    assert statuses == [401] * 5 + [429] * 35
    status, headers, body = post_chat(gateway, new_api_key(), attacker)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "too_many_auth_failures"
    assert post_chat(gateway, new_api_key(), neighbour)[0] == 401
    assert post_chat(gateway, key, neighbour)[0] == 200
    assert _metric(gateway, 'modelfence_auth_failures_total{outcome="rejected",surface="api"}') == 6

    guesses = [
        http_json("GET", gateway.url + "/admin/v1/keys", token=f"guess-{n:04}-0123456789", headers=attacker)[0]
        for n in range(20)
    ]
    assert guesses == [401] * 5 + [429] * 15
    status, _ = http_json("GET", gateway.url + "/admin/v1/keys", token=gateway.admin_token, headers=neighbour)
    assert status == 200
    assert _metric(gateway, 'modelfence_auth_failures_total{outcome="refused",surface="admin"}') == 15
    assert gateway.log_file is not None
    log = gateway.log_file.read_text()
    # Logged with the address, throttled (the metric above counts every one).
    assert log.count("admin authentication failed from 203.0.113.9") >= 1
