"""Per-client watermark keys, derived from the server secret and versioned.

Every mark ModelFence puts on an answer is keyed by the client that received it, so a
leaked text or a cloned model points at one account. Keys are never stored or configured:
``WatermarkKeyring(secret).key("acme")`` recomputes them from the server secret (HKDF for
the version's master key, then HMAC-SHA256 of the client name). Bumping ``version``
issues fresh keys; older versions stay derivable, so marks made under them stay
verifiable. Nothing a client receives is a key or reveals one, and ``repr`` is masked.

>>> from modelfence.identity.secret import ServerSecret
>>> ring = WatermarkKeyring(ServerSecret(b"0123456789abcdef0123456789abcdef"))
>>> key = ring.key("acme")
>>> key
WatermarkKey(client='acme', version=1, material=***)
>>> key == ring.key("acme") and key != ring.key("acme", version=2)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelfence.keyedhash import hmac_sha256

if TYPE_CHECKING:  # a runtime import would cycle: config -> watermark.config -> identity -> config
    from modelfence.identity.secret import ServerSecret

CURRENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class WatermarkKey:
    """One client's key material for one key version; use it through :meth:`subkey`."""

    client: str
    version: int
    material: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"WatermarkKey(client={self.client!r}, version={self.version}, material=***)"

    def subkey(self, purpose: str) -> bytes:
        """32 bytes for one scheme (``"labels"``, ``"text"``...), so schemes never share a key."""
        return hmac_sha256(self.material, b"modelfence-wm/" + purpose.encode())

    def seed(self, purpose: str) -> int:
        """A 63-bit integer seed for one scheme (for numpy generators and integer hashes)."""
        return int.from_bytes(self.subkey(purpose)[:8], "big") >> 1


class WatermarkKeyring:
    """Derives (and caches) every client's watermark keys from the server secret."""

    def __init__(self, secret: ServerSecret, *, version: int = CURRENT_VERSION) -> None:
        if version < 1:
            raise ValueError("watermark key version must be >= 1")
        self.version = version
        self._secret = secret
        self._masters: dict[int, bytes] = {}
        self._keys: dict[tuple[str, int], WatermarkKey] = {}

    def __repr__(self) -> str:
        return f"WatermarkKeyring(version={self.version}, secret=***)"

    def channel_key(self) -> bytes:
        """The 32-byte key of the gateway → model-server mark channel (see ``.channel``).

        Its own HKDF purpose, so the model server that holds it can derive no client's key.
        """
        return self._secret.derive("watermark/channel")

    def key(self, client: str, version: int | None = None) -> WatermarkKey:
        version = self.version if version is None else version
        cached = self._keys.get((client, version))
        if cached is not None:
            return cached
        master = self._masters.get(version)
        if master is None:
            master = self._masters[version] = self._secret.derive(f"watermark/v{version}")
        # Length-prefixed, so no two (client, version) pairs feed HMAC the same bytes.
        name = client.encode()
        material = hmac_sha256(master, len(name).to_bytes(4, "big") + name)
        key = self._keys[(client, version)] = WatermarkKey(client, version, material)
        return key
