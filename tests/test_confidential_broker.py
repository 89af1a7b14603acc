"""The key broker: an attested worker gets the data key; every negative case is refused,
and every decision is in the hash-chained audit log with its security level."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modelfence.confidential.attestation import (
    Evidence,
    SimPlatform,
    SimVerifier,
    measure,
    report_data,
)
from modelfence.confidential.broker import (
    AuditLog,
    KeyBroker,
    ReleasePolicy,
    ReleaseRefused,
    receive_key,
    verify_chain,
)
from modelfence.confidential.sealing import new_key, open_sealed, read_header, seal
from modelfence.errors import ModelFenceError

from .tee_evidence import NOW as HARDWARE_NOW
from .tee_evidence import NitroForge, TdxForge, p256

KEK = new_key()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """A sealed part, a measured worker, a platform, and a broker that trusts that worker."""

    tmp: Path
    clock: Clock
    platform: SimPlatform
    broker: KeyBroker
    measurement: str
    sealed: Path
    worker: X25519PrivateKey

    @property
    def public(self) -> bytes:
        return self.worker.public_key().public_bytes_raw()


def worker_files(tmp: Path, code: bytes = b"def infer(x): return x @ W") -> list[Path]:
    (tmp / "worker.py").write_bytes(code)
    return [tmp / "worker.py"]


def build(tmp: Path, *, version: int = 3, profile: str = "development") -> World:
    clock, platform = Clock(), SimPlatform()
    measurement = measure(tmp, worker_files(tmp), b"output: labels-only")
    policy = ReleasePolicy(profile=profile, tee_types=frozenset({"sim"}), measurements=frozenset({measurement}),  # type: ignore[arg-type]
                           min_security_version=2, min_artifact_versions={"digits-head": 3})
    broker = KeyBroker(KEK, policy, {"sim": SimVerifier(platform.public_key, max_age=30)}, AuditLog(tmp / "audit.log"),
                       clock=clock, nonce_ttl=60)
    sealed = tmp / "head.sealed"
    seal({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, sealed, kek=KEK, artifact_id="digits-head",
         version=version)
    return World(tmp, clock, platform, broker, measurement, sealed, X25519PrivateKey.generate())


def attempt(world: World, *, measurement: str | None = None, debug: bool = False, svn: int = 2,
            platform: SimPlatform | None = None, evidence_key: bytes | None = None, sent_key: bytes | None = None,
            nonce_age: float = 0.0, evidence_age: float = 0.0, reuse: bool = False, foreign_nonce: bool = False,
            tee_type: str | None = None) -> bytes:
    """One release with one thing changed; the worker's data key when released."""
    header = read_header(world.sealed)
    nonce = world.broker.challenge()
    if foreign_nonce:
        nonce = bytes(32)
    world.clock.now += nonce_age
    data = report_data(nonce, evidence_key or world.public, header.digest)
    evidence = (platform or world.platform).quote(measurement or world.measurement, data,
                                                  world.clock.now - evidence_age, debug=debug, security_version=svn)
    if tee_type is not None:
        evidence = replace(evidence, tee_type=tee_type)
    if reuse:
        world.broker.release(header, evidence, sent_key or world.public, nonce)
    released = world.broker.release(header, evidence, sent_key or world.public, nonce)
    return receive_key(world.worker, released, header.digest)


