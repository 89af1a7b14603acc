"""Sealed model parts: envelope encryption of named tensors, authenticated chunk by chunk.

A sealed file is what an operator ships next to a model whose sensitive part (a privately
trained head, adapter or slice) must not be readable by whoever holds the file::

    b"MFSEAL\\x00\\x01" | header length (4 bytes, big-endian) | header (canonical JSON)
    | chunk 0 | chunk 1 | ... | chunk n-1          each: AES-256-GCM(data key, plaintext)

The tensors' raw bytes (C order, little-endian) are concatenated and cut into chunks of
``chunk_bytes``; each is encrypted under a fresh random 256-bit data key with the chunk's
index as its nonce (one key per artifact, so no nonce repeats) and associated data
``SHA-256(header) ‖ index ‖ last`` — a chunk cannot be altered, moved, dropped or taken
from another artifact, and the file cannot be cut short, without decryption failing. The
header names the artifact, its release ``version`` (the key broker refuses versions below
its policy's minimum: no rollback to an older part) and the tensor manifest; it carries the
data key wrapped (AES-256-GCM) under a key-encryption key that only the key broker holds,
with the rest of the header as associated data, so editing the version or the manifest
makes the key unrecoverable. The header is stored in one canonical encoding (anything
else is refused), so ``digest`` (SHA-256 of the header) names exactly one artifact: the
broker releases its data key only against evidence that binds this digest, from a worker
whose measurement its policy allows.

There is deliberately no unseal command: the plaintext exists only inside the worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from base64 import b64decode, b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from zipfile import BadZipFile

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelfence.errors import ModelFenceError

MAGIC = b"MFSEAL\x00\x01"
FORMAT = 1
CIPHER = "AES-256-GCM"
KEY_BYTES = 32
TAG_BYTES = 16
WRAP_NONCE_BYTES = 12
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 16 << 20  # a manifest of ~100,000 tensors; beyond it, not a sealed file
MAX_TENSORS = 100_000
# Plain numeric types only: object arrays would need pickle, which a worker never runs.
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}")  # no control characters for terminals
MAX_DIMS = 64
MAX_BYTES = 1 << 50  # a payload, a tensor or a dimension beyond this is not a model part
WRAPPED_BYTES = KEY_BYTES + TAG_BYTES


class SealError(ModelFenceError):
    """A sealed file is malformed, was tampered with, or the key does not open it."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lies in the decrypted payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class SealedHeader:
    """What anyone holding the file may read (``modelfence inspect``): no weights."""

    artifact_id: str
    version: int
    created_at: str
    chunk_bytes: int
    payload_bytes: int
    tensors: tuple[TensorEntry, ...]
    kek_id: str  # which key-encryption key wraps the data key
    wrapped_key: bytes
    wrap_nonce: bytes
    raw: bytes  # the header exactly as stored (what ``digest`` covers)

    @property
    def digest(self) -> str:
        """SHA-256 of the stored header: the artifact's identity in attestation."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def chunks(self) -> int:
        return max(1, -(-self.payload_bytes // self.chunk_bytes))

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def new_key() -> bytes:
    """A fresh 256-bit key (a key-encryption key for the broker, or a data key)."""
    return AESGCM.generate_key(bit_length=256)


def kek_id(kek: bytes) -> str:
    """A public name for a key-encryption key (it reveals nothing about the key)."""
    return hashlib.sha256(b"modelfence-kek-id\x00" + kek).hexdigest()[:16]


def _canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SealError(f"{what} must be {KEY_BYTES} bytes")


def seal(
    tensors: Mapping[str, np.ndarray],
    out: Path,
    *,
    kek: bytes,
    artifact_id: str,
    version: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SealedHeader:
    """Write ``tensors`` sealed to ``out`` (see the module docstring); returns its header."""
    _check_key(kek, "the key-encryption key")
    if not _ID.fullmatch(artifact_id):
        raise SealError("artifact_id: 1-128 characters of letters, digits and ._:/- "
                        "starting with a letter or digit")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:
        raise SealError("version: an integer from 1 to 2147483647")
    if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise SealError(f"chunk_bytes: from 4096 to {MAX_CHUNK_BYTES}")
    if not tensors:
        raise SealError("nothing to seal: no tensors")
    if len(tensors) > MAX_TENSORS:
        raise SealError(f"at most {MAX_TENSORS} tensors")
    arrays: list[tuple[str, np.ndarray]] = []
    manifest: list[dict[str, Any]] = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SealError(f"tensor name {name!r}: 1-256 printable characters")
        if array.dtype.name not in DTYPES:
            raise SealError(f"tensor {name!r}: dtype {array.dtype} not one of {', '.join(DTYPES)}")
        array = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d
        arrays.append((name, array))
        manifest.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
                         "offset": offset, "nbytes": array.nbytes})
        offset += array.nbytes
    data_key = new_key()
    body = {"format": FORMAT, "cipher": CIPHER, "artifact_id": artifact_id, "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "chunk_bytes": chunk_bytes, "payload_bytes": offset, "tensors": manifest}
    wrap_nonce = os.urandom(WRAP_NONCE_BYTES)
    wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, _canonical(body))
    raw = _canonical({**body, "key": {"kek_id": kek_id(kek), "wrapped": b64encode(wrapped).decode(),
                                      "nonce": b64encode(wrap_nonce).decode()}})
    header = parse_header(raw)
    aead = AESGCM(data_key)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as f:
        f.write(MAGIC + struct.pack(">I", len(raw)) + raw)
        for index, chunk in enumerate(_chunks(arrays, chunk_bytes, offset)):
            last = index == header.chunks - 1
            f.write(aead.encrypt(_nonce(index), chunk, _aad(header, index, last)))
    tmp.replace(out)
    return header


def _chunks(arrays: list[tuple[str, np.ndarray]], size: int, total: int) -> Any:
    """The payload in chunks of ``size`` bytes (one empty chunk for an empty payload)."""
    if total == 0:
        yield b""
        return
    pending = bytearray()
    for _, array in arrays:
        view = array.reshape(-1).view(np.uint8).data
        start = 0
        while start < len(view):
            take = min(size - len(pending), len(view) - start)
            pending += view[start : start + take]
            start += take
            if len(pending) == size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(header: SealedHeader, index: int, last: bool) -> bytes:
    return bytes.fromhex(header.digest) + struct.pack(">Q?", index, last)


def parse_header(raw: bytes) -> SealedHeader:
    """Validate a stored header; :class:`SealError` names what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4,300-digit numbers, nesting
        raise SealError("header is not JSON") from exc
    if not isinstance(doc, dict):
        raise SealError("header is not a JSON object")
    try:
        canonical = _canonical(doc) == raw
    except (ValueError, TypeError):
        canonical = False
    if not canonical:  # one artifact, one digest
        raise SealError("header is not in its canonical encoding")
    if doc.get("format") != FORMAT or doc.get("cipher") != CIPHER:
        raise SealError(f"unsupported format {doc.get('format')!r} / cipher {doc.get('cipher')!r}; "
                        f"this version reads format {FORMAT}, {CIPHER}")
    try:
        key = doc["key"]
        tensors = tuple(_entry(t) for t in doc["tensors"])
        header = SealedHeader(
            artifact_id=_typed(doc["artifact_id"], str, "artifact_id"),
            version=_typed(doc["version"], int, "version"),
            created_at=_typed(doc["created_at"], str, "created_at"),
            chunk_bytes=_typed(doc["chunk_bytes"], int, "chunk_bytes"),
            payload_bytes=_typed(doc["payload_bytes"], int, "payload_bytes"),
            tensors=tensors,
            kek_id=_typed(key["kek_id"], str, "key.kek_id"),
            wrapped_key=b64decode(_typed(key["wrapped"], str, "key.wrapped"), validate=True),
            wrap_nonce=b64decode(_typed(key["nonce"], str, "key.nonce"), validate=True),
            raw=raw,
        )
    except (KeyError, TypeError) as exc:
        raise SealError(f"header lacks {exc}") from exc
    except ValueError as exc:  # bad base64
        raise SealError(f"header: {exc}") from exc
    if not 4096 <= header.chunk_bytes <= MAX_CHUNK_BYTES or not 0 <= header.payload_bytes <= MAX_BYTES:
        raise SealError("header: chunk_bytes or payload_bytes out of range")
    if not _ID.fullmatch(header.artifact_id) or not 1 <= header.version < 2**31:
        raise SealError("header: artifact_id or version out of range")
    if len(header.wrap_nonce) != WRAP_NONCE_BYTES or len(header.wrapped_key) != WRAPPED_BYTES:
        raise SealError("header: the wrapped key has the wrong size")
    if len({t.name for t in header.tensors}) != len(header.tensors):
        raise SealError("header: two tensors share a name")
    if len(header.tensors) > MAX_TENSORS:
        raise SealError(f"header: more than {MAX_TENSORS} tensors")
    expected = 0
    for entry in header.tensors:
        if entry.offset != expected:
            raise SealError(f"header: tensor {entry.name!r} does not follow the one before it")
        expected += entry.nbytes
    if expected != header.payload_bytes:
        raise SealError("header: the tensors do not add up to payload_bytes")
    return header


