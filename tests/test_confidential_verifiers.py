"""Hardware verifiers (Intel TDX, AMD SEV-SNP, AWS Nitro Enclaves).

Recorded evidence from real hardware (``tests/data/attestation/``, sources in its README)
is verified end to end against the real pinned roots at a time inside its certificates'
validity; it binds someone else's report data, which ours refuses. Evidence built to the
published formats under a throwaway test PKI (``tests/tee_evidence.py``) covers the rest:
a round trip and, per verifier, a table of negative cases, each contraindicated with its
reason (debug evidence is affirmed with ``debug`` set: the broker refuses it). The
configfs-tsm attester runs against a temporary folder laid out like the kernel's.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfence.confidential import nitro, snp, tdx
from modelfence.confidential.attestation import AttestationResult, Evidence, Verifier, report_data
from modelfence.confidential.nitro import NitroVerifier, parse_document
from modelfence.confidential.snp import SnpVerifier
from modelfence.confidential.tdx import TdxVerifier
from modelfence.confidential.tsm import TsmAttester
from modelfence.errors import ModelFenceError

from .tee_evidence import NOW, NitroForge, SnpForge, TdxForge, cert_table, issue, p256, p384

SAMPLES = Path(__file__).parent / "data" / "attestation"
DATA = report_data(b"n" * 32, b"k" * 32, "ab" * 32)
OTHER = report_data(b"o" * 32, b"k" * 32, "ab" * 32)


def at(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def evidence(tee_type: str, raw: bytes, aux: bytes = b"") -> Evidence:
    """Hardware evidence whose claim fields are empty hints: the verifier reads ``raw``."""
    return Evidence(tee_type, "", False, 0, b"", NOW, raw=raw, aux=aux)


def outcome(result: AttestationResult) -> str:
    """Why a broker with no allowance for debug would refuse this result ("" if it would not)."""
    if not result.affirming:
        return "; ".join(result.reasons)
    return "debug" if result.debug else ""


# Recorded evidence -------------------------------------------------------------------


def recorded_tdx_quote() -> bytes:
    raw = (SAMPLES / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    # The source appended 39 bytes for its own tests; cut at the length the quote declares.
    return raw[:636 + struct.unpack_from("<I", raw, 632)[0]]


def test_a_recorded_tdx_quote_verifies_against_the_intel_root() -> None:
    raw = recorded_tdx_quote()
    theirs = raw[48 + 520:48 + 584]
    verifier = TdxVerifier()
    result = verifier.verify(evidence("tdx", raw), theirs, at("2024-06-01"))
    assert result.affirming and result.security_level == "hardware"
    assert (result.debug, result.security_version) == (False, 3)  # TEE_TCB_SVN 03 00: major 0, SVN 3
    assert raw[48 + 120:48 + 128] == (1 << 30).to_bytes(8, "little")  # TD_ATTRIBUTES: PKS only
    assert result.measurement == "b75b9c0662e57d99a03410cd7b2ef343b25465934e1808db6b174be7b02479eb7f087e7bc54b87a6c23df92f5f6445a5"
    assert "report data" in outcome(verifier.verify(evidence("tdx", raw), DATA, at("2024-06-01")))
    assert "expired" in outcome(verifier.verify(evidence("tdx", raw), theirs, at("2030-01-01")))
    assert "pinned root" in outcome(TdxForge().verifier().verify(evidence("tdx", raw), theirs, at("2024-06-01")))
    assert "after its end" in outcome(verifier.verify(
        evidence("tdx", (SAMPLES / "tdx_prod_quote_SPR_E4.dat").read_bytes()), theirs, at("2024-06-01")))


def recorded_snp() -> tuple[bytes, bytes]:
    vcek = (SAMPLES / "sev_snp_vcek.testcer").read_bytes()
    return (SAMPLES / "sev_snp_attestation.bin").read_bytes(), cert_table([(snp.VCEK, vcek)])


def test_a_recorded_snp_report_verifies_through_the_shipped_ask_to_ark_milan() -> None:
    raw, aux = recorded_snp()
    theirs = raw[0x50:0x90]
    verifier = SnpVerifier()
    result = verifier.verify(evidence("sev-snp", raw, aux), theirs, at("2024-06-01"))
    assert result.affirming and result.security_level == "hardware"
    assert result.debug  # the recorded guest's policy allows debugging
    assert struct.unpack_from("<I", raw, snp.VMPL_OFFSET)[0] == 0  # requested from VMPL 0
    assert not struct.unpack_from("<Q", raw, 8)[0] & snp.POLICY_MIGRATE_MA
    assert result.security_version == 5
    assert result.measurement == raw[0x90:0xC0].hex()
    assert "report data" in outcome(verifier.verify(evidence("sev-snp", raw, aux), DATA, at("2024-06-01")))
    assert "expired" in outcome(verifier.verify(evidence("sev-snp", raw, aux), theirs, at("2030-01-01")))
    assert "pinned root" in outcome(SnpForge().verifier().verify(evidence("sev-snp", raw, aux), theirs,
                                                                   at("2024-06-01")))
    assert "no VCEK" in outcome(verifier.verify(evidence("sev-snp", raw, cert_table([])), theirs,
                                                at("2024-06-01")))


@pytest.mark.parametrize(("name", "debug"), [("nitro_valid-attestation-doc-bytes", False),
                                             ("nitro_debug-mode-attestation-doc-bytes", True)])
def test_recorded_nitro_documents_verify_against_the_aws_root(name: str, debug: bool) -> None:
    raw = (SAMPLES / name).read_bytes()
    doc = parse_document(raw)[3]
    issued = doc["timestamp"] / 1000
    theirs = doc["user_data"] or b""
    verifier = NitroVerifier()
    result = verifier.verify(evidence("nitro", raw), theirs, issued + 10)
    assert result.affirming and result.security_level == "hardware"
    assert result.debug is debug and result.security_version == 0
    assert "report data" in outcome(verifier.verify(evidence("nitro", raw), DATA, issued + 10))
    assert "s old" in outcome(verifier.verify(evidence("nitro", raw), theirs, issued + 61))
    assert "expired" in outcome(NitroVerifier(max_age=10**9).verify(evidence("nitro", raw), theirs, issued + 86400))
    assert "pinned root" in outcome(NitroForge().verifier().verify(evidence("nitro", raw), theirs, issued + 10))


# Constructed evidence ----------------------------------------------------------------


@dataclass
class Attempt:
    """One verification: a verifier, the evidence's bytes, the report data expected, when."""

    verifier: Verifier
    raw: bytes
    aux: bytes = b""
    expected: bytes = DATA
    now: float = NOW
    tee_type: str = ""

    def run(self) -> AttestationResult:
        ev = evidence(self.tee_type or self.verifier.tee_type, self.raw, self.aux)
        return self.verifier.verify(ev, self.expected, self.now)


