"""Building request events: what the gateway records, off the request path."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pytest

from modelfence.detect.features import query_count
from modelfence.errors import PermissionDenied
from modelfence.gateway.apis import ParsedRequest
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.telemetry import (
    MAX_INPUT_VALUES,
    MAX_PROMPT_CHARS,
    EmitEvents,
    build_event,
    classifier_output,
    event_draft,
    first_tensor,
    input_rows_of,
    input_texts_of,
    prompt_hash,
    prompt_of,
)
from modelfence.identity.base import ApiKeyRecord
from modelfence.operations import Operation
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.pipeline import EventPipeline, EventSource, PipelineSettings
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
    assert prompt_of(Operation.CHAT, body) == ("second", 4)
    assert prompt_of(Operation.COMPLETIONS, {"prompt": ["a", "b"]}) == ("a", 0)
    assert prompt_of(Operation.EMBEDDINGS, {"input": "text"}) == ("text", 0)


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
    assert input_rows_of(*first_tensor(body)) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    nested = {"inputs": [{"name": "x", "data": [[1, 2], [3, 4]]}]}  # no shape: one input
    assert input_rows_of(*first_tensor(nested)) == [[1.0, 2.0, 3.0, 4.0]]
    assert input_rows_of(*first_tensor({"inputs": [{"name": "x", "data": "nope"}]})) is None
    assert first_tensor({"inputs": {"x": 1}}) == (None, None)


@pytest.mark.parametrize(
    "data, shape",
    [
        ([0.25, 1, -3.5, 2**70, 0.0, 7], [3, 2]),  # the fast path: plain numbers
        ([0.25, True, -3.5, 2, 0.0, 7], [3, 2]),  # a bool is skipped, not read as 1.0
        ([0.5, "x", 1.0, 2.0, 3.0], [2, 2]),  # so is a string
        ([[1, 2], [3, 4], [5, 6]], [3, 2]),  # nested rows
        ([1.0, 2.0, 3.0], [2, 2]),  # fewer values than one row
        ([1.0, 2.0, 3.0, 4.0, 5.0], [2, 2]),  # a partial last row is dropped
        ([0.5] * (MAX_INPUT_VALUES + 64), [MAX_INPUT_VALUES // 64 + 1, 64]),  # capped
    ],
)
def test_input_rows_read_every_tensor_as_the_plain_walk_does(data: list[Any], shape: list[int]) -> None:
    # The plain walk (no shape, one row) cut into rows by hand is the reference.
    flat = [float(v) for v in _walk(data) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    flat = flat[: min(len(flat), MAX_INPUT_VALUES)]
    width = int(np.prod(shape[1:]))
    expected = [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)] or None
    rows = input_rows_of(*first_tensor({"inputs": [{"name": "x", "shape": shape, "data": data}]}))
    assert rows == expected
    assert rows is None or all(type(v) is float for row in rows for v in row)


def _walk(data: Any) -> list[Any]:
    return [x for item in data for x in (_walk(item) if isinstance(item, list) else [item])]


def test_an_event_counts_every_input_beyond_the_vectors_it_keeps() -> None:
    rows = 300  # more than the 256 rows of vectors an event keeps
    body = {"inputs": [{"name": "x", "shape": [rows, 64], "datatype": "FP32", "data": [0.5] * (rows * 64)}]}
    ctx = RequestContext(route=Operation.OIP_INFER.route, started=0.0, request_id="r", key=KEY,
                         body=body, raw_body=orjson.dumps(body), model="digits",
                         parsed=ParsedRequest(Operation.OIP_INFER, "digits", prompt_tokens=rows, inputs=rows))
    event = build_event(ctx, 200, 1.0, 0.01, HASH_KEY, None)
    assert len(event.input_rows or []) == 256 and event.input_count == rows
    assert query_count(event) == rows  # detection and budgets count all of them


def test_an_embeddings_batch_is_one_query_per_text() -> None:
    assert input_texts_of({"input": ["a", "b", 3, "c" * 600]}) == ["a", "b", "c" * 512]
    assert input_texts_of({"input": "one text"}) is None  # prompt_text carries it


async def _finish(stage: EmitEvents, ctx: RequestContext) -> None:
    async def send(_message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    await stage({"type": "http", SCOPE_KEY: ctx}, receive, send)


def _big_request(i: int, route: str = "/v1/chat/completions") -> RequestContext:
    ctx = RequestContext(route=route, started=0.0, request_id=f"r{i}", key=KEY)
    history = [{"role": "user", "content": "y" * 2**19 + str(i)}, {"role": "assistant", "content": "ok"}]
    ctx.body = {"messages": [*history, {"role": "user", "content": "x" * 2**19 + str(i)}]}
    ctx.raw_body = b"z" * 2**20
    return ctx


async def test_queued_events_hold_a_slim_snapshot_and_the_queue_is_bounded_by_bytes() -> None:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    pipeline = EventPipeline([], settings=PipelineSettings(queue_bytes=8 * 2**20))
    stage = EmitEvents(answer, emit=pipeline.emit, hash_key=HASH_KEY)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):  # 1 MiB requests; the pipeline is not started: nothing drains
            await _finish(stage, _big_request(i))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = pipeline.stats
    assert stats["dropped_queue_bytes"] > 0  # counted, not silent
    assert stats["emitted"] + stats["dropped_queue_bytes"] == 40
    assert pipeline.queued_bytes() <= 8 * 2**20
    # Only the last user turn is kept (about 0.5 MiB each), never the whole body.
    assert held <= 10 * 2**20
    await pipeline.start()  # what was queued still becomes complete events
    await pipeline.stop()


async def test_events_are_built_off_the_event_loop_and_unchanged() -> None:
    class Keep:
        name = "keep"

        def __init__(self) -> None:
            self.events: list[RequestEvent] = []

        async def write(self, events: Sequence[RequestEvent]) -> None:
            self.events += events

        async def close(self) -> None:
            return None

    threads: list[str] = []
    ctx = _big_request(1)
    expected = build_event(ctx, 200, 5.0, 0.0, HASH_KEY, None)
    draft = event_draft(ctx, 200, 5.0, 0.0, HASH_KEY, None)

    def build() -> RequestEvent:
        threads.append(threading.current_thread().name)
        return draft()

    sink = Keep()
    pipeline = EventPipeline([sink])
    await pipeline.start()
    pipeline.emit(build)
    assert await pipeline.flush(5)
    await pipeline.stop()
    assert threads and threads[0] != threading.main_thread().name
    (event,) = sink.events
    assert event.prompt_hash == expected.prompt_hash and event.prompt_len == 2**19 + 1
    assert event.prompt_text == ("x" * 2**19 + "1")[:MAX_PROMPT_CHARS] and event.turns == 3


def test_a_chats_frame_is_its_system_messages_else_the_user_turns_opening() -> None:
    from modelfence.gateway.telemetry import frame_of
    from modelfence.operations import Operation

    def chat(*messages: tuple[str, str]) -> dict[str, object]:
        return {"messages": [{"role": role, "content": text} for role, text in messages]}

    framed = [
        frame_of(Operation.CHAT, chat(("system", "Explain step by step."), ("user", task)))
        for task in ("Why is the sky blue?", "How do tides work?")
    ]
    assert framed[0] == framed[1] == "system\x00Explain step by step."
    assert frame_of(Operation.CHAT, chat(("user", "What is  the capital of Peru?"))) == (
        "user\x00What is the"
    )
    assert frame_of(Operation.CHAT, chat(("system", " "), ("user", ""))) == ""
    assert frame_of(Operation.EMBEDDINGS, {"input": ["x"]}) == ""


def test_chain_of_thought_asked_for_in_the_system_message_is_seen() -> None:
    from modelfence.detect.detectors.harvesting import _SIGNALS
    from modelfence.gateway.context import RequestContext
    from modelfence.gateway.telemetry import build_event
    from modelfence.identity.base import ApiKeyRecord

    cot = _SIGNALS["chain-of-thought elicited"][1]
    body = {"model": "m", "messages": [
        {"role": "system", "content": "Work through the problem in numbered steps."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]}
    ctx = RequestContext(route="/v1/chat/completions", started=0.0, request_id="r",
                         key=ApiKeyRecord("key_1", "c", "default", "mf_x", datetime.now(UTC)),
                         body=body, model="m")
    event = build_event(ctx, 200, 0.0, 0.0, b"k" * 16, None)
    assert event.cot and cot(event)
    plain = build_event(
        RequestContext(route="/v1/chat/completions", started=0.0, request_id="r",
                       key=ctx.key, body={"messages": body["messages"][1:]}, model="m"),
        200, 0.0, 0.0, b"k" * 16, None,
    )
    assert not plain.cot and not cot(plain)
