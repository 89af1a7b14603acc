"""The key broker: releases a sealed part's data key only to an attested worker.

The exchange (a challenge, then one release)::

    nonce = broker.challenge()
    secret = X25519PrivateKey.generate()                       # the worker's, never leaves it
    public = secret.public_key().public_bytes_raw()
    evidence = platform.quote(measurement, report_data(nonce, public, header.digest), now)
    released = broker.release(header, evidence, public, nonce) # raises ReleaseRefused
    data_key = receive_key(secret, released, header.digest)

The broker checks, and writes every decision to a hash-chained audit log with its
security level: the nonce is one it issued, unexpired and unused (one release per nonce);
the artifact's version is not below the policy's minimum for it (no rollback); the TEE type
is allowed, and the ``production`` profile refuses ``sim``; the verifier for that type
affirms the evidence (signature, freshness, report data binding this nonce, this worker key
and this artifact); and in the claims the verifier returns (never the evidence's own
fields) the measurement is one the policy lists, debug is off, and the security version is
high enough. Only then is the data key unwrapped and wrapped again to the
worker's X25519 key (ephemeral X25519, HKDF-SHA256, AES-256-GCM with the artifact digest
as associated data), so only that worker can read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelfence.confidential.attestation import AttestationResult, Evidence, Verifier, report_data
from modelfence.confidential.sealing import SealedHeader, parse_header, unwrap_data_key
from modelfence.errors import ModelFenceError

Profile = Literal["development", "production"]
NONCE_BYTES = 32
MAX_OUTSTANDING = 10_000  # challenges not yet answered; the oldest are dropped past it


class ReleaseRefused(ModelFenceError):
    """The broker refused to release a key; ``str()`` says which check failed."""


@dataclass(frozen=True, slots=True)
class ReleasePolicy:
    profile: Profile
    tee_types: frozenset[str]
    measurements: frozenset[str]
    min_security_version: int = 1
    allow_debug: bool = False
    min_artifact_versions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReleasedKey:
    """A data key wrapped to one worker's X25519 key."""

    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes
    security_level: str


def _release_key(shared: bytes, digest: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=b"modelfence-key-release\x00" + bytes.fromhex(digest)).derive(shared)


def wrap_to_worker(data_key: bytes, worker_public_key: bytes, digest: str, level: str) -> ReleasedKey:
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(worker_public_key))
    nonce = os.urandom(12)
    ciphertext = AESGCM(_release_key(shared, digest)).encrypt(nonce, data_key, bytes.fromhex(digest))
    return ReleasedKey(ephemeral.public_key().public_bytes_raw(), nonce, ciphertext, level)


def receive_key(worker_secret: X25519PrivateKey, released: ReleasedKey, digest: str) -> bytes:
    """The worker's side: the data key, if it was wrapped to this worker for this artifact."""
    shared = worker_secret.exchange(X25519PublicKey.from_public_bytes(released.ephemeral_public_key))
    try:
        return AESGCM(_release_key(shared, digest)).decrypt(released.nonce, released.ciphertext,
                                                            bytes.fromhex(digest))
    except InvalidTag as exc:
        raise ReleaseRefused("the released key is not for this worker or artifact") from exc