@pytest.fixture(scope="module")
def tdx_forge() -> TdxForge:
    return TdxForge()


@pytest.fixture(scope="module")
def snp_forge() -> SnpForge:
    return SnpForge()


@pytest.fixture(scope="module")
def nitro_forge() -> NitroForge:
    return NitroForge()


def test_constructed_evidence_of_each_kind_is_affirmed(tdx_forge: TdxForge, snp_forge: SnpForge,
                                                       nitro_forge: NitroForge) -> None:
    attempts = {
        TdxForge.MEASUREMENT: Attempt(tdx_forge.verifier(), tdx_forge.quote(DATA)),
        SnpForge.MEASUREMENT.hex(): Attempt(snp_forge.verifier(), snp_forge.report(DATA), snp_forge.aux()),
        NitroForge.MEASUREMENT: Attempt(nitro_forge.verifier(), nitro_forge.document(DATA)),
    }
    for measurement, attempt in attempts.items():
        result = attempt.run()
        assert result.affirming, result.reasons
        assert (result.measurement, result.debug, result.security_level) == (measurement, False, "hardware")
    untagged = nitro_forge.document(DATA, tagged=False)
    assert Attempt(nitro_forge.verifier(), untagged).run().affirming
    long_tag = Attempt(nitro_forge.verifier(), b"\xd8\x12" + untagged).run()  # 18 in a one-byte argument
    assert long_tag.affirming, long_tag.reasons
    allowed = Attempt(tdx_forge.verifier(), tdx_forge.quote(DATA, attributes=1 << 28 | 1 << 30)).run()
    assert allowed.affirming and not allowed.debug  # SEPT_VE_DISABLE and PKS
    vmpl_1 = Attempt(SnpVerifier(roots=[snp_forge.ark.cert], intermediates=[], max_vmpl=1),
                     snp_forge.report(DATA, vmpl=1), snp_forge.aux()).run()
    assert vmpl_1.affirming, vmpl_1.reasons
    vcek_only = Attempt(SnpVerifier(roots=[snp_forge.ark.cert], intermediates=[snp_forge.ask.cert]),
                        snp_forge.report(DATA), cert_table([(snp.VCEK, snp_forge.vcek.der)])).run()
    assert vcek_only.affirming  # the ASK may come from the verifier instead of the table


