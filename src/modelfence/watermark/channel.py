"""The mark channel: how the gateway asks a self-hosted model server to mark one client's text.

Trust model. The gateway can derive every client's watermark key; the model server should
learn as little as possible. So the server holds only the *channel key*
(:meth:`WatermarkKeyring.channel_key`, an HKDF output of the server secret under its own
purpose; ``modelfence keys mark-secret`` prints it), and each chat or completions request
carries, in the ``x-modelfence-mark`` header, just what marking that one answer needs: the
client's text seed and the green-list parameters, sealed with AES-256-GCM under the
channel key::

    v1.<key version>.<expiry, unix seconds>.<nonce, base64url>.<ciphertext + tag, base64url>

- The server learns the text seeds of the clients whose requests it serves (marking needs
  exactly that) and nothing else: no client name, no seed of a client it has not served,
  no key of the other marks (labels, embeddings), nothing a key can be derived from
  (seeds are one-way HMAC outputs). Had it a secret to derive seeds from client ids
  instead, one leaked model server would give away every client's seed at once.
- A seed lets its holder test or imitate that one client's text mark, so the server is
  trusted with the seeds it is sent; bumping ``watermark.key_version`` re-keys everyone.
- Without the channel key nobody can read a seed or make a header the server accepts; the
  tag also covers the version and the expiry.
- Clients never see the header (it only travels gateway → upstream) and cannot send one:
  the gateway copies none of a client's headers upstream, so a forged ``x-modelfence-*``
  header is dropped there.
- A captured header works until its expiry (``ttl``) and can only ask for the mark of the
  client it was made for.

Cost: the gateway seals one header per client every ``ttl / 2`` and reuses it (a dict
lookup per request); the server opens a header in microseconds and keeps one processor
per seed.

>>> key = bytes(32)
>>> header = seal(key, MarkOrder(seed=7, gamma=0.25, delta=2.0, key_version=1), expires=2_000)
>>> open_mark(key, header, now=1_000)
MarkOrder(gamma=0.25, delta=2.0, key_version=1)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelfence.errors import ConfigError, ModelFenceError
from modelfence.watermark.config import TextConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import TEXT_PURPOSE, GreenListProcessor

log = logging.getLogger(__name__)

MARK_HEADER = "x-modelfence-mark"
MARK_SECRET_ENV = "MODELFENCE_MARK_SECRET"
DEFAULT_TTL_SECONDS = 300
_VERSION = "v1"
_PAYLOAD = struct.Struct(">Qdd")  # seed, gamma, delta
_NONCE_BYTES = 12
_KEY_BYTES = 32


class MarkRejected(ModelFenceError):
    """A mark header the model server will not use; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MarkOrder:
    """What one header asks of the model server: mark with ``seed``, ``gamma`` and ``delta``."""

    seed: int = field(repr=False)
    gamma: float
    delta: float
    key_version: int

    def processor(self) -> GreenListProcessor:
        return GreenListProcessor(self.seed, gamma=self.gamma, delta=self.delta)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(key: bytes, order: MarkOrder, *, expires: int) -> str:
    """The header value carrying ``order`` until ``expires`` (unix seconds), sealed with ``key``."""
    prefix = f"{_VERSION}.{order.key_version}.{expires}"
    nonce = os.urandom(_NONCE_BYTES)
    payload = _PAYLOAD.pack(order.seed, order.gamma, order.delta)
    sealed = AESGCM(key).encrypt(nonce, payload, prefix.encode("ascii"))
    return f"{prefix}.{_b64(nonce)}.{_b64(sealed)}"


def open_mark(key: bytes, header: str, *, now: float) -> MarkOrder:
    """The order in ``header``; raises :class:`MarkRejected` unless it is ours and current."""
    parts = header.split(".")
    if len(parts) != 5:
        raise MarkRejected("malformed", "mark header: expected 5 dot-separated fields")
    version, key_version, expires, nonce_text, sealed_text = parts
    if version != _VERSION:
        raise MarkRejected("version", f"mark header: unknown format {version[:8]!r}")
    try:
        nonce, sealed = _unb64(nonce_text), _unb64(sealed_text)
        payload = AESGCM(key).decrypt(nonce, sealed, f"{version}.{key_version}.{expires}".encode())
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise MarkRejected("forged", "mark header: not sealed with this channel key") from exc
    # Authenticated from here on: the fields are the gateway's own.
    if now > int(expires):
        raise MarkRejected("expired", "mark header: expired")
    seed, gamma, delta = _PAYLOAD.unpack(payload)
    return MarkOrder(seed, gamma, delta, int(key_version))


