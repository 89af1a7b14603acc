"""The shape of API keys and key ids.

A key is ``mf_`` followed by 43 URL-safe characters (32 random bytes). It is shown once,
when created; afterwards only its :attr:`~modelfence.identity.base.ApiKeyRecord.prefix`
and its keyed hash (:meth:`ServerSecret.hash_api_key
<modelfence.identity.secret.ServerSecret.hash_api_key>`) exist anywhere.
"""

from __future__ import annotations

import secrets

KEY_PREFIX = "mf_"
_KEY_RANDOM_BYTES = 32
KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32) is 43 characters
# "mf_" + 7 characters: enough for a person to tell keys apart in a list, 42 of 256 bits.
DISPLAY_PREFIX_LENGTH = 10


def new_api_key() -> str:
    """A fresh secret key, e.g. ``mf_3q2-7wD0...`` (46 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)


def new_key_id() -> str:
    """A fresh public key id, e.g. ``key_1f9a0c33be42``."""
    return "key_" + secrets.token_hex(6)


def display_prefix(api_key: str) -> str:
    return api_key[:DISPLAY_PREFIX_LENGTH]


def looks_like_api_key(value: str) -> bool:
    """Cheap shape check, so garbage is turned away before hashing or a database lookup."""
    return len(value) == KEY_LENGTH and value.startswith(KEY_PREFIX)