def test_hardware_evidence_crosses_json_frames_whole(tdx_forge: TdxForge, snp_forge: SnpForge) -> None:
    sent = Evidence("sev-snp", "hint", False, 0, DATA, NOW, raw=snp_forge.report(DATA), aux=snp_forge.aux())
    received = Evidence.from_dict(json.loads(json.dumps(sent.to_dict())))
    assert received == sent
    legacy = {k: v for k, v in sent.to_dict().items() if k not in ("raw", "aux")}
    assert Evidence.from_dict(legacy).raw == b""  # sim evidence from before still reads
    with pytest.raises(ValueError, match="malformed evidence"):
        Evidence.from_dict({**sent.to_dict(), "raw": "not base64!"})


# (TEE_TCB_SVN[0], TEE_TCB_SVN[1]) -> security_version, in the order Intel's TCB info ranks them
TDX_SECURITY_VERSIONS = {(0, 0): 0, (3, 0): 3, (255, 0): 255, (0, 1): 256, (2, 1): 258, (1, 2): 513}


def test_tdx_security_version_is_the_module_major_version_then_its_svn(tdx_forge: TdxForge) -> None:
    verifier = tdx_forge.verifier()
    found: dict[tuple[int, int], int] = {}
    for svn, major in TDX_SECURITY_VERSIONS:
        result = Attempt(verifier, tdx_forge.quote(DATA, svn=svn, svn_major=major)).run()
        assert result.affirming, result.reasons
        found[svn, major] = result.security_version
    assert found == TDX_SECURITY_VERSIONS
    assert sorted(found, key=found.__getitem__) == sorted(found, key=lambda k: (k[1], k[0]))


def test_snp_max_vmpl_is_0_to_3() -> None:
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="max_vmpl"):
            SnpVerifier(max_vmpl=bad)


Case = tuple[Callable[..., Attempt], str]
UNKNOWN_CRITICAL = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
NO_CERT_SIGN = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=True,
                             encipher_only=False, decipher_only=False)


