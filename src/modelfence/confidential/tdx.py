"""Intel TDX: verify a version 4 quote (as configfs-tsm's ``outblob`` holds it) offline.

A quote is a 48-byte header, the 584-byte TD report body, and signature data: the ECDSA
P-256 signature over header and body, the attestation key that made it, and certification
data of type 6 (the Quoting Enclave's report, its signature by the PCK key, the QE's auth
data, and nested certification data of type 5: the PCK certificate chain in PEM).

Checked: the quote signature with the attestation key; the QE report signature with the
PCK leaf's key; that the QE report binds the attestation key (``report_data[:32] ==
SHA-256(attestation key ‖ QE auth data)``, the rest zero); the QE's signer and product
(Intel's TDX QE, as Intel's QE identity names it) and that the QE is not a debug enclave
(its report's ATTRIBUTES.DEBUG, bit 1, is 0); the PCK chain up to the pinned Intel SGX Root
CA, every certificate valid at ``now``. TD_ATTRIBUTES (TDX module ABI): the bits the spec
reserves (8-15, 17-26, 32-61) must be 0, and MIGRATABLE (bit 29), which lets a migration TD
export the TD's state to another platform, is refused; the TUD group (bits 0-7, "TD under
debug": DEBUG and the profiling bits HGS_PLUS_PROF, PERF_PROF, PMT_PROF), with which the TD
is not trusted, yields ``debug``, which the broker refuses. ICSSD, LASS, SEPT_VE_DISABLE,
PKS, KL, TPA and PERFMON are allowed. Not checked: TCB status (Intel PCS TCB info and QE
identity TCB levels, the QE's ISVSVN) and CRLs, which need collateral fetched online; XFAM,
MRCONFIGID, MROWNER, MROWNERCONFIG, MRSEAM and MRSIGNERSEAM.

Claims: ``measurement`` = hex SHA-384(MRTD ‖ RTMR0 ‖ RTMR1 ‖ RTMR2 ‖ RTMR3) (firmware,
then what it and the kernel measured); ``debug`` = any TUD bit of TD_ATTRIBUTES;
``security_version`` = TEE_TCB_SVN[1] * 256 + TEE_TCB_SVN[0]: the TDX module's major
version, then its SVN within that version (how Intel's TCB info orders them), so a newer
major version compares above every SVN of an older one; report data = REPORTDATA.
Freshness comes from the broker's nonce inside the report data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelfence.confidential.attestation import (
    AttestationResult,
    Claims,
    Evidence,
    EvidenceError,
    SecurityLevel,
    appraise_hardware,
)
from modelfence.confidential.certs import ec_key, load_pem, pinned, verify_chain

MAX_QUOTE_BYTES = 64 * 1024
HEADER_BYTES, BODY_BYTES, QE_REPORT_BYTES = 48, 584, 384
QUOTE_VERSION, ECDSA_P256, TEE_TDX = 4, 2, 0x81
INTEL_QE_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# Intel's TDX Quoting Enclave (QE identity "TD_QE"): its MRSIGNER and ISVPRODID.
INTEL_TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
TD_QE_PRODID = 2
QE_REPORT_CERT_DATA, PCK_CHAIN_CERT_DATA = 6, 5
SGX_ATTRIBUTES_DEBUG = 1 << 1  # in the first byte of a QE report's ATTRIBUTES (offset 48)
# TD_ATTRIBUTES: the TUD ("TD under debug") group, the reserved bits, and MIGRATABLE.
TD_ATTRIBUTES_TUD = 0xFF
TD_ATTRIBUTES_RESERVED = 0xFF << 8 | 0x3FF << 17 | ((1 << 30) - 1) << 32
TD_ATTRIBUTES_MIGRATABLE = 1 << 29


class _Reader:
    """Reads fields in order; every read is bounded by what is left."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.at, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.data) - self.at:
            raise EvidenceError(f"{self.what} truncated: {field} needs {n} bytes, "
                                f"{len(self.data) - self.at} left")
        self.at += n
        return self.data[self.at - n:self.at]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def end(self) -> None:
        if self.at != len(self.data):
            raise EvidenceError(f"{self.what} has {len(self.data) - self.at} bytes after its end")


@dataclass(frozen=True, slots=True)
class Quote:
    header: bytes
    body: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes

    @property
    def td_attributes(self) -> int:
        return int.from_bytes(self.body[120:128], "little")

    @property
    def security_version(self) -> int:
        """TEE_TCB_SVN[1] (the TDX module's major version) * 256 + TEE_TCB_SVN[0] (its SVN)."""
        return self.body[1] * 256 + self.body[0]

    @property
    def mrtd(self) -> bytes:
        return self.body[136:184]

    @property
    def rtmrs(self) -> tuple[bytes, ...]:
        return tuple(self.body[328 + 48 * i:376 + 48 * i] for i in range(4))

    @property
    def report_data(self) -> bytes:
        return self.body[520:584]


