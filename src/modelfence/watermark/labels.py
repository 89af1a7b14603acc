"""DAWN-style label watermarks: a keyed, deterministic few inputs get a keyed wrong label.

For each client, an input is *marked* when the HMAC of its quantised features (under the
client's ``labels`` subkey) falls below ``rate`` (≤ 0.5%, DAWN's operating range). A marked
input always gets the same wrong label, also chosen by the HMAC, so repeating a query
gives the same answer and an extractor cannot average the mark away. A clone trained on
these answers learns the wrong labels; :mod:`modelfence.forensics.model` queries it on the
recorded marked inputs and tests the agreement with a binomial test (chance is
``1 / (classes - 1)`` at most).

Quantising first (``quantum``, in input units) makes tiny float noise land in the same
cell: the thief's replay and the verifier's query hash alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from modelfence.keyedhash import KeyedHash
from modelfence.watermark.keys import WatermarkKey

MAX_RATE = 0.005  # DAWN marks at most 0.5% of queries; more costs benign accuracy
_TWO_64 = float(2**64)


class RowMark(Protocol):
    """What the answer rewriting needs of any label mark: whether the row is marked, and
    its marked label given the true one."""

    @property
    def marked(self) -> bool: ...

    def label(self, true_label: int, n_classes: int) -> int: ...


@dataclass(frozen=True, slots=True)
class LabelMark:
    """The verdict for one input row: ``digest`` identifies the quantised input."""

    digest: bytes  # 32 bytes, HMAC-SHA256 of the quantised row under the client's key
    marked: bool

    def label(self, true_label: int, n_classes: int) -> int:
        """The keyed wrong label for a marked row (never ``true_label``; ``n_classes`` ≥ 2)."""
        offset = 1 + int.from_bytes(self.digest[8:16], "big") % (n_classes - 1)
        return (true_label + offset) % n_classes


UNMARKED = LabelMark(bytes(32), marked=False)  # a row no mark applies to


def label_mark(key: WatermarkKey, row: npt.ArrayLike, *, rate: float, quantum: float) -> LabelMark:
    """Whether ``row`` is in the client's watermark set, and its digest.

    >>> from modelfence.watermark.keys import WatermarkKey
    >>> key = WatermarkKey("acme", 1, b"k" * 32)
    >>> m = label_mark(key, [0.0] * 64, rate=0.005, quantum=0.5)
    >>> m == label_mark(key, [0.1] * 64, rate=0.005, quantum=0.5)
    True
    """
    return label_marks(key, np.asarray(row, dtype=np.float64).reshape(1, -1), rate=rate, quantum=quantum)[0]


def label_marks(
    key: WatermarkKey, rows: npt.ArrayLike, *, rate: float, quantum: float,
) -> list[LabelMark]:
    """:func:`label_mark` for every row of a batch ``[n, features]``: the grid and the
    subkey are computed once per batch, which is what the gateway pays per answer. What is
    hashed is each row's int32 grid cells (input units / ``quantum``, rounded)."""
    if not 0.0 <= rate <= MAX_RATE:
        raise ValueError(f"label watermark rate must be in [0, {MAX_RATE}], got {rate}")
    subkey, cut = key.subkey("labels"), rate * _TWO_64
    grid = np.ascontiguousarray(np.rint(np.asarray(rows, dtype=np.float64) / quantum).astype("<i4"))
    mac = KeyedHash(subkey)
    digests = [mac.digest(cells.tobytes()) for cells in grid]
    return [LabelMark(d, int.from_bytes(d[:8], "big") < cut) for d in digests]