def _tdx_chain(f: TdxForge, *, pck_ca: bool = False, platform: tuple[x509.ExtensionType, ...] = (),
               critical_on: str = "") -> Attempt:
    """A quote under a fresh root ← platform CA ← PCK, the PCK a CA if ``pck_ca``, the platform
    CA with ``platform`` extensions, an unknown critical extension on ``critical_on``."""
    def critical(which: str) -> tuple[x509.ExtensionType, ...]:
        return (UNKNOWN_CRITICAL,) if critical_on == which else ()

    root = issue("Test SGX Root CA", p256(), ca=True, critical=critical("root"))
    ca = issue("Test SGX PCK Platform CA", p256(), root, ca=True, extensions=platform, critical=critical("platform"))
    pck = issue("Test SGX PCK Certificate", p256(), ca, ca=pck_ca, critical=critical("pck"))
    return Attempt(f.verifier(root), f.quote(DATA, chain=(pck, ca, root)))


def _flip(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 1]) + raw[offset + 1:]


TDX_NEGATIVE: dict[str, Case] = {
    "forged signature": (lambda f: Attempt(f.verifier(), f.quote(DATA, quote_key=p256())),
                         "quote signature does not verify"),
    "tampered report body": (lambda f: Attempt(f.verifier(), _flip(f.quote(DATA), 48 + 140)),
                             "quote signature does not verify"),
    "attestation key the QE did not certify": (lambda f: Attempt(f.verifier(), f.quote(DATA, carried_key=p256())),
                                               "does not bind the attestation key"),
    "expired certificate": (lambda f: Attempt(f.verifier(), f.quote(DATA, pck=f.expired_pck())), "expired"),
    "chain to an unpinned root": (lambda f: Attempt(f.verifier(issue("Test SGX Root CA", p256(), ca=True)),
                                                    f.quote(DATA)), "pinned root"),
    "debug evidence": (lambda f: Attempt(f.verifier(), f.quote(DATA, debug=True)), "debug"),
    "wrong report data": (lambda f: Attempt(f.verifier(), f.quote(OTHER)), "report data"),
    "truncated": (lambda f: Attempt(f.verifier(), f.quote(DATA)[:-100]), "truncated"),
    "oversized": (lambda f: Attempt(f.verifier(), f.quote(DATA) + bytes(70_000)), "at most"),
    "bytes after the quote": (lambda f: Attempt(f.verifier(), f.quote(DATA) + b"\x00"), "after its end"),
    "garbage": (lambda f: Attempt(f.verifier(), bytes(range(256)) * 8), "not a TDX quote"),
    "empty": (lambda f: Attempt(f.verifier(), b""), "truncated"),
    "another tee type": (lambda f: Attempt(f.verifier(), f.quote(DATA), tee_type="sev-snp"), "not 'tdx'"),
    "debug quoting enclave": (lambda f: Attempt(f.verifier(), f.quote(DATA, qe_debug=True)), "debug quoting enclave"),
    "reserved TD attribute (bit 8)": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=1 << 8)), "reserves"),
    "reserved TD attribute (bit 17)": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=1 << 17)), "reserves"),
    "reserved TD attribute (bit 40)": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=1 << 40)), "reserves"),
    "migratable TD": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=tdx.TD_ATTRIBUTES_MIGRATABLE)),
                      "MIGRATABLE"),
    "TD under debug: PERF_PROF": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=1 << 5)), "debug"),
    "TD under debug: reserved TUD bit 1": (lambda f: Attempt(f.verifier(), f.quote(DATA, attributes=1 << 1)), "debug"),
    "PCK that is a CA": (lambda f: _tdx_chain(f, pck_ca=True), "is a CA"),
    "platform CA without keyCertSign": (lambda f: _tdx_chain(f, platform=(NO_CERT_SIGN,)), "keyCertSign"),
    "unknown critical extension on the PCK": (lambda f: _tdx_chain(f, critical_on="pck"),
                                              "unknown critical extension"),
    "unknown critical extension on the platform CA": (lambda f: _tdx_chain(f, critical_on="platform"),
                                                      "unknown critical extension"),
    "unknown critical extension on the root": (lambda f: _tdx_chain(f, critical_on="root"),
                                               "unknown critical extension"),
}


