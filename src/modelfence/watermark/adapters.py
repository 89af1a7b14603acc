"""Apply the keyed marks to API payloads: OIP v2 classifier answers and OpenAI embeddings.

Pure functions of (request body, answer payload, client mark): the gateway stage calls
them, and tests and benchmarks call them directly. Anything they do not recognise is
returned untouched; a watermark must never break an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from modelfence.watermark.embeddings import EmbeddingMark
from modelfence.watermark.labels import RowMark
from modelfence.watermark.probs import argmax, swap_to_label

# Called for every marked row: (input row [features], its mark, watermark label, classes).
OnMarked = Callable[[npt.NDArray[np.float64], RowMark, int, int], None]


def oip_rows(body: dict[str, Any]) -> npt.NDArray[np.float64] | None:
    """The ``[N, features]`` input of a v2 inference request, or None if it is not one tensor.
    Inputs of more dimensions (images ``[N, 1, 8, 8]``) are flattened per row, so that
    a model's marks do not depend on the shape a client chose to send."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        return None
    shape, data = inputs[0].get("shape"), inputs[0].get("data")
    try:
        rows = np.asarray(data, dtype=np.float64).reshape(shape)
    except (TypeError, ValueError):
        return None
    if rows.ndim > 2 and len(rows) > 0:
        return rows.reshape(len(rows), -1)
    return rows if rows.ndim == 2 else None


def _is_probabilities(tensor: dict[str, Any], n: int) -> bool:
    shape = tensor.get("shape")
    return (
        str(tensor.get("datatype", "")).startswith("FP") and isinstance(shape, list)
        and len(shape) == 2 and shape[0] == n and isinstance(tensor.get("data"), list)
    )


def _is_labels(tensor: dict[str, Any], n: int) -> bool:
    shape = tensor.get("shape")
    return (
        str(tensor.get("datatype", "")).startswith(("INT", "UINT")) and isinstance(shape, list)
        and bool(shape) and shape[0] == n and isinstance(tensor.get("data"), list)
        and len(tensor["data"]) == n
    )


def class_count(payload: Any, n: int) -> int | None:
    """The class count an OIP answer for ``n`` rows shows (its probability width), if any."""
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    for tensor in outputs if isinstance(outputs, list) else []:
        if isinstance(tensor, dict) and _is_probabilities(tensor, n):
            return int(tensor["shape"][1])
    return None


def mark_oip(
    payload: Any, rows: npt.NDArray[np.float64], marks: Sequence[RowMark], *,
    classes: int | None, on_marked: OnMarked, on_unmarked: Callable[[], None] = lambda: None,
) -> Any:
    """Give each marked row its watermark label in every output tensor, consistently.

    The true label is the argmax of the row's probabilities (or the returned label when
    there are none, with ``classes`` giving the class count); probabilities are permuted
    (see :mod:`.probs`), label tensors overwritten. A marked row of a labels-only answer
    with no known class count cannot be marked: ``on_unmarked`` counts it.
    """
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list):
        return payload
    n = len(rows)
    probs = [t for t in outputs if isinstance(t, dict) and _is_probabilities(t, n)]
    labels = [t for t in outputs if isinstance(t, dict) and _is_labels(t, n)]
    for i in range(n):
        mark = marks[i]
        if not mark.marked:
            continue
        if probs:
            width = probs[0]["shape"][1]
            true, n_classes = argmax(probs[0]["data"][i * width : (i + 1) * width]), width
        elif labels and classes is not None:
            true, n_classes = int(labels[0]["data"][i]), classes
        else:
            if labels:
                on_unmarked()
            continue
        wm = mark.label(true, n_classes)
        for tensor in probs:
            w = tensor["shape"][1]
            tensor["data"][i * w : (i + 1) * w] = swap_to_label(tensor["data"][i * w : (i + 1) * w], wm)
        for tensor in labels:
            tensor["data"][i] = wm
        on_marked(rows[i], mark, wm, n_classes)
    return payload


def embedding_texts(body: dict[str, Any]) -> list[str] | None:
    """The texts of an embeddings request (None for token-id inputs, which carry no words)."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        return texts
    return None


def _item_index(item: Any, texts: list[str]) -> int | None:
    """Which request text an answer item's vector belongs to (None: leave the item alone)."""
    index = item.get("index") if isinstance(item, dict) else None
    if not isinstance(index, int) or not 0 <= index < len(texts):
        return None
    return index


