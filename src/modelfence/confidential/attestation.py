"""Attestation roles (IETF RATS): the evidence a worker presents and the verifier's result.

An Attester (the worker, through its platform) produces :class:`Evidence`: which TEE, the
measurement of the code and configuration it launched, whether it runs in debug mode, its
security version, and 64 bytes of report data the worker chose — here always
``report_data(nonce, worker public key, artifact digest)``, so the evidence answers one
challenge, for one key, for one artifact. A :class:`Verifier` checks the platform's
signature and freshness and appraises the claims into an :class:`AttestationResult`
(shaped like an EAT Attestation Result: a status, the claims, and the security level).

Only the ``sim`` platform exists here (this machine has no TEE): a launcher measures the
worker before starting it and alone holds the simulated platform's signing key. Every
result it yields says ``security_level: simulated``; nothing it attests is protected by
hardware.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SecurityLevel = Literal["simulated", "hardware"]
Status = Literal["affirming", "contraindicated"]
REPORT_DATA_BYTES = 64  # the size TDX and SEV-SNP reports give the guest to fill


def report_data(nonce: bytes, worker_public_key: bytes, artifact_digest: str) -> bytes:
    """``SHA-512(nonce ‖ worker public key ‖ artifact digest)``: what evidence must carry."""
    return hashlib.sha512(b"modelfence-report-data\x00" + nonce + worker_public_key
                          + bytes.fromhex(artifact_digest)).digest()


def measure(root: Path, files: Iterable[Path], config: bytes) -> str:
    """SHA-384 over the worker's code files (path under ``root`` and content, in path
    order, every field length-prefixed in bytes) and its configuration."""
    named = {path.resolve().relative_to(root.resolve()).as_posix(): path for path in files}
    h = hashlib.sha384(b"modelfence-measurement\x00")
    for name in sorted(named):
        encoded, content = name.encode(), named[name].read_bytes()
        h.update(struct.pack(">I", len(encoded)) + encoded + struct.pack(">Q", len(content)) + content)
    h.update(b"config\x00" + struct.pack(">Q", len(config)) + config)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Evidence:
    tee_type: str  # "sim" here; "tdx", "sev-snp", "nitro" where a verifier exists
    measurement: str
    debug: bool
    security_version: int
    report_data: bytes
    issued_at: float
    signature: bytes = b""

    def to_dict(self) -> dict[str, object]:
        return {**json.loads(self.signed_part()), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, doc: dict[str, object]) -> Evidence:
        """Evidence as it crossed a process boundary; ``ValueError`` if malformed."""
        try:
            return cls(str(doc["tee_type"]), str(doc["measurement"]), bool(doc["debug"]),
                       int(doc["security_version"]),  # type: ignore[call-overload]
                       bytes.fromhex(str(doc["report_data"])), float(doc["issued_at"]),  # type: ignore[arg-type]
                       bytes.fromhex(str(doc["signature"])))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed evidence: {exc}") from exc

    def signed_part(self) -> bytes:
        return json.dumps(
            {"tee_type": self.tee_type, "measurement": self.measurement, "debug": self.debug,
             "security_version": self.security_version, "report_data": self.report_data.hex(),
             "issued_at": self.issued_at},
            sort_keys=True, separators=(",", ":"),
        ).encode()


@dataclass(frozen=True, slots=True)
class AttestationResult:
    """The verifier's appraisal (EAR-like). ``reasons`` are empty when affirming."""

    status: Status
    tee_type: str
    measurement: str
    debug: bool
    security_version: int
    security_level: SecurityLevel
    reasons: tuple[str, ...] = ()

    @property
    def affirming(self) -> bool:
        return self.status == "affirming"


class Verifier(Protocol):
    """Checks one TEE type's evidence: signature, freshness, and the report data bound."""

    tee_type: str
    security_level: SecurityLevel

    def verify(self, evidence: Evidence, expected_report_data: bytes, now: float) -> AttestationResult: ...


class SimPlatform:
    """The simulated hardware root: signs evidence for what the launcher measured.

    The launcher holds this object and never hands its key to the worker; a worker can ask
    for a quote over its own report data only through the launcher. Simulated: a process
    on the same machine with the key could forge anything, which real TEEs prevent.
    """

    tee_type = "sim"

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def quote(self, measurement: str, data: bytes, now: float, *, debug: bool = False,
              security_version: int = 1) -> Evidence:
        if len(data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes")
        unsigned = Evidence(self.tee_type, measurement, debug, security_version, data, now)
        return Evidence(self.tee_type, measurement, debug, security_version, data, now,
                        self._key.sign(unsigned.signed_part()))


class SimVerifier:
    """Verifies ``sim`` evidence against the simulated platform's public key."""

    tee_type = "sim"
    security_level: SecurityLevel = "simulated"

    def __init__(self, platform_key: Ed25519PublicKey, *, max_age: float = 60.0) -> None:
        self.platform_key = platform_key
        self.max_age = max_age

    def verify(self, evidence: Evidence, expected_report_data: bytes, now: float) -> AttestationResult:
        reasons = []
        if evidence.tee_type != self.tee_type:
            reasons.append(f"evidence is {evidence.tee_type!r}, not {self.tee_type!r}")
        try:
            self.platform_key.verify(evidence.signature, evidence.signed_part())
        except InvalidSignature:
            reasons.append("signature does not verify against the platform key")
        if not 0 <= now - evidence.issued_at <= self.max_age:
            reasons.append(f"evidence issued {now - evidence.issued_at:.0f} s ago; "
                           f"accepted for {self.max_age:.0f} s")
        if evidence.report_data != expected_report_data:
            reasons.append("report data does not bind this nonce, worker key and artifact")
        return AttestationResult(
            "contraindicated" if reasons else "affirming", evidence.tee_type, evidence.measurement,
            evidence.debug, evidence.security_version, self.security_level, tuple(reasons),
        )
