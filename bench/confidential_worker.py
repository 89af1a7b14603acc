"""What a call into the isolated worker costs, next to the same head run in-process.

A worker is launched and measured, attested to a key broker (``sim`` platform: simulated),
provisioned with a sealed linear head, and then called with float32 rows over its Unix
socket; the same rows go through the same head in this process, alternating call by call
so both see the same machine. Reported: p50/p99 of each and the added p50 (the target is
≤ 100 µs for up to 16 KB of tensors), for a 16 KB request on a small head, and for a head
of about 1M parameters, where the target is ≤ 5% added.

    python bench/confidential_worker.py                 # 2,000 calls per case
    python bench/confidential_worker.py --calls 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from modelfence.confidential.attestation import SimPlatform, SimVerifier
from modelfence.confidential.broker import AuditLog, KeyBroker, ReleasePolicy
from modelfence.confidential.launcher import LaunchedWorker, WorkerClient, launch, provision
from modelfence.confidential.sealing import new_key, seal

CASES = {  # name: (rows, inputs, classes)
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


def in_process(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What a gateway-side head does without the worker: the same arithmetic."""
    logits = rows.astype(np.float64) @ weight + bias
    return logits.argmax(axis=1).astype("<i4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"# {host.machine()}, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d}, {args.calls} calls each")
    print("| case | in-process p50 / p99 µs | worker p50 / p99 µs | added p50 µs | added |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, (n, d, c) in CASES.items():
        weight = rng.standard_normal((d, c)).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        rows = rng.standard_normal((n, d)).astype(np.float32)
        payload = rows.tobytes()
        with tempfile.TemporaryDirectory() as folder:
            client, worker = provisioned(Path(folder), weight, bias)
            local_w, local_b = weight.astype(np.float64), bias.astype(np.float64)
            inside, outside = [], []
            try:
                for _ in range(args.calls):
                    started = time.perf_counter()
                    in_process(rows, local_w, local_b)
                    inside.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    client.call("infer", payload, dtype="float32", shape=[n, d])
                    outside.append(time.perf_counter() - started)
            finally:
                client.close()
                worker.stop()
        a = np.percentile(np.array(inside) * 1e6, [50, 99])
        b = np.percentile(np.array(outside) * 1e6, [50, 99])
        print(f"| {name} ({len(payload):,} B in) | {a[0]:.1f} / {a[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} | "
              f"{b[0] - a[0]:.1f} | {(b[0] - a[0]) / a[0]:.0%} |")


if __name__ == "__main__":
    main()
