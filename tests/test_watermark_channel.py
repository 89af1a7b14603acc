"""The mark channel: sealed headers, the gateway's issuer, the model server's verifier, and
``modelfence serve`` telling the (fake) upstream whom to mark for."""

from __future__ import annotations

import http.client
import logging
from typing import Any

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.errors import ConfigError
from modelfence.identity.secret import ServerSecret
from modelfence.testing.processes import ServiceProcess, http_json
from modelfence.watermark.channel import (
    MARK_HEADER,
    MARK_SECRET_ENV,
    MarkIssuer,
    MarkOrder,
    MarkRejected,
    MarkVerifier,
    load_mark_secret,
    open_mark,
    seal,
)
from modelfence.watermark.config import TextConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import TEXT_PURPOSE, GreenListProcessor

from .conftest import GatewayFactory

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

RING = WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef"))  # base_config's secret
KEY = RING.channel_key()
NOW = 1_700_000_000.0
TEXT = TextConfig.model_validate({})  # gamma 0.25, delta 2.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def order_for(client: str) -> MarkOrder:
    return MarkOrder(RING.key(client).seed(TEXT_PURPOSE), 0.25, 2.0, 1)


def test_sealed_order_opens_only_with_the_key_and_before_expiry() -> None:
    header = seal(KEY, order_for("acme"), expires=int(NOW) + 60)
    assert open_mark(KEY, header, now=NOW) == order_for("acme")
    assert seal(KEY, order_for("acme"), expires=int(NOW) + 60) != header  # fresh nonce each time
    with pytest.raises(MarkRejected, match="expired"):
        open_mark(KEY, header, now=NOW + 61)
    with pytest.raises(MarkRejected, match="not sealed"):
        open_mark(bytes(32), header, now=NOW)
    version, kv, expires, nonce, sealed = header.split(".")
    # One character of the ciphertext changed (a fixed "AA" ending was no change in about
    # one seal of 256, whose ciphertext ends so by chance).
    tampered = ("B" if sealed[0] == "A" else "A") + sealed[1:]
    for forged in (
        f"{version}.{kv}.{int(expires) + 3600}.{nonce}.{sealed}",  # a longer life
        f"{version}.2.{expires}.{nonce}.{sealed}",  # another key version
        f"{version}.{kv}.{expires}.{nonce}.{tampered}",
        f"{version}.{kv}.{expires}.{nonce}.!!",
    ):
        with pytest.raises(MarkRejected) as caught:
            open_mark(KEY, forged, now=NOW)
        assert caught.value.reason == "forged"
    for bad, reason in (("v2.1.2.3.4", "version"), ("v1.1.2", "malformed"), ("", "malformed")):
        with pytest.raises(MarkRejected) as caught:
            open_mark(KEY, bad, now=NOW)
        assert caught.value.reason == reason


def test_header_reveals_no_key_and_repr_is_masked() -> None:
    key = RING.key("acme")
    order = order_for("acme")
    header = seal(KEY, order, expires=int(NOW))
    secrets = (key.material.hex(), key.subkey(TEXT_PURPOSE).hex(), str(order.seed),
               format(order.seed, "x"), KEY.hex())
    for text in (header, repr(order), repr(MarkIssuer(RING, TEXT)), repr(MarkVerifier(KEY))):
        assert not any(s in text for s in secrets)
    assert RING.channel_key() == WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef")).channel_key()
    assert KEY not in {key.material, key.subkey(TEXT_PURPOSE)}


def test_issuer_caches_per_client_and_renews_before_expiry() -> None:
    clock = Clock()
    issuer = MarkIssuer(RING, TextConfig(gamma=0.3, delta=1.5), ttl=300, clock=clock)
    first = issuer.header("acme")
    assert issuer.header("acme") == first
    assert issuer.header("bob") != first
    clock.now += 149
    assert issuer.header("acme") == first
    clock.now += 2  # past ttl / 2: a new header, good for another ttl
    renewed = issuer.header("acme")
    assert renewed != first
    order = open_mark(KEY, renewed, now=clock.now + 299)
    assert (order.seed, order.gamma, order.delta, order.key_version) == (
        RING.key("acme").seed(TEXT_PURPOSE), 0.3, 1.5, 1)


