"""The server secret: the root of every key ModelFence derives (API key hashes first).

Loaded once at start-up by :func:`load_server_secret`, from the config ``secret``
(or ``MODELFENCE_SECRET``), else from ``secret_file``, else generated into that file.
Its ``repr`` is masked, and nothing here logs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelfence.errors import ConfigError
from modelfence.keyedhash import KeyedHash

log = logging.getLogger(__name__)

MIN_SECRET_LENGTH = 16  # bytes; the same floor as the config's ``secret``


class ServerSecret:
    """Secret key material with a masked ``repr``; use it through :meth:`derive`.

    >>> secret = ServerSecret(b"0123456789abcdef0123456789abcdef")
    >>> secret
    ServerSecret(***)
    >>> len(secret.hash_api_key("mf_example"))
    64
    """

    __slots__ = ("_api_key_hmac", "_material", "_trait_hmac")

    def __init__(self, material: bytes) -> None:
        if len(material) < MIN_SECRET_LENGTH:
            raise ConfigError(f"secret: must be at least {MIN_SECRET_LENGTH} bytes long")
        self._material = material
        self._api_key_hmac = KeyedHash(self.derive("api-key-hash"))
        self._trait_hmac = KeyedHash(self.derive("account-trait-hash"))

    def __repr__(self) -> str:
        return "ServerSecret(***)"

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """An independent subkey for one purpose (HKDF-SHA256), so no two uses share a key."""
        hkdf = HKDF(
            algorithm=SHA256(), length=length, salt=None, info=b"modelfence/" + purpose.encode()
        )
        return hkdf.derive(self._material)

    def hash_api_key(self, api_key: str) -> str:
        """HMAC-SHA256 of the key as 64 hex digits: what the store keeps instead of the key.

        Keyed, so a copy of the database alone cannot confirm a guessed key; cheap (about
        a microsecond), so the gateway can hash every request's key.
        """
        return self._api_key_hmac.digest(api_key.encode()).hex()

    def hash_trait(self, name: str, value: str) -> str:
        """HMAC-SHA256 of one account trait, 32 hex digits: equal values link accounts.

        The trait's name is part of the message, so a payment fingerprint and an e-mail
        domain that happen to be the same text do not hash alike.
        """
        message = f"{name}\x00{value}".encode()
        return self._trait_hmac.digest(message).hex()[:32]


def load_server_secret(secret: str | None, secret_file: str | Path) -> ServerSecret:
    """The configured secret, else the one in ``secret_file``, else a new one written there.

    Wiring: ``load_server_secret(config.secret, config.secret_file)``. A generated file
    holds 64 hex characters (mode 0600); setting ``MODELFENCE_SECRET`` to its content gives
    the same secret, which is how replicas share one.
    """
    if secret:
        return ServerSecret(secret.encode())
    path = Path(secret_file)
    if not path.exists():
        _generate_secret_file(path)
        log.warning(
            "no secret configured: using a generated one kept in %s; set `secret` or "
            "MODELFENCE_SECRET to the same value on every replica",
            path,
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"secret_file: cannot read {path}: {exc.strerror}") from exc
    if len(text) < MIN_SECRET_LENGTH:
        raise ConfigError(f"secret_file: {path} must hold at least {MIN_SECRET_LENGTH} characters")
    return ServerSecret(text.encode())


def _generate_secret_file(path: Path) -> None:
    # Written to a private temporary file, then hard-linked into place: the link fails if
    # another process got there first, and nobody ever reads a half-written secret.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(secrets.token_hex(32) + "\n")
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(tmp, path)
        finally:
            tmp.unlink()
    except OSError as exc:
        raise ConfigError(f"secret_file: cannot create {path}: {exc.strerror}") from exc
