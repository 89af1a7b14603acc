"""Hardware evidence built to the published formats, signed by throwaway test PKIs.

No TEE exists here: these forges lay out a TDX quote v4, an SEV-SNP attestation report
with its configfs-tsm certificate table, and an AWS Nitro Enclaves attestation document
byte for byte as the platforms do, and sign them with keys and certificate chains made
for the test. Verifiers accept them only when given the forge's root as their pinned root.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from modelfence.confidential import snp, tdx
from modelfence.confidential.nitro import NitroVerifier
from modelfence.confidential.snp import SnpVerifier
from modelfence.confidential.tdx import TdxVerifier

NOW = 1_750_000_000.0  # 2025-06-15: every forged certificate is valid then, unless expired on purpose
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    key: Key
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(Encoding.DER)


def issue(name: str, key: Key, issuer: Issued | None = None, *, ca: bool, expired: bool = False,
          extensions: tuple[x509.ExtensionType, ...] = (),
          critical: tuple[x509.ExtensionType, ...] = ()) -> Issued:
    """A certificate for ``key``, self-signed when ``issuer`` is None, with ``extensions``
    not critical and ``critical`` ones critical; RSA issuers sign with RSA-PSS/SHA-384 as
    AMD's ARK and ASK do."""
    at = datetime.fromtimestamp(NOW, UTC)
    start, end = (at - timedelta(days=30), at - timedelta(days=1)) if expired else (
        at - timedelta(days=1), at + timedelta(days=365))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    for extension in critical:
        builder = builder.add_extension(extension, critical=True)
    signer = issuer.key if issuer else key
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48) if isinstance(signer, rsa.RSAPrivateKey) else None
    return Issued(key, builder.sign(signer, hashes.SHA384(), rsa_padding=pss))


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes, size: int) -> tuple[int, int]:
    algorithm = hashes.SHA256() if size == 32 else hashes.SHA384()
    return decode_dss_signature(key.sign(data, ec.ECDSA(algorithm)))


def big_endian_signature(key: ec.EllipticCurvePrivateKey, data: bytes, size: int) -> bytes:
    r, s = sign_raw(key, data, size)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


