"""``modelfence redteam`` from the command line, against a running gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfence.cli import app

from .conftest import ADMIN_TOKEN, GatewayFactory


def test_redteam_drives_a_running_gateway_with_the_admin_token_from_the_environment(
    tmp_path: Path, start_gateway: GatewayFactory
) -> None:
    gateway = start_gateway()
    result = CliRunner().invoke(
        app, ["redteam", "--suite", "ci", "--scenario", "replay-scale", "--gateway", gateway.url,
              "--output", str(tmp_path)],
        env={"MODELFENCE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert "replay-scale: done" in result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["gateway"] == gateway.url
    assert results["scenarios"][0]["details"]["clients"] > 1000
    assert (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "huge"], "unknown suite"),
        (["--scenario", "nope"], "unknown scenario"),
        (["--gateway", "http://127.0.0.1:9"], "admin token"),
        (["--scenario", "adaptive", "--defended"], "run them without --gateway and --defended"),
        (["--scenario", "benign,hydra", "--gateway", "http://127.0.0.1:9"], "hydra model the example"),
    ],
)
def test_redteam_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["redteam", *args], env={"MODELFENCE_ADMIN_TOKEN": ""})
    assert result.exit_code == 2
    assert message in result.output
