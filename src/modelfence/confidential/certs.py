"""X.509 chains for hardware evidence: a leaf up to a pinned root, checked at a given time.

The same plain checks serve Intel's, AMD's and AWS's chains, whatever their signature
algorithm (ECDSA, RSA PKCS#1 v1.5 or the RSA-PSS of AMD's ARK and ASK): each certificate
names and is signed by the next; every issuer is a CA (BasicConstraints ``ca``) within its
path length and, where it has KeyUsage, may sign certificates (``keyCertSign``); the leaf is
not a CA (no BasicConstraints, or ``ca`` false); no certificate in the path (the root
included) carries a critical extension other than BasicConstraints and KeyUsage, the only
ones these checks understand; every certificate is valid at ``now``; and the path ends at a
certificate the verifier pinned. AMD's VCEK/VLEK extensions (TCB, hardware ID) are not
critical, and are read by ``snp``. Not checked: revocation (CRLs), which needs collateral
fetched online; the leaf's own KeyUsage and ExtendedKeyUsage; name and policy constraints
(a certificate marking one critical is refused).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from modelfence.confidential.attestation import EvidenceError

_T = TypeVar("_T")
MAX_CHAIN = 6  # certificates in a path, root included; real ones have 3 to 5
UNDERSTOOD_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def _parse(parse: Callable[[bytes], _T], data: bytes, what: str) -> _T:
    # AMD's KDS issues VCEKs with serial number 0, which cryptography warns about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return parse(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise EvidenceError(f"{what}: {exc}") from exc


def load_der(data: bytes, what: str) -> x509.Certificate:
    return _parse(x509.load_der_x509_certificate, data, f"{what} is not a DER certificate")


def load_pem(data: bytes, what: str) -> list[x509.Certificate]:
    return _parse(x509.load_pem_x509_certificates, data, f"{what} is not a PEM certificate chain")


def pinned(name: str) -> list[x509.Certificate]:
    """Certificates shipped in ``confidential/trust/`` (public roots and AMD's ASKs)."""
    return load_pem(resources.files("modelfence.confidential").joinpath("trust", name).read_bytes(), name)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except (KeyError, ValueError):  # names are parsed lazily; a malformed one fails here
        return "(with a malformed name)"


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise EvidenceError(f"certificate {_name(cert)} has malformed extensions: {exc}") from None


def _check_critical(cert: x509.Certificate) -> None:
    """Refuse a critical extension these checks do not understand (RFC 5280, 4.2)."""
    for extension in _extensions(cert):
        if extension.critical and extension.oid not in UNDERSTOOD_CRITICAL:
            raise EvidenceError(f"certificate {_name(cert)} has an unknown critical extension "
                                f"{extension.oid.dotted_string}")


def _check_leaf(leaf: x509.Certificate) -> None:
    _check_critical(leaf)
    try:
        constraints = _extensions(leaf).get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if constraints.ca:
        raise EvidenceError(f"certificate {_name(leaf)} is a CA, not an end-entity certificate")


def _issuer_problem(child: x509.Certificate, issuer: x509.Certificate, below: int) -> str | None:
    """None if ``issuer`` signed ``child`` and may issue it with ``below`` intermediates under
    it; otherwise why not ("" when it did not sign ``child`` at all)."""
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError, KeyError):
        return ""
    name = _name(issuer)
    extensions = _extensions(issuer)
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"issuer {name} is not a CA (no BasicConstraints)"
    if not constraints.ca:
        return f"issuer {name} is not a CA"
    if constraints.path_length is not None and below > constraints.path_length:
        return f"issuer {name} may have {constraints.path_length} intermediates under it, not {below}"
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        return f"issuer {name}'s KeyUsage does not allow signing certificates (keyCertSign)"
    for extension in extensions:
        if extension.critical and extension.oid not in UNDERSTOOD_CRITICAL:
            return f"certificate {name} has an unknown critical extension {extension.oid.dotted_string}"
    return None


def _find_issuer(child: x509.Certificate, candidates: Sequence[x509.Certificate], below: int,
                 problems: list[str]) -> x509.Certificate | None:
    """The first candidate that signed ``child`` and may issue it; why the others that signed
    it may not go to ``problems``."""
    for candidate in candidates:
        problem = _issuer_problem(child, candidate, below)
        if problem is None:
            return candidate
        if problem:
            problems.append(problem)
    return None


def ec_key(cert: x509.Certificate, curve: str, what: str) -> ec.EllipticCurvePublicKey:
    """The certificate's key, if it is ECDSA on ``curve`` (e.g. ``secp384r1``)."""
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
        raise EvidenceError(f"{what}'s key is not ECDSA on {curve}")
    return key


def _check_time(cert: x509.Certificate, at: datetime) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise EvidenceError(
            f"certificate {_name(cert)} is expired or not yet valid at {at:%Y-%m-%dT%H:%M:%SZ} "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")


def verify_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 roots: Sequence[x509.Certificate], now: float) -> list[x509.Certificate]:
    """The path from ``leaf`` to a pinned root through ``intermediates`` (in any order; a
    copy of the root among them is fine); ``EvidenceError`` says where it breaks."""
    at = datetime.fromtimestamp(now, UTC)
    pinned_der = {_der(root) for root in roots}
    _check_leaf(leaf)
    path, pool, problems = [leaf], list(intermediates), list[str]()
    while True:
        current = path[-1]
        _check_time(current, at)
        if len(path) > 1 and _der(current) in pinned_der:
            return path
        if len(path) >= MAX_CHAIN:
            break
        below = len(path) - 1
        root = _find_issuer(current, roots, below, problems)
        if root is not None:
            _check_time(root, at)
            return [*path, root]
        issuer = _find_issuer(current, pool, below, problems)
        if issuer is None:
            break
        pool.remove(issuer)
        path.append(issuer)
    if problems:
        raise EvidenceError(f"certificate {_name(path[-1])} does not chain to a pinned root: {problems[0]}")
    raise EvidenceError(f"certificate {_name(path[-1])} does not chain to a pinned root")
