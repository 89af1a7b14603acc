"""Layering, read from the source (lazy imports included): production code never reaches
into the demo or the red team, and detection and the gateway meet only in ``app.py``
(the gateway may use the leaf ``detect.actions``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import modelfence

PACKAGE = Path(modelfence.__file__).parent
OFF_LIMITS = ("modelfence.demo", "modelfence.redteam")
# The CLI's demo, red-team and calibration commands import them lazily, inside the command.
MAY_REACH_OFF_LIMITS = {"cli.py"}


def imports_of(root: Path, folder: str = "") -> dict[str, set[str]]:
    """Per file under ``root/folder``: the ``modelfence.*`` modules it imports or names."""
    out: dict[str, set[str]] = {}
    for path in sorted((root / folder).rglob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)  # importlib.import_module("..."), resources.files("...")
        out[path.relative_to(root).as_posix()] = {m for m in found if m.startswith("modelfence.")}
    return out


def off_limits_imports(root: Path) -> dict[str, list[str]]:
    crossing = {}
    for path, modules in imports_of(root).items():
        if path.startswith(("demo/", "redteam/")) or path in MAY_REACH_OFF_LIMITS:
            continue
        bad = sorted(m for m in modules if m.startswith(OFF_LIMITS))
        if bad:
            crossing[path] = bad
    return crossing


def test_no_production_module_reaches_into_the_demo_or_the_red_team() -> None:
    assert off_limits_imports(PACKAGE) == {}


def test_detection_imports_neither_the_gateway_nor_the_admin_api() -> None:
    crossing = {
        path: sorted(m for m in modules if m.startswith(("modelfence.gateway", "modelfence.admin")))
        for path, modules in imports_of(PACKAGE, "detect").items()
    }
    assert {p: m for p, m in crossing.items() if m} == {}


def test_the_gateway_takes_nothing_from_detection_but_its_action_vocabulary() -> None:
    crossing = {
        path: sorted(
            m for m in modules
            if m.startswith("modelfence.detect") and not m.startswith("modelfence.detect.actions")
        )
        for path, modules in imports_of(PACKAGE, "gateway").items()
    }
    assert {p: m for p, m in crossing.items() if m} == {}


def test_serve_the_cli_and_the_detector_start_without_scipy() -> None:
    """Importing ``scipy.stats`` takes most of a second and ``scipy.special`` or
    ``scipy.linalg`` a third of one: the gateway, every CLI command and the detector child
    would each pay it on start for a Poisson tail and one statistic. Verification and
    profile fitting import SciPy when they run."""
    code = (
        "import sys, modelfence.cli, modelfence.app, modelfence.detect.process\n"
        "from modelfence.detect.process import build_engine\n"
        "import modelfence.detect.engine, modelfence.detect.service\n"
        "print(sorted(m for m in sys.modules if m.startswith(('scipy', 'sklearn'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
