"""AWS Nitro Enclaves: verify an attestation document (the NSM's reply) offline.

The document is a COSE_Sign1 (tagged 18 or not) over CBOR: ``[protected, unprotected,
payload, signature]``, ES384 in the protected header, and a payload map of ``module_id``,
``digest`` ("SHA384"), ``timestamp`` (ms), ``pcrs``, ``certificate`` (the DER leaf),
``cabundle`` (root first), ``public_key``, ``user_data`` and ``nonce``.

Checked: the ES384 signature over ``["Signature1", protected, b"", payload]`` with the leaf's
key; the chain leaf ← cabundle up to the pinned AWS Nitro Enclaves root (G1), every
certificate valid at ``now``; the timestamp no older than ``max_age`` (nor ahead by more
than ``max_skew``); the field types and sizes the NSM documents; no CBOR tag but the
document's own top-level 18, read by hand before cbor2 runs: cbor2 looks every other tag up
in a table that refuses it before decoding the tagged item, so no bignum, decimal, rational,
date, set, regular expression or shared reference is ever built. Not checked: CRLs (AWS
publishes none for this chain).

Claims: ``measurement`` = hex SHA-384(PCR0 ‖ PCR1 ‖ PCR2) (enclave image, kernel and
bootstrap, application); ``debug`` = PCR0 all zero (how Nitro shows a debug-mode enclave);
``security_version`` = 0 (the document carries none); report data = ``user_data``, where
the attester puts our 64 bytes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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
from modelfence.errors import ModelFenceError

MAX_DOCUMENT_BYTES = 64 * 1024
COSE_SIGN1_TAG, ES384 = 18, -35
PCR_BYTES, MAX_PCRS = 48, 32
MAX_OPTIONAL = {"public_key": 1024, "user_data": 512, "nonce": 512}  # NSM limits
MAX_CABUNDLE = 8


class _TagRefused(Exception):
    def __init__(self, tag: object) -> None:
        super().__init__(tag)
        self.tag = tag


class _NoTags(Mapping[int, Any]):
    """cbor2's ``semantic_decoders``: cbor2 looks a tag's number up here, before decoding the
    item it tags, for every tag (its own decoders included), and the lookup refuses them all."""

    def __getitem__(self, tag: int) -> Any:
        raise _TagRefused(tag)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_tag(tag: Any, immutable: bool) -> Any:  # cbor2's tag_hook; _NoTags refuses first
    raise _TagRefused(getattr(tag, "tag", "?"))


def _decode(data: bytes, what: str) -> Any:
    """One CBOR item filling ``data``: definite lengths, no duplicate keys, shallow, no tags."""
    import cbor2  # an optional dependency, checked when the verifier is made

    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream, max_depth=8, allow_indefinite=False, allow_duplicate_keys=False,
                                 semantic_decoders=_NoTags(), tag_hook=_refuse_tag).decode()
    except _TagRefused as exc:
        raise EvidenceError(f"{what} uses CBOR tag {exc.tag}; no tag is accepted inside a document") from None
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        if isinstance(exc.__cause__, _TagRefused):
            raise EvidenceError(f"{what} uses CBOR tag {exc.__cause__.tag}; no tag is accepted "
                                "inside a document") from None
        raise EvidenceError(f"{what} is not valid CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise EvidenceError(f"{what} has {len(data) - stream.tell()} bytes after its CBOR item")
    return item


def _untag(raw: bytes) -> bytes:
    """``raw`` without its top-level COSE_Sign1 tag (18), if it has one; any other tag is
    refused here, read from the CBOR head by hand."""
    if not raw or raw[0] >> 5 != 6:  # major type 6: a tag
        return raw
    info = raw[0] & 0x1F
    if info < 24:
        tag, head = info, 1
    elif info <= 27:
        head = 1 + (1 << (info - 24))
        if len(raw) < head:
            raise EvidenceError("Nitro document is not valid CBOR: truncated tag")
        tag = int.from_bytes(raw[1:head], "big")
    else:
        raise EvidenceError("Nitro document is not valid CBOR: malformed tag")
    if tag != COSE_SIGN1_TAG:
        raise EvidenceError(f"document is tagged {tag}, not COSE_Sign1 (18)")
    return raw[head:]


def _field(doc: Mapping[Any, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EvidenceError(f"document field {name!r} is missing or of the wrong type")
    return value


def parse_document(raw: bytes) -> tuple[bytes, bytes, bytes, Mapping[str, Any]]:
    """``(protected, payload, signature, payload map)``; ``EvidenceError`` if out of format."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise EvidenceError(f"Nitro document is {len(raw)} bytes; at most {MAX_DOCUMENT_BYTES} accepted")
    outer = _decode(_untag(raw), "Nitro document")
    if not (isinstance(outer, list | tuple) and len(outer) == 4 and isinstance(outer[1], Mapping)
            and all(isinstance(outer[i], bytes) for i in (0, 2, 3))):
        raise EvidenceError("document is not a COSE_Sign1 array")
    protected, _, payload, signature = outer
    header = _decode(protected, "protected header")
    if not isinstance(header, Mapping) or header.get(1) != ES384:
        raise EvidenceError("protected header does not name ES384")
    doc = _decode(payload, "payload")
    if not isinstance(doc, Mapping):
        raise EvidenceError("payload is not a map")
    _field(doc, "module_id", str)
    if _field(doc, "digest", str) != "SHA384":
        raise EvidenceError("document digest is not SHA384")
    if not 0 < _field(doc, "timestamp", int) < 2**63:
        raise EvidenceError("document timestamp is not a positive 64-bit count of milliseconds")
    _field(doc, "certificate", bytes)
    pcrs = _field(doc, "pcrs", Mapping)
    if not 3 <= len(pcrs) <= MAX_PCRS or not all(
            isinstance(i, int) and 0 <= i < MAX_PCRS and isinstance(v, bytes) and len(v) == PCR_BYTES
            for i, v in pcrs.items()) or not {0, 1, 2} <= pcrs.keys():
        raise EvidenceError("document PCRs are not SHA-384 values indexed 0 to 31 with 0, 1 and 2")
    bundle = _field(doc, "cabundle", (list, tuple))
    if not 1 <= len(bundle) <= MAX_CABUNDLE or not all(isinstance(c, bytes) for c in bundle):
        raise EvidenceError(f"document cabundle is not 1 to {MAX_CABUNDLE} certificates")
    for name, limit in MAX_OPTIONAL.items():
        value = doc.get(name)
        if value is not None and (not isinstance(value, bytes) or len(value) > limit):
            raise EvidenceError(f"document field {name!r} is not bytes of at most {limit}")
    return protected, payload, signature, doc


