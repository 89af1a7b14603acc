"""Accounts at the gateway: probation, allowances reserved before the answer, shared by keys
and replicas, and trust changed through the admin API reaching every replica."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json

from .conftest import GatewayFactory
from .test_admin_names import private_database
from .test_gateway_e2e import upstream_requests

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

ALLOWANCES = {
    "probation": {"rows_per_day": 10, "rows_per_30_days": 100},
    "standard": {"rows_per_day": 1000},
    "trusted": {},
}


def embed(gateway: GatewayProcess, key: str, texts: int) -> tuple[int, dict[str, str], Any]:
    body = {"model": "fake-embed", "input": [f"text {i}" for i in range(texts)]}
    response = httpx.post(
        gateway.url + "/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"}
    )
    return response.status_code, dict(response.headers), response.json()


def account_id() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway(accounts={"allowances": ALLOWANCES})


def test_a_newcomer_is_told_its_probation_allowance_and_when_it_widens(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    account = account_id()
    first = gateway.create_key("newcomer", account=account)
    second = gateway.create_key("newcomer-batch", account=account)
    assert embed(gateway, first, 4)[0] == 200
    status, headers, _ = embed(gateway, second, 4)  # the same account: 8 of 10 rows used
    assert status == 200
    before = upstream_requests(fake_upstream)
    status, headers, body = embed(gateway, first, 4)  # would make 12: refused before the answer
    assert status == 429 and body["error"]["code"] == "probation_limit"
    message = body["error"]["message"]
    assert "probation" in message and "10 rows a day" in message and "100 over 30 days" in message
    assert "Used: 8 today, 8 over 30 days" in message and "widens on" in message
    assert headers["x-modelfence-trust"] == "probation" and int(headers["retry-after"]) >= 1
    assert upstream_requests(fake_upstream) == before
    assert embed(gateway, second, 2)[0] == 200  # what is left still fits


def test_one_batch_larger_than_the_allowance_is_refused_whole(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    key = gateway.create_key("one-batch", account=account_id())
    before = upstream_requests(fake_upstream)
    status, headers, body = embed(gateway, key, 11)
    assert status == 429 and body["error"]["code"] == "probation_limit"
    assert "alone needs more rows" in body["error"]["message"] and "retry-after" not in headers
    assert upstream_requests(fake_upstream) == before
    assert embed(gateway, key, 10)[0] == 200  # nothing was charged by the refusal


def test_verified_and_account_less_keys_are_not_on_probation(gateway: GatewayProcess) -> None:
    verified = gateway.create_key(
        "verified", account=account_id(), metadata={"verified": True, "organisation": "Acme"}
    )
    assert embed(gateway, verified, 50)[0] == 200  # standard: 1000 rows a day
    operator_key = gateway.create_key("internal")  # no account: standard
    assert embed(gateway, operator_key, 50)[0] == 200


def test_the_admin_api_shows_trust_and_verification_widens_it_at_once(
    gateway: GatewayProcess,
) -> None:
    account = account_id()
    key = gateway.create_key("grows", account=account, metadata={"email_domain": "x.example"})
    token = gateway.admin_token
    status, view = http_json("GET", f"{gateway.url}/admin/v1/accounts/{account}", token=token)
    assert status == 200 and view["trust"]["level"] == "probation"
    assert view["trust"]["allowance"]["rows_per_day"] == 10 and view["trust"]["widens_at"]
    assert list(view["traits"]) == ["email_domain"] and "x.example" not in str(view)
    assert [k["client"] for k in view["keys"]] == ["grows"]
    assert embed(gateway, key, 10)[0] == 200
    assert embed(gateway, key, 1)[0] == 429
    status, view = http_json(
        "PUT", f"{gateway.url}/admin/v1/accounts/{account}", {"verified": True}, token=token
    )
    assert status == 200 and view["trust"]["level"] == "standard"
    deadline = time.monotonic() + 5
    while embed(gateway, key, 1)[0] != 200:  # every replica polls the store every 0.5 s
        assert time.monotonic() < deadline, "verification did not reach the gateway"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"client": "x", "metadata": {"verified": True}}, "metadata"),
        ({"client": "x", "account": "a", "metadata": {"signup_address": "nope"}},
         "metadata.signup_address"),
        ({"client": "x", "account": "a", "metadata": {"paid_usd": "5"}}, "metadata.paid_usd"),
        ({"client": "x", "account": "a", "metadata": {"created_at": "2030-01-01T00:00:00"}},
         "metadata.created_at"),
        ({"client": "x", "account": "a", "metadata": {"created_at": 1767225600}},
         "metadata.created_at"),
        ({"client": "x", "account": "\x00"}, "account"),
    ],
)
def test_bad_account_input_is_a_422_naming_the_field(
    gateway: GatewayProcess, body: dict[str, Any], param: str
) -> None:
    status, answer = http_json(
        "POST", gateway.url + "/admin/v1/keys", body, token=gateway.admin_token
    )
    assert status == 422 and answer["error"]["param"] == param
    status, _ = http_json("GET", gateway.url + "/admin/v1/accounts/a", token=gateway.admin_token)
    assert status == 404


@pytest.mark.redis
def test_the_allowance_is_shared_by_replicas_through_redis(
    start_gateway: GatewayFactory, redis_url: str, postgres_url: str
) -> None:
    shared = {
        "store": postgres_url,
        "limits": {"backend": redis_url, "on_backend_error": "closed"},
        "accounts": {"allowances": ALLOWANCES},
    }
    replicas = [start_gateway(name=f"replica{i}", **shared) for i in range(2)]
    account = account_id()
    keys = [replicas[0].create_key(f"r{i}", account=account) for i in range(2)]
    assert embed(replicas[0], keys[0], 6)[0] == 200
    status, _, body = embed(replicas[1], keys[1], 6)
    assert status == 429 and body["error"]["code"] == "probation_limit"
    assert embed(replicas[1], keys[1], 4)[0] == 200


def test_probation_answers_are_graded(gateway: GatewayProcess) -> None:
    """Probation gets the tier's `elevated` hardening profile: one alternative per token."""
    body = {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 5,
    }

    def alternatives(key: str) -> set[int]:
        response = httpx.post(
            gateway.url + "/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200
        content = response.json()["choices"][0]["logprobs"]["content"]
        return {len(token["top_logprobs"]) for token in content}

    assert alternatives(gateway.create_key("new", account=account_id())) == {1}
    verified = gateway.create_key("old", account=account_id(), metadata={"verified": True})
    assert alternatives(verified) == {5}


@pytest.fixture
def surge_store(postgres_url: str) -> Iterator[str]:
    """A database of its own: a surge in the shared one would hold the accounts other tests
    create within the hour. Set up before the gateways, so dropped after they stop."""
    with private_database(postgres_url) as url:
        yield url


def test_accounts_created_in_a_sign_up_surge_are_held_on_every_replica(
    surge_store: str, start_gateway: GatewayFactory, redis_url: str
) -> None:
    shared = {
        "store": surge_store,
        "limits": {"backend": redis_url},
        "accounts": {"allowances": ALLOWANCES, "surge": {"min_history_hours": 12, "windows": {1: 3}}},
    }
    replicas = [start_gateway(name=f"surge{i}", **shared) for i in range(2)]
    now = datetime.now(UTC)
    for hour in range(24):  # a day of ordinary sign-ups: one an hour
        created = (now - timedelta(hours=24 - hour)).isoformat()
        replicas[0].create_key(f"past-{hour}", account=f"past-{hour}", metadata={"created_at": created})
    keys = [replicas[i % 2].create_key(f"burst-{i}", account=f"burst-{i}") for i in range(30)]
    vouched = replicas[0].create_key("burst-paid", account="paid", metadata={"paid_usd": 25.0})
    for replica in replicas:
        deadline = time.monotonic() + 5
        # Each replica polls the store. Until it has seen the surge, the account is an
        # ordinary newcomer, and these very requests may spend its 10 rows: a 429 for that
        # is not the surge's.
        while "surge" not in str((answer := embed(replica, keys[-1], 1))[2]):
            assert time.monotonic() < deadline, "the surge did not reach the gateway"
            time.sleep(0.1)
        _, headers, body = answer
        assert body["error"]["code"] == "probation_limit" and headers["x-modelfence-trust"] == "probation"
        message = body["error"]["message"]
        assert "surge" in message and "gets no answers yet" in message and "verified or the account has paid" in message
        assert "retry-after" not in headers
        assert embed(replica, keys[0], 1)[0] == 429  # the first of the crowd too, once found
        assert embed(replica, vouched, 1)[0] == 200  # paid: released
        metrics = httpx.get(replica.url + "/metrics").text
        assert "modelfence_signup_surges_total" in metrics
        assert "modelfence_signup_surges_total 0.0" not in metrics
        status, view = http_json("GET", f"{replica.url}/admin/v1/signups", token=replica.admin_token)
        assert status == 200 and view["enabled"] and view["surges"][-1]["accounts"] >= 30
        assert view["windows"] == [{"hours": 1.0, "signups": 31, "expected": view["windows"][0]["expected"]}]
        assert 0.1 < view["windows"][0]["expected"] < 0.2  # 24 sign-ups in the week the baseline reads
        assert http_json("GET", f"{replica.url}/admin/v1/signups")[0] == 401
