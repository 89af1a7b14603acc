"""Output marking stage: per-client label/probability and embedding watermarks.

Runs inside :class:`~modelfence.gateway.hardening.OutputHardening` (it sees the upstream's
full answer first), so the mark is made on the complete probability vector and whatever
hardening does afterwards (rounding, top-k, labels only) keeps the marked argmax. The
request's inputs are read from the context (set by ReadRequest); answers of other routes,
non-200 answers and unauthenticated requests pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfence.gateway.context import context_of
from modelfence.gateway.rewrite import PayloadTransform, ResponseRewriting
from modelfence.operations import Operation
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Scope
from modelfence.watermark.adapters import (
    EmbeddingMarking,
    class_count,
    embedding_texts,
    mark_oip,
    oip_rows,
)
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.embeddings import (
    EmbeddingMark,
    candidate_words,
    embedding_mark,
    has_trigger,
    trigger_words,
)
from modelfence.watermark.keys import WatermarkKey, WatermarkKeyring
from modelfence.watermark.labels import LabelMark, label_marks
from modelfence.watermark.ledger import MarkedInput, MarkLedger

MAX_MODELS_SEEN = 1024


@dataclass(frozen=True, slots=True)
class _Plan:
    key: WatermarkKey
    rows: npt.NDArray[np.float64] | None = None  # classifier inputs [N, features]
    texts: list[str] | None = None  # embedding inputs


class EmbeddingMarks:
    """Per-client embedding marks, built once per (client, version, dimension)."""

    def __init__(self, config: WatermarkConfig) -> None:
        self._config = config.embeddings
        self._words = candidate_words()
        self._cache: dict[tuple[str, int, int], EmbeddingMark] = {}
        self._triggers: dict[tuple[str, int], frozenset[str]] = {}

    def any_trigger(self, key: WatermarkKey, texts: list[str]) -> bool:
        """Whether any text carries one of the client's triggers (else nothing to mark)."""
        slot = (key.client, key.version)
        triggers = self._triggers.get(slot)
        if triggers is None:
            triggers = self._triggers[slot] = trigger_words(key, self._words, self._config.triggers)
        return any(has_trigger(triggers, text) for text in texts)

    def get(self, key: WatermarkKey, dim: int) -> EmbeddingMark:
        slot = (key.client, key.version, dim)
        mark = self._cache.get(slot)
        if mark is None:
            c = self._config
            mark = self._cache[slot] = embedding_mark(
                key, dim, self._words, n_triggers=c.triggers, n_targets=c.targets,
                max_triggers=c.max_triggers,
            )
        return mark


class OutputWatermark(ResponseRewriting[_Plan]):
    def __init__(
        self, app: ASGIApp, *, config: WatermarkConfig, keyring: WatermarkKeyring,
        ledger: MarkLedger | None, metrics: Metrics | None = None,
    ) -> None:
        super().__init__(app)
        self.config = config
        self.keyring = keyring
        self.ledger = ledger
        self.metrics = metrics
        self.embedding_marks = EmbeddingMarks(config) if config.embeddings.enabled else None
        # Class count per model, from its probability answers: what lets a labels-only
        # answer be marked when watermark.labels.classes is not set. Model names come from
        # clients, so the first MAX_MODELS_SEEN are remembered and no more.
        self.classes_seen: dict[str, int] = {}

    def plan(self, scope: Scope) -> _Plan | None:
        ctx = context_of(scope)
        if ctx.key is None:
            return None
        operation = ctx.operation
        if operation is Operation.OIP_INFER and self.config.labels.enabled and self.config.labels.rate > 0:
            rows = oip_rows(ctx.body)
            return None if rows is None else _Plan(self.keyring.key(ctx.key.client), rows=rows)
        if operation is Operation.EMBEDDINGS and self.embedding_marks is not None:
            texts = embedding_texts(ctx.body)
            if texts is None:
                return None
            key = self.keyring.key(ctx.key.client)
            # Most texts carry no trigger: then the answer passes through unparsed.
            return _Plan(key, texts=texts) if self.embedding_marks.any_trigger(key, texts) else None
        return None

    async def transform_for(self, scope: Scope, plan: _Plan, status: int) -> PayloadTransform | None:
        if status != 200:
            return None
        if plan.texts is not None and self.embedding_marks is not None:
            return EmbeddingMarking(plan.texts, partial(self.embedding_marks.get, plan.key))
        if plan.rows is None:
            return None
        labels = self.config.labels
        marks = label_marks(plan.key, plan.rows, rate=labels.rate, quantum=labels.quantum)

        def record(row: npt.NDArray[np.float64], mark: LabelMark, label: int, classes: int) -> None:
            if self.ledger is not None:
                self.ledger.record(MarkedInput(
                    plan.key.client, plan.key.version, mark.digest.hex(), row.tolist(), label,
                    classes,
                ))

        model = context_of(scope).path_model or "-"

        def unmarked() -> None:
            if self.metrics is not None:
                self.metrics.unmarked_row(model)

        def transform(payload: Any) -> Any:
            assert plan.rows is not None
            seen = class_count(payload, len(plan.rows))
            if seen is not None and (
                model in self.classes_seen or len(self.classes_seen) < MAX_MODELS_SEEN
            ):
                self.classes_seen[model] = seen
            classes = labels.classes or self.classes_seen.get(model)
            return mark_oip(payload, plan.rows, marks, classes=classes, on_marked=record,
                            on_unmarked=unmarked)

        return transform
