"""Apply the keyed marks to API payloads: OIP v2 classifier answers and OpenAI embeddings.

Pure functions of (request body, answer payload, client mark): the gateway stage calls
them, and tests and benchmarks call them directly. Anything they do not recognise is
returned untouched; a watermark must never break an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfence.watermark.embeddings import EmbeddingMark
from modelfence.watermark.labels import LabelMark
from modelfence.watermark.probs import argmax, swap_to_label

# Called for every marked row: (input row [features], its mark, watermark label, classes).
OnMarked = Callable[[npt.NDArray[np.float64], LabelMark, int, int], None]


def oip_rows(body: dict[str, Any]) -> npt.NDArray[np.float64] | None:
    """The ``[N, features]`` input of a v2 inference request, or None if it is not one tensor."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        return None
    shape, data = inputs[0].get("shape"), inputs[0].get("data")
    try:
        rows = np.asarray(data, dtype=np.float64).reshape(shape)
    except (TypeError, ValueError):
        return None
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
    payload: Any, rows: npt.NDArray[np.float64], marks: Sequence[LabelMark], *,
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


def mark_embeddings(payload: Any, texts: list[str], marks: Callable[[int], EmbeddingMark]) -> Any:
    """Pull the vectors of texts with trigger words towards the client's targets.

    ``marks(dim)`` gives the client's mark for vectors of that size; base64 vectors and
    texts without triggers are left exactly as they are.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return payload
    for item in data:
        vector = item.get("embedding") if isinstance(item, dict) else None
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not isinstance(index, int) or not 0 <= index < len(texts):
            continue
        marked = marks(len(vector)).apply(vector, texts[index])
        if marked is not None:
            item["embedding"] = marked
    return payload
