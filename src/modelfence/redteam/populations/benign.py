"""Honest customers: real prompts, human timing, a few heavy but legitimate users.

Every request is planned ahead from the seed, never from model outputs, so a live run and
a replay of the same population send the same requests. Multi-turn conversations carry
the earlier user turns with a short stand-in for each assistant reply for that reason.

    plans, profiles = BenignPopulation(chat_users=20).generate(corpus, rng, horizon=3600)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.timing import HumanTiming, SteadyTiming
from modelfence.redteam.traffic import (
    CHAT,
    DIGITS_INFER,
    EMBEDDINGS,
    ClientProfile,
    PlannedRequest,
    chat_body,
    digits_body,
    embeddings_body,
    make_profile,
)

ASSISTANT_STAND_IN = "Sure, here is what I know."
FOLLOW_UPS = (
    "Can you explain that more simply?",
    "Thanks. Can you give me an example?",
    "What would you recommend then?",
    "Could you make that shorter?",
    "Why is that?",
)


@cache  # every classifier user samples from the same bundled set
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class BenignPopulation:
    """How many honest clients of each kind, and how they behave.

    ``max_tokens`` is kept small by default because the demo LLM runs on a CPU; replay
    runs may raise it freely.
    """

    chat_users: int = 20
    embedding_users: int = 3
    classifier_users: int = 3
    batch_summarisers: int = 1  # a team summarising its own documents at a steady rate
    image_streams: int = 1  # a client scoring its own camera stream, with natural repeats
    max_tokens: int = 8
    timing: HumanTiming = field(default_factory=HumanTiming)
    heavy_rate: float = 0.05  # requests per virtual second for the heavy honest users

    def generate(
        self, corpus: PromptCorpus, rng: np.random.Generator, horizon: float, *, subnet_base: int = 0
    ) -> tuple[list[PlannedRequest], list[ClientProfile]]:
        plans: list[PlannedRequest] = []
        profiles: list[ClientProfile] = []
        subnet = subnet_base
        kinds = (
            ("chat", self.chat_users, self._chat),
            ("embed", self.embedding_users, self._embed),
            ("digits", self.classifier_users, self._digits_user),
            ("summariser", self.batch_summarisers, self._summariser),
            ("camera", self.image_streams, self._camera),
        )
        for kind, count, build in kinds:
            for i in range(count):
                profile = make_profile(rng, f"benign-{kind}-{i}", "benign", subnet=subnet)
                subnet += 1
                profiles.append(profile)
                plans.extend(build(profile, corpus, rng, horizon))
        plans.sort(key=lambda p: p.at)
        return plans, profiles

    def _topic(self, corpus: PromptCorpus, rng: np.random.Generator) -> Sequence[str]:
        """A person's interests: a contiguous slice of one source (files group by theme)."""
        sources = [texts for texts in corpus.by_source.values() if texts]
        texts = sources[int(rng.integers(len(sources)))]
        width = min(len(texts), 40)
        start = int(rng.integers(0, len(texts) - width + 1))
        return texts[start : start + width]

    def _chat(
        self, profile: ClientProfile, corpus: PromptCorpus, rng: np.random.Generator, horizon: float
    ) -> list[PlannedRequest]:
        topic = self._topic(corpus, rng)
        phase = float(rng.uniform(-4, 4)) * 3600  # time zone
        plans: list[PlannedRequest] = []
        messages: list[dict[str, str]] = []
        last = -1e9
        for at in self.timing.arrivals(rng, horizon, phase):
            if at - last > 600 or len(messages) >= 6 or rng.random() < 0.5:
                messages = []  # a new conversation
                text = topic[int(rng.integers(len(topic)))]
            else:
                messages.append({"role": "assistant", "content": ASSISTANT_STAND_IN})
                text = FOLLOW_UPS[int(rng.integers(len(FOLLOW_UPS)))]
            messages.append({"role": "user", "content": text})
            last = at
            body = chat_body(list(messages), int(rng.integers(self.max_tokens // 2, self.max_tokens + 1)))
            plans.append(PlannedRequest(at, profile.name, CHAT, body, turns=len(messages)))
        return plans

    def _embed(
        self, profile: ClientProfile, corpus: PromptCorpus, rng: np.random.Generator, horizon: float
    ) -> list[PlannedRequest]:
        topic = self._topic(corpus, rng)
        return [
            PlannedRequest(
                at, profile.name, EMBEDDINGS,
                embeddings_body([topic[int(j)] for j in rng.integers(len(topic), size=rng.integers(1, 9))]),
            )
            for at in self.timing.arrivals(rng, horizon)
        ]

    def _digits_user(
        self, profile: ClientProfile, corpus: PromptCorpus, rng: np.random.Generator, horizon: float
    ) -> list[PlannedRequest]:
        x, y = digit_images()
        weights = rng.dirichlet(np.full(10, 0.8))  # each customer sees its own class mix
        p = weights[y] / weights[y].sum()
        plans = []
        for at in self.timing.arrivals(rng, horizon):
            rows = x[rng.choice(len(x), size=int(rng.integers(1, 5)), p=p)]
            plans.append(PlannedRequest(at, profile.name, DIGITS_INFER, digits_body(rows)))
        return plans

    def _camera(
        self, profile: ClientProfile, corpus: PromptCorpus, rng: np.random.Generator, horizon: float
    ) -> list[PlannedRequest]:
        x, _ = digit_images()
        plans: list[PlannedRequest] = []
        current = x[int(rng.integers(len(x)))]
        for at in SteadyTiming(self.heavy_rate).arrivals(rng, horizon):
            if rng.random() > 0.3:  # the scene changed; otherwise the same frame again
                current = x[int(rng.integers(len(x)))]
            frame = np.clip(current + rng.normal(0, 0.3, size=64), 0, 16)
            plans.append(PlannedRequest(at, profile.name, DIGITS_INFER, digits_body(frame)))
        return plans

    def _summariser(
        self, profile: ClientProfile, corpus: PromptCorpus, rng: np.random.Generator, horizon: float
    ) -> list[PlannedRequest]:
        documents = corpus.all()
        return [
            PlannedRequest(
                at, profile.name, CHAT,
                chat_body(
                    [{"role": "user", "content": "Summarise this for our team wiki: "
                      + documents[int(rng.integers(len(documents)))]}],
                    self.max_tokens,
                ),
                turns=1,
            )
            for at in SteadyTiming(self.heavy_rate).arrivals(rng, horizon)
        ]