class AuditLog:
    """Append-only JSON lines, each holding the hash of the one before (tampering shows).

    ``path`` None keeps the records in memory only (tests, the demo). Either way only the
    latest ``keep`` records stay in memory (``records``); the file holds them all.
    """

    GENESIS = "0" * 64

    def __init__(self, path: Path | None = None, *, keep: int = 10_000) -> None:
        if keep < 1:
            raise ValueError("keep at least one record in memory: the chain continues from it")
        self.path = path
        self.records: deque[dict[str, Any]] = deque(maxlen=keep)
        self.count = 0
        self._last = self.GENESIS
        self._lock = threading.Lock()  # one writer at a time, or two records share a seq
        if path is not None and path.exists():
            verified = verify_chain(path)
            if verified:
                self.count, self._last = len(verified), verified[-1]["hash"]
            self.records.extend(verified)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            entry = {**record, "seq": self.count, "prev": self._last}
            entry["hash"] = _record_hash(entry)
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._last = entry["hash"]
            self.records.append(entry)
            self.count += 1
            return entry

    def latest(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` records held in memory, oldest first."""
        with self._lock:
            return list(self.records)[-limit:]


def _record_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_chain(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log, after checking the chain; raises on a broken link."""
    records: list[dict[str, Any]] = []
    last = AuditLog.GENESIS
    for number, line in enumerate(path.read_text().splitlines()):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ModelFenceError(f"{path}: audit record {number} is not JSON (a torn write?)") from exc
        if not isinstance(entry, dict) or entry.get("prev") != last or entry.get("seq") != number or entry.get("hash") != _record_hash(entry):
            raise ModelFenceError(f"{path}: audit record {number} is altered or out of place")
        last = entry["hash"]
        records.append(entry)
    return records


class KeyBroker:
    """Challenges workers and releases data keys under a :class:`ReleasePolicy`."""

    def __init__(self, kek: bytes, policy: ReleasePolicy, verifiers: Mapping[str, Verifier],
                 audit: AuditLog, *, nonce_ttl: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        if policy.profile == "production" and ("sim" in policy.tee_types or policy.allow_debug):
            raise ModelFenceError("the production profile refuses tee type 'sim' (simulated) "
                                  "and debug evidence")
        self._kek = kek
        self.policy = policy
        self.verifiers = dict(verifiers)
        self.audit = audit
        self.nonce_ttl = nonce_ttl
        self._clock = clock
        self._nonces: dict[bytes, float] = {}  # outstanding challenge -> issued at
        self._lock = threading.Lock()  # challenges and releases may come from several threads

    def challenge(self) -> bytes:
        """A fresh nonce; answered once, within ``nonce_ttl`` seconds."""
        with self._lock:
            if len(self._nonces) >= MAX_OUTSTANDING:
                del self._nonces[next(iter(self._nonces))]
            nonce = secrets.token_bytes(NONCE_BYTES)
            self._nonces[nonce] = self._clock()
            return nonce

    def release(self, header: SealedHeader, evidence: Evidence, worker_public_key: bytes,
                nonce: bytes) -> ReleasedKey:
        now = self._clock()
        with self._lock:
            issued = self._nonces.pop(nonce, None)  # one answer per challenge, right or wrong
        result: AttestationResult | None = None
        try:
            # The checks read the stored header, not fields a caller could have edited.
            header = parse_header(header.raw)
            if issued is None:
                raise ReleaseRefused("nonce was not issued by this broker, or was already used")
            if not 0 <= now - issued <= self.nonce_ttl:
                raise ReleaseRefused(f"nonce expired ({now - issued:.0f} s old; ttl {self.nonce_ttl:.0f} s)")
            minimum = self.policy.min_artifact_versions.get(header.artifact_id, 1)
            if header.version < minimum:
                raise ReleaseRefused(f"artifact {header.artifact_id!r} v{header.version} is below "
                                     f"the minimum v{minimum} (rollback)")
            if evidence.tee_type not in self.policy.tee_types:
                raise ReleaseRefused(f"tee type {evidence.tee_type!r} is not allowed "
                                     f"({', '.join(sorted(self.policy.tee_types))})")
            verifier = self.verifiers.get(evidence.tee_type)
            if verifier is None:
                raise ReleaseRefused(f"no verifier for tee type {evidence.tee_type!r}")
            if len(worker_public_key) != 32:
                raise ReleaseRefused("worker public key must be 32 bytes (X25519)")
            expected = report_data(nonce, worker_public_key, header.digest)
            result = verifier.verify(evidence, expected, now)
            if not result.affirming:
                raise ReleaseRefused("evidence does not verify: " + "; ".join(result.reasons))
            # The claims appraised are the verifier's, read from signed bytes; for hardware
            # TEE types the evidence's own claim fields are unverified hints.
            if result.measurement not in self.policy.measurements:
                raise ReleaseRefused("measurement is not one the policy allows (changed code or config)")
            if result.debug and not self.policy.allow_debug:
                raise ReleaseRefused("worker runs in debug mode")
            if verifier.reports_security_version and \
                    result.security_version < self.policy.min_security_version:
                raise ReleaseRefused(f"security version {result.security_version} is below "
                                     f"{self.policy.min_security_version}")
            if self.policy.profile == "production" and result.security_level != "hardware":
                raise ReleaseRefused(f"the production profile needs hardware evidence, not "
                                     f"{result.security_level}")
            released = wrap_to_worker(unwrap_data_key(header, self._kek), worker_public_key,
                                      header.digest, result.security_level)
        except Exception as exc:  # noqa: BLE001 -- every failure is a refusal, and audited
            refused = exc if isinstance(exc, ReleaseRefused) else ReleaseRefused(
                f"{type(exc).__name__}: {exc}")
            self._record("refused", str(refused), header, evidence, result)
            raise refused from (None if refused is exc else exc)
        self._record("released", "", header, evidence, result)
        return released

    def _record(self, decision: str, reason: str, header: SealedHeader, evidence: Evidence,
                result: AttestationResult | None) -> None:
        # Only what a verifier read from signed evidence is recorded as the measurement and
        # the security level; a refusal before any verification says so, and keeps a bounded
        # copy of what the caller claimed.
        self.audit.append({
            "ts": self._clock(), "decision": decision, "reason": reason[:1000],
            "artifact_id": header.artifact_id, "version": header.version, "digest": header.digest,
            "tee_type": evidence.tee_type[:32],
            "measurement": result.measurement if result else "",
            "claimed_measurement": "" if result else evidence.measurement[:128],
            "security_level": result.security_level if result else "unverified",
            "profile": self.policy.profile,
        })