def _typed(value: Any, kind: type, field: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SealError(f"header: {field} must be {kind.__name__}")
    return value


def _entry(doc: Any) -> TensorEntry:
    if not isinstance(doc, dict):
        raise SealError("header: a tensor entry is not an object")
    dims = _typed(doc["shape"], list, "shape")
    if len(dims) > MAX_DIMS:  # before multiplying: a long shape costs quadratic time
        raise SealError(f"header: more than {MAX_DIMS} dimensions")
    shape = tuple(_typed(d, int, "shape") for d in dims)
    dtype = _typed(doc["dtype"], str, "dtype")
    name = _typed(doc["name"], str, "name")
    if dtype not in DTYPES or any(not 0 <= d <= MAX_BYTES for d in shape) or not _NAME.fullmatch(name):
        raise SealError(f"header: tensor {name!r}: bad name, dtype or shape")
    entry = TensorEntry(name, dtype, shape, _typed(doc["offset"], int, "offset"),
                        _typed(doc["nbytes"], int, "nbytes"))
    if entry.nbytes != math.prod(shape) * np.dtype(dtype).itemsize:
        raise SealError(f"header: tensor {entry.name!r}: nbytes does not match dtype and shape")
    return entry


def read_header(path: Path) -> SealedHeader:
    """The header of a sealed file, without touching its chunks."""
    with path.open("rb") as f:
        return _read_header(f)


def _read_header(f: BinaryIO) -> SealedHeader:
    start = f.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed ModelFence file (bad magic)")
    (length,) = struct.unpack(">I", start[len(MAGIC) :])
    if length > MAX_HEADER_BYTES:
        raise SealError(f"header of {length} bytes is over the {MAX_HEADER_BYTES} limit")
    raw = f.read(length)
    if len(raw) != length:
        raise SealError("file ends inside its header")
    return parse_header(raw)


def unwrap_data_key(header: SealedHeader, kek: bytes) -> bytes:
    """The artifact's data key (the key broker's step, after attestation)."""
    _check_key(kek, "the key-encryption key")
    if kek_id(kek) != header.kek_id:
        raise SealError(f"artifact {header.artifact_id!r} is sealed under key {header.kek_id}, "
                        f"not {kek_id(kek)}")
    body = json.loads(header.raw)
    body.pop("key")
    try:
        return AESGCM(kek).decrypt(header.wrap_nonce, header.wrapped_key, _canonical(body))
    except InvalidTag as exc:
        raise SealError("the header was altered: its data key does not unwrap") from exc


def open_sealed(path: Path, data_key: bytes) -> tuple[SealedHeader, dict[str, np.ndarray]]:
    """Decrypt and check every chunk; the tensors, read-only, over one buffer.

    Runs inside the isolated worker only. Any altered, moved, missing or extra byte raises
    :class:`SealError` before a tensor is returned.
    """
    _check_key(data_key, "the data key")
    with path.open("rb") as f:
        header = _read_header(f)
        expected = len(MAGIC) + 4 + len(header.raw) + header.payload_bytes + header.chunks * TAG_BYTES
        if os.fstat(f.fileno()).st_size != expected:  # before allocating what the header claims
            raise SealError(f"file is {os.fstat(f.fileno()).st_size} bytes; its header "
                            f"describes {expected}")
        aead = AESGCM(data_key)
        payload = bytearray(header.payload_bytes)
        position = 0
        for index in range(header.chunks):
            last = index == header.chunks - 1
            size = min(header.chunk_bytes, header.payload_bytes - position)
            sealed = f.read(size + TAG_BYTES)
            if len(sealed) != size + TAG_BYTES:
                raise SealError(f"file ends inside chunk {index} of {header.chunks}")
            try:
                plain = aead.decrypt(_nonce(index), sealed, _aad(header, index, last))
            except InvalidTag as exc:
                raise SealError(f"chunk {index} fails authentication (tampered, moved, "
                                "or another key)") from exc
            payload[position : position + size] = plain
            position += size
        if f.read(1):
            raise SealError("bytes after the last chunk")
    tensors: dict[str, np.ndarray] = {}
    buffer = memoryview(payload)
    for entry in header.tensors:
        array = np.frombuffer(buffer, dtype=np.dtype(entry.dtype).newbyteorder("<"),
                              count=math.prod(entry.shape), offset=entry.offset)
        array = array.reshape(entry.shape)
        array.flags.writeable = False
        tensors[entry.name] = array
    return header, tensors


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """What ``modelfence seal`` reads: ``.safetensors``, ``.npz`` or ``.npy`` (no pickle)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}
    except (OSError, ValueError, TypeError, EOFError, BadZipFile) as exc:
        raise SealError(f"{path}: {exc}") from exc
    raise SealError(f"{path}: expected .safetensors, .npz or .npy, not {suffix or 'no suffix'!r}")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """``safetensors`` is an optional dependency (the ``demo`` extra): imported when used."""
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file  # numpy only: no torch at import
    except ImportError as exc:
        raise SealError(f"{path}: reading .safetensors needs the safetensors package "
                        "(pip install safetensors), or give .npz") from exc
    try:
        return dict(load_file(str(path)))
    except (OSError, ValueError, TypeError, SafetensorError) as exc:
        raise SealError(f"{path}: {exc}") from exc
