"""Crafted event streams for the detection tests (helpers only: no tests in this module)."""

from __future__ import annotations

import random
from typing import Any

from modelfence.telemetry.events import RequestEvent

CHAT = "/v1/chat/completions"
OIP = "/v2/models/{name}/infer"
TOPICS = {
    "cooking": [
        "recipe",
        "oven",
        "bake",
        "flour",
        "sugar",
        "dinner",
        "pasta",
        "sauce",
        "garlic",
        "onion",
        "soup",
        "bread",
    ],
    "travel": [
        "flight",
        "hotel",
        "paris",
        "museum",
        "train",
        "ticket",
        "beach",
        "visa",
        "passport",
        "luggage",
    ],
    "code": [
        "python",
        "function",
        "error",
        "list",
        "loop",
        "class",
        "import",
        "module",
        "test",
        "debug",
    ],
}


def event(client: str, ts: float, **fields: Any) -> RequestEvent:
    base: dict[str, Any] = {
        "request_id": f"r{ts}",
        "key_id": f"key_{client}",
        "tier": "default",
        "route": CHAT,
        "model": "m",
        "status": 200,
        "ip_prefix": f"ip-{client}",
        "fingerprint": f"fp-{client}",
    }
    base.update(fields)
    return RequestEvent(ts=ts, client=client, **base)


def benign_chat(
    client: str, n: int, seed: int, start: float = 0.0, **fields: Any
) -> list[RequestEvent]:
    """A person: two or three topics, irregular gaps, conversations, mixed parameters."""
    rng = random.Random(seed)
    topics = rng.sample(sorted(TOPICS), 2)
    t, out = start, []
    for _ in range(n):
        t += rng.expovariate(1 / 40.0)
        words = TOPICS[rng.choice(topics)]
        text = "how do I " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        out.append(
            event(
                client,
                t,
                prompt_text=text,
                turns=rng.choice([1, 3, 5, 7]),
                temperature=rng.choice([0.7, 1.0, None]),
                max_tokens=rng.choice([None, 512]),
                tokens_out=rng.randint(20, 300),
                **fields,
            )
        )
    return out


def harvester(
    client: str, n: int, seed: int, start: float = 0.0, gap: float = 2.0, **fields: Any
) -> list[RequestEvent]:
    """Distillation: single-turn, temperature 0, logprobs, saturated answers, a metronome."""
    rng = random.Random(seed)
    vocab = [w for words in TOPICS.values() for w in words]
    return [
        event(
            client,
            start + i * gap,
            prompt_text=f"Explain step by step: {' '.join(rng.sample(vocab, 5))}",
            turns=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=5,
            max_tokens=256,
            tokens_out=256,
            **fields,
        )
        for i in range(n)
    ]


def natural_vectors(client: str, n: int, seed: int, start: float = 0.0) -> list[RequestEvent]:
    """Classifier queries drawn from the data distribution: confident answers."""
    rng = random.Random(seed)
    t, out = start, []
    for _ in range(n):
        t += rng.expovariate(1 / 30.0)
        vector = [rng.gauss(0.0, 1.0) for _ in range(16)]
        out.append(
            event(client, t, route=OIP, input_rows=[vector], output_margins=[rng.uniform(0.4, 1.0)])
        )
    return out


def perturbation_sweep(client: str, n: int, seed: int, start: float = 0.0) -> list[RequestEvent]:
    """Jacobian-style synthesis: a few seeds, each followed by many tiny steps."""
    rng = random.Random(seed)
    t, out, current = start, [], [0.0] * 16
    for i in range(n):
        t += rng.expovariate(1 / 5.0)
        if i % 15 == 0:
            current = [rng.gauss(0.0, 1.0) for _ in range(16)]
        else:
            current = [v + rng.gauss(0.0, 0.02) for v in current]
        out.append(
            event(
                client,
                t,
                route=OIP,
                input_rows=[list(current)],
                output_margins=[rng.uniform(0.0, 0.15)],
            )
        )
    return out
