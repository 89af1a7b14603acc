"""Start-up time: ``modelfence --help``, and ``modelfence serve`` until it answers, with and
without its detector child.

What a rollout, an autoscaler adding a replica, or an operator typing a CLI command waits
for, started as users start it: the ``modelfence`` console script next to this Python
(``python -m modelfence`` where there is none; the table's title says which). ``serve``
is timed from the process start to the first 200 from ``/healthz``
(polled every 10 ms), on a fresh SQLite state file each time, with detection off and on
(the hashing embedder; the gateway serves once its detector child runs). The cases are
interleaved run by run, so a busy machine weighs on each alike; medians and ranges in
seconds.

With detection on it also prints the detector child's resident memory once ``serve``
answers (what the child imported).

    python bench/startup.py                  # ~1 minute
    python bench/startup.py --runs 20
    python bench/startup.py --module         # python -m modelfence instead of the script
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

import psutil

import modelfence
from modelfence.redteam.benchmarks import Footer
from modelfence.testing.processes import free_port, write_config

POLL_SECONDS = 0.01
TIMEOUT_SECONDS = 120.0
SCRIPT = Path(sys.executable).parent / "modelfence"
MODULE = [sys.executable, "-m", "modelfence"]


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


def time_help(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([*command, "--help"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def child_mib(pid: int) -> float:
    """Resident memory of ``pid``'s detector child (not multiprocessing's resource tracker)."""
    children = [c for c in psutil.Process(pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]
    return sum(c.memory_info().rss for c in children) / 2**20


def time_serve(command: list[str], detection: bool, memory: list[float]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        workdir, port = Path(tmp), free_port()
        path = write_config(workdir / "config.yaml", config(workdir, detection))
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*command, "serve", "--config", str(path), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            while time.perf_counter() - started < TIMEOUT_SECONDS:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            elapsed = time.perf_counter() - started
                            if detection:
                                memory.append(child_mib(proc.pid))
                            return elapsed
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
    parser.add_argument("--module", action="store_true",
                        help="start `python -m modelfence` instead of the console script")
    args = parser.parse_args()
    footer = Footer()
    command = MODULE if args.module or not SCRIPT.exists() else [str(SCRIPT)]
    memory: list[float] = []
    cases: dict[str, Callable[[], float]] = {
        "`modelfence --help`": lambda: time_help(command),
        "`modelfence serve`, detection off": lambda: time_serve(command, False, memory),
        "`modelfence serve`, detection on (detector child)": lambda: time_serve(command, True, memory),
    }
    for run in cases.values():
        run()  # warm the file cache once; not counted
    memory.clear()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, run in cases.items():
            seconds[name].append(run())
    print(f"## Start-up ({args.runs} runs per case, interleaved; `{' '.join(command)}`; "
          f"{Path(modelfence.__file__).parent})\n")
    print("| case | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"\ndetector child's resident memory once serve answers: median "
          f"{statistics.median(memory):.0f} MiB ({min(memory):.0f}–{max(memory):.0f})")
    print(f"\n{footer}")


if __name__ == "__main__":
    main()
