"""Output marking stage: per-client label/probability and embedding watermarks.

Runs inside :class:`~modelfence.gateway.hardening.OutputHardening` (it sees the upstream's
full answer first), so the mark is made on the complete probability vector and whatever
hardening does afterwards (rounding, top-k, labels only) keeps the marked argmax. The
request's inputs are read from the context (set by ReadRequest); answers of other routes,
non-200 answers and unauthenticated requests pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfence.gateway.context import context_of
from modelfence.gateway.rewrite import PayloadTransform, ResponseRewriting, Unread
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
    texts_with_trigger,
    trigger_words,
)
from modelfence.watermark.keys import WatermarkKey, WatermarkKeyring
from modelfence.watermark.labels import UNMARKED, LabelMark, RowMark, label_marks
from modelfence.watermark.ledger import MarkedInput, MarkLedger
from modelfence.watermark.regions import InputProfile, RegionMark, RegionRowMark, region_mark

MAX_MODELS_SEEN = 1024
REGION_RULE_BYTES = 64 << 20  # clients' region rules kept built; past it the cache starts over


@dataclass(frozen=True, slots=True)
class _Plan:
    key: WatermarkKey
    rows: npt.NDArray[np.float64] | None = None  # classifier inputs [N, features]
    texts: list[str] | None = None  # embedding inputs
    triggered: list[bool] | None = None  # per text: holds one of the client's triggers


class EmbeddingMarks:
    """Per-client embedding marks, built once per (client, version, dimension)."""

    def __init__(self, config: WatermarkConfig) -> None:
        self._config = config.embeddings
        self._words = candidate_words()
        self._cache: dict[tuple[str, int, int], EmbeddingMark] = {}
        self._triggers: dict[tuple[str, int], frozenset[bytes]] = {}

    def triggered(self, key: WatermarkKey, texts: list[str]) -> list[bool]:
        """Which texts carry one of the client's triggers (the others are never marked)."""
        slot = (key.client, key.version)
        triggers = self._triggers.get(slot)
        if triggers is None:
            words = trigger_words(key, self._words, self._config.triggers)
            triggers = self._triggers[slot] = frozenset(w.encode("ascii") for w in words)
        return texts_with_trigger(triggers, texts)

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


class RegionMarks:
    """Per-model input profiles and per-client region rules (:mod:`..watermark.regions`):
    which rows of a profiled model's request are off-distribution, and their marks."""

    def __init__(self, config: WatermarkConfig, profiles: Mapping[str, InputProfile]) -> None:
        self._config = config.labels
        self._profiles = profiles
        self._rules: dict[tuple[str, int, str], RegionMark] = {}
        self._rule_bytes = 0

    def __contains__(self, model: str) -> bool:
        return model in self._profiles

    def marks(self, key: WatermarkKey, model: str, rows: npt.NDArray[np.float64]) -> list[RowMark]:
        """One mark per row: the region rule's off-distribution, DAWN at the model's
        ``dawn_rate`` (or none) for the rest."""
        settings, profile = self._config.regions[model], self._profiles[model]
        off = profile.off(rows)
        if settings.dawn_rate > 0:
            marks: list[RowMark] = list(label_marks(
                key, rows, rate=settings.dawn_rate, quantum=self._config.quantum))
        else:
            marks = [UNMARKED] * len(rows)
        if off.any():
            rule = self._rule(key, model, profile, settings.cell_bits)
            cells = rule.cells(rows[off]).tolist()
            for i, cell in zip(np.flatnonzero(off).tolist(), cells, strict=True):
                marks[i] = RegionRowMark(rule, cell)
        return marks

    def _rule(self, key: WatermarkKey, model: str, profile: InputProfile, bits: int) -> RegionMark:
        slot = (key.client, key.version, model)
        rule = self._rules.get(slot)
        if rule is None:
            size = rule_bytes(bits, profile.features)
            if self._rule_bytes + size > REGION_RULE_BYTES:
                self._rules.clear()
                self._rule_bytes = 0
            rule = self._rules[slot] = region_mark(key, profile, bits)
            self._rule_bytes += size
        return rule


RULE_OVERHEAD = 1024  # a rule's objects and keyed hash (RSS: ~780 B per rule of 4 features)


def rule_bytes(bits: int, features: int) -> int:
    """An upper bound on one cached rule: its directions, plus the profile mean it only
    refers to (shared by every rule, counted anyway so the bound never undercounts), plus
    the rule's fixed size."""
    return (bits + 1) * features * 8 + RULE_OVERHEAD


class OutputWatermark(ResponseRewriting[_Plan]):
    def __init__(
        self, app: ASGIApp, *, config: WatermarkConfig, keyring: WatermarkKeyring,
        ledger: MarkLedger | None, metrics: Metrics | None = None,
        regions: RegionMarks | None = None, on_unread: Unread | None = None,
    ) -> None:
        super().__init__(app, on_unread=on_unread)
        self.config = config
        self.keyring = keyring
        self.ledger = ledger
        self.metrics = metrics
        self.regions = regions
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
        if operation is Operation.OIP_INFER and self.config.labels.enabled and (
            self.config.labels.rate > 0
            or (self.regions is not None and (ctx.path_model or "") in self.regions)
        ):
            rows = oip_rows(ctx.body)
            return None if rows is None else _Plan(self.keyring.key(ctx.key.client), rows=rows)
        if operation is Operation.EMBEDDINGS and self.embedding_marks is not None:
            texts = embedding_texts(ctx.body)
            if texts is None:
                return None
            key = self.keyring.key(ctx.key.client)
            # Most texts carry no trigger: then the answer passes through unparsed.
            triggered = self.embedding_marks.triggered(key, texts)
            return _Plan(key, texts=texts, triggered=triggered) if any(triggered) else None
        return None

    async def transform_for(self, scope: Scope, plan: _Plan, status: int) -> PayloadTransform | None:
        if status != 200:
            return None
        if plan.texts is not None and self.embedding_marks is not None:
            return EmbeddingMarking(
                plan.texts, partial(self.embedding_marks.get, plan.key), plan.triggered
            )
        if plan.rows is None:
            return None
        labels = self.config.labels
        model = context_of(scope).path_model or "-"
        marks: Sequence[RowMark]
        if self.regions is not None and model in self.regions:
            marks = self.regions.marks(plan.key, model, plan.rows)
        else:
            marks = label_marks(plan.key, plan.rows, rate=labels.rate, quantum=labels.quantum)

        def record(row: npt.NDArray[np.float64], mark: RowMark, label: int, classes: int) -> None:
            if isinstance(mark, RegionRowMark):
                if self.metrics is not None:
                    self.metrics.region_row(model)
            elif isinstance(mark, LabelMark) and self.ledger is not None:
                # Region marks are verified on probes, so only DAWN's marked rows are kept.
                self.ledger.record(MarkedInput(
                    plan.key.client, plan.key.version, mark.digest.hex(), row.tolist(), label,
                    classes,
                ))

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
