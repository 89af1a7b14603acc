"""Run a suite end to end: against a given gateway, or against a stack of our own."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from modelfence.redteam.context import Context, ScenarioResult
from modelfence.redteam.defences import defended_overrides
from modelfence.redteam.report import write_report
from modelfence.redteam.runner import LiveGateway
from modelfence.redteam.scenarios import OPT_IN, REPLAY_ONLY, SCENARIOS, run_suite
from modelfence.redteam.stack import DEFAULT_PRICES, own_stack
from modelfence.redteam.suites import SUITES


def scenario_names(suite: str, scenario: str | None = None) -> list[str]:
    """The scenarios to run: the comma-separated names in ``scenario``, or every scenario
    but the week-long replays (``OPT_IN``), which run only when named."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    if scenario is None:
        return [name for name in SCENARIOS if name not in OPT_IN]
    names = [name.strip() for name in scenario.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise ValueError(f"unknown scenario {', '.join(unknown) or repr(scenario)}; known: {', '.join(SCENARIOS)}")
    return names


async def _drive(url: str, token: str, suite: str, names: Sequence[str], seed: int,
                 on_done: Callable[[ScenarioResult], None] | None) -> list[ScenarioResult]:
    async with LiveGateway(url, token) as gateway:
        ctx = Context(gateway, SUITES[suite], seed, DEFAULT_PRICES)
        return await run_suite(ctx, names, on_done)


async def _replay_only(suite: str, names: Sequence[str], seed: int,
                       on_done: Callable[[ScenarioResult], None] | None) -> list[ScenarioResult]:
    return await run_suite(Context(None, SUITES[suite], seed, DEFAULT_PRICES), names, on_done)


def source_commit() -> str:
    """The commit of the source tree the harness runs from ("unknown" outside a checkout):
    every result records it, so a number can be traced to the code that printed it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


def run_redteam(
    suite: str = "ci", *, scenario: str | None = None, gateway_url: str | None = None,
    admin_token: str | None = None, output: Path = Path("redteam-results"), seed: int = 0,
    upstream_url: str | None = None, on_done: Callable[[ScenarioResult], None] | None = None,
    defended: bool = False,
) -> Path:
    """Run ``suite`` (or the comma-separated ``scenario`` names) and write the report;
    returns the report's path.

    With ``gateway_url`` the harness drives that gateway (``admin_token`` creates the keys);
    otherwise it starts the demo upstream (or uses ``upstream_url``) behind its own gateway:
    the limits-only baseline, or with ``defended`` every defence on (``defences.py``).
    """
    names = scenario_names(suite, scenario)
    modelled = OPT_IN.intersection(names)
    if modelled and (gateway_url is not None or defended):
        raise ValueError(f"{', '.join(sorted(modelled))} model the example configuration's gateway "
                         "(undefended and defended side by side); run them without --gateway and --defended")
    started = time.perf_counter()
    if gateway_url is None and set(names) <= REPLAY_ONLY and not defended:
        gateway_url = "none (replay only: the scenarios model the gateway's limits and detection)"
        results = asyncio.run(_replay_only(suite, names, seed, on_done))
    elif gateway_url is not None:
        if defended:
            raise ValueError("--defended configures the harness's own stack; a given gateway runs its own config")
        if not admin_token:
            raise ValueError("an admin token is needed to create the clients' keys")
        results = asyncio.run(_drive(gateway_url, admin_token, suite, names, seed, on_done))
    else:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modelfence-redteam-")))
            overrides = (defended_overrides(tmp, seed=seed, clients=SUITES[suite].calibration_clients)
                         if defended else None)
            gw = stack.enter_context(own_stack(tmp, upstream_url, overrides))
            gateway_url = ("own stack (demo upstream + defended gateway: detection, request policy, hardening)"
                           if defended else "own stack (demo upstream + limits-only gateway)")
            results = asyncio.run(_drive(gw.url, gw.admin_token, suite, names, seed, on_done))
    meta = {"suite": suite, "seed": seed, "commit": source_commit(), "gateway": gateway_url,
            "seconds": round(time.perf_counter() - started, 1), "scenarios": names}
    return write_report(results, meta, output)
