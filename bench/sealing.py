"""What sealing costs: seal and open throughput, and the cold start of a sealed part.

Opening is what a worker does at start-up after the broker releases the data key: read
the file, authenticate and decrypt every chunk (AES-256-GCM), and map the tensors. The
targets: decryption ≥ 1 GB/s, and a 256 MiB sealed part opened in ≤ 1 s. Each size is
sealed once and opened ``--runs`` times; the file stays in the page cache, so this is the
decryption's cost, not the disk's (the first open and the median of the others are shown).
One core, on the machine it runs on.

    python bench/sealing.py                         # 16 and 256 MiB parts, 5 opens each
    python bench/sealing.py --mib 1024 --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from modelfence.confidential.sealing import new_key, open_sealed, read_header, seal, unwrap_data_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.now(UTC):%Y-%m-%d}, chunks of {args.chunk_kib} KiB")
    print("| part | seal GB/s | first open s | open s (p50) | open GB/s (p50) |")
    print("|---:|---:|---:|---:|---:|")
    kek = new_key()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for mib in args.mib:
            size = mib << 20
            # A head and an adapter: a few large matrices, as a protected part looks.
            tensors = {f"layer{i}.weight": rng.standard_normal(size // 16, dtype=np.float32)
                       for i in range(4)}
            path = Path(folder) / f"part-{mib}.sealed"
            started = time.perf_counter()
            seal(tensors, path, kek=kek, artifact_id=f"bench-{mib}", version=1,
                 chunk_bytes=args.chunk_kib << 10)
            sealing = time.perf_counter() - started
            del tensors
            opens = []
            for _ in range(args.runs):
                started = time.perf_counter()
                header = read_header(path)
                _, opened = open_sealed(path, unwrap_data_key(header, kek))
                opens.append(time.perf_counter() - started)
                del opened
            p50 = float(np.median(opens[1:] if len(opens) > 1 else opens))
            print(f"| {mib} MiB | {size / sealing / 1e9:.2f} | {opens[0]:.3f} | {p50:.3f} | "
                  f"{size / p50 / 1e9:.2f} |")


if __name__ == "__main__":
    main()
