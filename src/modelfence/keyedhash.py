"""HMAC-SHA256 that keeps the GIL for short messages: the request path's keyed hash.

``hmac.digest`` releases the GIL around every call, however short the message. While any
other thread of the process is busy (the SQLite writers, the watermark ledger), the
event loop's thread then waits for the GIL to come back, up to the
interpreter's switch interval (5 ms), once per call: a gateway hashes every request's
key and every row of a classifier batch, so one request could wait that long dozens of
times. Here the key's padded blocks are hashed once and each message continues copies of
them with ``hashlib.sha256``, which keeps the GIL for messages under 2 KiB. The digests
are those of ``hmac.digest(key, message, "sha256")`` (RFC 2104), so nothing stored or
marked before changes::

    >>> import hmac
    >>> KeyedHash(b"k" * 32).digest(b"row") == hmac.digest(b"k" * 32, b"row", "sha256")
    True
"""

from __future__ import annotations

import hashlib

_BLOCK = 64  # SHA-256's block size in bytes
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


class KeyedHash:
    """HMAC-SHA256 under one key; build it once per key, call :meth:`digest` per message."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        block = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(block.translate(_INNER))
        self._outer = hashlib.sha256(block.translate(_OUTER))

    def digest(self, message: bytes) -> bytes:
        """The 32-byte HMAC-SHA256 of ``message``."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """One HMAC-SHA256, for keys used once (subkey derivations)."""
    return KeyedHash(key).digest(message)
