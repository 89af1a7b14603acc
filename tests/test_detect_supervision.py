"""The detector child's supervision (end to end in ``test_faults_detector``), and shadow
mode, which enforces no verdict, not even one stored before it was switched on; only
operator pins."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelfence.config import parse_config
from modelfence.detect.process import DetectorDied, DetectorProcess
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.store import create_tables, open_engine
from modelfence.testing.processes import http_json

from .conftest import GatewayFactory

DETECTION = {"detection": {"embedder": "hashing", "state_poll_seconds": 0.2}}


async def wait_until_ready(detector: DetectorProcess) -> None:
    for _ in range(300):
        try:
            await detector.probe()
            return
        except DetectorDied:
            await asyncio.sleep(0.1)
    await detector.probe()


async def test_the_supervisor_replaces_a_dead_child_and_the_probe_reports_it(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {"store": f"sqlite:///{tmp_path / 'state.db'}", "detection": {"embedder": "hashing"}}
    )
    restarts: list[int] = []
    detector = DetectorProcess(config, on_restart=lambda: restarts.append(1))
    detector.start()
    try:
        await wait_until_ready(detector)
        await detector.supervise()  # alive: nothing to do
        detector.process.kill()
        detector.process.join(10)
        with pytest.raises(DetectorDied):
            await detector.probe()
        with pytest.raises(DetectorDied, match="restarted"):
            await detector.supervise()
        with pytest.raises(DetectorDied, match="starting|not running"):
            await detector.probe()  # spawned, but not yet running its detector
        await wait_until_ready(detector)
        assert restarts == [1] and detector.restarts == 1
        await detector.sink().write([])  # the sink feeds the new child's queue
        assert detector.sink().queue is detector.queue
    finally:
        await asyncio.to_thread(detector.stop)


def thread_priorities(pid: int) -> set[tuple[int, int]]:
    """(nice, scheduling policy) of each thread of ``pid``; threads that end are left out."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            out.add((os.getpriority(os.PRIO_PROCESS, int(tid)), os.sched_getscheduler(int(tid))))
    return out


def own_priority() -> tuple[int, int]:
    nice, policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
    if nice > 9 or policy != os.SCHED_OTHER:
        pytest.skip(f"the tests already run at nice {nice}, policy {policy}: "
                    "a child at a lower priority would look the same")
    return nice, policy


# Lowers its own priority as the detector child does, with a thread already running (as
# numpy's BLAS threads are when the child starts), and prints every thread's priority.
YIELDING = """
import os, sys, threading
from modelfence.detect.process import _yield_cpu
stop = threading.Event()
threading.Thread(target=stop.wait).start()
_yield_cpu(sys.argv[1])
print(sorted((os.getpriority(os.PRIO_PROCESS, int(t)), os.sched_getscheduler(int(t)))
             for t in os.listdir("/proc/self/task")))
stop.set()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/task")
@pytest.mark.parametrize("priority", ["low", "idle"])
def test_threads_started_before_the_priority_is_lowered_are_lowered_too(priority: str) -> None:
    nice, policy = own_priority()
    out = subprocess.run([sys.executable, "-c", YIELDING, priority], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    expected = (nice + 10, policy) if priority == "low" else (nice, os.SCHED_IDLE)
    threads = ast.literal_eval(out)
    assert len(threads) >= 2 and set(threads) == {expected}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/task")
@pytest.mark.parametrize("priority", ["low", "idle", "normal"])
def test_every_thread_of_the_detector_child_yields_the_cpu_as_configured(
    tmp_path: Path, priority: str
) -> None:
    """detection.process_priority, on every thread: numpy's BLAS threads start on import,
    before the child lowers its priority, and Linux sets priorities per thread."""
    own_nice, own_policy = own_priority()
    config = parse_config({"store": f"sqlite:///{tmp_path / 'state.db'}",
                           "detection": {"embedder": "hashing", "process_priority": priority}})
    detector = DetectorProcess(config)
    detector.start()
    try:
        assert detector.wait_ready(60)
        priorities = thread_priorities(detector.process.pid)
    finally:
        detector.stop()
    expected = {"low": (own_nice + 10, own_policy), "idle": (own_nice, os.SCHED_IDLE),
                "normal": (own_nice, own_policy)}
    assert priorities == {expected[priority]}


# A program run as a file (as the ``modelfence`` console script is) that starts a detector
# child; it notes each name it runs under, so a child that runs it again leaves a trace.
PROGRAM = """
import pathlib, sys
pathlib.Path(sys.argv[1], __name__).touch()
if __name__ == "__main__":
    from modelfence.config import parse_config
    from modelfence.detect.process import DetectorProcess
    config = parse_config({"store": f"sqlite:///{sys.argv[1]}/state.db",
                           "detection": {"embedder": "hashing"}})
    detector = DetectorProcess(config)
    detector.start()
    ready = detector.wait_ready(60)
    detector.stop()
    sys.exit(0 if ready else 3)
