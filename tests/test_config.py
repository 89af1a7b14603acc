"""Configuration errors name the key, the bad value and what is allowed; secrets stay hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfence.config import load_config, parse_config
from modelfence.errors import ConfigError

BAD = sorted(Path(__file__).parent.joinpath("configs", "bad").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_each_bad_config_fails_with_its_message(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert _expected(path) in str(info.value)
    assert str(path) in str(info.value)


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"admin_token": "tooshort-secret"}, environ={})
    assert "tooshort-secret" not in str(info.value)
    assert "admin_token" in str(info.value)


def test_embedded_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.store == "sqlite:///modelfence.db"
    assert config.limits.backend == "memory"
    assert config.upstreams[0].url == "http://127.0.0.1:9000"


def test_environment_overrides_secrets_and_urls() -> None:
    config = parse_config(
        {"admin_token": "from-file-0123456789"},
        environ={
            "MODELFENCE_ADMIN_TOKEN": "from-env-0123456789",
            "MODELFENCE_LIMITS_BACKEND": "redis://127.0.0.1:6379/1",
            "MODELFENCE_STORE": "postgresql://postgres@127.0.0.1/test",
        },
    )
    assert config.admin_token == "from-env-0123456789"
    assert config.limits.backend == "redis://127.0.0.1:6379/1"
    assert config.store.startswith("postgresql://")
    assert "from-env" not in repr(config)


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text("server: {port: 9999}\n", encoding="utf-8")
    assert load_config(None, environ={"MODELFENCE_CONFIG": str(path)}).server.port == 9999


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[1] / "modelfence.example.yaml"
    config = load_config(example, environ={})
    assert "default" in config.limits.tiers
