"""The server secret (where it comes from, how it is shown) and the API key format."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from modelfence.errors import ConfigError
from modelfence.identity import ServerSecret, load_server_secret, new_api_key
from modelfence.identity.keys import KEY_LENGTH, looks_like_api_key, new_key_id


def test_the_configured_secret_wins_and_is_never_shown(tmp_path: Path) -> None:
    secret = load_server_secret("configured-secret-0123456789", tmp_path / "unused.secret")
    assert repr(secret) == str(secret) == "ServerSecret(***)"
    assert not (tmp_path / "unused.secret").exists()
    same = ServerSecret(b"configured-secret-0123456789")
    assert secret.hash_api_key("mf_x") == same.hash_api_key("mf_x")


def test_without_a_secret_one_is_generated_into_a_private_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "modelfence.secret"
    with caplog.at_level(logging.WARNING):
        first = load_server_secret(None, path)
    assert "generated" in caplog.text and str(path) in caplog.text
    content = path.read_text().strip()
    assert len(content) == 64 and int(content, 16) >= 0  # 32 random bytes, hex
    assert content not in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    caplog.clear()
    again = load_server_secret(None, path)  # a restart, or another replica sharing the file
    assert again.hash_api_key("mf_x") == first.hash_api_key("mf_x")
    assert caplog.text == ""
    # The file's content and MODELFENCE_SECRET are interchangeable.
    assert load_server_secret(content, path).hash_api_key("mf_x") == first.hash_api_key("mf_x")


@pytest.mark.parametrize("content", ["", "short\n"])
def test_a_secret_file_that_is_too_short_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "modelfence.secret"
    path.write_text(content)
    with pytest.raises(ConfigError, match="at least 16"):
        load_server_secret(None, path)


def test_an_unusable_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret_file: cannot"):
        load_server_secret(None, tmp_path)  # a directory
    with pytest.raises(ConfigError, match="secret_file: cannot create"):
        load_server_secret(None, tmp_path / "missing-dir" / "modelfence.secret")


def test_derived_keys_are_independent_and_stable() -> None:
    material = b"0123456789abcdef0123456789abcdef"
    secret = ServerSecret(material)
    assert secret.derive("watermark") == ServerSecret(material).derive("watermark")
    assert secret.derive("watermark") != secret.derive("api-key-hash")
    assert len(secret.derive("watermark", 16)) == 16
    with pytest.raises(ConfigError, match="at least 16"):
        ServerSecret(b"too short")


def test_api_key_format() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(looks_like_api_key(key) and len(key) == KEY_LENGTH for key in keys)
    assert not looks_like_api_key("sk-" + "a" * 43)
    assert not looks_like_api_key(new_api_key() + "x")
    key_id = new_key_id()
    assert key_id.startswith("key_") and int(key_id[4:], 16) >= 0 and len(key_id) == 16
