"""Sealed model parts: round trips, and every way a sealed file can be altered refuses to open."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.confidential.sealing import (
    MAGIC,
    TAG_BYTES,
    SealError,
    kek_id,
    load_tensors,
    new_key,
    open_sealed,
    read_header,
    seal,
    unwrap_data_key,
)

KEK = new_key()
CHUNK = 4096


def part() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "head.weight": rng.standard_normal((10, 300)).astype(np.float32),  # with the rest: 3 chunks
        "head.bias": rng.standard_normal(10).astype(np.float64),
        "adapter.scale": np.array(3, dtype=np.int8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }


def sealed(tmp_path: Path, **kwargs: object) -> Path:
    out = tmp_path / "part.sealed"
    seal(part(), out, kek=KEK, artifact_id="digits-head", version=2, chunk_bytes=CHUNK, **kwargs)  # type: ignore[arg-type]
    return out


def opened(path: Path, kek: bytes = KEK) -> dict[str, np.ndarray]:
    header = read_header(path)
    return open_sealed(path, unwrap_data_key(header, kek))[1]


def test_a_sealed_part_opens_to_the_same_tensors_and_hides_them(tmp_path: Path) -> None:
    path = sealed(tmp_path)
    original = part()
    tensors = opened(path)
    assert list(tensors) == list(original)
    for name, array in original.items():
        assert tensors[name].dtype == array.dtype and tensors[name].shape == array.shape
        np.testing.assert_array_equal(tensors[name], array)
        assert not tensors[name].flags.writeable
    raw = path.read_bytes()
    assert original["head.weight"].tobytes()[:64] not in raw  # no plaintext on disk
    header = read_header(path)
    assert (header.artifact_id, header.version, header.chunks) == ("digits-head", 2, 3)
    assert header.kek_id == kek_id(KEK) and header.parameters == 3000 + 10 + 1 + 3


def test_every_seal_uses_a_fresh_data_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    seal(part(), a, kek=KEK, artifact_id="p", version=1)
    seal(part(), b, kek=KEK, artifact_id="p", version=1)
    assert unwrap_data_key(read_header(a), KEK) != unwrap_data_key(read_header(b), KEK)


def _flip(offset: int) -> Callable[[bytes, int], bytes]:
    def edit(raw: bytes, body: int) -> bytes:
        at = body + offset if offset >= 0 else len(raw) + offset
        return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]
    return edit


def _header_edit(change: Callable[[dict], None]) -> Callable[[bytes, int], bytes]:
    """Rewrite the header (valid JSON, right length field) with the chunks left as they are."""
    def edit(raw: bytes, body: int) -> bytes:
        (length,) = struct.unpack(">I", raw[len(MAGIC) : body])
        doc = json.loads(raw[body : body + length])
        change(doc)
        new = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack(">I", len(new)) + new + raw[body + length :]
    return edit


def _chunk_at(raw: bytes, body: int, index: int) -> tuple[int, int]:
    (length,) = struct.unpack(">I", raw[len(MAGIC) : body])
    start = body + length + index * (CHUNK + TAG_BYTES)
    return start, start + CHUNK + TAG_BYTES


def _swap_chunks(raw: bytes, body: int) -> bytes:
    a, b = _chunk_at(raw, body, 0), _chunk_at(raw, body, 1)
    return raw[: a[0]] + raw[b[0] : b[1]] + raw[a[0] : a[1]] + raw[b[1] :]


def _drop_last_chunk(raw: bytes, body: int) -> bytes:
    start, _ = _chunk_at(raw, body, 2)
    return raw[:start]


def _set(field: str, value: object) -> Callable[[dict], None]:
    return lambda doc: doc.__setitem__(field, value)


TAMPERING: dict[str, Callable[[bytes, int], bytes]] = {
    "a bit of a chunk": _flip(-100),
    "a chunk's tag": _flip(-1),
    "chunks swapped": _swap_chunks,
    "last chunk dropped": _drop_last_chunk,
    "a chunk appended": lambda raw, body: raw + raw[-(CHUNK + TAG_BYTES) :],
    "version lowered (rollback)": _header_edit(_set("version", 1)),
    "artifact renamed": _header_edit(_set("artifact_id", "other-head")),
    "manifest reordered": _header_edit(lambda doc: doc["tensors"].reverse()),
    "dtype changed": _header_edit(lambda doc: doc["tensors"][1].update(dtype="int64")),
    "wrapped key altered": _header_edit(lambda doc: doc["key"].update(nonce="AAAAAAAAAAAAAAAA")),
    "header made bigger": _header_edit(_set("note", "x" * 100)),
    "magic": lambda raw, body: b"MFSEAL\x00\x02" + raw[8:],
    "header length": lambda raw, body: raw[:8] + struct.pack(">I", 2**31) + raw[12:],
    "truncated inside the header": lambda raw, body: raw[: body + 10],
    "payload size claimed huge": _header_edit(lambda doc: doc.update(payload_bytes=2**50)),
    "payload size beyond any float": _header_edit(lambda doc: doc.update(payload_bytes=2**1100)),
    "a tensor of 2**1100 elements": _header_edit(lambda doc: doc["tensors"][0].update(
        shape=[2**1100], nbytes=2**1102)),
    "a shape of 100,000 dimensions": _header_edit(lambda doc: doc["tensors"][0].update(shape=[1] * 100_000)),
    "empty wrap nonce": _header_edit(lambda doc: doc["key"].update(nonce="")),
    "key not an object": _header_edit(_set("key", [1, 2])),
    "two tensors of one name": _header_edit(lambda doc: doc["tensors"][1].update(name="head.weight")),
    "an escape sequence in a name": _header_edit(lambda doc: doc["tensors"][0].update(name="\x1b[2Jx")),
    "a C1 control in a name": _header_edit(lambda doc: doc["tensors"][0].update(name="\x9bx")),
    "header not canonical (spaces)": lambda raw, body: _respace(raw, body),
    "a number of 5,000 digits": lambda raw, body: _raw_header(raw, body, b'{"version":' + b"9" * 5000 + b"}"),
    "JSON nested 100,000 deep": lambda raw, body: _raw_header(raw, body, b"[" * 100_000 + b"]" * 100_000),
}


def _raw_header(raw: bytes, body: int, new: bytes) -> bytes:
    (length,) = struct.unpack(">I", raw[len(MAGIC) : body])
    return MAGIC + struct.pack(">I", len(new)) + new + raw[body + length :]


def _respace(raw: bytes, body: int) -> bytes:
    (length,) = struct.unpack(">I", raw[len(MAGIC) : body])
    return _raw_header(raw, body, json.dumps(json.loads(raw[body : body + length]), sort_keys=True).encode())


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_an_altered_sealed_file_never_opens(tmp_path: Path, case: str) -> None:
    path = sealed(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(TAMPERING[case](raw, len(MAGIC) + 4))
    started = time.perf_counter()
    with pytest.raises(SealError):
        opened(path)
    assert time.perf_counter() - started < 5.0  # refused, not computed at length
    shown = CliRunner().invoke(app, ["inspect", str(path)])
    assert shown.exit_code in (0, 2), shown.output  # a clean answer or a named error
    assert "\x1b[2J" not in shown.output and "\x9b" not in shown.output


def test_a_chunk_from_another_artifact_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = sealed(tmp_path / "a"), sealed(tmp_path / "b")
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    body = len(MAGIC) + 4
    (start_a, end_a), (start_b, end_b) = _chunk_at(raw_a, body, 0), _chunk_at(raw_b, body, 0)
    a.write_bytes(raw_a[:start_a] + raw_b[start_b:end_b] + raw_a[end_a:])
    with pytest.raises(SealError, match="chunk 0"):
        opened(a)


def test_the_wrong_keys_are_refused(tmp_path: Path) -> None:
    path = sealed(tmp_path)
    with pytest.raises(SealError, match="sealed under key"):
        opened(path, new_key())
    with pytest.raises(SealError, match="chunk 0"):
        open_sealed(path, new_key())
    with pytest.raises(SealError, match="32 bytes"):
        open_sealed(path, b"short")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"artifact_id": "../etc"}, "artifact_id"),
        ({"artifact_id": "x" * 200}, "artifact_id"),
        ({"version": 0}, "version"),
        ({"version": 1.5}, "version"),
        ({"version": True}, "version"),
        ({"chunk_bytes": 10}, "chunk_bytes"),
        ({"tensors": {}}, "no tensors"),
        ({"tensors": {"x": np.array(["text"])}}, "dtype"),
        ({"tensors": {"x": np.array([object()])}}, "dtype"),
        ({"tensors": {"\x00": np.zeros(2)}}, "tensor name"),
        ({"kek": b"short"}, "32 bytes"),
    ],
)
def test_sealing_refuses_bad_input_and_names_it(tmp_path: Path, kwargs: dict, message: str) -> None:
    args: dict = {"tensors": part(), "kek": KEK, "artifact_id": "p", "version": 1, **kwargs}
    tensors = args.pop("tensors")
    with pytest.raises(SealError, match=message):
        seal(tensors, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_tensors_load_from_safetensors_npz_and_npy_but_never_from_pickles(tmp_path: Path) -> None:
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    np.savez(tmp_path / "m.npz", **weights)
    np.save(tmp_path / "w.npy", weights["w"])
    for name in ("m.safetensors", "m.npz", "w.npy"):
        np.testing.assert_array_equal(load_tensors(tmp_path / name)["w"], weights["w"])
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SealError, match="pickle"):
        load_tensors(tmp_path / "o.npy")
    with pytest.raises(SealError, match="expected .safetensors"):
        load_tensors(tmp_path / "m.pt")


def test_the_seal_and_inspect_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    np.savez(tmp_path / "head.npz", weight=np.ones((4, 8), np.float32))
    key, out = tmp_path / "broker.key", tmp_path / "head.sealed"
    args = ["seal", str(tmp_path / "head.npz"), str(out), "--artifact-id", "head", "--key-file", str(key)]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "--new-key" in missing.output
    made = runner.invoke(app, [*args, "--new-key", "--version", "4"])
    assert made.exit_code == 0, made.output
    assert key.stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, [*args, "--new-key"])
    assert again.exit_code == 2 and "never overwrites" in again.output
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0
    doc = json.loads(shown.output)
    assert doc["artifact_id"] == "head" and doc["version"] == 4 and doc["parameters"] == 32
    assert doc["tensors"] == [{"name": "weight", "dtype": "float32", "shape": [4, 8]}]
    assert "wrapped" not in shown.output
    not_sealed = runner.invoke(app, ["inspect", str(tmp_path / "head.npz")])
    assert not_sealed.exit_code == 2 and "bad magic" in not_sealed.output
    key.chmod(0o644)
    loose = runner.invoke(app, args)
    assert loose.exit_code == 2 and "chmod 600" in loose.output
    assert "unseal" not in runner.invoke(app, ["--help"]).output


def test_inspect_shows_a_name_with_markup_as_written(tmp_path: Path) -> None:
    out = tmp_path / "odd.sealed"
    seal({"[/][link=http://x]w[/link]": np.zeros(2, np.float32)}, out, kek=KEK, artifact_id="odd", version=1)
    shown = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "[/][link=http://x]w[/link]" in shown.output


SAMPLE = part()


@settings(max_examples=200, deadline=None, database=None)
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_anywhere_is_refused(tmp_path_factory: pytest.TempPathFactory, position: float,
                                             bit: int) -> None:
    path = tmp_path_factory.mktemp("flip") / "part.sealed"
    seal(SAMPLE, path, kek=KEK, artifact_id="digits-head", version=2, chunk_bytes=CHUNK)
    raw = bytearray(path.read_bytes())
    raw[int(position * len(raw))] ^= 1 << bit
    path.write_bytes(bytes(raw))
    with pytest.raises(SealError):
        opened(path)


def test_the_commands_need_safetensors_only_to_read_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors comes with the demo extra; a core install must still load the CLI.
    blocked = "import sys; sys.modules['safetensors'] = None; sys.modules['safetensors.numpy'] = None; "
    code = blocked + "import modelfence.cli, modelfence.confidential.sealing; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    (tmp_path / "m.safetensors").write_bytes(b"x")
    with pytest.raises(SealError, match="needs the safetensors package"):
        load_tensors(tmp_path / "m.safetensors")
