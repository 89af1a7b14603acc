"""AMD SEV-SNP: verify an ATTESTATION_REPORT (configfs-tsm ``outblob``) offline.

The report is 0x4A0 bytes (SEV-SNP firmware ABI, Linux ``sev-guest``); bytes [0, 0x2A0)
are signed with ECDSA P-384/SHA-384 by the chip's VCEK (or a cloud's VLEK), the signature
stored as ``r`` and ``s`` of 72 little-endian bytes each at 0x2A0. The VCEK or VLEK comes in
``aux``: the certificate table configfs-tsm returns as ``auxblob`` (GUID, offset, length
entries ending in a zero entry, as in the GHCB extended guest request), which may also
hold the ASK and ARK.

Checked: the report's version (2 to 5) and signature algorithm (1); the signature with the
VCEK/VLEK named by the report's signing-key field; the chain VCEK ← ASK (or VLEK ← ASVK) ←
ARK, RSA-PSS, up to a pinned ARK (Milan or Genoa), every certificate valid at ``now`` (AMD's
public ASKs are shipped, so a table holding only the VCEK suffices); that a VCEK's hardware
ID is the report's chip ID and that the VCEK/VLEK's TCB extensions match the report's
REPORTED_TCB; that the report was requested from VMPL 0, the most privileged level (a
guest under an SVSM or a paravisor, which hold VMPL 0, reports from a higher one: set
``max_vmpl`` to accept it); that the guest policy forbids a migration agent (MIGRATE_MA,
bit 18), which could export the guest's memory.
Not checked: CRLs (AMD KDS), and whether that TCB is current; the ID block and author key
(ID_KEY_DIGEST, AUTHOR_KEY_DIGEST, FAMILY_ID, IMAGE_ID), HOST_DATA and GUEST_SVN; the other
policy bits (ABI version, SMT, SINGLE_SOCKET, CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS,
CIPHERTEXT_HIDING...) and PLATFORM_INFO; CURRENT_TCB, COMMITTED_TCB and LAUNCH_TCB.

Claims: ``measurement`` = hex MEASUREMENT (the launch digest, 0x90); ``debug`` = policy bit
19; ``security_version`` = the SNP firmware SPL of REPORTED_TCB; report data = REPORT_DATA.
Freshness comes from the broker's nonce inside the report data.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

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
from modelfence.confidential.certs import ec_key, load_der, pinned, verify_chain

REPORT_BYTES, SIGNED_BYTES = 0x4A0, 0x2A0
VERSIONS = range(2, 6)
ECDSA_P384_SHA384 = 1
POLICY_MIGRATE_MA, POLICY_DEBUG = 1 << 18, 1 << 19
VMPL_OFFSET, MAX_VMPL = 0x30, 3
MAX_AUX_BYTES, MAX_TABLE_ENTRIES, ENTRY_BYTES = 64 * 1024, 64, 24
VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
SIGNERS = {0: VCEK, 1: VLEK}  # the report's signing_key field (bits 4:2 at 0x48)
AMD_OID = "1.3.6.1.4.1.3704.1."
HWID_OID = AMD_OID + "4"
# VCEK/VLEK TCB extensions and their byte in REPORTED_TCB (Milan and Genoa layout).
TCB_OIDS = {AMD_OID + "3.1": 0, AMD_OID + "3.2": 1, AMD_OID + "3.3": 6, AMD_OID + "3.8": 7}
SNP_SPL_BYTE = 6


def parse_cert_table(aux: bytes) -> dict[uuid.UUID, bytes]:
    """The certificates of a configfs-tsm ``auxblob`` certificate table, by GUID."""
    if len(aux) > MAX_AUX_BYTES:
        raise EvidenceError(f"certificate table is {len(aux)} bytes; at most {MAX_AUX_BYTES} accepted")
    entries: list[tuple[uuid.UUID, int, int]] = []
    at = 0
    while True:
        if len(aux) - at < ENTRY_BYTES:
            raise EvidenceError("certificate table truncated: no terminating zero entry")
        raw_guid, offset, length = aux[at:at + 16], *struct.unpack_from("<II", aux, at + 16)
        at += ENTRY_BYTES
        if raw_guid == bytes(16) and offset == length == 0:
            break
        if len(entries) == MAX_TABLE_ENTRIES:
            raise EvidenceError(f"certificate table has over {MAX_TABLE_ENTRIES} entries")
        entries.append((uuid.UUID(bytes=raw_guid), offset, length))
    table: dict[uuid.UUID, bytes] = {}
    for guid, offset, length in entries:
        if offset < at or offset + length > len(aux):
            raise EvidenceError(f"certificate table entry {guid} points outside the table")
        if guid in table:
            raise EvidenceError(f"certificate table names {guid} twice")
        table[guid] = aux[offset:offset + length]
    return table


def _der_integer(value: bytes, oid: str) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2:
        raise EvidenceError(f"certificate extension {oid} is not a small DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _check_endorsement(cert: x509.Certificate, report: bytes, is_vcek: bool) -> None:
    """The VCEK/VLEK was issued for this chip and for the TCB the report claims."""
    amd = {ext.oid.dotted_string: ext.value.value for ext in cert.extensions
           if isinstance(ext.value, x509.UnrecognizedExtension)}
    chip_id = report[0x1A0:0x1E0]
    if is_vcek and chip_id != bytes(64) and amd.get(HWID_OID) != chip_id:
        raise EvidenceError("VCEK was issued for another chip (hardware ID is not the report's chip ID)")
    reported_tcb = report[0x180:0x188]
    for oid, index in TCB_OIDS.items():
        if oid in amd and _der_integer(amd[oid], oid) != reported_tcb[index]:
            raise EvidenceError("VCEK/VLEK was issued for another TCB than the report's REPORTED_TCB")


def check_report(raw: bytes, aux: bytes, roots: Sequence[x509.Certificate],
                 intermediates: Sequence[x509.Certificate], now: float, max_vmpl: int = 0) -> Claims:
    """The claims of a report whose signature and endorsement chain check out at ``now``,
    requested from a VMPL no higher than ``max_vmpl``, by a guest no migration agent serves."""
    if len(raw) != REPORT_BYTES:
        raise EvidenceError(f"SEV-SNP report is {len(raw)} bytes, not {REPORT_BYTES}")
    version, _guest_svn, policy = struct.unpack_from("<IIQ", raw)
    algorithm, = struct.unpack_from("<I", raw, 0x34)
    if version not in VERSIONS or algorithm != ECDSA_P384_SHA384:
        raise EvidenceError(f"SEV-SNP report version {version} with signature algorithm "
                            f"{algorithm} is not supported (versions 2-5, ECDSA P-384)")
    signer = SIGNERS.get((struct.unpack_from("<I", raw, 0x48)[0] >> 2) & 7)
    if signer is None:
        raise EvidenceError("report is not signed by a VCEK or VLEK")
    table = parse_cert_table(aux)
    if signer not in table:
        raise EvidenceError(f"certificate table holds no {'VCEK' if signer == VCEK else 'VLEK'}")
    endorsement = load_der(table[signer], "VCEK/VLEK")
    carried = [load_der(table[g], str(g)) for g in (ASK, ARK) if g in table]
    verify_chain(endorsement, [*carried, *intermediates], roots, now)
    key = ec_key(endorsement, "secp384r1", "VCEK/VLEK")
    r, s = (int.from_bytes(raw[at:at + 72], "little") for at in (SIGNED_BYTES, SIGNED_BYTES + 72))
    try:
        key.verify(encode_dss_signature(r, s), raw[:SIGNED_BYTES], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError("report signature does not verify with the VCEK/VLEK") from None
    _check_endorsement(endorsement, raw, signer == VCEK)
    vmpl, = struct.unpack_from("<I", raw, VMPL_OFFSET)
    if vmpl > max_vmpl:
        raise EvidenceError(f"report was requested from VMPL {vmpl}; VMPL {max_vmpl} or lower accepted")
    if policy & POLICY_MIGRATE_MA:
        raise EvidenceError("guest policy allows a migration agent (MIGRATE_MA), which could export its memory")
    return Claims(raw[0x90:0xC0].hex(), bool(policy & POLICY_DEBUG), raw[0x180 + SNP_SPL_BYTE],
                  raw[0x50:0x90])


class SnpVerifier:
    """Verifies ``sev-snp`` evidence: ``raw`` the report, ``aux`` its certificate table;
    ``max_vmpl`` is the least privileged VMPL (0 to 3) whose reports are accepted."""

    tee_type = "sev-snp"
    security_level: SecurityLevel = "hardware"
    reports_security_version = True

    def __init__(self, roots: Sequence[x509.Certificate] | None = None,
                 intermediates: Sequence[x509.Certificate] | None = None, *, max_vmpl: int = 0) -> None:
        if not 0 <= max_vmpl <= MAX_VMPL:
            raise ValueError(f"max_vmpl is {max_vmpl}, not 0 to {MAX_VMPL}")
        self.max_vmpl = max_vmpl
        self.roots = list(roots) if roots is not None else pinned("amd_ark.pem")
        self.intermediates = list(intermediates) if intermediates is not None else pinned("amd_ask.pem")

    def verify(self, evidence: Evidence, expected_report_data: bytes, now: float) -> AttestationResult:
        return appraise_hardware(
            self.tee_type, evidence, expected_report_data,
            lambda e: check_report(e.raw, e.aux, self.roots, self.intermediates, now, self.max_vmpl))