def parse_quote(raw: bytes) -> Quote:
    """Split a TDX quote v4 into its parts; ``EvidenceError`` on anything out of format."""
    if len(raw) > MAX_QUOTE_BYTES:
        raise EvidenceError(f"TDX quote is {len(raw)} bytes; at most {MAX_QUOTE_BYTES} accepted")
    quote = _Reader(raw, "TDX quote")
    header = quote.take(HEADER_BYTES, "header")
    version, key_type, tee_type = struct.unpack_from("<HHI", header)
    if (version, key_type, tee_type) != (QUOTE_VERSION, ECDSA_P256, TEE_TDX):
        raise EvidenceError(f"not a TDX quote v4 with an ECDSA P-256 key (version {version}, "
                            f"key type {key_type}, TEE type {tee_type:#x})")
    if header[12:28] != INTEL_QE_VENDOR:
        raise EvidenceError("quote's QE vendor is not Intel")
    body = quote.take(BODY_BYTES, "TD report body")
    signed = _Reader(quote.take(quote.u32("signature data length"), "signature data"),
                     "TDX quote signature data")
    quote.end()
    signature, attestation_key = signed.take(64, "quote signature"), signed.take(64, "attestation key")
    if signed.u16("certification data type") != QE_REPORT_CERT_DATA:
        raise EvidenceError("certification data is not a QE report (type 6)")
    certification = _Reader(signed.take(signed.u32("certification data size"), "certification data"),
                            "QE report certification data")
    signed.end()
    qe_report = certification.take(QE_REPORT_BYTES, "QE report")
    qe_report_signature = certification.take(64, "QE report signature")
    qe_auth_data = certification.take(certification.u16("QE auth data size"), "QE auth data")
    if certification.u16("nested certification data type") != PCK_CHAIN_CERT_DATA:
        raise EvidenceError("nested certification data is not a PCK certificate chain (type 5)")
    pck_chain = certification.take(certification.u32("PCK chain size"), "PCK chain")
    certification.end()
    return Quote(header, body, signature, attestation_key, qe_report, qe_report_signature,
                 qe_auth_data, pck_chain)


def _p256_verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, what: str) -> None:
    """Check a raw ``r ‖ s`` ECDSA P-256/SHA-256 signature."""
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(f"{what} does not verify") from None


def check_quote(raw: bytes, roots: Sequence[x509.Certificate], now: float) -> Claims:
    """The claims of a quote whose signatures and PCK chain check out at ``now``."""
    quote = parse_quote(raw)
    try:
        attestation_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError:
        raise EvidenceError("attestation key is not a P-256 point") from None
    _p256_verify(attestation_key, quote.signature, quote.header + quote.body, "quote signature")
    chain = load_pem(quote.pck_chain.rstrip(b"\x00"), "PCK certificate chain")
    if not chain:
        raise EvidenceError("PCK certificate chain is empty")
    verify_chain(chain[0], chain[1:], roots, now)
    _p256_verify(ec_key(chain[0], "secp256r1", "PCK certificate"), quote.qe_report_signature, quote.qe_report, "QE report signature")
    bound = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    if quote.qe_report[320:384] != bound + bytes(32):
        raise EvidenceError("QE report does not bind the attestation key")
    if (quote.qe_report[128:160], int.from_bytes(quote.qe_report[256:258], "little")) != (
            INTEL_TD_QE_MRSIGNER, TD_QE_PRODID):
        raise EvidenceError("QE report is not from Intel's TDX quoting enclave")
    if quote.qe_report[48] & SGX_ATTRIBUTES_DEBUG:
        raise EvidenceError("QE report is from a debug quoting enclave")
    attributes = quote.td_attributes
    if attributes & TD_ATTRIBUTES_RESERVED:
        raise EvidenceError(f"TD_ATTRIBUTES {attributes:#018x} sets bits the TDX module reserves "
                            f"({attributes & TD_ATTRIBUTES_RESERVED:#x})")
    if attributes & TD_ATTRIBUTES_MIGRATABLE:
        raise EvidenceError("TD_ATTRIBUTES has MIGRATABLE set: a migration TD could export the TD")
    measurement = hashlib.sha384(quote.mrtd + b"".join(quote.rtmrs)).hexdigest()
    return Claims(measurement, bool(attributes & TD_ATTRIBUTES_TUD), quote.security_version,
                  quote.report_data)


class TdxVerifier:
    """Verifies ``tdx`` evidence: ``raw`` is a TDX quote v4 (configfs-tsm ``outblob``)."""

    tee_type = "tdx"
    security_level: SecurityLevel = "hardware"
    reports_security_version = True

    def __init__(self, roots: Sequence[x509.Certificate] | None = None) -> None:
        self.roots = list(roots) if roots is not None else pinned("intel_sgx_root_ca.pem")

    def verify(self, evidence: Evidence, expected_report_data: bytes, now: float) -> AttestationResult:
        return appraise_hardware(self.tee_type, evidence, expected_report_data,
                                 lambda e: check_quote(e.raw, self.roots, now))