def _table_offset_outside(f: SnpForge) -> bytes:
    aux = bytearray(f.aux())
    struct.pack_into("<I", aux, 20, 10**6)  # the VCEK entry's length
    return bytes(aux)


SNP_NEGATIVE: dict[str, Case] = {
    "forged signature": (lambda f: Attempt(f.verifier(), f.report(DATA, key=p384()), f.aux()),
                         "report signature does not verify"),
    "tampered report body": (lambda f: Attempt(f.verifier(), _flip(f.report(DATA), 0x95), f.aux()),
                             "report signature does not verify"),
    "expired certificate": (lambda f: Attempt(f.verifier(), f.report(DATA, key=(v := f.new_vcek(expired=True)).key),
                                              f.aux(v)), "expired"),
    "chain to an unpinned root": (lambda f: Attempt(f.verifier(issue("ARK-Test", p384(), ca=True)),
                                                    f.report(DATA), f.aux()), "pinned root"),
    "debug evidence": (lambda f: Attempt(f.verifier(), f.report(DATA, debug=True), f.aux()), "debug"),
    "wrong report data": (lambda f: Attempt(f.verifier(), f.report(OTHER), f.aux()), "report data"),
    "VCEK of another chip": (lambda f: Attempt(f.verifier(), f.report(DATA, chip_id=bytes([7]) * 64), f.aux()),
                             "another chip"),
    "VCEK of another TCB": (lambda f: Attempt(f.verifier(), f.report(DATA, tcb=bytes(8)), f.aux()),
                            "another TCB"),
    "truncated": (lambda f: Attempt(f.verifier(), f.report(DATA)[:-1], f.aux()), "bytes, not 1184"),
    "oversized": (lambda f: Attempt(f.verifier(), f.report(DATA) + bytes(1), f.aux()), "bytes, not 1184"),
    "garbage": (lambda f: Attempt(f.verifier(), b"\xff" * snp.REPORT_BYTES, f.aux()), "not supported"),
    "no certificate table": (lambda f: Attempt(f.verifier(), f.report(DATA)), "truncated"),
    "certificate table entry outside it": (lambda f: Attempt(f.verifier(), f.report(DATA), _table_offset_outside(f)),
                                           "outside the table"),
    "oversized certificate table": (lambda f: Attempt(f.verifier(), f.report(DATA), f.aux() + bytes(70_000)),
                                    "at most"),
    "garbage certificate": (lambda f: Attempt(f.verifier(), f.report(DATA), cert_table([(snp.VCEK, b"\x30\x03abc")])),
                            "not a DER certificate"),
    "requested from VMPL 1": (lambda f: Attempt(f.verifier(), f.report(DATA, vmpl=1), f.aux()), "VMPL 1"),
    "requested from VMPL 3": (lambda f: Attempt(f.verifier(), f.report(DATA, vmpl=3), f.aux()), "VMPL 3"),
    "VMPL 2 past max_vmpl 1": (lambda f: Attempt(SnpVerifier(roots=[f.ark.cert], intermediates=[], max_vmpl=1),
                                                 f.report(DATA, vmpl=2), f.aux()), "VMPL 2"),
    "migration agent allowed": (lambda f: Attempt(f.verifier(), f.report(DATA, policy=snp.POLICY_MIGRATE_MA),
                                                  f.aux()), "MIGRATE_MA"),
    "VCEK that is a CA": (lambda f: Attempt(f.verifier(), f.report(DATA, key=(v := f.new_vcek(ca=True)).key),
                                            f.aux(v)), "is a CA"),
    "VCEK with an unknown critical extension": (lambda f: Attempt(
        f.verifier(), f.report(DATA, key=(v := f.new_vcek(critical=(UNKNOWN_CRITICAL,))).key), f.aux(v)),
        "unknown critical extension"),
}


def _tampered_document(f: NitroForge) -> bytes:
    raw = f.document(DATA)
    return raw.replace(b"i-test-enc", b"i-tEst-enc", 1)


