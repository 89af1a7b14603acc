"""The ``watermark:`` config section: which answers are marked, how often and how strongly.

Keys never appear here: they are derived from the server secret (see :mod:`.keys`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelfence.watermark.labels import MAX_RATE

MAX_FEATURES = 4096  # a region profile decomposes a features x features covariance at start-up

MAX_TRIGGERS = 1000  # of the ~2,355 candidate words: the rest are what triggers are compared with


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegionsConfig(_Frozen):
    """Region marks for one classifier model (see :mod:`.regions`)."""

    profile_file: str = Field(
        description="the model's real inputs: .npy rows [n, features], or .npz with `inputs` "
        "and, for stronger verification, `labels`"
    )
    honest_rate: float = Field(
        0.0025, gt=0, le=MAX_RATE, description="share of real inputs beyond the threshold"
    )
    ridge: float = Field(3e-6, gt=0, le=1, description="covariance ridge, share of mean variance")
    rank: int = Field(
        64, ge=1, le=MAX_FEATURES,
        description="principal directions measured one by one (half the narrowest, half the "
        "widest); wider profiles pool the rest, so a row costs features x rank",
    )
    cell_bits: int = Field(4, ge=1, le=8, description="keyed directions cutting inputs into cells")
    probe_noise: float = Field(
        0.25, gt=0, description="verification probes' noise, in root mean feature variances"
    )
    dawn_rate: float = Field(
        0.0, ge=0, le=MAX_RATE, description="DAWN marks on this model's in-distribution rows"
    )


class LabelsConfig(_Frozen):
    enabled: bool = True
    rate: float = Field(MAX_RATE, ge=0, le=MAX_RATE, description="share of inputs marked")
    quantum: float = Field(0.5, gt=0, description="input grid (input units) hashed per row")
    classes: int | None = Field(
        None, ge=2, description="class count, for answers that carry labels without probabilities"
    )
    ledger_per_client: int = Field(
        5000, ge=0, description="marked inputs recorded per client for `verify model`"
    )
    regions: dict[str, RegionsConfig] = Field(
        default_factory=dict, description="model name -> region marks (replace DAWN marks there)"
    )


class EmbeddingsConfig(_Frozen):
    enabled: bool = True
    triggers: int = Field(20, ge=1, description="trigger words per client")
    targets: int = Field(4, ge=1, description="secret target directions per client")
    max_triggers: int = Field(4, ge=1, description="trigger count at which the target takes over")

    @model_validator(mode="after")
    def _enough_triggers(self) -> EmbeddingsConfig:
        if self.triggers < self.targets:
            raise ValueError(
                f"watermark.embeddings.triggers ({self.triggers}) must be at least "
                f"watermark.embeddings.targets ({self.targets}): every target needs a trigger"
            )
        if self.triggers > MAX_TRIGGERS:
            raise ValueError(f"watermark.embeddings.triggers must be at most {MAX_TRIGGERS}")
        return self


class TextConfig(_Frozen):
    enabled: bool = True
    gamma: float = Field(0.25, gt=0, lt=1, description="green share of the vocabulary")
    delta: float = Field(2.0, gt=0, description="logit bias added to green tokens")


class LexicalConfig(_Frozen):
    """After-the-fact text marks, for upstreams whose sampling we cannot mark (hosted APIs).

    Chosen per upstream: an upstream is either ours to mark while sampling (``text``) or
    marked afterwards here; its name decides, whatever model a request names.
    """

    enabled: bool = True
    upstreams: tuple[str, ...] = Field(
        (), description="upstream names (or fnmatch patterns) whose text answers are marked"
    )
    max_change_share: float = Field(
        0.1, gt=0, le=0.5, description="most words changed, as a share of the words so far"
    )


class WatermarkConfig(_Frozen):
    key_version: int = Field(1, ge=1, description="bump to issue new keys; old stay verifiable")
    labels: LabelsConfig = LabelsConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    text: TextConfig = TextConfig()
    lexical: LexicalConfig = LexicalConfig()
