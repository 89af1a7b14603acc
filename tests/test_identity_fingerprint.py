"""Fingerprints: client address behind proxies, network prefixes, client libraries."""

from __future__ import annotations

from typing import Any

import pytest

from modelfence.config import parse_config
from modelfence.identity import Fingerprinter, client_library, compute_fingerprint


def scope(*headers: tuple[str, str], client: str | None = "203.0.113.9") -> dict[str, Any]:
    return {
        "type": "http",
        "client": (client, 51234) if client else None,
        "headers": [(name.encode(), value.encode()) for name, value in headers],
    }


BEHIND_PROXY = Fingerprinter(trusted_proxies=["10.0.0.0/8", "fd00::/8"])


def client_ip(fingerprinter: Fingerprinter, forwarded_for: str, peer: str = "10.0.0.1") -> str:
    return fingerprinter.compute(scope(("x-forwarded-for", forwarded_for), client=peer)).ip


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert client_ip(Fingerprinter(), "198.51.100.7", peer="203.0.113.9") == "203.0.113.9"
    assert client_ip(BEHIND_PROXY, "198.51.100.7", peer="203.0.113.9") == "203.0.113.9"


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("198.51.100.7, 10.1.2.3", "198.51.100.7"),  # through two trusted proxies
        ("6.6.6.6, 198.51.100.7", "198.51.100.7"),  # the client's own claim is not believed
        ("10.9.9.9, 10.1.2.3", "10.9.9.9"),  # all trusted: the left-most
        ("not-an-ip, 10.1.2.3", "10.1.2.3"),  # garbage: the last address vouched for
        ("198.51.100.7:4711", "198.51.100.7"),  # some proxies add the port
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("", "10.0.0.1"),
    ],
)
def test_forwarded_for_from_a_trusted_peer(forwarded_for: str, expected: str) -> None:
    assert client_ip(BEHIND_PROXY, forwarded_for) == expected


def test_repeated_forwarded_for_headers_are_one_list() -> None:
    fingerprint = BEHIND_PROXY.compute(
        scope(
            ("x-forwarded-for", "198.51.100.7"), ("x-forwarded-for", "10.1.2.3"), client="10.0.0.1"
        )
    )
    assert fingerprint.ip == "198.51.100.7"


@pytest.mark.parametrize(
    ("peer", "ip", "prefix"),
    [
        ("203.0.113.9", "203.0.113.9", "203.0.113.0/24"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd:12::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9", "203.0.113.0/24"),  # dual-stack socket
        (None, "unknown", "unknown"),
    ],
)
def test_address_and_prefix(peer: str | None, ip: str, prefix: str) -> None:
    fingerprint = Fingerprinter().compute(scope(client=peer))
    assert (fingerprint.ip, fingerprint.ip_prefix) == (ip, prefix)


def test_prefix_lengths_come_from_the_config() -> None:
    config = parse_config(
        {
            "fingerprint": {"ipv4_prefix": 16, "ipv6_prefix": 48},
            "server": {"trusted_proxies": ["192.168.0.0/16"]},
        },
        environ={},
    )
    fingerprinter = Fingerprinter.from_config(config)
    assert fingerprinter.compute(scope(client="203.0.113.9")).ip_prefix == "203.0.0.0/16"
    assert fingerprinter.compute(scope(client="2001:db8:1:2::1")).ip_prefix == "2001:db8:1::/48"
    assert client_ip(fingerprinter, "198.51.100.7", peer="192.168.1.1") == "198.51.100.7"


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        ("OpenAI/Python 1.40.0", "openai-python/1.40.0"),
        ("AsyncOpenAI/Python 1.51.2", "openai-python/1.51.2"),
        ("OpenAI/JS 4.52.7", "openai-node/4.52.7"),
        ("OpenAI/NodeJS/3.3.0", "openai-node/3.3.0"),
        ("python-requests/2.32.3", "python-requests/2.32.3"),
        ("python-httpx/0.27.0", "httpx/0.27.0"),
        ("Python/3.11 aiohttp/3.9.5", "aiohttp/3.9.5"),
        ("curl/8.5.0", "curl/8.5.0"),
        ("Go-http-client/2.0", "go-http-client/2.0"),
        ("axios/1.7.2", "axios/1.7.2"),
        ("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", "node-fetch/1.0"),
        ("okhttp/4.12.0", "okhttp/4.12.0"),
        ("Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "browser"),
        ("my-scraper", "unknown"),
        ("", "none"),
    ],
)
def test_client_library_from_the_user_agent(user_agent: str, expected: str) -> None:
    assert client_library(user_agent) == expected


def test_client_library_from_stainless_headers() -> None:
    fingerprint = Fingerprinter().compute(
        scope(
            ("user-agent", "my-app/2.0"),
            ("x-stainless-lang", "python"),
            ("x-stainless-package-version", "1.40.0"),
        )
    )
    assert fingerprint.client_library == "stainless-python/1.40.0"
    assert fingerprint.user_agent == "my-app/2.0"


def test_header_order_and_digest() -> None:
    fingerprinter = Fingerprinter()
    one = scope(("host", "api"), ("user-agent", "curl/8.5.0"), ("accept", "*/*"))
    swapped = scope(("user-agent", "curl/8.5.0"), ("host", "api"), ("accept", "*/*"))
    neighbour = scope(
        ("host", "api"), ("user-agent", "curl/8.5.0"), ("accept", "*/*"), client="203.0.113.200"
    )
    elsewhere = scope(
        ("host", "api"), ("user-agent", "curl/8.5.0"), ("accept", "*/*"), client="198.51.100.1"
    )
    first = compute_fingerprint(one, fingerprinter)
    assert first.header_order == "host,user-agent,accept"
    # Pinned: limits and detectors key on digests, so they must not change between releases.
    assert first.digest == "1242258e606ffb4e"
    assert compute_fingerprint(neighbour, fingerprinter).digest == first.digest  # same /24
    assert compute_fingerprint(swapped, fingerprinter).digest != first.digest
    assert compute_fingerprint(elsewhere, fingerprinter).digest != first.digest