def test_verifier_marks_good_headers_and_ignores_bad_ones(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    verifier = MarkVerifier(KEY, clock=clock)
    header = MarkIssuer(RING, TEXT, clock=clock).header("acme")
    processor = verifier({MARK_HEADER: header})
    assert processor is not None and verifier({MARK_HEADER: header}) is processor  # cached
    want = GreenListProcessor.for_key(RING.key("acme"))
    assert np.array_equal(processor.green(42, 1000), want.green(42, 1000))
    assert verifier({}) is None
    forged = seal(bytes(32), order_for("acme"), expires=int(NOW) + 60)
    bad_params = seal(KEY, MarkOrder(1, 1.5, 2.0, 1), expires=int(NOW) + 60)
    with caplog.at_level(logging.WARNING):
        assert verifier({MARK_HEADER: forged}) is None
        assert verifier({MARK_HEADER: "garbage"}) is None
        assert verifier({MARK_HEADER: bad_params}) is None
        clock.now += 10_000
        assert verifier({MARK_HEADER: header}) is None
    assert verifier.counts == {"marked": 2, "absent": 1, "rejected_forged": 1,
                               "rejected_malformed": 1, "rejected_parameters": 1,
                               "rejected_expired": 1}
    assert "without a text mark" in caplog.text
    assert header not in caplog.text and forged not in caplog.text
    with pytest.raises(ValueError, match="32 bytes"):
        MarkVerifier(b"short")


def test_mark_secret_loads_from_file_or_env_with_clear_errors(tmp_path: Any) -> None:
    path = tmp_path / "mark.key"
    path.write_text(KEY.hex() + "\n")
    assert load_mark_secret(path) == KEY
    assert load_mark_secret(None, {MARK_SECRET_ENV: KEY.hex()}) == KEY
    assert load_mark_secret(None, {}) is None
    path.write_text("not hex")
    with pytest.raises(ConfigError, match="64 hex characters"):
        load_mark_secret(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_mark_secret(tmp_path / "missing.key")


def test_cli_prints_the_channel_key(tmp_path: Any) -> None:
    config = tmp_path / "modelfence.yaml"
    config.write_text(f"store: sqlite:///{tmp_path / 's.db'}\nsecret: test-secret-0123456789abcdef\n")
    result = CliRunner().invoke(app, ["--config", str(config), "keys", "mark-secret"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == KEY.hex()


# -- through a real gateway process, on the fake upstream ----------------------------------


def post(url: str, path: str, key: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=orjson.dumps(body), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json", **headers})
        response = conn.getresponse()
        assert MARK_HEADER not in {k.lower() for k in response.headers}
        response.read()
        return response.status
    finally:
        conn.close()


def told_upstream(upstream: ServiceProcess) -> dict[str, str]:
    headers: dict[str, str] = http_json("GET", upstream.url + "/_stats")[1]["gateway_headers"]
    return headers


CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fake-chat", "prompt": "hi"}
EMBED = {"model": "fake-embed", "input": "hi"}


def test_gateway_sends_the_clients_mark_and_drops_forged_ones(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess
) -> None:
    gateway = start_gateway()
    acme, bob = gateway.create_key("mark-acme"), gateway.create_key("mark-bob")
    forged = {MARK_HEADER: seal(KEY, order_for("mark-bob"), expires=int(2e9)),
              "x-modelfence-client": "mark-bob"}
    seen = []
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                       ("/v1/chat/completions", {**CHAT, "stream": True})):
        assert post(gateway.url, path, acme, body, forged) == 200
        sent = told_upstream(fake_upstream)
        assert set(sent) == {MARK_HEADER}  # the forged x-modelfence-client never arrives
        order = open_mark(KEY, sent[MARK_HEADER], now=NOW)
        assert order == order_for("mark-acme")
        seen.append(sent[MARK_HEADER])
    assert len(set(seen)) == 1  # sealed once, reused
    assert post(gateway.url, "/v1/chat/completions", bob, CHAT, {}) == 200
    assert open_mark(KEY, told_upstream(fake_upstream)[MARK_HEADER], now=NOW) == order_for("mark-bob")
    assert post(gateway.url, "/v1/embeddings", acme, EMBED, forged) == 200
    assert told_upstream(fake_upstream) == {}


@pytest.mark.parametrize("watermark", [
    {"text": {"enabled": False}},
    {"lexical": {"upstreams": ["fake"]}},  # marked after the fact: a hosted API gets no header
], ids=["text-off", "hosted-upstream"])
def test_gateway_sends_no_mark_where_none_is_made_at_the_source(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess, watermark: dict[str, Any]
) -> None:
    gateway = start_gateway(watermark=watermark)
    acme = gateway.create_key("mark-off")
    forged = {MARK_HEADER: seal(KEY, order_for("mark-off"), expires=int(2e9))}
    assert post(gateway.url, "/v1/chat/completions", acme, CHAT, forged) == 200
    assert told_upstream(fake_upstream) == {}
