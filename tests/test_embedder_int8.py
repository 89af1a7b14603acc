"""MiniLM multiplying in int8: built once from the wheel's model, close to float32; a damaged
copy is built again and a cache that cannot be written moves to a private /tmp directory."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelfence.config import Config, parse_config
from modelfence.detect.embedding import CachedEmbedder, load_embedder
from modelfence.errors import ConfigError
from modelfence.models.embedder import (
    LOCK_NAME,
    STAGING_PREFIX,
    TextEmbedder,
    _prune,
    find_model,
    quantized_model,
)

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
    kept = sorted(p.name for p in built.parent.iterdir())
    # No staging left over; the empty lock file stays.
    assert kept == [LOCK_NAME, built.name, built.with_suffix(".sha256").name]
    # The same model reinstalled (another file time) is the same copy; another model is not.
    source = tmp_path / "model.onnx"
    shutil.copyfile(find_model(), source)
    os.utime(source, ns=(1, 1))
    assert quantized_model(source, cache_dir=cache) == built
    model = onnx.load(source)
    onnx.helper.set_model_props(model, {"release": "next"})  # another file, the same weights
    onnx.save(model, source)
    other = quantized_model(source, cache_dir=cache)
    assert other != built and built.exists()  # another wheel on this cache keeps its copy
    other.unlink()
    other.with_suffix(".sha256").unlink()


def test_a_build_removes_copies_unused_for_a_month_and_dead_staging(tmp_path: Path) -> None:
    now = time.time()

    def made(name: str, days: float) -> Path:
        path = tmp_path / name
        if name.startswith(STAGING_PREFIX):
            path.mkdir()
        else:
            path.write_text("x")
        os.utime(path, (now - days * 86400, now - days * 86400))
        return path

    current = [made("minilm-l6-v2-dynamic-int8-aaaa.onnx", 90), made("minilm-l6-v2-dynamic-int8-aaaa.sha256", 90)]
    unused = [made("minilm-l6-v2-dynamic-int8-bbbb.onnx", 40), made("minilm-l6-v2-dynamic-int8-bbbb.sha256", 31)]
    # Built long ago, loaded yesterday (a load touches the checksum file): kept.
    in_use = [made("minilm-l6-v2-dynamic-int8-cccc.onnx", 90), made("minilm-l6-v2-dynamic-int8-cccc.sha256", 1)]
    dead, building = made(f"{STAGING_PREFIX}dead", 2 / 24), made(f"{STAGING_PREFIX}live", 0.1 / 24)
    _prune(tmp_path, keep="minilm-l6-v2-dynamic-int8-aaaa")
    assert all(p.exists() for p in (*current, *in_use, building))
    assert not any(p.exists() for p in (*unused, dead))


def test_int8_vectors_stay_close_to_float32(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(cache))
    exact = TextEmbedder.load(threads=1).embed(TEXTS)
    fast = TextEmbedder.load(threads=1, quantized=True).embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(exact * fast, axis=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.98, cosine
    assert not np.array_equal(exact, fast)  # it is another computation, not the same model
    assert fast[0] @ fast[1] > fast[0] @ fast[2] + 0.3  # paraphrases still land together


@pytest.mark.parametrize("damage", ["cut short", "emptied", "one byte flipped", "checksum not text"])
def test_a_damaged_copy_is_built_again(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(root))
    built = quantized_model()
    whole = built.read_bytes()
    if damage == "cut short":
        built.write_bytes(whole[: len(whole) // 3])
    elif damage == "checksum not text":
        built.with_suffix(".sha256").write_bytes(b"\xff\xfe")
    elif damage == "emptied":
        built.write_bytes(b"")
    else:  # still a model onnxruntime loads, with one weight wrong
        middle = len(whole) // 2
        built.write_bytes(whole[:middle] + bytes([whole[middle] ^ 0xFF]) + whole[middle + 1 :])
    embedder = TextEmbedder.load(threads=1, quantized=True)
    assert built.read_bytes() == whole
    assert quantized_model() == built  # and its checksum file says so again
    assert embedder.embed(TEXTS[:1]).shape == (1, 384)


def test_a_cache_that_cannot_be_made_moves_to_a_private_tmp(
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


def test_a_cache_directory_that_refuses_new_files_moves_to_the_private_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory that exists but takes no new file (a read-only volume): made immutable,
    # so the kernel refuses the build's lock file whoever asks, root included.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    frozen = tmp_path / "read-only" / "minilm"
    frozen.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE on ext4/xfs)")
    try:
        with pytest.raises(PermissionError):
            tempfile.mkdtemp(dir=frozen)  # the fault is real
        built = quantized_model(cache_dir=frozen.parent)
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)
    assert built.parent == tmp_path / "tmp" / f"modelfence-{os.getuid()}" / "minilm"
    assert not any(frozen.iterdir())


def test_a_failure_that_is_not_the_caches_is_raised_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        quantized_model(tmp_path / "no-such-model.onnx", cache_dir=tmp_path / "cache")
    assert not (tmp_path / f"modelfence-{os.getuid()}").exists()  # no /tmp fallback for it


@pytest.mark.parametrize("planted", ["symlink", "others can write"])
def test_a_tmp_directory_not_private_to_the_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    place = tmp_path / f"modelfence-{os.getuid()}"
    if planted == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        place.symlink_to(tmp_path / "elsewhere")
    else:
        place.mkdir()
        place.chmod(0o777)  # anyone could have swapped the model file
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(PermissionError, match="not a directory private to this user"):
        quantized_model(cache_dir=blocked)


def test_workers_starting_together_build_the_copy_once(tmp_path: Path) -> None:
    # Real processes on one empty cache, as detector workers on one host just started.
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
        "from pathlib import Path; from modelfence.models.embedder import quantized_model; "
        f"print(quantized_model(cache_dir=Path({str(tmp_path)!r})))"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    assert sum("built the int8 MiniLM" in out for out in outputs) == 1, outputs
    assert len({out.strip().splitlines()[-1] for out in outputs}) == 1  # one copy for all
    assert not [p for p in (tmp_path / "minilm").iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_a_tmp_that_lets_others_swap_directories_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable without the sticky bit /tmp has
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(PermissionError, match="no sticky bit"):
        quantized_model(cache_dir=blocked)
    assert not any(shared.iterdir())  # nothing was made there
    os.chown(shared, 4321, 4321)
    shared.chmod(0o1777)  # sticky, but its owner (another user) could still swap ours
    with pytest.raises(PermissionError, match="another user's"):
        quantized_model(cache_dir=blocked)
    os.chown(shared, os.getuid(), os.getgid())
    shared.chmod(0o1777)  # as /tmp: the private directory is used
    private = shared / f"modelfence-{os.getuid()}"
    assert quantized_model(cache_dir=blocked).parent == private / "minilm"


def test_a_file_system_without_locks_still_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # what NFS without lockd says

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="modelfence.models.embedder"):
        built = quantized_model(cache_dir=tmp_path)
    assert built.parent == tmp_path / "minilm" and built.is_file()
    assert "building without the lock" in caplog.text


def test_detection_config_names_the_int8_embedder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.model_validate({"detection": {"embedder": "minilm-int8"}})
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(cache))
    embedder = load_embedder(config.detection.embedder)
    assert isinstance(embedder, CachedEmbedder)
    int8 = TextEmbedder.load(threads=1, quantized=True).embed(TEXTS)
    np.testing.assert_array_equal(embedder.embed(TEXTS), int8)
    assert not np.array_equal(load_embedder("minilm").embed(TEXTS), int8)
    with pytest.raises(ConfigError, match=r"detection\.embedder.*minilm-int8"):
        parse_config({"detection": {"embedder": "int8"}}, environ={})
    with pytest.raises(ValueError, match="unknown embedder 'int8'"):
        load_embedder("int8")  # type: ignore[arg-type]
