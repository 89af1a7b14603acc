"""`modelfence demo` end to end: the real stack, the scripted actors, the summary."""

from __future__ import annotations

import re
import subprocess

import pytest

from modelfence.testing.processes import modelfence_command


@pytest.mark.models
@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: object) -> None:
    result = subprocess.run(
        modelfence_command("demo"), capture_output=True, text=True, timeout=900, cwd=str(tmp_path)
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "summary" in out and "limit decisions" in out
    assert "who was flagged" in out and "thief" in out
    assert "newcomer (a new, unverified account): This account is on probation" in out
    assert "hydra (24 accounts signed up in one second): one sign-up surge of 24 accounts" in out
    assert "0 of 24 queries answered" in out and "gets no answers yet" in out
    assert re.search(r"3 answers posted online\W+carol\b", out)  # the leak, traced
    assert "region mark" in out  # the copy that stopped early, named by its rule
    assert "demo finished" in out
