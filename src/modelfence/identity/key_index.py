"""Which keyed hashes belong to an issued key: a Bloom filter, so a flood of made-up keys
costs the gateway a hash and a few bit tests, not a database lookup each.

A key's keyed hash (HMAC-SHA256, ``ServerSecret.hash_api_key``) is already uniformly
random, so its own bits give the filter's ``PROBES`` positions; nothing else is hashed.
A filter never forgets (a revoked key stays "issued": its lookup finds it revoked) and
answers "maybe issued" for about 1 in ``1 / FALSE_POSITIVE_RATE`` made-up keys, which
then cost the lookup they cost before. At ``BITS_PER_KEY`` bits per key, a million keys
take 1.2 MB, and an index built for them (with room to double) 2.5 MB.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BITS_PER_KEY = 10
PROBES = 7  # the best count at 10 bits per key: ~0.8% false positives
FALSE_POSITIVE_RATE = 0.008
MIN_CAPACITY = 1_024


class KeyIndex:
    """A Bloom filter of keyed hashes (64 hex digits) sized for ``capacity`` keys."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, MIN_CAPACITY)
        self._bits_count = self.capacity * BITS_PER_KEY
        self._bits = bytearray((self._bits_count + 7) // 8)
        self.count = 0  # distinct hashes added (up to the false positives)

    @classmethod
    def of(cls, key_hashes: Iterable[str]) -> KeyIndex:
        """An index of ``key_hashes`` (distinct, as keys' hashes are), with room for as many
        again before it is full. Built with array operations: a million keys take well
        under a second on the gateway's loop, where one ``add`` each would take ~10 s."""
        hashes = list(key_hashes)
        index = cls(2 * len(hashes))
        if hashes:
            # Big-endian 32-bit words of the hash are the 8-hex-digit slices _positions reads.
            words = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u4")
            probes = words.reshape(len(hashes), 8)[:, :PROBES].astype(np.uint64)
            flags = np.zeros(index._bits_count, dtype=bool)
            flags[(probes % index._bits_count).ravel()] = True
            index._bits = bytearray(np.packbits(flags, bitorder="little").tobytes())
            index.count = len(hashes)
        return index

    @property
    def full(self) -> bool:
        """More keys than it was sized for: false positives grow; rebuild it larger."""
        return self.count > self.capacity

    def add(self, key_hash: str) -> None:
        """Add a hash; one already in (a key seen again by a poll) does not count again."""
        if key_hash in self:
            return
        for bit in self._positions(key_hash):
            self._bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1

    def __contains__(self, key_hash: str) -> bool:
        return all(self._bits[bit >> 3] & (1 << (bit & 7)) for bit in self._positions(key_hash))

    def _positions(self, key_hash: str) -> list[int]:
        # 7 disjoint 32-bit slices of the 256-bit hash (8 hex digits each).
        return [int(key_hash[8 * i : 8 * i + 8], 16) % self._bits_count for i in range(PROBES)]
