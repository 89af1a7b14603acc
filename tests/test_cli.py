"""The command line: ``--config`` before or after any subcommand, or from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from modelfence.cli import app

runner = CliRunner()


def _leaf_commands(group: typer.core.TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found.append(path)
        if isinstance(command, typer.core.TyperGroup):
            found.extend(_leaf_commands(command, path))
    return found


def test_every_subcommand_lists_the_config_option() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)
    commands = _leaf_commands(root)
    assert ("keys", "create") in commands and ("serve",) in commands
    for path in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "--config" in result.output, path


@pytest.mark.parametrize(
    "args",
    [
        ["serve"],
        ["keys", "create", "--client", "acme"],
        ["keys", "list"],
        ["keys", "revoke", "key_0"],
        ["keys", "mark-secret"],
        ["detect"],
        ["calibrate"],
        ["verify", "text", "-"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_config_after_the_subcommand_is_read(args: list[str], flag: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = runner.invoke(app, [*args, flag, str(missing)])
    # The named file was used (and is missing), rather than "No such option: --config".
    assert result.exit_code == 2, result.output
    output = "".join(result.output.split())  # the console wraps long lines anywhere
    assert "cannotreadconfigfile" in output and "missing.yaml" in output


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mf.yaml"
    path.write_text(yaml.safe_dump({
        "store": f"sqlite:///{tmp_path / 'state.db'}",
        "secret": "cli-test-secret-0123456789abcdef",
    }))
    return path


def test_keys_created_and_listed_through_the_config_in_every_position(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = runner.invoke(app, ["keys", "create", "--client", "acme", "--config", str(config_file)])
    assert created.exit_code == 0, created.output
    assert created.output.strip().splitlines()[-1].startswith("mf_")
    before = runner.invoke(app, ["--config", str(config_file), "keys", "list"])
    middle = runner.invoke(app, ["keys", "-c", str(config_file), "list"])
    monkeypatch.setenv("MODELFENCE_CONFIG", str(config_file))
    from_env = runner.invoke(app, ["keys", "list"])
    for result in (before, middle, from_env):
        assert result.exit_code == 0, result.output
        assert "acme" in result.output


def test_config_check_takes_the_option_or_the_argument(config_file: Path) -> None:
    for args in (["config", "check", "--config", str(config_file)], ["config", "check", str(config_file)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ok:")


def test_the_option_after_the_subcommand_wins(config_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-c", str(tmp_path / "missing.yaml"), "keys", "list", "-c", str(config_file)])
    assert result.exit_code == 0, result.output


def test_measure_worker_prints_what_the_launcher_measures() -> None:
    from modelfence.confidential.launcher import measurement

    result = runner.invoke(app, ["measure-worker", '{"output": "labels"}'])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == measurement(b'{"output": "labels"}')
    bad = runner.invoke(app, ["measure-worker", '{"output": "weights"}'])
    assert bad.exit_code == 2 and "WORKER_CONFIG" in bad.output