NITRO_NEGATIVE: dict[str, Case] = {
    "forged signature": (lambda f: Attempt(f.verifier(), f.document(DATA, key=p384())),
                         "signature does not verify"),
    "tampered payload": (lambda f: Attempt(f.verifier(), _tampered_document(f)), "signature does not verify"),
    "expired certificate": (lambda f: Attempt(f.verifier(), f.document(DATA, leaf=f.expired_leaf())), "expired"),
    "chain to an unpinned root": (lambda f: Attempt(f.verifier(issue("aws.nitro-enclaves", p384(), ca=True)),
                                                    f.document(DATA)), "pinned root"),
    "debug evidence": (lambda f: Attempt(f.verifier(), f.document(DATA, debug=True)), "debug"),
    "wrong report data": (lambda f: Attempt(f.verifier(), f.document(OTHER)), "report data"),
    "stale timestamp": (lambda f: Attempt(f.verifier(), f.document(DATA, timestamp=NOW - 61)), "61 s old"),
    "timestamp from the future": (lambda f: Attempt(f.verifier(), f.document(DATA, timestamp=NOW + 60)), "s old"),
    "truncated": (lambda f: Attempt(f.verifier(), f.document(DATA)[:-10]), "not valid CBOR"),
    "oversized": (lambda f: Attempt(f.verifier(), f.document(DATA) + bytes(70_000)), "at most"),
    "bytes after the document": (lambda f: Attempt(f.verifier(), f.document(DATA) + b"\x00"), "after its CBOR item"),
    "garbage": (lambda f: Attempt(f.verifier(), b"\x84" + b"\xff" * 40), "not valid CBOR"),
    "nested 10,000 deep": (lambda f: Attempt(f.verifier(), b"\x81" * 10_000 + b"\x00"), "not valid CBOR"),
    "another tag": (lambda f: Attempt(f.verifier(), cbor2.dumps(cbor2.CBORTag(17, []))), "not COSE_Sign1"),
    "not ES384": (lambda f: Attempt(f.verifier(), f.document(DATA, protected=cbor2.dumps({1: -7}))), "ES384"),
    "leaf key not ECDSA P-384": (lambda f: Attempt(f.verifier(), f.document(
        DATA, leaf=issue("i-test-enc.test.aws", p256(), f.zonal, ca=False))), "not ECDSA on secp384r1"),
    "timestamp beyond 63 bits": (lambda f: Attempt(f.verifier(), f.document(DATA, timestamp=9.3e15)), "64-bit"),
    "timestamp beyond 64 bits (a bignum)": (lambda f: Attempt(f.verifier(), f.document(DATA, timestamp=1e20)),
                                            "CBOR tag 2"),
    "short PCR": (lambda f: Attempt(f.verifier(), f.document(DATA, pcrs={0: b"", 1: b"", 2: b""})), "PCRs"),
    "regular-expression tag": (lambda f: Attempt(f.verifier(), cbor2.dumps(cbor2.CBORTag(35, "(a+)+$"))),
                               "tagged 35, not COSE_Sign1"),
    "tag 18 inside tag 18": (lambda f: Attempt(f.verifier(), b"\xd2" + f.document(DATA)), "CBOR tag 18"),
    "tag in the protected header": (lambda f: Attempt(f.verifier(), f.document(
        DATA, protected=cbor2.dumps({1: cbor2.CBORTag(3, b"\x22")}))), "protected header uses CBOR tag 3"),
    "tag in the unprotected header": (lambda f: Attempt(f.verifier(), f.document(
        DATA, unprotected={4: cbor2.CBORTag(1, 0)})), "Nitro document uses CBOR tag 1"),
    "leaf that is a CA": (lambda f: Attempt(f.verifier(), f.document(
        DATA, leaf=issue("i-test-enc.test.aws", p384(), f.zonal, ca=True))), "is a CA"),
    "zonal CA without keyCertSign": (lambda f: Attempt(f.verifier(), f.document(
        DATA, leaf=issue("i-test-enc.test.aws", p384(), zonal := issue(
            "zonal.test.aws.nitro-enclaves", p384(), f.root, ca=True, extensions=(NO_CERT_SIGN,)), ca=False),
        cabundle=[f.root, zonal])), "keyCertSign"),
    "leaf with an unknown critical extension": (lambda f: Attempt(f.verifier(), f.document(
        DATA, leaf=issue("i-test-enc.test.aws", p384(), f.zonal, ca=False, critical=(UNKNOWN_CRITICAL,)))),
        "unknown critical extension"),
}