def test_an_attested_worker_gets_the_key_and_opens_the_part(tmp_path: Path) -> None:
    world = build(tmp_path)
    data_key = attempt(world)
    _, tensors = open_sealed(world.sealed, data_key)
    np.testing.assert_array_equal(tensors["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    (record,) = world.broker.audit.records
    assert record["decision"] == "released" and record["security_level"] == "simulated"
    assert record["tee_type"] == "sim" and record["artifact_id"] == "digits-head"


def _tampered_code(world: World) -> dict:
    return {"measurement": measure(world.tmp, worker_files(world.tmp, b"def infer(x): leak(W)"), b"output: labels-only")}


def _tampered_config(world: World) -> dict:
    return {"measurement": measure(world.tmp, worker_files(world.tmp), b"output: full-probabilities")}


NEGATIVE: dict[str, tuple[Callable[[World], dict], str]] = {
    "tampered worker code": (_tampered_code, "measurement"),
    "tampered worker config": (_tampered_config, "measurement"),
    "stale nonce": (lambda w: {"nonce_age": 61.0}, "expired"),
    "replayed nonce": (lambda w: {"reuse": True}, "already used"),
    "nonce never issued": (lambda w: {"foreign_nonce": True}, "not issued"),
    "swapped recipient key": (lambda w: {"sent_key": X25519PrivateKey.generate().public_key().public_bytes_raw()},
                              "report data"),
    "debug evidence": (lambda w: {"debug": True}, "debug"),
    "forged signature": (lambda w: {"platform": SimPlatform()}, "signature"),
    "expired evidence": (lambda w: {"evidence_age": 31.0}, "issued 31 s ago"),
    "evidence from the future": (lambda w: {"evidence_age": -5.0}, "issued"),
    "old security version": (lambda w: {"svn": 1}, "security version"),
    "unknown tee type": (lambda w: {"tee_type": "tdx"}, "not allowed"),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_every_negative_case_is_refused_and_audited(tmp_path: Path, case: str) -> None:
    world = build(tmp_path)
    change, reason = NEGATIVE[case]
    with pytest.raises(ReleaseRefused, match=reason):
        attempt(world, **change(world))
    last = world.broker.audit.records[-1]
    assert last["decision"] == "refused" and reason in last["reason"]


def test_a_rollback_to_an_older_artifact_version_is_refused(tmp_path: Path) -> None:
    world = build(tmp_path, version=2)
    with pytest.raises(ReleaseRefused, match="rollback"):
        attempt(world)
    # The broker reads the stored header, not the fields a caller hands it.
    header = read_header(world.sealed)
    nonce = world.broker.challenge()
    evidence = world.platform.quote(world.measurement, report_data(nonce, world.public, header.digest),
                                    world.clock.now, security_version=2)
    with pytest.raises(ReleaseRefused, match="rollback"):
        world.broker.release(replace(header, version=3), evidence, world.public, nonce)
    assert world.broker.audit.records[-1]["version"] == 2


def test_a_failure_inside_the_release_is_a_refusal_and_is_audited(tmp_path: Path) -> None:
    world = build(tmp_path)
    header = read_header(world.sealed)
    low_order = bytes(32)  # X25519 refuses to agree a key with the all-zero point
    nonce = world.broker.challenge()
    evidence = world.platform.quote(world.measurement, report_data(nonce, low_order, header.digest),
                                    world.clock.now, security_version=2)
    with pytest.raises(ReleaseRefused, match="ValueError"):
        world.broker.release(header, evidence, low_order, nonce)
    assert world.broker.audit.records[-1]["decision"] == "refused"


def test_the_measurement_covers_where_each_file_lies(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "worker.py").write_bytes(b"code")
    (tmp_path / "pkg" / "worker.py").write_bytes(b"code")
    top = measure(tmp_path, [tmp_path / "worker.py"], b"")
    moved = measure(tmp_path, [tmp_path / "pkg" / "worker.py"], b"")
    assert top != moved
    assert top != measure(tmp_path, [tmp_path / "worker.py"], b"debug: true")


def test_the_production_profile_refuses_simulated_and_debug_evidence(tmp_path: Path) -> None:
    with pytest.raises(ModelFenceError, match="production profile refuses"):
        build(tmp_path, profile="production")
    with pytest.raises(ModelFenceError, match="production profile refuses"):
        KeyBroker(KEK, ReleasePolicy("production", frozenset({"tdx"}), frozenset(), allow_debug=True), {},
                  AuditLog())
    (tmp_path / "dev").mkdir()
    world = build(tmp_path / "dev")
    world.broker = KeyBroker(KEK, ReleasePolicy("production", frozenset({"tdx"}), frozenset({"m"})), {},
                             AuditLog(), clock=world.clock)
    with pytest.raises(ReleaseRefused, match="'sim' is not allowed"):
        attempt(world)


def test_a_key_released_to_one_worker_is_useless_to_another(tmp_path: Path) -> None:
    world = build(tmp_path)
    header = read_header(world.sealed)
    nonce = world.broker.challenge()
    evidence = world.platform.quote(world.measurement, report_data(nonce, world.public, header.digest), world.clock.now,
                                    security_version=2)
    released = world.broker.release(header, evidence, world.public, nonce)
    with pytest.raises(ReleaseRefused, match="not for this worker"):
        receive_key(X25519PrivateKey.generate(), released, header.digest)


def test_the_audit_log_keeps_only_its_latest_records_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, keep=3)
    for n in range(5):
        log.append({"decision": "refused", "n": n})
    assert [r["n"] for r in log.records] == [2, 3, 4]
    assert len(verify_chain(path)) == 5  # the file keeps every record
    reopened = AuditLog(path, keep=3)
    assert reopened.append({"decision": "released"})["seq"] == 5
    assert len(verify_chain(path)) == 6


def test_the_audit_log_is_a_chain_that_shows_tampering(tmp_path: Path) -> None:
    world = build(tmp_path)
    attempt(world)
    with pytest.raises(ReleaseRefused):
        attempt(world, debug=True)
    path = tmp_path / "audit.log"
    records = verify_chain(path)
    assert [r["decision"] for r in records] == ["released", "refused"]
    assert list(AuditLog(path).records) == records  # reopened, the chain continues
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["decision"] = "released"
    path.write_text(lines[0] + "\n" + json.dumps(edited) + "\n")
    with pytest.raises(ModelFenceError, match="record 1"):
        verify_chain(path)
    path.write_text(lines[1] + "\n")  # the first record removed
    with pytest.raises(ModelFenceError, match="record 0"):
        verify_chain(path)


# A hardware verifier in the broker: TDX quotes built to Intel's format under a test PKI
# (tests/tee_evidence.py). Every piece of evidence carries hint fields naming the allowed
# measurement, no debug and a high security version: the broker appraises the claims the
# verifier read from the quote, so a refusal below shows the hints are not what counts.


def hardware_release(tmp_path: Path, forge: TdxForge, **quote: Any) -> bytes:
    clock = Clock()
    clock.now = HARDWARE_NOW
    policy = ReleasePolicy("production", frozenset({"tdx"}), frozenset({TdxForge.MEASUREMENT}),
                           min_security_version=2, min_artifact_versions={"digits-head": 3})
    broker = KeyBroker(KEK, policy, {"tdx": forge.verifier()}, AuditLog(tmp_path / "audit.log"), clock=clock)
    sealed = tmp_path / "head.sealed"
    seal({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, sealed, kek=KEK, artifact_id="digits-head", version=3)
    header, worker = read_header(sealed), X25519PrivateKey.generate()
    public = worker.public_key().public_bytes_raw()
    nonce = broker.challenge()
    data = report_data(nonce, public, header.digest)
    evidence = Evidence("tdx", TdxForge.MEASUREMENT, False, 99, data, clock.now,
                        raw=forge.quote(data, **quote))
    try:
        return receive_key(worker, broker.release(header, evidence, public, nonce), header.digest)
    finally:
        last = broker.audit.records[-1]
        assert last["security_level"] == "hardware" and last["profile"] == "production"


def test_a_hardware_verifier_releases_under_the_production_profile(tmp_path: Path) -> None:
    forge = TdxForge()
    data_key = hardware_release(tmp_path, forge)
    _, tensors = open_sealed(tmp_path / "head.sealed", data_key)
    assert tensors["w"].shape == (3, 4)
    (record,) = verify_chain(tmp_path / "audit.log")
    assert record["decision"] == "released" and record["measurement"] == TdxForge.MEASUREMENT


HARDWARE_NEGATIVE: dict[str, tuple[Callable[[TdxForge], dict], str]] = {
    "debug TD": (lambda f: {"debug": True}, "debug mode"),
    "forged quote signature": (lambda f: {"quote_key": p256()}, "quote signature does not verify"),
    "expired PCK certificate": (lambda f: {"pck": f.expired_pck()}, "expired"),
    "measurement not in policy": (lambda f: {"mrtd": bytes(48)}, "measurement is not one the policy allows"),
    "old TDX module": (lambda f: {"svn": 1}, "security version 1 is below 2"),
}


@pytest.mark.parametrize("case", sorted(HARDWARE_NEGATIVE))
def test_a_hardware_verifier_refuses_in_the_broker(tmp_path: Path, case: str) -> None:
    forge = TdxForge()
    change, reason = HARDWARE_NEGATIVE[case]
    with pytest.raises(ReleaseRefused, match=reason):
        hardware_release(tmp_path, forge, **change(forge))
    (record,) = verify_chain(tmp_path / "audit.log")
    assert record["decision"] == "refused" and reason in record["reason"]
    if case == "measurement not in policy":  # the audit names what the quote measured, not the hint
        assert record["measurement"] != TdxForge.MEASUREMENT


def test_a_nitro_document_carries_no_security_version_and_needs_no_minimum(tmp_path: Path) -> None:
    """The policy's minimum security version (default 1) is not applied to Nitro, whose
    documents carry none; it still applies to the types that report one."""
    forge, clock = NitroForge(), Clock()
    clock.now = HARDWARE_NOW
    policy = ReleasePolicy("production", frozenset({"nitro"}), frozenset({NitroForge.MEASUREMENT}))
    broker = KeyBroker(KEK, policy, {"nitro": forge.verifier()}, AuditLog(), clock=clock)
    sealed = tmp_path / "head.sealed"
    seal({"w": np.ones((2, 2), dtype=np.float32)}, sealed, kek=KEK, artifact_id="digits-head", version=1)
    header, worker = read_header(sealed), X25519PrivateKey.generate()
    public = worker.public_key().public_bytes_raw()
    nonce = broker.challenge()
    data = report_data(nonce, public, header.digest)
    evidence = Evidence("nitro", "", False, 0, data, clock.now,
                        raw=forge.document(data, timestamp=clock.now))
    receive_key(worker, broker.release(header, evidence, public, nonce), header.digest)
    assert broker.audit.records[-1]["decision"] == "released"
