"""Text marked at the source, end to end: ``modelfence serve`` in front of the real demo
upstream (SmolLM2) holding the mark channel key, called with the ``openai`` client, and
the answers traced back through ``POST /admin/v1/verify/text``.

Generations are the cost here (about 10 tokens/s on two shared cores), so each test asks
for as few tokens as its claim needs, and sampling is seeded so the outcome is fixed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from modelfence.demo.llm import MODEL_NAME
from modelfence.identity.secret import ServerSecret
from modelfence.testing.processes import (
    GatewayProcess,
    ServiceProcess,
    free_port,
    http_json,
    modelfence_command,
)
from modelfence.watermark.channel import MARK_HEADER, MarkOrder, seal
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import TEXT_PURPOSE

from .conftest import GatewayFactory

pytestmark = [pytest.mark.models, pytest.mark.slow]

RING = WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef"))  # base_config's secret
SEALED = re.compile(r"v1\.\d+\.\d{9,}\.[A-Za-z0-9_-]{16}\.")  # what a mark header looks like
PHOTOSYNTHESIS = "Explain in detail how photosynthesis works."
DRAGON = "Write a story about a dragon who learns to cook."


@pytest.fixture(scope="module")
def marking_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The demo upstream, given the channel key of base_config's secret."""
    workdir = tmp_path_factory.mktemp("marking")
    key_file = workdir / "mark.key"
    key_file.write_text(RING.channel_key().hex())
    port = free_port()
    with ServiceProcess(
        modelfence_command("demo-upstream", "--port", str(port), "--mark-secret-file", str(key_file)),
        port=port,
        ready_path="/healthz?ready=all",
        log_file=workdir / "demo-upstream.log",
        ready_timeout=600,
    ) as proc:
        yield proc


def gateway_on(start_gateway: GatewayFactory, upstream: ServiceProcess, **extra: Any) -> GatewayProcess:
    return start_gateway(
        upstreams=[{"name": "demo", "url": upstream.url, "models": [MODEL_NAME],
                    "timeout_seconds": 300}],
        detection={"enabled": False},
        forensics={"allowed_suspect_urls": ["127.0.0.1"]},  # the suspects of verify/model
        **extra,
    )


def ask(gateway: GatewayProcess, key: str, prompt: str, max_tokens: int,
        headers: dict[str, str] | None = None) -> str:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, timeout=300, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=1.0, seed=7, extra_headers=headers,
    )
    assert MARK_HEADER not in raw.headers
    text = raw.parse().choices[0].message.content
    assert text
    return text


def verify(gateway: GatewayProcess, text: str) -> dict[str, Any]:
    status, verdict = http_json("POST", gateway.url + "/admin/v1/verify/text", {"text": text},
                                token=gateway.admin_token, timeout=180)
    assert status == 200, verdict
    return dict(verdict)


def forged_for(client: str) -> dict[str, str]:
    """A header as the gateway would seal it: what a client that stole one could send."""
    order = MarkOrder(RING.key(client).seed(TEXT_PURPOSE), 0.25, 2.0, 1)
    return {MARK_HEADER: seal(RING.channel_key(), order, expires=2_000_000_000)}


def assert_no_secrets(*logs: Path) -> None:
    secrets = [RING.channel_key().hex()]
    for client in ("src-alice", "src-bob"):
        key = RING.key(client)
        secrets += [key.material.hex(), key.subkey(TEXT_PURPOSE).hex(), str(key.seed(TEXT_PURPOSE))]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), log
        assert not SEALED.search(text), log


def test_each_clients_answer_names_that_client(
    start_gateway: GatewayFactory, marking_upstream: ServiceProcess
) -> None:
    gateway = gateway_on(start_gateway, marking_upstream)
    alice, bob = gateway.create_key("src-alice"), gateway.create_key("src-bob")
    gateway.create_key("src-carol")  # a third known client, never asking anything
    # Alice also sends a header sealed for Bob: the gateway never forwards it.
    answers = {"src-alice": ask(gateway, alice, PHOTOSYNTHESIS, 180, forged_for("src-bob")),
               "src-bob": ask(gateway, bob, DRAGON, 180)}
    for client, text in answers.items():
        verdict = verify(gateway, text)
        assert verdict["ours"] and verdict["client"] == client, verdict
        assert verdict["p_value"] <= 1e-6 and verdict["keys_tested"] == 3
        assert verdict["tokens_scored"] >= 100
    assert_no_secrets(gateway.log_file or Path(), marking_upstream.log_file or Path())


