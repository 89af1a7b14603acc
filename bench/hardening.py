"""How much does output hardening cost per response? In-process, no network.

Each case is what :class:`~modelfence.gateway.hardening.OutputHardening` does to one
answer: ``plan()`` (which every request pays, hardened or not; for a hardened LLM request
it also narrows what the upstream is asked for), then parse the upstream JSON, apply the
profile's transform and serialise it again (the ``JsonRewriter`` / ``SSERewriter`` path).
Where the request was narrowed, the upstream's answer is the narrower one it then sends
(1 alternative instead of 5, or no logprobs); the "not narrowed" cases are what the same
profile costs when the upstream ignores the narrower request, or for streams whose request
the proxy rebuilds. The DP accountant's round trip (one SQL upsert or one Redis script) is
not included: it is I/O, paid only by clients whose profile adds DP noise.

    python bench/hardening.py            # a table of CPU µs per response; target: <= 200
    python bench/hardening.py --json     # the same numbers as JSON

Efficacy against extraction, through a real gateway: ``bench/hardening_efficacy.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.hardening import OutputHardening
from modelfence.gateway.rewrite import ClosedEvents, JsonRewriter, SSERewriter
from modelfence.identity.base import ApiKeyRecord
from modelfence.policy import (
    LogprobHardening,
    NormalRisk,
    PolicyConfig,
    RiskLevel,
    RiskOverrides,
    RowHardening,
    harden_oip,
)
from modelfence.policy.reasoning import ReasoningMode, ReasoningTrim

TARGET_US = 200.0
REQUEST = {"model": "smollm2-135m-instruct", "max_tokens": 100, "logprobs": True,
           "top_logprobs": 5, "messages": [
               {"role": "system", "content": "You are a helpful assistant. " * 8},
               {"role": "user", "content": "Explain the difference between TCP and UDP. " * 4}]}


def chat_body(tokens: int, alternatives: int | None) -> bytes:
    """A chat answer of ``tokens`` tokens, with that many alternatives each (None: no
    logprobs, what an upstream sends when the request was narrowed to text only)."""
    if alternatives is None:
        return orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "t" * tokens},
             "logprobs": None}]})
    rng = np.random.default_rng(0)
    content = []
    for i in range(tokens):
        top = sorted((-rng.exponential(1.0, alternatives)).tolist(), reverse=True)
        content.append({"token": f"t{i}", "logprob": top[0], "bytes": [116],
                        "top_logprobs": [{"token": f"t{i}-{j}", "logprob": lp, "bytes": [116]}
                                         for j, lp in enumerate(top)]})
    return orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "t" * tokens},
         "logprobs": {"content": content, "refusal": None}}]})


def chat_stream(tokens: int, alternatives: int) -> list[bytes]:
    whole = orjson.loads(chat_body(tokens, alternatives))["choices"][0]["logprobs"]["content"]
    return [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": p["token"]},
                                                   "logprobs": {"content": [p]}}]}) + b"\n\n"
            for p in whole]


def reasoning_body(chars: int, where: str) -> bytes:
    """A reasoning model's answer: ``chars`` characters of chain of thought in
    ``reasoning_content`` (``where="field"``), as a ``<think>`` block that opens the content
    (``"block"``) or as the thinking part of a Magistral content list (``"parts"``)."""
    thought = ("Let me work through this step by step. " * (chars // 38 + 1))[:chars]
    message = {
        "field": {"role": "assistant", "content": "The answer.", "reasoning_content": thought},
        "block": {"role": "assistant", "content": f"<think>{thought}</think>\n\nThe answer."},
        "parts": {"role": "assistant", "content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": thought}]},
            {"type": "text", "text": "The answer."}]},
    }[where]
    return orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}]})


def reasoning_stream(events: int) -> list[bytes]:
    """``events`` reasoning deltas of ~5 characters, then as many content deltas."""
    def event(delta: dict[str, str]) -> bytes:
        return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n"
    return ([event({"reasoning_content": f"step{i} "}) for i in range(events)]
            + [event({"content": f"w{i} "}) for i in range(events)])


def oip_body(rows: int) -> bytes:
    raw = np.random.default_rng(1).random((rows, 10)) ** 4
    data = (raw / raw.sum(axis=1, keepdims=True)).ravel().tolist()
    return orjson.dumps({"model_name": "digits", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [rows, 10], "data": data}]})


def per_call_us(fn: Callable[[], Any], rounds: int = 9, round_seconds: float = 0.03) -> float:
    """CPU microseconds per call of ``fn``: the median over ``rounds`` rounds.

    CPU time of this thread (``time.thread_time``), not wall time, and the median, not the
    mean: on a shared machine the time the scheduler gives other processes, and the rounds
    they disturb most, would otherwise be counted as hardening.
    """
    for _ in range(20):
        fn()
    calls, started = 0, time.thread_time()
    while time.thread_time() - started < round_seconds:
        fn()
        calls += 1
    per_round = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            fn()
        per_round.append((time.thread_time() - started) / calls * 1e6)
    return statistics.median(per_round)


def cases() -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(2)
    narrowed16, narrowed100, full100 = chat_body(16, 1), chat_body(100, 1), chat_body(100, 5)
    text100 = chat_body(100, None)
    events = chat_stream(100, 5)
    elevated = LogprobHardening(quantum=0.5, top_k=1)
    noised = LogprobHardening(quantum=0.1, noise_scale=2.0, rng=rng)
    text_only = LogprobHardening(text_only=True)
    oip1, oip32 = oip_body(1), oip_body(32)

    risk = RiskOverrides(NormalRisk())
    stage = OutputHardening(lambda *_: None, policy=PolicyConfig(),  # type: ignore[arg-type]
                            risk=risk, accountant=None)  # type: ignore[arg-type]

    def scope(client: str, level: RiskLevel) -> dict[str, Any]:
        risk.set(client, level)
        key = ApiKeyRecord("k", client, "default", "mf-", datetime.now(UTC))
        return {SCOPE_KEY: RequestContext(route="/v1/chat/completions", started=0.0,
                                          request_id="r", key=key, body=dict(REQUEST))}

    normal, suspect, flagged = (scope("acme", RiskLevel.NORMAL),
                                scope("suspect", RiskLevel.ELEVATED),
                                scope("flagged", RiskLevel.HIGH))

    def json_case(body: bytes, transform: Callable[[Any], Any],
                  plan: dict[str, Any] | None = None) -> Callable[[], Any]:
        if plan is None:
            return lambda: JsonRewriter(transform).feed(body, False)
        return lambda: (stage.plan(plan), JsonRewriter(transform).feed(body, False))

    def sse_case(transform: Callable[[Any], Any]) -> Callable[[], Any]:
        def run() -> None:
            rewriter = SSERewriter(transform)
            for i, event in enumerate(events):
                rewriter.feed(event, i < len(events) - 1)
        return run

    def trimmed(body: bytes, mode: ReasoningMode) -> Callable[[], Any]:
        return lambda: JsonRewriter(ReasoningTrim(mode, 400)).feed(body, False)

    def trimmed_stream(mode: ReasoningMode) -> Callable[[], Any]:
        def run() -> None:  # as the stage streams it: held text closed before the end
            trim = ReasoningTrim(mode, 400)
            trim.stream = True
            rewriter = ClosedEvents(trim, trim.held)
            for i, event in enumerate(thoughts):
                rewriter.feed(event, i < len(thoughts) - 1)
        return run

    thoughts = reasoning_stream(100)
    thought, inline, parts = (reasoning_body(2000, where) for where in ("field", "block", "parts"))

    def rows(mode: str, **extra: Any) -> Callable[[Any], Any]:
        h = RowHardening(mode=mode, rng=rng, **extra)  # type: ignore[arg-type]
        return lambda payload: harden_oip(payload, h)

    return {
        "plan() only (normal risk: pass-through)": lambda: stage.plan(normal),
        "chat 16 tokens, narrowed to 1 alt: quantise 0.5 + top-1":
            json_case(narrowed16, elevated.apply, suspect),
        "chat 100 tokens, narrowed to 1 alt: quantise 0.5 + top-1":
            json_case(narrowed100, elevated.apply, suspect),
        "chat 100 tokens, narrowed to text: text only":
            json_case(text100, text_only.apply, flagged),
        "chat 100 tokens x 5 alts, not narrowed: quantise 0.5 + top-1":
            json_case(full100, elevated.apply),
        "chat 100 tokens x 5 alts, not narrowed: text only": json_case(full100, text_only.apply),
        "chat 100 tokens x 5 alts: DP noise + quantise 0.1": json_case(full100, noised.apply),
        "chat stream 100 events x 5 alts, not narrowed: quantise + top-1": sse_case(elevated.apply),
        "chat 100 tokens, no reasoning: reasoning shorten (not parsed)":
            trimmed(text100, "shorten"),
        "chat, 2,000 chars of reasoning_content: shorten to 400": trimmed(thought, "shorten"),
        "chat, 2,000 chars of reasoning_content: drop": trimmed(thought, "drop"),
        "chat, a <think> block of 2,000 chars: shorten to 400": trimmed(inline, "shorten"),
        "chat, a Magistral thinking part of 2,000 chars: shorten to 400": trimmed(parts, "shorten"),
        "chat stream 100 reasoning + 100 content events: shorten to 400":
            trimmed_stream("shorten"),
        "OIP 1 x 10: labels only": json_case(oip1, rows("labels_only")),
        "OIP 1 x 10: reverse sigmoid": json_case(oip1, rows("reverse_sigmoid")),
        "OIP 1 x 10: OOD-aware + 2 decimals": json_case(oip1, rows("ood_aware", decimals=2)),
        "OIP 1 x 10: DP noise + top-3": json_case(oip1, rows("exact", noise_scale=0.1, top_k=3)),
        "OIP 32 x 10: reverse sigmoid": json_case(oip32, rows("reverse_sigmoid")),
        "OIP 32 x 10: DP noise + top-3": json_case(oip32, rows("exact", noise_scale=0.1, top_k=3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {name: round(per_call_us(fn), 1) for name, fn in cases().items()}
    if args.json:
        print(json.dumps({"target_us": TARGET_US, "us_per_response": results}, indent=2))
        return
    width = max(map(len, results))
    print(f"{'case':<{width}}  µs/response  (target <= {TARGET_US:.0f})")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:>11.1f}  {'PASS' if us <= TARGET_US else 'over'}")


if __name__ == "__main__":
    main()