# Tags a CBOR decoder may turn into costly or surprising objects (cbor2 decodes all but 18 and
# 4000 itself): none may appear inside a document, wherever it sits.
REFUSED_TAGS = {
    0: "2025-06-15T00:00:00Z", 1: 1_750_000_000, 2: b"\x01" * 9, 3: b"\x01" * 9, 4: [-2, 12345], 5: [-2, 3],
    18: [], 25: 0, 28: b"x", 29: 0, 30: [1, 3], 35: "(a+)+$", 36: "Subject: x", 37: bytes(16), 52: b"\x7f\0\0\1",
    54: bytes(16), 100: 0, 256: [b"x"], 258: [1, 2], 260: b"\x7f\0\0\1", 261: {24: b"\x7f"}, 1004: "2025-06-15",
    43000: [1.0, 2.0], 55799: b"x", 4000: b"x",
}


@pytest.mark.parametrize("tag", sorted(REFUSED_TAGS))
def test_nitro_refuses_every_cbor_tag_inside_a_document(tag: int, nitro_forge: NitroForge) -> None:
    tagged = cbor2.CBORTag(tag, REFUSED_TAGS[tag])
    for raw in (nitro_forge.document(DATA, fields={"nonce": tagged}),
                nitro_forge.document(DATA, fields={"module_id": [tagged]}),
                nitro_forge.document(DATA, unprotected={33: tagged})):
        result = Attempt(nitro_forge.verifier(), raw).run()
        assert not result.affirming
        assert f"uses CBOR tag {tag};" in outcome(result), result.reasons


def test_nitro_refuses_a_60_kb_bignum_before_decoding_it(nitro_forge: NitroForge) -> None:
    """A bignum (tag 2) of 60 KB as the timestamp: refused as a tag, never turned into an int
    (nor its digits into anything costlier), inside a document under the size limit."""
    raw = nitro_forge.document(DATA, fields={"timestamp": cbor2.CBORTag(2, b"\xff" * 60_000)})
    assert 60_000 < len(raw) <= nitro.MAX_DOCUMENT_BYTES
    result = Attempt(nitro_forge.verifier(), raw).run()
    assert not result.affirming
    assert outcome(result) == "payload uses CBOR tag 2; no tag is accepted inside a document"
    fraction = cbor2.dumps(cbor2.CBORTag(4, [-10**6, cbor2.CBORTag(2, b"\xff" * 60_000)]))
    assert "uses CBOR tag 4" in outcome(Attempt(nitro_forge.verifier(), nitro_forge.document(
        DATA, protected=fraction)).run())

FORGES = {"tdx": TDX_NEGATIVE, "sev-snp": SNP_NEGATIVE, "nitro": NITRO_NEGATIVE}


@pytest.mark.parametrize(("tee", "case"), [(tee, case) for tee, table in FORGES.items() for case in sorted(table)])
def test_every_negative_case_is_refused_with_its_reason(tee: str, case: str, tdx_forge: TdxForge,
                                                        snp_forge: SnpForge, nitro_forge: NitroForge) -> None:
    forge = {"tdx": tdx_forge, "sev-snp": snp_forge, "nitro": nitro_forge}[tee]
    make, reason = FORGES[tee][case]
    result = make(forge).run()
    assert reason in outcome(result), result
    assert result.security_level == "hardware"
    if reason == "debug":
        assert result.affirming and result.debug
    else:
        assert not result.affirming and result.reasons


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tee=st.sampled_from(sorted(FORGES)), flips=st.lists(st.integers(min_value=0), min_size=1, max_size=4),
       cut=st.integers(min_value=0, max_value=6000))