def check_document(raw: bytes, roots: Sequence[x509.Certificate], now: float, max_age: float,
                   max_skew: float) -> Claims:
    """The claims of a document whose signature, chain and timestamp check out at ``now``."""
    import cbor2

    protected, payload, signature, doc = parse_document(raw)
    leaf = load_der(doc["certificate"], "document certificate")
    bundle = [load_der(c, "cabundle certificate") for c in doc["cabundle"]]
    verify_chain(leaf, bundle[::-1], roots, now)
    key = ec_key(leaf, "secp384r1", "document certificate")
    if len(signature) != 96:
        raise EvidenceError(f"ES384 signature is {len(signature)} bytes, not 96")
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    try:
        key.verify(encode_dss_signature(int.from_bytes(signature[:48], "big"),
                                        int.from_bytes(signature[48:], "big")),
                   to_sign, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError("document signature does not verify with its certificate") from None
    age = now - doc["timestamp"] / 1000
    if not -max_skew <= age <= max_age:
        raise EvidenceError(f"document timestamp is {age:.0f} s old; accepted for {max_age:.0f} s")
    pcrs = doc["pcrs"]
    return Claims(hashlib.sha384(pcrs[0] + pcrs[1] + pcrs[2]).hexdigest(), pcrs[0] == bytes(PCR_BYTES),
                  0, doc.get("user_data") or b"")


class NitroVerifier:
    """Verifies ``nitro`` evidence: ``raw`` is the NSM attestation document."""

    tee_type = "nitro"
    security_level: SecurityLevel = "hardware"
    reports_security_version = False  # a Nitro document carries none

    def __init__(self, roots: Sequence[x509.Certificate] | None = None, *, max_age: float = 60.0,
                 max_skew: float = 5.0) -> None:
        try:
            import cbor2  # noqa: F401 -- fail here, not at the first document
        except ImportError as exc:
            raise ModelFenceError("the nitro verifier needs cbor2: pip install 'modelfence[attestation]'") from exc
        self.roots = list(roots) if roots is not None else pinned("aws_nitro_root_g1.pem")
        self.max_age = max_age
        self.max_skew = max_skew

    def verify(self, evidence: Evidence, expected_report_data: bytes, now: float) -> AttestationResult:
        return appraise_hardware(
            self.tee_type, evidence, expected_report_data,
            lambda e: check_document(e.raw, self.roots, now, self.max_age, self.max_skew))
