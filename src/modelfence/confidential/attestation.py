"""Attestation roles (IETF RATS): the evidence a worker presents and the verifier's result.

An Attester (the worker, through its platform) produces :class:`Evidence`: which TEE, the
measurement of the code and configuration it launched, whether it runs in debug mode, its
security version, and 64 bytes of report data the worker chose — here always
``report_data(nonce, worker public key, artifact digest)``, so the evidence answers one
challenge, for one key, for one artifact. A :class:`Verifier` checks the platform's
signature and freshness and appraises the claims into an :class:`AttestationResult`
(shaped like an EAT Attestation Result: a status, the claims, and the security level).

The ``sim`` platform is the only one a worker here can attest with (this machine has no
TEE): a launcher measures the worker before starting it and alone holds the simulated
platform's signing key, and every result it yields says ``security_level: simulated``.
Hardware evidence (``tdx``, ``sev-snp``, ``nitro``) carries the platform's own bytes in
``raw`` (and, for SEV-SNP, the certificate table in ``aux``); its claim fields are only
hints, and the verifiers in ``tdx.py``, ``snp.py`` and ``nitro.py`` return the claims they
parsed from signed bytes in the :class:`AttestationResult`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import struct
from collections.abc import Callable, Iterable
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
    """What an attester presents. For hardware TEE types the claim fields are hints: the
    verifier reads the claims from ``raw`` (the platform's signed report, quote or
    document) and ``aux`` (supplemental data, e.g. the configfs-tsm auxblob)."""

    tee_type: str  # "sim", "tdx", "sev-snp" or "nitro"
    measurement: str
    debug: bool
    security_version: int
    report_data: bytes
    issued_at: float
    signature: bytes = b""
    raw: bytes = b""
    aux: bytes = b""

    def to_dict(self) -> dict[str, object]:
        return {**json.loads(self.signed_part()), "signature": self.signature.hex(),
                "raw": base64.b64encode(self.raw).decode(), "aux": base64.b64encode(self.aux).decode()}

    @classmethod
    def from_dict(cls, doc: dict[str, object]) -> Evidence:
        """Evidence as it crossed a process boundary; ``ValueError`` if malformed."""
        try:
            debug, version, issued = doc["debug"], doc["security_version"], doc["issued_at"]
            if not isinstance(debug, bool) or isinstance(version, bool) or not isinstance(version, int):
                raise TypeError("debug must be a boolean and security_version an integer")
            if isinstance(issued, bool) or not isinstance(issued, int | float) \
                    or not math.isfinite(issued):
                raise TypeError("issued_at must be a finite number")
            return cls(str(doc["tee_type"]), str(doc["measurement"]), debug, version,
                       bytes.fromhex(str(doc["report_data"])), float(issued),
                       bytes.fromhex(str(doc["signature"])),
                       base64.b64decode(str(doc.get("raw", "")), validate=True),
                       base64.b64decode(str(doc.get("aux", "")), validate=True))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # binascii.Error too
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
    """The verifier's appraisal (EAR-like). ``reasons`` are empty when affirming; the claims
    are the ones the verifier read from signed bytes (unverified when contraindicated)."""

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


class EvidenceError(ValueError):
    """Hardware evidence that is malformed or fails a check; the message is the reason."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a hardware verifier read from evidence after checking its signatures and chain."""

    measurement: str
    debug: bool
    security_version: int
    report_data: bytes


def appraise_hardware(tee_type: str, evidence: Evidence, expected_report_data: bytes,
                      check: Callable[[Evidence], Claims]) -> AttestationResult:
    """A hardware verifier's result: ``check`` parses and verifies the platform's bytes and
    raises ``EvidenceError`` naming what is wrong. That, or any other error hostile bytes
    provoke in a parser underneath, becomes a contraindicated result with the reason:
    malformed evidence never escapes as an exception."""
    def refused(reason: str, claims: Claims | None = None) -> AttestationResult:
        claims = claims or Claims("", False, 0, b"")
        return AttestationResult("contraindicated", tee_type, claims.measurement, claims.debug,
                                 claims.security_version, "hardware", (reason,))

    if evidence.tee_type != tee_type:
        return refused(f"evidence is {evidence.tee_type!r}, not {tee_type!r}")
    try:
        claims = check(evidence)
    except EvidenceError as exc:
        return refused(str(exc))
    except Exception as exc:  # noqa: BLE001 -- e.g. a certificate field parsed lazily
        return refused(f"malformed evidence: {type(exc).__name__}: {exc}")
    if not hmac.compare_digest(claims.report_data, expected_report_data):
        return refused("report data does not bind this nonce, worker key and artifact", claims)
    return AttestationResult("affirming", tee_type, claims.measurement, claims.debug,
                             claims.security_version, "hardware")


class Verifier(Protocol):
    """Checks one TEE type's evidence: signature, freshness, and the report data bound."""

    tee_type: str
    security_level: SecurityLevel
    # False where the evidence carries no security version (Nitro): no minimum applies.
    reports_security_version: bool

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
    reports_security_version = True

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