class TdxForge:
    """An Intel-like PKI (root ← PCK platform CA ← PCK) and TDX quotes v4 signed under it."""

    MRTD = bytes(range(48))
    RTMRS = tuple(bytes([i + 1]) * 48 for i in range(4))
    MEASUREMENT = hashlib.sha384(MRTD + b"".join(RTMRS)).hexdigest()

    def __init__(self) -> None:
        self.root = issue("Test SGX Root CA", p256(), ca=True)
        self.platform = issue("Test SGX PCK Platform CA", p256(), self.root, ca=True)
        self.pck = issue("Test SGX PCK Certificate", p256(), self.platform, ca=False)
        self.attestation_key = p256()

    def verifier(self, root: Issued | None = None) -> TdxVerifier:
        return TdxVerifier(roots=[(root or self.root).cert])

    def expired_pck(self) -> Issued:
        return issue("Test SGX PCK Certificate", p256(), self.platform, ca=False, expired=True)

    def quote(self, report_data: bytes, *, debug: bool = False, mrtd: bytes = MRTD, svn: int = 3,
              svn_major: int = 0, attributes: int = 0, qe_debug: bool = False,
              quote_key: ec.EllipticCurvePrivateKey | None = None, pck: Issued | None = None,
              carried_key: ec.EllipticCurvePrivateKey | None = None,
              chain: tuple[Issued, Issued, Issued] | None = None) -> bytes:
        """A quote; ``quote_key`` signs it instead of the attestation key the QE certified,
        and ``carried_key`` is the attestation key it carries instead (and signs with).
        ``svn`` and ``svn_major`` are TEE_TCB_SVN[0] and [1]; ``attributes`` are TD_ATTRIBUTES
        (with bit 0 set if ``debug``); ``chain`` is (PCK, platform CA, root) instead of the
        forge's, the PCK signing the QE report."""
        header = struct.pack("<HHIHH", 4, 2, 0x81, 0, 0) + tdx.INTEL_QE_VENDOR + bytes(20)
        body = bytearray(tdx.BODY_BYTES)
        body[0:2] = bytes([svn, svn_major])
        body[120:128] = (attributes | int(debug)).to_bytes(8, "little")
        body[136:184] = mrtd
        for i, rtmr in enumerate(self.RTMRS):
            body[328 + 48 * i:376 + 48 * i] = rtmr
        body[520:584] = report_data

        carried = carried_key or self.attestation_key
        signature = big_endian_signature(quote_key or carried, header + bytes(body), 32)
        qe_auth = bytes(range(32))
        qe_report = bytearray(tdx.QE_REPORT_BYTES)
        qe_report[48] = 0x15 | (tdx.SGX_ATTRIBUTES_DEBUG if qe_debug else 0)  # INIT, MODE64BIT, PROVISIONKEY
        qe_report[128:160] = tdx.INTEL_TD_QE_MRSIGNER
        qe_report[256:258] = tdx.TD_QE_PRODID.to_bytes(2, "little")
        qe_report[320:352] = hashlib.sha256(raw_point(self.attestation_key) + qe_auth).digest()
        certs = chain or (pck or self.pck, self.platform, self.root)
        leaf = certs[0]
        assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)
        pem = b"".join(c.cert.public_bytes(Encoding.PEM) for c in certs)
        inner = (bytes(qe_report) + big_endian_signature(leaf.key, bytes(qe_report), 32)
                 + struct.pack("<H", len(qe_auth)) + qe_auth + struct.pack("<HI", 5, len(pem)) + pem)
        signed = signature + raw_point(carried) + struct.pack("<HI", 6, len(inner)) + inner
        return header + bytes(body) + struct.pack("<I", len(signed)) + signed


