"""Account metadata as stored: each trait normalised, then reduced to a keyed hash.

Normalising first makes the same organisation, card or domain hash alike however the
sign-up system spelt it ("Acme  Ltd" and "acme ltd"; "Ops@Example.COM" and
"example.com"); a sign-up address is kept as its network (the same /24 or /64 as client
fingerprints), since linking asks "same network?", not "same host?".
"""

from __future__ import annotations

import ipaddress
import math
from datetime import UTC, datetime, timedelta

from modelfence.identity.base import AccountMetadata
from modelfence.identity.secret import ServerSecret

MAX_TRAIT_LENGTH = 512
EARLIEST_SIGNUP = datetime(2000, 1, 1, tzinfo=UTC)
MAX_PAID_USD = 1e12


class InvalidMetadata(ValueError):
    """A metadata field the store refuses; ``field`` names it for the 4xx answer."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _words(value: str) -> str:
    return " ".join(value.casefold().split())


def _email_domain(value: str) -> str:
    domain = value.rpartition("@")[2].strip().strip(".").casefold()
    if not domain or any(ch.isspace() for ch in domain):
        raise InvalidMetadata("email_domain", "must be a domain such as example.com")
    return domain


def _network(value: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidMetadata("signup_address", "must be an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:203.0.113.5 signed up from 203.0.113.0/24
    length = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((address, length), strict=False))


def hashed_traits(
    metadata: AccountMetadata,
    secret: ServerSecret,
    *,
    ipv4_prefix: int = 24,
    ipv6_prefix: int = 64,
) -> dict[str, str]:
    """The traits ``metadata`` sets, normalised and hashed; raises :class:`InvalidMetadata`."""
    plain = {
        "organisation": metadata.organisation,
        "payment": metadata.payment,
        "signup_address": metadata.signup_address,
        "email_domain": metadata.email_domain,
    }
    hashed: dict[str, str] = {}
    for name, value in plain.items():
        if value is None:
            continue
        if not value.strip() or len(value) > MAX_TRAIT_LENGTH:
            raise InvalidMetadata(name, f"must be 1-{MAX_TRAIT_LENGTH} characters of text")
        if name == "signup_address":
            hashed["signup_network"] = secret.hash_trait(
                "signup_network", _network(value, ipv4_prefix, ipv6_prefix)
            )
        elif name == "email_domain":
            hashed[name] = secret.hash_trait(name, _email_domain(value))
        elif name == "organisation":
            hashed[name] = secret.hash_trait(name, _words(value))
        else:
            hashed[name] = secret.hash_trait(name, value.strip())
    paid = metadata.paid_usd
    if paid is not None and not (math.isfinite(paid) and 0 <= paid <= MAX_PAID_USD):
        raise InvalidMetadata("paid_usd", f"must be a number from 0 to {MAX_PAID_USD:g}")
    created = metadata.created_at
    if created is not None:
        if created.tzinfo is None:
            raise InvalidMetadata("created_at", "must carry a time zone (e.g. 2026-01-31T12:00:00Z)")
        # A sign-up in the future would keep an account on probation for years.
        latest = datetime.now(UTC) + timedelta(days=1)
        if not EARLIEST_SIGNUP <= created <= latest:
            raise InvalidMetadata(
                "created_at", f"must lie between {EARLIEST_SIGNUP:%Y-%m-%d} and tomorrow"
            )
    return hashed
