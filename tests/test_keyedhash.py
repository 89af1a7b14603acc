"""The request path's keyed hash: RFC 2104 HMAC-SHA256 that keeps the GIL."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import numpy as np
import pytest

from modelfence.identity.secret import ServerSecret
from modelfence.keyedhash import KeyedHash, hmac_sha256
from modelfence.testing.gil import busy_thread
from modelfence.watermark.keys import WatermarkKey
from modelfence.watermark.labels import label_marks


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 200])
def test_digests_are_hmac_sha256(key_length: int) -> None:
    rng = np.random.default_rng(key_length)
    key = rng.bytes(key_length)
    mac = KeyedHash(key)
    for length in (0, 1, 55, 56, 64, 256, 3000):
        message = rng.bytes(length)
        assert mac.digest(message) == hmac.digest(key, message, "sha256")
        assert hmac_sha256(key, message) == hmac.digest(key, message, "sha256")
    assert mac.digest(b"a") == mac.digest(b"a")  # the padded states are copied, never used up


def _seconds(work: Callable[[], object]) -> float:
    with busy_thread(0.02):
        started = time.perf_counter()
        work()
        return time.perf_counter() - started


def test_hot_path_hashes_keep_the_gil_while_another_thread_is_busy() -> None:
    # hmac.digest lets go of the GIL on every call; when the busy thread wins it, the
    # caller waits up to the switch interval (20 ms here) to get it back. Whether it wins
    # depends on the machine's scheduling, so the premise is shown first.
    secret = ServerSecret(b"s" * 32)
    key = WatermarkKey("acme", 1, b"k" * 32)
    rows = np.arange(64 * 64, dtype=np.float64).reshape(64, 64)
    subkey = key.subkey("labels")
    released = max(
        _seconds(lambda: [hmac.digest(subkey, row.tobytes(), "sha256") for row in rows])
        for _ in range(3)
    )
    if released < 0.1:
        pytest.skip(f"hmac.digest never waited for the GIL here ({released:.3f} s for 64 calls)")
    assert _seconds(lambda: [secret.hash_api_key(f"mf_{n}") for n in range(64)]) < released / 4
    assert _seconds(lambda: label_marks(key, rows, rate=0.005, quantum=0.5)) < released / 4
