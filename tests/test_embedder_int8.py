"""MiniLM multiplying in int8: built once from the wheel's model, close to float32, and a
damaged or unwritable cache never stops the detector."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from modelfence.config import Config, parse_config
from modelfence.detect.embedding import CachedEmbedder, load_embedder
from modelfence.errors import ConfigError
from modelfence.models.embedder import TextEmbedder, find_model, quantized_model

pytestmark = pytest.mark.models

TEXTS = [
    "How do I reset my password?",
    "What are the steps to change my password?",
    "The recipe needs two cups of flour.",
    "Summarise the quarterly report in three bullet points.",
    "Translate 'good morning' into French.",
    "word " * 300,
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-cache")
    quantized_model(cache_dir=root)
    return root


def test_the_int8_copy_is_built_once_and_named_by_its_source(cache: Path, tmp_path: Path) -> None:
    built = quantized_model(cache_dir=cache)
    assert built.parent == cache / "minilm" and built.stat().st_size > 1_000_000
    written = built.stat().st_mtime_ns
    assert quantized_model(cache_dir=cache) == built and built.stat().st_mtime_ns == written
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging left over
    # Another source file (a new wheel) gets a copy of its own.
    source = tmp_path / "model.onnx"
    shutil.copyfile(find_model(), source)
    os.utime(source, ns=(1, 1))
    assert quantized_model(source, cache_dir=cache).name != built.name


def test_int8_vectors_stay_close_to_float32(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(cache))
    exact = TextEmbedder.load(threads=1).embed(TEXTS)
    fast = TextEmbedder.load(threads=1, quantized=True).embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(exact * fast, axis=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.98, cosine
    assert not np.array_equal(exact, fast)  # it is another computation, not the same model
    assert fast[0] @ fast[1] > fast[0] @ fast[2] + 0.3  # paraphrases still land together


def test_an_unreadable_copy_is_built_again(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(root))
    built = quantized_model()
    size = built.stat().st_size
    with open(built, "r+b") as fh:  # a disk that lost the end of the file
        fh.truncate(size // 3)
    with caplog.at_level(logging.WARNING, logger="modelfence.models.embedder"):
        embedder = TextEmbedder.load(threads=1, quantized=True)
    assert "building the int8 MiniLM again" in caplog.text
    assert built.stat().st_size == size
    assert embedder.embed(TEXTS[:1]).shape == (1, 384)


def test_an_unwritable_cache_builds_in_a_private_tmp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="modelfence.models.embedder"):
        built = quantized_model(cache_dir=blocked)
    assert "cannot keep the int8 MiniLM" in caplog.text
    private = tmp_path / "tmp" / f"modelfence-{os.getuid()}"
    assert built.parent == private / "minilm" and built.is_file()
    assert private.stat().st_mode & 0o777 == 0o700
    assert quantized_model(cache_dir=blocked) == built  # the next start finds it there


def test_a_tmp_directory_others_can_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"modelfence-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # past the umask: anyone could swap the model file
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(PermissionError, match="not a directory private to this user"):
        quantized_model(cache_dir=blocked)


def test_detection_config_names_the_int8_embedder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.model_validate({"detection": {"embedder": "minilm-int8"}})
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(cache))
    embedder = load_embedder(config.detection.embedder)
    assert isinstance(embedder, CachedEmbedder) and isinstance(embedder.inner, TextEmbedder)
    with pytest.raises(ConfigError, match=r"detection\.embedder.*minilm-int8"):
        parse_config({"detection": {"embedder": "int8"}}, environ={})
