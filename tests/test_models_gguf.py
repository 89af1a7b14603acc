"""The GGUF tokenizer is converted once and then read from the cache, where forensics finds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelfence.models.gguf import find_gguf, gguf_tokenizer

pytestmark = pytest.mark.models

TEXT = "The quick brown fox jumps over the lazy dog. 名前、Ⅻ"


def test_the_tokenizer_is_converted_once_and_read_back_alike(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    loads: list[str] = []  # what each load read: the GGUF file, or the cached copy
    real = AutoTokenizer.from_pretrained

    def recorded(path: Any, **kwargs: Any) -> Any:
        loads.append("gguf" if "gguf_file" in kwargs else "copy")
        return real(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recorded)
    # A damaged copy where the cache would be: converted again (the one slow step here).
    stat = find_gguf().stat()
    kept = tmp_path / "tokenizers" / f"{find_gguf().stem}-{stat.st_size}-{stat.st_mtime_ns}"
    kept.mkdir(parents=True)
    (kept / "tokenizer.json").write_text("{ not json")
    converted = gguf_tokenizer(tmp_path)
    assert "ignoring unreadable tokenizer cache" in caplog.text
    assert (kept / "tokenizer.json").read_text().startswith("{\n")
    assert not [p for p in kept.parent.iterdir() if p.name.startswith(".tokenizer-")]

    cached = gguf_tokenizer(tmp_path)
    assert loads == ["copy", "gguf", "copy"]  # the damaged copy, the conversion, the copy
    expected = converted.encode(TEXT, add_special_tokens=False)
    assert cached.encode(TEXT, add_special_tokens=False) == expected