def mark_embeddings(
    payload: Any, texts: list[str], marks: Callable[[int], EmbeddingMark],
    triggered: Sequence[bool] | None = None,
) -> Any:
    """Pull the vectors of texts with trigger words towards the client's targets.

    ``marks(dim)`` gives the client's mark for vectors of that size; base64 vectors and
    texts without triggers are left exactly as they are. ``triggered`` says which texts
    hold a trigger where the caller has found out already.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return payload
    for item in data:
        index = _item_index(item, texts)
        vector = item.get("embedding") if index is not None else None
        if not isinstance(vector, list) or len(vector) < MIN_DIMENSIONS:
            continue
        assert index is not None
        text = texts[index]
        mark = marks(len(vector))
        hit = triggered[index] if triggered is not None else mark.has_trigger(text)
        numbers = _numbers(vector) if hit else None
        if numbers is not None:
            item["embedding"] = mark.apply(numbers, text)
    return payload


MIN_DIMENSIONS = 2  # a shorter vector has no direction to pull: it is left as it is


def _numbers(vector: list[Any]) -> npt.NDArray[np.float64] | None:
    """``vector`` as numbers, or None when numpy reads it as anything else (strings, booleans
    alone, nulls, nested lists): such an answer is not marked."""
    try:
        array = np.array(vector)
    except ValueError:  # ragged: [0.1, [0.2]]
        return None
    if array.ndim != 1 or array.dtype.kind not in "fiu":
        return None
    return array.astype(np.float64, copy=False)


def _innermost_arrays(body: bytes, most: int) -> list[tuple[int, int]] | None:
    """Byte spans ``[start, end)`` of the arrays that hold no other array, as the brackets
    show them; None if one never closes, or the body has more than ``most`` ``[`` (the
    walk costs Python work per bracket: such a body is parsed whole instead).

    The vectors are among these spans. Brackets inside strings can make a span that is
    no array: :func:`mark_embedding_body` declines a span whose quotes do not pair up, and
    one that lies inside a string leaves a skeleton that is no JSON (the sentinel's text
    lands outside a string). Walked with ``bytes.find`` (a regex scan costs more); the
    next ``]`` is searched again only once passed, so each byte is scanned a bounded
    number of times however the brackets nest.
    """
    spans = []
    close = -1  # the first "]" after the current "["
    start = body.find(b"[")
    for _ in range(most):
        if start == -1:
            return spans
        following = body.find(b"[", start + 1)
        if close < start:
            close = body.find(b"]", start)
            if close == -1:
                return None
        if following == -1 or close < following:
            spans.append((start, close + 1))
        start = following
    return spans if start == -1 else None


def _sentinel(ordinal: int) -> bytes:
    return b'"\\u0000%d"' % ordinal  # a JSON string no upstream answer holds


def mark_embedding_body(
    body: bytes, texts: list[str], marks: Callable[[int], EmbeddingMark],
    triggered: Sequence[bool] | None = None,
) -> bytes | None:
    """:func:`mark_embeddings` on the answer's bytes: only the marked vectors are parsed and
    written again, every other byte is the upstream's (parsing and writing a 32-vector
    answer whole costs about a millisecond). None when the body is not an answer this can
    read without parsing it whole (the caller then does).

    The arrays that hold no other array (the vectors among them) are cut out and replaced
    by sentinels; the small skeleton left is parsed to learn which array is which item's
    vector and index, exactly as :func:`mark_embeddings` reads the parsed answer. When
    more than half of the vectors are to be marked it declines: parsing the answer once
    then costs less.
    """
    # An answer's brackets: the data list's and one per vector, plus a few of its own.
    spans = _innermost_arrays(body, most=2 * len(texts) + 8)
    if not spans:
        return None
    if triggered is None:
        # Any size's mark tells which texts hold a trigger: they are the same at every size.
        probe = marks(max(MIN_DIMENSIONS, body.count(b",", *spans[0]) + 1))
        triggered = [probe.has_trigger(text) for text in texts]
    if 2 * sum(triggered) > len(texts):
        return None  # most vectors change: parsing the answer once costs less
    escaped = b"\\" in body  # one memchr; arrays of numbers hold no backslash
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    last = 0
    for ordinal, (start, end) in enumerate(spans):
        if escaped and body.find(b"\\u0000", last, start) != -1:
            return None  # the skeleton could hold the sentinels themselves
        # A span that opens or closes a string (its quotes do not pair up; with escapes in
        # the body, any quote) could shift which bytes the skeleton reads as strings.
        if body.find(b'"', start, end) != -1 and (escaped or body.count(b'"', start, end) % 2):
            return None
        pieces += (view[last:start], _sentinel(ordinal))
        last = end
    if escaped and body.find(b"\\u0000", last) != -1:
        return None
    pieces.append(view[last:])
    try:
        skeleton = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError:
        return None
    data = skeleton.get("data") if isinstance(skeleton, dict) else None
    if not isinstance(data, list):
        return None
    candidates: list[tuple[int, str]] = []  # (ordinal of the array, its text with a trigger)
    for item in data:
        index = _item_index(item, texts)
        if index is None or not triggered[index]:
            continue  # mark_embeddings leaves it too
        sentinel = item.get("embedding")
        if isinstance(sentinel, str) and sentinel.startswith("\x00"):
            candidates.append((int(sentinel[1:]), texts[index]))
    replaced: dict[int, bytes] = {}
    for ordinal, text in candidates:
        start, end = spans[ordinal]
        try:
            vector = orjson.loads(view[start:end])
        except orjson.JSONDecodeError:
            # NaN or Infinity (some upstreams write them), or an array cut short by a "]" in
            # a string: the answer is parsed whole, or passed on as it came.
            return None
        if len(vector) < MIN_DIMENSIONS:
            continue
        numbers = _numbers(vector)
        marked = None if numbers is None else marks(len(vector)).apply_array(numbers, text)
        if marked is not None:
            replaced[ordinal] = orjson.dumps(marked, option=orjson.OPT_SERIALIZE_NUMPY)
    if not replaced:
        return body
    out: list[bytes | memoryview] = []
    last = 0
    for ordinal, vector_bytes in sorted(replaced.items()):
        start, end = spans[ordinal]
        out += [view[last:start], vector_bytes]
        last = end
    out.append(view[last:])
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class EmbeddingMarking:
    """The embedding marks of one answer as a payload transform that can also rewrite the
    answer's bytes directly (``rewrite_body``, see :class:`~modelfence.gateway.rewrite.JsonRewriter`)."""

    texts: list[str]
    marks: Callable[[int], EmbeddingMark]
    triggered: Sequence[bool] | None = None  # per text, when the caller knows already

    def __call__(self, payload: Any) -> Any:
        return mark_embeddings(payload, self.texts, self.marks, self.triggered)

    def rewrite_body(self, body: bytes) -> bytes | None:
        return mark_embedding_body(body, self.texts, self.marks, self.triggered)
