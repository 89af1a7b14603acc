"""The demo models on their own: sampler helpers (no model), MiniLM and digits (real, quick).

SmolLM2 itself is exercised through the app in ``test_demo_upstream.py``, which loads it once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelfence.demo import llm as smollm
from modelfence.demo.classifier import DigitsClassifier, check_pixels
from modelfence.demo.llm import SamplingParams, SmolLM, _find_stop, _safe_end, _write_cache
from modelfence.models.embedder import DIMENSIONS, TextEmbedder

# -- sampler helpers ---------------------------------------------------------------------


def test_sampling_params_clamp_logit_bias_like_openai() -> None:
    params = SamplingParams(logit_bias={5: 250, 7: -1e9, 9: 3})
    assert params.logit_bias == {5: 100.0, 7: -100.0, 9: 3.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 9}, "n must be"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "requires logprobs"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
def test_sampling_params_reject_out_of_range(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_find_stop_returns_the_earliest_stop() -> None:
    assert _find_stop("one two three", ("three", "two")) == 4
    assert _find_stop("one two", ("four",)) is None
    assert _find_stop("anything", ()) is None


@pytest.mark.parametrize(
    ("text", "stops", "released"),
    [
        ("Hello wor", (), "Hello wor"),
        ("Hello\ufffd", (), "Hello"),  # half a UTF-8 character waits for its other half
        ("Hello ST", ("STOP",), "Hello "),  # might grow into the stop string
        ("Hello S", ("STOP", "Sx"), "Hello "),
        ("Hello X", ("STOP",), "Hello X"),
    ],
)
def test_safe_end_holds_back_what_may_change(
    text: str, stops: tuple[str, ...], released: str
) -> None:
    assert text[: _safe_end(text, stops)] == released


def test_byte_decoder_inverts_gpt2_byte_table() -> None:
    decoder = smollm._byte_decoder()
    assert len(decoder) == 256
    assert sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == ord(" ") and decoder["Ċ"] == ord("\n") and decoder["A"] == ord("A")


class _FakeConfig:
    def save_pretrained(self, path: Path) -> None:
        (path / "config.json").write_text("{}")


class _FakeModel:
    config = _FakeConfig()
    generation_config = _FakeConfig()

    def state_dict(self) -> dict[str, object]:
        import torch

        return {"w": torch.zeros(2)}


class _FakeTokenizer:
    def save_pretrained(self, path: Path) -> None:
        (path / "tokenizer.json").write_text("{}")


def test_cache_write_is_atomic_and_the_first_writer_wins(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "abc"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    barrier = threading.Barrier(4)

    def write() -> None:
        barrier.wait()
        _write_cache(target, _FakeModel(), _FakeTokenizer(), gguf)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (target / smollm.CACHE_MARKER).is_file()
    assert (target / "model.safetensors").is_file()
    # The losers' temporary folders are gone: only the finished cache remains.
    assert [p.name for p in target.parent.iterdir()] == ["abc"]


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELFENCE_CACHE_DIR", str(tmp_path))
    assert smollm.default_cache_dir() == tmp_path
    monkeypatch.delenv("MODELFENCE_CACHE_DIR")
    assert smollm.default_cache_dir() == Path.home() / ".cache" / "modelfence"


@pytest.mark.slow
@pytest.mark.models
def test_gguf_conversion_is_cached_with_identical_weights(tmp_path: Path) -> None:
    """The cache holds the de-quantised weights bit for bit. Logits agree closely, not
    exactly: torch's CPU kernels may add up in another order for tensors placed at other
    addresses (one CI run differed by 1.7e-3 on logits of ~15)."""
    cold = SmolLM.load(tmp_path)
    assert cold.loaded_from == "gguf"
    warm = SmolLM.load(tmp_path)
    assert warm.loaded_from == "cache"
    cold_weights, warm_weights = cold._model.state_dict(), warm._model.state_dict()
    assert cold_weights.keys() == warm_weights.keys()
    for name, tensor in cold_weights.items():
        assert tensor.dtype == warm_weights[name].dtype and tensor.equal(warm_weights[name]), name
    prompt = warm.encode_chat([{"role": "user", "content": "Name a colour."}])
    np.testing.assert_allclose(cold.next_token_logits(prompt), warm.next_token_logits(prompt),
                               rtol=0, atol=0.02)


# -- MiniLM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder.load(batch_size=4)


@pytest.mark.models
def test_embedder_vectors_are_unit_and_semantic(embedder: TextEmbedder) -> None:
    texts = [
        "How do I reset my password?",
        "What are the steps to change my password?",
        "The recipe needs two cups of flour.",
    ]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, DIMENSIONS) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


@pytest.mark.models
def test_embedder_batching_keeps_input_order(embedder: TextEmbedder) -> None:
    texts = [f"sentence {i} " + "word " * (i * 7 % 23) for i in range(11)]  # 3 batches of 4
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)


@pytest.mark.models
def test_embedder_passes_hold_at_most_batch_tokens(embedder: TextEmbedder) -> None:
    # Few padded tokens per forward pass keep the activations in cache; the vectors are
    # those of one text at a time, whatever the grouping.
    texts = [f"sentence {i} " + "word " * (i * 7 % 23) for i in range(11)] + ["word " * 1000]
    capped = TextEmbedder.load(batch_tokens=40)
    shapes: list[tuple[int, int]] = []
    session = capped._session

    class Recording:
        def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
            shapes.append(feed["input_ids"].shape)
            return session.run(names, feed)

    capped._session = Recording()
    batch = capped.embed_with_usage(texts)
    assert all(rows == 1 or rows * length <= 40 for rows, length in shapes)
    assert sum(rows for rows, _ in shapes) == len(texts) and (1, 256) in shapes
    assert len(shapes) < len(texts)  # short texts still share a pass
    np.testing.assert_allclose(batch.vectors, embedder.embed(texts), atol=1e-4)
    assert batch.token_counts == embedder.embed_with_usage(texts).token_counts
    assert capped.embed([]).shape == (0, DIMENSIONS)


@pytest.mark.models
def test_embedder_counts_tokens_and_truncates_at_256(embedder: TextEmbedder) -> None:
    batch = embedder.embed_with_usage(["hello world", "word " * 1000])
    assert batch.token_counts == (4, 256)  # [CLS] hello world [SEP]; the long one is cut
    assert embedder.count_tokens(["hello world"]) == [4]
    with pytest.raises(TypeError):
        embedder.embed("not a list")


# -- digits --------------------------------------------------------------------------------


@pytest.mark.models
def test_digits_classifier_is_accurate_and_quick() -> None:
    started = time.perf_counter()
    clf = DigitsClassifier.train(seed=0)
    assert time.perf_counter() - started < 10  # about 0.3 s alone; generous on a busy CI box
    assert clf.test_accuracy > 0.95
    x, y = DigitsClassifier.dataset()
    proba = clf.predict_proba(x[:50])
    assert proba.shape == (50, 10) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    labels = clf.predict(x[:50])
    assert labels.dtype == np.int64
    assert (labels == proba.argmax(axis=1)).all()
    assert (labels == y[:50]).mean() > 0.9
    again = DigitsClassifier.train(seed=0)
    np.testing.assert_array_equal(again.predict_proba(x[:5]), clf.predict_proba(x[:5]))


def test_check_pixels_rejects_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="shape"):
        check_pixels(np.zeros((2, 63)))
    with pytest.raises(ValueError, match="NaN"):
        check_pixels(np.full((1, 64), np.nan))
    assert check_pixels(np.zeros((1, 64), dtype=np.float64)).dtype == np.float32
