"""What a call into the isolated worker costs, next to the same head run in-process.

A worker is launched and measured, attested to a key broker (``sim`` platform: simulated),
provisioned with a sealed linear head, and then called with float32 rows over its Unix
socket; the same rows go through the same head in this process, alternating call by call
so both see the same machine. The in-process side is the worker's own arithmetic
(``read_slice(...).probabilities``: float64, softmax, argmax, after the same NaN check), so
the difference is what the isolation costs: framing, the socket, the other process. Reported:
p50/p99 of each, the added p50 (the target is ≤ 100 µs for up to 16 KB of tensors) and the
ratio of the p50s, for small requests on a small head and for a head of about 1M parameters,
where the target is ≤ 5% added. The first line records the machine, date and command.

    python bench/confidential_worker.py                 # 2,000 calls per case
    python bench/confidential_worker.py --calls 10000
    python bench/confidential_worker.py --blas-threads 0   # the BLAS library's own thread count

Each process runs one BLAS thread unless ``--blas-threads`` says otherwise (see _BLAS_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from modelfence.confidential.attestation import SimPlatform, SimVerifier
from modelfence.confidential.broker import AuditLog, KeyBroker, ReleasePolicy
from modelfence.confidential.launcher import LaunchedWorker, WorkerClient, launch, provision
from modelfence.confidential.sealing import new_key, seal
from modelfence.confidential.worker import Slice, read_slice

CASES = {  # name: (rows, inputs, classes)
    "1 row, 64x10 head": (1, 64, 10),
    "16 KB request, 64x10 head": (64, 64, 10),
    "1M-parameter head (1024x1024), 8 rows": (8, 1024, 1024),
}


def provisioned(folder: Path, weight: np.ndarray, bias: np.ndarray) -> tuple[WorkerClient, LaunchedWorker]:
    kek, platform = new_key(), SimPlatform()
    worker = launch(json.dumps({"output": "labels"}).encode(), folder / "run", platform)
    sealed = folder / "head.sealed"
    seal({"weight": weight, "bias": bias}, sealed, kek=kek, artifact_id="bench-head", version=1)
    broker = KeyBroker(kek, ReleasePolicy("development", frozenset({"sim"}), frozenset({worker.measurement})),
                       {"sim": SimVerifier(platform.public_key)}, AuditLog())
    client = WorkerClient(worker.socket_path)
    provision(client, broker, sealed)
    return client, worker


# One BLAS thread per process by default: the two halves alternate, and two processes of two
# threads each on a 2-core machine stall each other for a scheduler tick at random (p50s of
# 0.45 ms or 4 ms for the same call), which measures the oversubscription, not the worker.
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def in_process(rows: np.ndarray, part: Slice) -> np.ndarray:
    """The same head without the worker: the worker's own arithmetic for a labels answer."""
    if not np.isfinite(rows).all():
        raise ValueError("input holds NaN or infinity")
    return part.probabilities(rows).argmax(axis=1).astype("<i4")


def cpu() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else host.processor() or host.machine()


def percentiles(seconds: list[float], warm_up: int) -> np.ndarray:
    return np.percentile(np.array(seconds[warm_up:]) * 1e6, [50, 99])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads in each process (0: the library's default)")
    args = parser.parse_args()
    threads = str(args.blas_threads)
    if args.blas_threads and any(os.environ.get(name) != threads for name in _BLAS_THREADS):
        # NumPy reads these once, as it loads: run again with them set (the worker inherits them).
        os.environ.update(dict.fromkeys(_BLAS_THREADS, threads))
        os.execv(sys.executable, [sys.executable, *sys.argv])
    warm_up = min(100, args.calls // 10)  # calls left out of the percentiles, on both sides
    print(f"# {cpu()}, {host.machine()}, {os.cpu_count()} cores; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
          f"Python {host.python_version()}, NumPy {np.__version__}; "
          f"`python bench/confidential_worker.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"# {args.calls} calls per case, alternating in-process and worker, the first {warm_up} of each "
          f"left out; both sides compute in float64 with {args.blas_threads or 'default'} BLAS thread(s) "
          "each")
    print("| case | in-process p50 / p99 µs | worker p50 / p99 µs | added p50 µs | worker / in-process p50 |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, (n, d, c) in CASES.items():
        weight = rng.standard_normal((c, d)).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        rows = rng.standard_normal((n, d)).astype(np.float32)
        payload = rows.tobytes()
        with tempfile.TemporaryDirectory() as folder:
            client, worker = provisioned(Path(folder), weight, bias)
            part = read_slice({"weight": weight, "bias": bias})
            inside, outside = [], []
            try:
                for _ in range(args.calls):
                    started = time.perf_counter()
                    in_process(rows, part)
                    inside.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    client.call("infer", payload, dtype="float32", shape=[n, d])
                    outside.append(time.perf_counter() - started)
            finally:
                client.close()
                worker.stop()
        a, b = percentiles(inside, warm_up), percentiles(outside, warm_up)
        print(f"| {name} ({len(payload):,} B in) | {a[0]:.1f} / {a[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} | "
              f"{b[0] - a[0]:+.1f} | {b[0] / a[0]:.2f} ({(b[0] - a[0]) / a[0]:+.0%}) |")
        if weight.size >= 1 << 20:  # what a float32 head would take here: not like with like
            f32 = []
            for _ in range(min(args.calls, 500)):
                started = time.perf_counter()
                rows @ weight.T + bias
                f32.append(time.perf_counter() - started)
            p50 = np.percentile(np.array(f32) * 1e6, 50)
            print(f"# {name}: a float32 matmul in-process takes {p50:.1f} µs "
                  "p50; the worker computes in float64 so that no finite input overflows (an oracle of the "
                  "weights' scale), and the in-process side above does the same")


if __name__ == "__main__":
    main()
