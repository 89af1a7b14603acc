"""The GGUF tokenizer is converted once and then read from the cache, where forensics finds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfence.models.gguf import gguf_tokenizer

pytestmark = pytest.mark.models

TEXT = "The quick brown fox jumps over the lazy dog. 名前、Ⅻ"


def test_the_tokenizer_is_converted_once_and_read_back_alike(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    converted = gguf_tokenizer(tmp_path)
    [kept] = (tmp_path / "tokenizers").iterdir()
    assert (kept / "tokenizer.json").is_file()
    assert not [p for p in kept.parent.iterdir() if p.name.startswith(".tokenizer-")]
    cached = gguf_tokenizer(tmp_path)
    expected = converted.encode(TEXT, add_special_tokens=False)
    assert cached.encode(TEXT, add_special_tokens=False) == expected

    (kept / "tokenizer.json").write_text("{ not json")  # a damaged copy: converted again
    again = gguf_tokenizer(tmp_path)
    assert again.encode(TEXT, add_special_tokens=False) == expected
    assert "ignoring unreadable tokenizer cache" in caplog.text
    assert (kept / "tokenizer.json").read_text().startswith("{")
    assert gguf_tokenizer(tmp_path).encode(TEXT, add_special_tokens=False) == expected
