"""Building request events: what the gateway records, off the request path."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from modelfence.errors import PermissionDenied
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.telemetry import (
    EmitEvents,
    classifier_output,
    input_rows_of,
    input_texts_of,
    prompt_hash,
    prompt_of,
)
from modelfence.identity.base import ApiKeyRecord
from modelfence.telemetry.pipeline import EventSource
from modelfence.types import Message, Receive, Scope, Send

KEY = ApiKeyRecord("key_1", "acme", "default", "mf_x", datetime.now(UTC))
HASH_KEY = b"k" * 32


def test_the_prompt_is_the_last_user_turn_and_turns_are_counted() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "second"}, {"type": "image_url"}],
            },
        ]
    }
    assert prompt_of("/v1/chat/completions", body) == ("second", 4)
    assert prompt_of("/v1/completions", {"prompt": ["a", "b"]}) == ("a", 0)
    assert prompt_of("/v1/embeddings", {"input": "text"}) == ("text", 0)


def test_prompt_hashes_are_keyed_and_normalised() -> None:
    assert prompt_hash("Hello   World", HASH_KEY) == prompt_hash("hello world", HASH_KEY)
    assert prompt_hash("hello world", HASH_KEY) != prompt_hash("hello world", b"j" * 32)


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ([{"name": "p", "data": [0.1, 0.7, 0.2]}], (1, [pytest.approx(0.5)])),
        # a batch of two rows: one margin per row, the label of the first
        ([{"name": "p", "shape": [2, 3], "data": [0.1, 0.7, 0.2, 0.3, 0.3, 0.4]}],
         (1, [pytest.approx(0.5), pytest.approx(0.1)])),
        ([{"name": "label", "data": [3]}], (3, None)),
        ("garbage", (None, None)),
    ],
)
def test_classifier_outputs_give_label_and_margin(outputs: Any, expected: tuple[Any, Any]) -> None:
    assert classifier_output(orjson.dumps({"outputs": outputs})) == expected


async def test_every_authenticated_request_emits_one_event_even_when_refused() -> None:
    emitted: list[EventSource] = []

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY].key = KEY
        raise PermissionDenied("no", code="client_blocked")

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY].key = KEY
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(_message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    for app, status in ((refuse, 403), (answer, 200)):
        ctx = RequestContext(route="/v1/chat/completions", started=0.0, request_id="r1")
        ctx.body = {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"1": 5},
            "max_tokens": 9,
        }
        stage = EmitEvents(app, emit=lambda e: emitted.append(e) or True, hash_key=HASH_KEY)
        try:
            await stage({"type": "http", SCOPE_KEY: ctx}, receive, send)
        except PermissionDenied:
            pass
        build = emitted[-1]
        assert callable(build)
        event = build()
        assert (event.status, event.client, event.prompt_text, event.turns) == (
            status,
            "acme",
            "hi",
            1,
        )
        assert (
            event.temperature,
            event.logprobs,
            event.top_logprobs,
            event.logit_bias_size,
            event.max_tokens,
        ) == (0.0, True, 3, 1, 9)
    assert len(emitted) == 2


def test_a_classifier_batch_is_one_row_per_input() -> None:
    body = {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    assert input_rows_of(body) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    nested = {"inputs": [{"name": "x", "data": [[1, 2], [3, 4]]}]}  # no shape: one input
    assert input_rows_of(nested) == [[1.0, 2.0, 3.0, 4.0]]
    assert input_rows_of({"inputs": [{"name": "x", "data": "nope"}]}) is None


def test_an_embeddings_batch_is_one_query_per_text() -> None:
    assert input_texts_of({"input": ["a", "b", 3, "c" * 600]}) == ["a", "b", "c" * 512]
    assert input_texts_of({"input": "one text"}) is None  # prompt_text carries it
