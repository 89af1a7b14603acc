"""Start-up time: ``modelfence --help``, and ``modelfence serve`` until it answers, with and
without its detector child.

What a rollout, an autoscaler adding a replica, or an operator typing a CLI command waits
for. ``serve`` is timed from the process start to the first 200 from ``/healthz``
(polled every 10 ms), on a fresh SQLite state file each time, with detection off and on
(the hashing embedder; the gateway serves once its detector child runs). The cases are
interleaved run by run, so a busy machine weighs on each alike; medians and ranges in
seconds.

    python bench/startup.py                  # ~1 minute
    python bench/startup.py --runs 20
    PYTHONPATH=/other/checkout/src python bench/startup.py   # another version, same machine
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import modelfence
from modelfence.redteam.benchmarks import Footer
from modelfence.testing.processes import free_port, write_config

POLL_SECONDS = 0.01
TIMEOUT_SECONDS = 120.0


def config(workdir: Path, detection: bool) -> dict[str, object]:
    """The least ``serve`` starts with: one upstream (never called), SQLite, in-process limits."""
    return {
        "upstreams": [{"name": "up", "url": "http://127.0.0.1:9", "kind": "openai",
                       "models": ["m"]}],
        "store": f"sqlite:///{workdir / 'state.db'}",
        "secret": "startup-bench-secret-0123456789ab",
        "admin_token": "startup-bench-admin-token-0123",
        "detection": {"enabled": detection, "embedder": "hashing"},
    }


def time_help() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modelfence", "--help"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_serve(detection: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        workdir, port = Path(tmp), free_port()
        path = write_config(workdir / "config.yaml", config(workdir, detection))
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfence", "serve", "--config", str(path), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            while time.perf_counter() - started < TIMEOUT_SECONDS:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            return time.perf_counter() - started
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(POLL_SECONDS)
            raise RuntimeError(f"serve did not answer within {TIMEOUT_SECONDS:.0f} s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="starts per case")
    args = parser.parse_args()
    footer = Footer()
    cases: dict[str, Callable[[], float]] = {
        "`modelfence --help`": time_help,
        "`modelfence serve`, detection off": lambda: time_serve(False),
        "`modelfence serve`, detection on (detector child)": lambda: time_serve(True),
    }
    for run in cases.values():
        run()  # warm the file cache once; not counted
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, run in cases.items():
            seconds[name].append(run())
    print(f"## Start-up ({args.runs} runs per case, interleaved; {Path(modelfence.__file__).parent})\n")
    print("| case | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"\n{footer}")


if __name__ == "__main__":
    main()
