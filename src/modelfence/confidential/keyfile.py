"""Key-encryption key files: one line of base64, created 0600, refused if others can read them.

``modelfence seal --new-key`` writes one; the seal command and the gateway's key broker
(``confidential.kek_file``) read it.
"""

from __future__ import annotations

import os
import stat
from base64 import b64decode, b64encode
from binascii import Error as Base64Error
from pathlib import Path

from modelfence.confidential.sealing import KEY_BYTES, SealError, new_key


def read_key_file(path: Path, what: str = "--key-file") -> bytes:
    """A key-encryption key: one line of base64 for 32 bytes, readable by its owner only.

    The checks are made on the opened file (no symbolic link followed), not on the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SealError(f"{what} {path}: {exc.strerror or exc}; "
                        "create one with `modelfence seal --new-key`") from exc
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid():
            raise SealError(f"{what} {path}: not a regular file of this user")
        if status.st_mode & 0o077:
            raise SealError(f"{what} {path}: readable by group or others; chmod 600 it")
        content = f.read(1024)
    try:
        key = b64decode(content.strip(), validate=True)
    except (Base64Error, ValueError) as exc:
        raise SealError(f"{what} {path}: not base64") from exc
    if len(key) != KEY_BYTES:
        raise SealError(f"{what} {path}: holds {len(key)} bytes, not {KEY_BYTES}")
    return key


def write_key_file(path: Path, what: str = "--key-file") -> bytes:
    """Create a new key-encryption key at ``path`` (mode 0600); never overwrites one."""
    key = new_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SealError(f"{what} {path} exists; --new-key never overwrites a key") from exc
    with os.fdopen(fd, "w") as f:
        f.write(b64encode(key).decode() + "\n")
    return key