def raw_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A P-256 public key as a TDX quote carries it: ``x ‖ y``."""
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


def cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """A configfs-tsm ``auxblob`` for SEV-SNP: GUID/offset/length entries, a zero entry, data."""
    start = (len(entries) + 1) * snp.ENTRY_BYTES
    table, data = b"", b""
    for guid, blob in entries:
        table += guid.bytes + struct.pack("<II", start + len(data), len(blob))
        data += blob
    return table + bytes(snp.ENTRY_BYTES) + data


class SnpForge:
    """An AMD-like PKI (ARK ← ASK ← VCEK, RSA-PSS above the VCEK) and reports it signs."""

    CHIP_ID = bytes(range(64))
    TCB = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # boot loader, TEE, reserved, SNP firmware, microcode
    MEASUREMENT = bytes(range(100, 148))

    def __init__(self) -> None:
        self.ark = issue("ARK-Test", rsa.generate_private_key(65537, 2048), ca=True)
        self.ask = issue("SEV-Test", rsa.generate_private_key(65537, 2048), self.ark, ca=True)
        self.vcek = self.new_vcek()

    def new_vcek(self, *, expired: bool = False, chip_id: bytes = CHIP_ID, ca: bool = False,
                 critical: tuple[x509.ExtensionType, ...] = ()) -> Issued:
        amd = "1.3.6.1.4.1.3704.1."
        tcb = [(amd + oid, self.TCB[i]) for oid, i in (("3.1", 0), ("3.2", 1), ("3.3", 6), ("3.8", 7))]
        extensions = tuple(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([2, 1, value]))
                           for oid, value in tcb if value < 0x80)
        hwid = x509.UnrecognizedExtension(x509.ObjectIdentifier(amd + "4"), chip_id)
        return issue("SEV-VCEK", p384(), self.ask, ca=ca, expired=expired, extensions=(*extensions, hwid),
                     critical=critical)

    def verifier(self, root: Issued | None = None) -> SnpVerifier:
        return SnpVerifier(roots=[(root or self.ark).cert], intermediates=[])

    def aux(self, vcek: Issued | None = None) -> bytes:
        return cert_table([(snp.VCEK, (vcek or self.vcek).der), (snp.ASK, self.ask.der), (snp.ARK, self.ark.der)])

    def report(self, report_data: bytes, *, debug: bool = False, key: ec.EllipticCurvePrivateKey | None = None,
               chip_id: bytes = CHIP_ID, tcb: bytes = TCB, vmpl: int = 0, policy: int = 0) -> bytes:
        """A report; ``policy`` bits are added to the guest policy, ``vmpl`` is the VMPL
        it was requested from."""
        report = bytearray(snp.REPORT_BYTES)
        policy |= 1 << 17 | (snp.POLICY_DEBUG if debug else 0)  # bit 17 is reserved, always set
        struct.pack_into("<IIQ", report, 0, 2, 1, policy)
        struct.pack_into("<II", report, snp.VMPL_OFFSET, vmpl, snp.ECDSA_P384_SHA384)
        report[0x50:0x90] = report_data
        report[0x90:0xC0] = self.MEASUREMENT
        report[0x180:0x188] = tcb
        report[0x1A0:0x1E0] = chip_id
        signer = key or self.vcek.key
        assert isinstance(signer, ec.EllipticCurvePrivateKey)
        r, s = sign_raw(signer, bytes(report[:snp.SIGNED_BYTES]), 48)
        report[0x2A0:0x2E8] = r.to_bytes(72, "little")
        report[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(report)


class NitroForge:
    """An AWS-like PKI (root ← zonal CA ← enclave leaf) and attestation documents it signs."""

    PCRS: ClassVar[dict[int, bytes]] = {i: hashlib.sha384(bytes([i])).digest() for i in range(16)}
    MEASUREMENT = hashlib.sha384(PCRS[0] + PCRS[1] + PCRS[2]).hexdigest()

    def __init__(self) -> None:
        self.root = issue("aws.nitro-enclaves", p384(), ca=True)
        self.zonal = issue("zonal.test.aws.nitro-enclaves", p384(), self.root, ca=True)
        self.leaf = issue("i-test-enc.test.aws", p384(), self.zonal, ca=False)

    def verifier(self, root: Issued | None = None, *, max_age: float = 60.0) -> NitroVerifier:
        return NitroVerifier(roots=[(root or self.root).cert], max_age=max_age)

    def expired_leaf(self) -> Issued:
        return issue("i-test-enc.test.aws", p384(), self.zonal, ca=False, expired=True)

    def document(self, user_data: bytes, *, timestamp: float = NOW, debug: bool = False,
                 key: ec.EllipticCurvePrivateKey | None = None, leaf: Issued | None = None,
                 tagged: bool = True, protected: bytes | None = None,
                 pcrs: dict[int, bytes] | None = None, fields: dict[str, object] | None = None,
                 unprotected: dict[object, object] | None = None, cabundle: list[Issued] | None = None) -> bytes:
        """A document; ``fields`` replace or add payload fields, ``cabundle`` (root first)
        replaces the forge's."""
        leaf = leaf or self.leaf
        bundle = cabundle or [self.root, self.zonal]
        payload = cbor2.dumps({
            "module_id": "i-test-enc", "digest": "SHA384", "timestamp": int(timestamp * 1000),
            "pcrs": pcrs or ({i: bytes(48) for i in range(16)} if debug else self.PCRS),
            "certificate": leaf.der, "cabundle": [c.der for c in bundle],
            "public_key": None, "user_data": user_data, "nonce": None, **(fields or {}),
        })
        protected = protected if protected is not None else cbor2.dumps({1: -35})
        signer = key or leaf.key
        assert isinstance(signer, ec.EllipticCurvePrivateKey)
        signature = big_endian_signature(signer, cbor2.dumps(["Signature1", protected, b"", payload]), 48)
        document = [protected, unprotected or {}, payload, signature]
        return cbor2.dumps(cbor2.CBORTag(18, document) if tagged else document)