def test_bit_flips_and_cuts_are_refused_never_raised(tee: str, flips: list[int], cut: int, tdx_forge: TdxForge,
                                                     snp_forge: SnpForge, nitro_forge: NitroForge) -> None:
    good = {"tdx": Attempt(tdx_forge.verifier(), tdx_forge.quote(DATA)),
            "sev-snp": Attempt(snp_forge.verifier(), snp_forge.report(DATA), snp_forge.aux()),
            "nitro": Attempt(nitro_forge.verifier(), nitro_forge.document(DATA))}[tee]
    raw = bytearray(good.raw)
    for flip in flips:
        raw[flip % len(raw)] ^= 1 << (flip // len(raw) % 8)
    claimed = good.run()
    good.raw = bytes(raw[:cut] if cut < len(raw) else raw)
    result = good.run()  # never raises
    if result.affirming:  # a flip in bytes nothing signs (SEV-SNP's reserved tail) changes no claim
        assert (result.measurement, result.debug, result.security_version) == (
            claimed.measurement, claimed.debug, claimed.security_version)


# configfs-tsm ------------------------------------------------------------------------


def fake_tsm(root: Path, provider: str, outblob: bytes, auxblob: bytes, *,
             other_writes: int = 0) -> tuple[threading.Thread, list[bytes]]:
    """A folder laid out like /sys/kernel/config/tsm/report/modelfence, ``inblob`` and
    ``outblob`` FIFOs, and a thread playing the kernel: it takes the report data (returned in
    the list), counts the write in ``generation`` (plus ``other_writes`` by another process),
    then serves ``outblob``."""
    entry = root / "modelfence"
    entry.mkdir(parents=True)
    (entry / "generation").write_text("4\n")
    (entry / "provider").write_text(provider + "\n")
    if auxblob:
        (entry / "auxblob").write_bytes(auxblob)
    os.mkfifo(entry / "inblob")
    os.mkfifo(entry / "outblob")
    received: list[bytes] = []

    def kernel() -> None:
        with open(entry / "inblob", "rb") as inblob:
            received.append(inblob.read())
        (entry / "generation").write_text(f"{5 + other_writes}\n")
        (entry / "outblob").write_bytes(outblob)

    thread = threading.Thread(target=kernel, daemon=True)
    thread.start()
    return thread, received


def test_the_tsm_attester_returns_verifiable_evidence(tmp_path: Path, snp_forge: SnpForge) -> None:
    kernel, received = fake_tsm(tmp_path, "sev_guest", snp_forge.report(DATA), snp_forge.aux())
    evidence = TsmAttester(tmp_path).quote(DATA, NOW)
    kernel.join(5)
    assert received == [DATA]
    assert evidence.tee_type == "sev-snp" and evidence.measurement == ""  # the claims are in raw
    assert snp_forge.verifier().verify(evidence, DATA, NOW).affirming


def test_the_tsm_attester_refuses_a_request_another_writer_changed(tmp_path: Path, tdx_forge: TdxForge) -> None:
    kernel, _ = fake_tsm(tmp_path, "tdx_guest", tdx_forge.quote(DATA), b"", other_writes=1)
    with pytest.raises(ModelFenceError, match="generation 4 before, 6 after"):
        TsmAttester(tmp_path).quote(DATA, NOW)
    kernel.join(5)
    with pytest.raises(ValueError, match="64 bytes"):
        TsmAttester(tmp_path).quote(b"short", NOW)