def test_marks_are_deterministic_and_per_client(
    start_gateway: GatewayFactory, marking_upstream: ServiceProcess
) -> None:
    gateway = gateway_on(start_gateway, marking_upstream)
    alice, bob = gateway.create_key("src-alice"), gateway.create_key("src-bob")
    first = ask(gateway, alice, DRAGON, 40)
    assert ask(gateway, alice, DRAGON, 40) == first  # same client, input and seed: same mark
    assert ask(gateway, bob, DRAGON, 40) != first  # another client's green lists


def test_unmarked_answers_are_not_attributed(
    start_gateway: GatewayFactory, marking_upstream: ServiceProcess
) -> None:
    """Text marks off at the gateway: a header the client forges for itself is dropped too."""
    gateway = gateway_on(start_gateway, marking_upstream, watermark={"text": {"enabled": False}})
    plain = gateway.create_key("src-plain")
    text = ask(gateway, plain, PHOTOSYNTHESIS, 180, forged_for("src-plain"))
    verdict = verify(gateway, text)
    assert not verdict["ours"] and verdict["client"] is None, verdict
    assert verdict["p_value"] > 1e-3 and verdict["tokens_scored"] >= 100


def test_verify_model_chat_names_the_client_whose_marks_a_suspect_speaks_in(
    start_gateway: GatewayFactory, marking_upstream: ServiceProcess
) -> None:
    """Our gateway asked with Carol's key answers in Carol's marks, as a model that learnt
    them perfectly would; the upstream asked directly stands for a model that never saw a
    mark. ``POST /admin/v1/verify/model`` with kind chat must tell them apart."""
    gateway = gateway_on(start_gateway, marking_upstream)
    carol = gateway.create_key("src-carol")
    gateway.create_key("src-dave")
    # Seeded, as the other tests here: unseeded, a probe this short (~135 distinct pairs)
    # sometimes falls short of p <= 1e-6 (seeds 1, 2 and 7 gave 1e-14, 2e-13 and 5e-9).
    probe = {"kind": "chat", "prompts": [PHOTOSYNTHESIS, DRAGON, "Describe a busy market."],
             "max_tokens": 48, "seed": 1}

    def verify_model(url: str, **extra: Any) -> dict[str, Any]:
        status, verdict = http_json("POST", gateway.url + "/admin/v1/verify/model",
                                    {"url": url, **probe, **extra}, token=gateway.admin_token,
                                    timeout=300)
        assert status == 200, verdict
        return dict(verdict)

    speaks_carol = verify_model(gateway.url, api_key=carol)
    assert speaks_carol["ours"] and speaks_carol["client"] == "src-carol", speaks_carol
    assert speaks_carol["p_value"] <= 1e-6 and speaks_carol["samples"] >= 60
    assert "unsupervised (2 clients)" in speaks_carol["method"]
    assert "sampled with seed 1" in speaks_carol["method"]
    supervised_dave = verify_model(gateway.url, api_key=carol, client="src-dave")
    assert not supervised_dave["ours"] and supervised_dave["client"] is None, supervised_dave
    assert supervised_dave["samples"] == speaks_carol["samples"]  # the seed: the same answers
    never_saw = verify_model(marking_upstream.url)
    assert not never_saw["ours"] and never_saw["p_value"] > 1e-4, never_saw
    status, error = http_json("POST", gateway.url + "/admin/v1/verify/model",
                              {"url": marking_upstream.url, **probe, "client": "nobody"},
                              token=gateway.admin_token)
    assert status == 400 and "unknown client" in str(error)
