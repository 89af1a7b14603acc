"""What a keyed hash on the event loop's thread costs while another thread is busy.

``hmac.digest`` releases the GIL around each call; ``modelfence.keyedhash.KeyedHash``
(the same HMAC-SHA256) keeps it for messages under 2 KiB. With a second thread spinning
in Python (as a busy SQLite writer or ledger thread would), each release can leave the
calling thread waiting up to the interpreter's switch interval to get the GIL back. The
script times ``--calls`` hashes of a 256-byte message (a 64-feature row) each way, alone
and with the spinning thread, at the default switch interval (5 ms) and ``--interval``.

    python bench/keyed_hash_gil.py
    python bench/keyed_hash_gil.py --calls 64 --interval 0.02
"""

from __future__ import annotations

import argparse
import hmac
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

from modelfence.keyedhash import KeyedHash
from modelfence.testing.gil import busy_thread

KEY = b"k" * 32
MESSAGE = bytes(range(256))


def seconds(digest: Callable[[bytes], bytes], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        digest(MESSAGE)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64, help="hashes per measurement (64)")
    parser.add_argument("--interval", type=float, default=0.02, help="a second switch interval")
    args = parser.parse_args()
    mac = KeyedHash(KEY)
    ways = {"hmac.digest": lambda m: hmac.digest(KEY, m, "sha256"), "KeyedHash": mac.digest}
    print(f"Python {sys.version.split()[0]}; {args.calls} hashes of {len(MESSAGE)} bytes, wall ms\n")
    print("| | alone | busy thread, 5 ms interval | busy thread, "
          f"{args.interval * 1000:g} ms interval |")
    print("|---|---:|---:|---:|")
    for name, digest in ways.items():
        cells = []
        for context in (nullcontext(), busy_thread(0.005), busy_thread(args.interval)):
            with context:
                cells.append(f"{seconds(digest, args.calls) * 1000:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