"""


def test_the_child_does_not_run_the_programs_main_file_again(tmp_path: Path) -> None:
    """``spawn`` would run the parent's main file in the child first: for the console
    script, the whole CLI's imports, which the detector does not need."""
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    subprocess.run([sys.executable, str(program), str(tmp_path)], check=True, timeout=120)
    assert (tmp_path / "__main__").exists()
    assert not (tmp_path / "__mp_main__").exists()


async def test_a_child_that_dies_at_start_up_is_restarted_with_back_off(tmp_path: Path) -> None:
    config = parse_config(
        {"store": f"sqlite:///{tmp_path / 'state.db'}", "detection": {"embedder": "hashing"}}
    )
    detector = DetectorProcess(config)

    def crash() -> None:  # dies before its detector ran (spawning alone takes longer)
        detector.process.kill()
        detector.process.join(10)

    detector.start()
    try:
        crash()
        with pytest.raises(DetectorDied, match="restarted"):
            await detector.supervise()  # the first crash is restarted at once
        crash()
        await detector.supervise()  # within the 1 s back-off: left dead
        assert detector.restarts == 1 and not detector.alive
        await asyncio.sleep(1.1)
        with pytest.raises(DetectorDied, match="restarted"):
            await detector.supervise()
        assert detector.restarts == 2
        crash()
        await asyncio.sleep(1.1)
        await detector.supervise()  # the back-off doubled to 2 s
        assert detector.restarts == 2
    finally:
        await asyncio.to_thread(detector.stop)


async def _store_block(store: str, client: str) -> None:
    engine = open_engine(store)
    try:
        await create_tables(engine)
        await SqlState(engine).publish([ClientRecord(
            client=client, tier="default", entity=None, risk=0.99, level="block",
            quota_share=0.1, reasons=[], queries=500, shadow=False, updated_at=datetime.now(UTC),
        )])
    finally:
        await engine.dispose()


def test_shadow_mode_enforces_no_stored_verdict_but_operator_pins(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    asyncio.run(_store_block(f"sqlite:///{tmp_path / 'state.db'}", "thief"))
    gateway = start_gateway(detection={**DETECTION["detection"], "shadow": True})
    keys = {client: gateway.create_key(client) for client in ("thief", "pinned")}
    status, _ = http_json(
        "POST", gateway.url + "/admin/v1/clients/pinned/action", {"action": "block"},
        token=gateway.admin_token,
    )
    assert status == 200

    def chat(client: str) -> int:
        status, _ = http_json(
            "POST", gateway.url + "/v1/chat/completions",
            {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]},
            token=keys[client],
        )
        return status

    deadline = time.monotonic() + 10
    while chat("pinned") != 403 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chat("pinned") == 403  # the state is read: the pin acts
    assert chat("thief") == 200  # the detector's earlier block does not