class MarkIssuer:
    """Gateway side: the header for a client, sealed once per ``ttl / 2`` and then reused."""

    def __init__(
        self, keyring: WatermarkKeyring, text: TextConfig, *,
        ttl: int = DEFAULT_TTL_SECONDS, clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"mark header ttl must be >= 2 seconds, got {ttl}")
        self._keyring = keyring
        self._key = keyring.channel_key()
        self._text = text
        self._ttl = ttl
        self._clock = clock
        self._headers: dict[str, tuple[str, float]] = {}  # client -> (header, refresh at)

    def __repr__(self) -> str:
        return f"MarkIssuer(ttl={self._ttl}, key=***)"

    def header(self, client: str) -> str:
        now = self._clock()
        cached = self._headers.get(client)
        if cached is not None and now < cached[1]:
            return cached[0]
        key = self._keyring.key(client)
        order = MarkOrder(key.seed(TEXT_PURPOSE), self._text.gamma, self._text.delta, key.version)
        value = seal(self._key, order, expires=int(now) + self._ttl)
        self._headers[client] = (value, now + self._ttl / 2)
        return value


class MarkVerifier:
    """Model-server side: the logits processor a request's headers ask for, or ``None``.

    Plugs into ``create_demo_upstream_app(logits_processor_for=MarkVerifier(key))``. A
    missing header means "do not mark"; a bad one is counted in :attr:`counts`, logged
    (its reason, never its value) and also means "do not mark": the end user never sees
    an error because of the mark channel.
    """

    def __init__(
        self, key: bytes, *, clock: Callable[[], float] = time.time, cache_size: int = 1024,
    ) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"the mark channel key must be {_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._clock = clock
        self._cache_size = cache_size
        # One processor per order: it keeps the vocabulary's token codes between requests.
        self._processors: OrderedDict[tuple[int, float, float], GreenListProcessor] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"MarkVerifier(counts={dict(self.counts)}, key=***)"

    def __call__(self, headers: Mapping[str, str]) -> GreenListProcessor | None:
        header = headers.get(MARK_HEADER)
        if header is None:
            self.counts["absent"] += 1
            return None
        try:
            order = open_mark(self._key, header, now=self._clock())
            slot = (order.seed, order.gamma, order.delta)
            processor = self._processors.get(slot)
            if processor is None:
                processor = order.processor()  # raises ValueError on out-of-range gamma/delta
        except MarkRejected as exc:
            self._reject(exc.reason, str(exc))
            return None
        except ValueError as exc:
            self._reject("parameters", f"mark header: {exc}")
            return None
        self._processors[slot] = processor
        self._processors.move_to_end(slot)
        if len(self._processors) > self._cache_size:
            self._processors.popitem(last=False)
        self.counts["marked"] += 1
        return processor

    def _reject(self, reason: str, message: str) -> None:
        self.counts[f"rejected_{reason}"] += 1
        log.warning("%s; answering without a text mark", message)


def parse_mark_secret(text: str, source: str) -> bytes:
    """The channel key from its hex form (what ``modelfence keys mark-secret`` prints)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise ConfigError(f"{source}: the mark secret must be {2 * _KEY_BYTES} hex characters")
    return key


def load_mark_secret(path: str | Path | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The channel key from ``path``, else ``$MODELFENCE_MARK_SECRET``, else ``None``."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"mark secret file: cannot read {path}: {exc.strerror}") from exc
        return parse_mark_secret(text, str(path))
    value = (os.environ if environ is None else environ).get(MARK_SECRET_ENV)
    return parse_mark_secret(value, MARK_SECRET_ENV) if value else None
