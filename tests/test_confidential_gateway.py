"""The gateway's key broker, end to end with real processes: a model server's worker gets
its sealed head's key from ``modelfence serve`` over HTTP (with the broker's own token, not
the admin token), the decision is audited, and the security level (``simulated`` here) is
in /readyz, the capabilities and every record."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelfence.confidential.broker import ReleaseRefused
from modelfence.confidential.keyfile import write_key_file
from modelfence.confidential.launcher import measurement
from modelfence.confidential.remote import RemoteBroker
from modelfence.confidential.sealing import read_header
from modelfence.demo import private_digits
from modelfence.errors import ModelFenceError
from modelfence.testing.processes import http_json
from tests.conftest import ADMIN_TOKEN, GatewayFactory

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

BROKER_TOKEN = "test-broker-token-0123456789"
RELEASE = "/confidential/v1/release"


def _confidential(tmp_path: Path, platform: Ed25519PrivateKey, **overrides: Any) -> dict[str, Any]:
    return {"confidential": {
        "enabled": True,
        "token": BROKER_TOKEN,
        "kek_file": str(tmp_path / "broker.key"),
        "audit_log": str(tmp_path / "audit.jsonl"),
        "measurements": [measurement(private_digits.WORKER_CONFIG)],
        "sim_platform_public_key": platform.public_key().public_bytes_raw().hex(),
        **overrides,
    }}


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    kek = write_key_file(tmp_path / "broker.key")
    folder = tmp_path / "digits"
    return folder, private_digits.prepare(folder, kek)


def test_a_worker_gets_its_key_from_the_gateway_and_serves_the_private_head(
    tmp_path: Path, start_gateway: GatewayFactory, sealed: tuple[Path, Ed25519PrivateKey]
) -> None:
    folder, platform = sealed
    gateway = start_gateway(**_confidential(tmp_path, platform))
    with RemoteBroker(gateway.url, BROKER_TOKEN) as broker:
        model = private_digits.load(folder, broker)
    try:
        assert model.test_accuracy > 0.9  # the public layer here, the sealed head in the worker
        assert model.estimator.security_level == "simulated"
        x, y = model.dataset()
        assert (model.predict(x[:200]) == y[:200]).mean() > 0.9  # as the demo upstream calls it
    finally:
        model.estimator.close()
    _, audit = http_json("GET", gateway.url + "/admin/v1/confidential/audit", token=ADMIN_TOKEN)
    record = audit["data"][-1]
    assert (record["decision"], record["artifact_id"], record["security_level"]) == (
        "released", private_digits.ARTIFACT_ID, "simulated")
    assert audit["security_level"] == "simulated"
    _, ready = http_json("GET", gateway.url + "/readyz")
    assert ready["confidential"] == {"security_level": "simulated"}
    _, capabilities = http_json("GET", gateway.url + "/admin/v1/capabilities", token=ADMIN_TOKEN)
    assert capabilities["confidential"] == {"enabled": True, "profile": "development",
                                            "tee_types": ["sim"], "security_level": "simulated"}
    log = (tmp_path / "gateway.log").read_text()
    assert "security level SIMULATED" in log
    assert [json.loads(line)["decision"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()] == ["released"]


def test_a_worker_the_policy_does_not_list_gets_a_403_with_the_reason(
    tmp_path: Path, start_gateway: GatewayFactory, sealed: tuple[Path, Ed25519PrivateKey]
) -> None:
    folder, platform = sealed
    other = measurement(json.dumps({"output": "labels"}).encode())
    gateway = start_gateway(**_confidential(tmp_path, platform, measurements=[other]))
    with RemoteBroker(gateway.url, BROKER_TOKEN) as broker, \
            pytest.raises(ReleaseRefused, match="measurement is not one the policy allows"):
        private_digits.load(folder, broker)
    _, audit = http_json("GET", gateway.url + "/admin/v1/confidential/audit", token=ADMIN_TOKEN)
    assert audit["data"][-1]["decision"] == "refused"


def test_the_broker_has_a_token_of_its_own(
    tmp_path: Path, start_gateway: GatewayFactory, sealed: tuple[Path, Ed25519PrivateKey]
) -> None:
    gateway = start_gateway(**_confidential(tmp_path, sealed[1]))
    challenge = gateway.url + "/confidential/v1/challenge"
    assert http_json("POST", challenge, {})[0] == 401
    assert http_json("POST", challenge, {}, token=ADMIN_TOKEN)[0] == 401  # not the admin token
    status, body = http_json("POST", challenge, {}, token=BROKER_TOKEN)
    assert status == 200 and body["security_level"] == "simulated"
    # ... and the broker token opens nothing else.
    assert http_json("GET", gateway.url + "/admin/v1/keys", token=BROKER_TOKEN)[0] == 401
    assert http_json("GET", gateway.url + "/admin/v1/confidential/audit", token=BROKER_TOKEN)[0] == 401


def test_a_broker_url_in_the_clear_is_refused_unless_loopback() -> None:
    with pytest.raises(ModelFenceError, match="https"):
        RemoteBroker("http://gateway.example:8080", BROKER_TOKEN)
    RemoteBroker("http://127.0.0.1:1", BROKER_TOKEN).close()
    RemoteBroker("https://gateway.example", BROKER_TOKEN).close()


EVIDENCE = {"tee_type": "sim", "measurement": "0" * 96, "debug": False, "security_version": 1,
            "report_data": "0" * 128, "issued_at": 1.0, "signature": "", "raw": "", "aux": ""}
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"header": "***"}, "header"),
    ({"header": base64.b64encode(b"{}").decode()}, "header"),
    ({"public_key": "zz" * 32}, "public_key"),
    ({"public_key": 7}, "public_key"),
    ({"nonce": "00" * 31}, "nonce"),
    ({"evidence": {"tee_type": "sim"}}, "evidence"),
    ({"evidence": "sim"}, "evidence"),
    ({"evidence": {**EVIDENCE, "tee_type": "sgx"}}, "tee_type"),
    ({"evidence": {**EVIDENCE, "debug": "false"}}, "debug"),
    ({"evidence": {**EVIDENCE, "security_version": 1e999}}, "security_version"),
    ({"evidence": {**EVIDENCE, "security_version": 2**40}}, "security_version"),
    ({"evidence": {**EVIDENCE, "issued_at": 1e999}}, "issued_at"),
    ({"evidence": {**EVIDENCE, "measurement": "a" * 200_000}}, "measurement"),
    ({"evidence": {**EVIDENCE, "raw": "A" * 100_000}}, "raw"),
    ({"evidence": {**EVIDENCE, "raw": "***"}}, "evidence"),
    ({"surprise": 1}, "surprise"),
]


def test_hostile_release_requests_get_a_422_naming_the_field(
    tmp_path: Path, start_gateway: GatewayFactory, sealed: tuple[Path, Ed25519PrivateKey]
) -> None:
    gateway = start_gateway(**_confidential(tmp_path, sealed[1]))
    header = read_header(sealed[0] / private_digits.SEALED_FILE)
    for change, param in HOSTILE:  # one gateway for all: each start takes seconds
        body = {"header": base64.b64encode(header.raw).decode(), "evidence": EVIDENCE,
                "public_key": "00" * 32, "nonce": "00" * 32, **change}
        status, answer = http_json("POST", gateway.url + RELEASE, body, token=BROKER_TOKEN)
        assert status == 422, (change, answer)
        assert param in json.dumps(answer["error"]), (change, answer)
    _, audit = http_json("GET", gateway.url + "/admin/v1/confidential/audit", token=ADMIN_TOKEN)
    assert audit["data"] == []  # refused before the broker: nothing to audit, nothing changed


def test_without_the_confidential_section_nothing_is_mounted(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    status, _ = http_json("POST", gateway.url + "/confidential/v1/challenge", {},
                          token=BROKER_TOKEN)
    assert status == 404
    _, ready = http_json("GET", gateway.url + "/readyz")
    assert "confidential" not in ready
    _, capabilities = http_json("GET", gateway.url + "/admin/v1/capabilities", token=ADMIN_TOKEN)
    assert capabilities["confidential"]["security_level"] == "off"


def test_a_production_broker_builds_the_hardware_verifiers_and_refuses_sim(
    tmp_path: Path, start_gateway: GatewayFactory, sealed: tuple[Path, Ed25519PrivateKey]
) -> None:
    folder, platform = sealed
    gateway = start_gateway(**_confidential(
        tmp_path, platform, profile="production", tee_types=["tdx", "sev-snp", "nitro"],
        sim_platform_public_key=None,
    ))
    _, ready = http_json("GET", gateway.url + "/readyz")
    assert ready["confidential"] == {"security_level": "hardware"}
    with RemoteBroker(gateway.url, BROKER_TOKEN) as broker, \
            pytest.raises(ReleaseRefused, match="tee type 'sim' is not allowed"):
        private_digits.load(folder, broker)
    _, audit = http_json("GET", gateway.url + "/admin/v1/confidential/audit", token=ADMIN_TOKEN)
    assert audit["data"][-1]["decision"] == "refused"
    assert "SIMULATED" not in (tmp_path / "gateway.log").read_text()
