"""The logit-leak probes on a synthetic model of known hidden size (no gateway needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelfence.redteam.attacks.logits import LogitProbe, bias_requests_needed, probe_rank
from modelfence.redteam.traffic import Exchange

HIDDEN, VOCAB = 24, 3_200
W = np.random.default_rng(0).normal(size=(VOCAB, HIDDEN))


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    """What an OpenAI-style server over logits ``W @ h`` answers (greedy decoding)."""
    prompt = body["messages"][-1]["content"]
    bias = np.zeros(VOCAB)
    for token, value in body["logit_bias"].items():
        bias[int(token)] = value
    steps = []
    for position in range(body["max_tokens"]):
        # Greedy under the probe's bias: the context depends on the prompt and position only.
        h = np.random.default_rng([len(prompt), sum(map(ord, prompt)), position]).normal(size=HIDDEN)
        scores = W @ h + bias
        logprobs = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
        order = np.argsort(-logprobs)[: body["top_logprobs"]]
        top = [{"token": str(t), "logprob": float(logprobs[t]), "bytes": list(str(t).encode())} for t in order]
        steps.append({"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top})
    return {"choices": [{"logprobs": {"content": steps}}]}


def _run(probe: LogitProbe) -> dict[str, float]:
    plans = probe.plans("thief", 1.0, np.random.default_rng(0))
    exchanges = [Exchange(p, "thief", 200, 1.0, _answer(dict(p.body))) for p in plans]
    return probe_rank(probe, exchanges)


@pytest.mark.parametrize("mode, columns", [("wide", 60), ("bias", 38)])
def test_probe_recovers_the_hidden_size(mode: str, columns: int) -> None:
    prompts = [f"prompt number {i}" for i in range(6)]
    got = _run(LogitProbe(prompts, mode, columns, positions=8))
    assert (got["rows"], got["columns"]) == (48, columns)
    assert got["recovered_rank"] == HIDDEN and got["cliff_found"] == 1.0


def test_too_few_rows_give_only_a_lower_bound() -> None:
    got = _run(LogitProbe(["one", "two"], "wide", 60, positions=8))
    assert got["recovered_rank"] == 16 and got["cliff_found"] == 0.0


def test_bias_probe_price_in_requests() -> None:
    assert LogitProbe(["a"], "bias", 577).requests == 31  # ceil(577 / 19) batches per prompt
    assert bias_requests_needed(640, 577, positions=16) == 40 * 31
