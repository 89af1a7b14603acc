"""The demo upstream app in-process (httpx ASGI transport), with the real models.

The models load once per session; every generation is kept to a few tokens because the
CI machine has two shared cores.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from starlette.applications import Starlette

from modelfence.demo.classifier import DigitsClassifier
from modelfence.demo.llm import MODEL_NAME as LLM
from modelfence.demo.llm import SamplingParams, SmolLM
from modelfence.demo.upstream import DemoModels, create_demo_upstream_app

pytestmark = pytest.mark.models

EMBED = "minilm-l6-v2"
HELLO = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    return DemoModels(threads=1)  # CI has two shared cores: one thread per model is fastest


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client for ``app`` in-process; the ASGI transport runs no lifespan, so enter it here."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo", timeout=300) as client,
    ):
        yield client


@pytest.fixture(scope="session")
async def client(demo_models: DemoModels) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_demo_upstream_app(demo_models)) as c:
        yield c


@pytest.fixture(scope="session")
async def llm(client: httpx.AsyncClient, demo_models: DemoModels) -> SmolLM:
    return await demo_models.llm.get()


async def chat(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/chat/completions", json={"model": LLM, "messages": HELLO, **body}
    )
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body; ``[DONE]`` stays a string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


# -- chat --------------------------------------------------------------------------------


async def test_chat_plain_counts_tokens_exactly(client: httpx.AsyncClient, llm: SmolLM) -> None:
    body = await chat(client, max_tokens=6, temperature=0, logprobs=True)
    assert body["object"] == "chat.completion" and body["model"] == LLM
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(llm.encode_chat(HELLO))
    # Every sampled token is counted; the end-of-turn token has no logprobs entry.
    ended = 1 if choice["finish_reason"] == "stop" else 0
    assert usage["completion_tokens"] == len(choice["logprobs"]["content"]) + ended <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    text = "".join(t["token"] for t in choice["logprobs"]["content"])
    assert text == choice["message"]["content"]


async def test_chat_logprobs_are_sorted_log_probabilities(client: httpx.AsyncClient) -> None:
    body = await chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5)
    content = body["choices"][0]["logprobs"]["content"]
    assert content
    for entry in content:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 5
        assert all(lp <= 0 for lp in top) and entry["logprob"] <= 0
        assert top == sorted(top, reverse=True)
        assert sum(math.exp(lp) for lp in top) <= 1 + 1e-5
        # Greedy decoding picks the most likely token.
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert entry["logprob"] == pytest.approx(top[0])
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


async def test_chat_stream_matches_plain_and_ends_with_usage(client: httpx.AsyncClient) -> None:
    plain = await chat(client, max_tokens=4, temperature=0)
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": LLM,
            "messages": HELLO,
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]


async def test_chat_stream_without_usage_option_has_no_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={"model": LLM, "messages": HELLO, "max_tokens": 2, "stream": True, "logprobs": True},
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e and e["choices"] for e in events[:-1])
    logprobs = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"][0]["logprobs"]]
    assert sum(len(lp["content"]) for lp in logprobs) >= 1


async def test_logit_bias_forces_and_bans_tokens(client: httpx.AsyncClient, llm: SmolLM) -> None:
    (forced,) = llm.encode(" banana")
    body = await chat(client, max_tokens=2, logit_bias={str(forced): 100}, logprobs=True)
    tokens = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in tokens] == [" banana"] * 2
    assert all(t["logprob"] > -1e-3 for t in tokens)  # the bias shows in the logprobs

    greedy = await chat(client, max_tokens=1, temperature=0, logprobs=True)
    first = greedy["choices"][0]["logprobs"]["content"][0]["bytes"]
    first_id = llm.encode(bytes(first).decode())[0]
    banned = await chat(
        client, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(first_id): -100}
    )
    assert banned["choices"][0]["logprobs"]["content"][0]["bytes"] != first


async def test_seed_makes_sampling_reproducible(client: httpx.AsyncClient) -> None:
    args = {"max_tokens": 4, "temperature": 1.5, "n": 2}
    first = await chat(client, seed=1234, **args)
    second = await chat(client, seed=1234, **args)
    other = await chat(client, seed=99, **args)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert first["usage"] == second["usage"]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert texts != [c["message"]["content"] for c in other["choices"]]


async def test_stop_string_ends_the_text_before_it(client: httpx.AsyncClient) -> None:
    plain = await chat(client, max_tokens=6, temperature=0)
    text = plain["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 2, text
    stop = " " + words[1]
    stopped = await chat(client, max_tokens=6, temperature=0, stop=[stop])
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


# -- legacy completions ------------------------------------------------------------------


async def test_completions_with_prompt_list_and_logprobs(
    client: httpx.AsyncClient, llm: SmolLM
) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    response = await client.post(
        "/v1/completions",
        json={"model": LLM, "prompt": prompts, "max_tokens": 3, "temperature": 0, "logprobs": 2},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"]
        assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"])
        assert all(
            len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp["top_logprobs"]
        )
        assert lp["text_offset"][0] == len(prompt)
    assert body["usage"]["prompt_tokens"] == sum(len(llm.encode(p)) for p in prompts)


async def test_completions_stream(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions",
        json={
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 3,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 3
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    plain = await client.post(
        "/v1/completions",
        json={"model": LLM, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
    )
    assert text == plain.json()["choices"][0]["text"]


# -- embeddings --------------------------------------------------------------------------


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    texts = [
        "How do I reset my password?",
        "What are the steps to change my password?",
        "The recipe needs two cups of flour.",
    ]
    response = await client.post("/v1/embeddings", json={"model": EMBED, "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == EMBED and body["object"] == "list"
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3

    b64 = await client.post(
        "/v1/embeddings", json={"model": EMBED, "input": texts[0], "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)


# -- Open Inference Protocol v2 -------------------------------------------------------------


async def test_oip_digits_infer(client: httpx.AsyncClient) -> None:
    x, y = DigitsClassifier.dataset()
    x, y = x[-40:], y[-40:]
    request: dict[str, Any] = {
        "id": "req-1",
        "inputs": [{"name": "input", "shape": [40, 64], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "probabilities"}, {"name": "label"}],
    }
    response = await client.post("/v2/models/digits/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "digits" and body["id"] == "req-1"
    proba_out, label_out = body["outputs"]
    assert proba_out["name"] == "probabilities" and proba_out["datatype"] == "FP32"
    assert proba_out["shape"] == [40, 10]
    proba = np.array(proba_out["data"]).reshape(40, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert label_out == {
        "name": "label",
        "shape": [40],
        "datatype": "INT64",
        "data": proba.argmax(axis=1).tolist(),
    }
    assert (proba.argmax(axis=1) == y).mean() >= 0.9

    flat = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32"}]}
    flat["inputs"][0]["data"] = x[:2].ravel().tolist()
    response = await client.post("/v2/models/digits/infer", json=flat)
    (only,) = response.json()["outputs"]  # probabilities by default
    np.testing.assert_allclose(np.array(only["data"]).reshape(2, 10), proba[:2], atol=1e-6)


async def test_oip_metadata_and_health(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/digits")).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "label"}
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/v2/models/digits/ready")).status_code == 200
    assert (await client.get("/v2/models/digits/versions/1")).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": []}, "one tensor"),
        (
            {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
            "input",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]},
            "shape",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["a"]}]},
            "datatype",
        ),
        (
            {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 64}]},
            "needs 128",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["x"] * 64}
                ]
            },
            "numbers",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ],
                "outputs": [{"name": "logits"}],
            },
            "outputs",
        ),
    ],
    ids=[
        "no-input",
        "wrong-name",
        "wrong-shape",
        "bytes",
        "size-mismatch",
        "strings",
        "bad-output",
    ],
)
async def test_oip_rejects_bad_requests(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    response = await client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_oip_unknown_model_and_bad_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/cats/infer", json={"inputs": []})
    assert response.status_code == 404 and "not found" in response.json()["error"]
    response = await client.post("/v2/models/digits/infer", content=b"[1, 2")
    assert response.status_code == 400 and isinstance(response.json()["error"], str)


# -- OpenAI-style errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", b"[]", 400, "invalid_json"),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": HELLO}, 404, "model_not_found"),
        ("/v1/chat/completions", {"messages": HELLO}, 400, "missing_required_parameter"),
        ("/v1/chat/completions", {"model": LLM, "messages": []}, 400, "invalid_value"),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": [{"role": "x", "content": ""}]},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "temperature": "hot"},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "max_tokens": True},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "top_logprobs": 3},
            400,
            "invalid_value",
        ),
        ("/v1/chat/completions", {"model": LLM, "messages": HELLO, "n": 50}, 400, "invalid_value"),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "logit_bias": {"x": 1}},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "logit_bias": {"99999999": 1}},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "stream_options": {"include_usage": True}},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "max_tokens": 10**6},
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            {"model": LLM, "messages": HELLO, "tools": [{}]},
            400,
            "unsupported_parameter",
        ),
        (
            "/v1/completions",
            {"model": LLM, "prompt": "hi", "echo": True},
            400,
            "unsupported_parameter",
        ),
        ("/v1/completions", {"model": LLM, "prompt": 42}, 400, "invalid_value"),
        ("/v1/completions", {"model": LLM, "prompt": "hi", "logprobs": 99}, 400, "invalid_value"),
        ("/v1/embeddings", {"model": EMBED, "input": []}, 400, "invalid_value"),
        ("/v1/embeddings", {"model": EMBED, "input": [1, 2, 3]}, 400, "invalid_value"),
        (
            "/v1/embeddings",
            {"model": EMBED, "input": "x", "encoding_format": "hex"},
            400,
            "invalid_value",
        ),
        ("/v1/embeddings", {"model": LLM, "input": "x"}, 404, "model_not_found"),
    ],
)
async def test_openai_errors(
    client: httpx.AsyncClient, path: str, body: Any, status: int, code: str
) -> None:
    if isinstance(body, bytes):
        response = await client.post(path, content=body)
    else:
        response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["type"] == "invalid_request_error"


async def test_models_list_and_unknown_routes(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {LLM, EMBED}
    assert (await client.get(f"/v1/models/{EMBED}")).json()["id"] == EMBED
    missing = await client.get("/v1/models/gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert (await client.get("/v1/nothing")).json()["error"]["code"] == "not_found"
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_healthz_reports_loaded_models(client: httpx.AsyncClient, llm: SmolLM) -> None:
    response = await client.get("/healthz?ready=all")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ready"
    assert set(report["models"]) == {LLM, EMBED, "digits"}
    assert report["models"]["digits"]["test_accuracy"] > 0.95
    assert (await client.get("/healthz?ready=nope")).status_code == 400


# -- loading failures and the watermark hook -------------------------------------------------


async def test_failed_model_answers_503_with_reason() -> None:
    def broken() -> Any:
        raise FileNotFoundError("no weights here")

    models = DemoModels(llm_loader=broken, embedder_loader=broken, classifier_loader=broken)
    async with serve(create_demo_upstream_app(models)) as c:
        response = await c.post("/v1/chat/completions", json={"model": LLM, "messages": HELLO})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        assert "no weights here" in response.json()["error"]["message"]
        response = await c.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ]
            },
        )
        assert response.status_code == 503 and "no weights here" in response.json()["error"]
        health = await c.get("/healthz?ready=all")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        # Bad parameters are still reported as such while the model is missing.
        response = await c.post(
            "/v1/chat/completions", json={"model": LLM, "messages": HELLO, "temperature": 9}
        )
        assert response.status_code == 400


async def test_logits_processor_hook_marks_at_the_source(
    demo_models: DemoModels, llm: SmolLM
) -> None:
    (marked,) = llm.encode(" zebra")
    seen: list[tuple[int, ...]] = []

    def processor_for(headers: Any) -> Any:
        if headers.get("x-modelfence-client") != "alice":
            return None

        def force(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(input_ids.shape))
            scores[:, marked] += 1000.0
            return scores

        return force

    shared = DemoModels(
        llm_loader=lambda: llm,
        embedder_loader=lambda: None,  # type: ignore[arg-type,return-value]
        classifier_loader=lambda: None,  # type: ignore[arg-type,return-value]
    )
    async with serve(create_demo_upstream_app(shared, logits_processor_for=processor_for)) as c:
        body = {"model": LLM, "messages": HELLO, "max_tokens": 2}
        alice = await c.post(
            "/v1/chat/completions", json=body, headers={"x-modelfence-client": "alice"}
        )
        assert alice.json()["choices"][0]["message"]["content"] == " zebra zebra"
        prompt_len = alice.json()["usage"]["prompt_tokens"]
        assert seen == [(1, prompt_len), (1, prompt_len + 1)]
        bob = await c.post(
            "/v1/chat/completions", json=body, headers={"x-modelfence-client": "bob"}
        )
        assert "zebra" not in bob.json()["choices"][0]["message"]["content"]


# -- the LLM's public helpers (logit-leak red-teaming uses them) --------------------------------


async def test_next_token_logprobs_match_the_sampler(llm: SmolLM) -> None:
    prompt = llm.encode_chat(HELLO)
    logprobs = llm.next_token_logprobs(prompt)
    assert logprobs.shape == (llm.vocab_size,) == (49152,) and logprobs.dtype == np.float32
    assert math.isclose(float(np.exp(logprobs.astype(np.float64)).sum()), 1.0, rel_tol=1e-4)
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=True))
    first = out.choices[0].logprobs[0]  # type: ignore[index]
    assert first.token_id == int(logprobs.argmax())
    assert first.logprob == pytest.approx(float(logprobs.max()), abs=1e-4)
    # logit_bias moves exactly the biased logit.
    raw = llm.next_token_logits(prompt)
    biased = llm.next_token_logits(prompt, logit_bias={7: 5.0})
    assert biased[7] == pytest.approx(raw[7] + 5.0, abs=1e-4)
    np.testing.assert_array_equal(np.delete(biased, 7), np.delete(raw, 7))


async def test_cancel_stops_a_stream(llm: SmolLM) -> None:
    import threading

    cancel = threading.Event()
    prompt = llm.encode_chat(HELLO)
    events = []
    for event in llm.stream(prompt, SamplingParams(max_tokens=8, temperature=0), cancel=cancel):
        events.append(event)
        cancel.set()
    assert len(events) == 1 and events[0].finish_reason is None


async def test_a_client_that_leaves_frees_the_llm(llm: SmolLM) -> None:
    from starlette.requests import Request

    from modelfence.demo.upstream import _ClientGone, _Workers

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    workers = _Workers()
    prompt = llm.encode_chat(HELLO)
    try:
        with pytest.raises(_ClientGone):
            await workers.generate(request, llm, prompt, SamplingParams(max_tokens=200), None)
        assert not workers.cancels
        # The abandoned generation stops at its next token, so the next one starts at once.
        follow_up = workers.llm.submit(lambda: llm.generate(prompt, SamplingParams(max_tokens=1)))
        assert follow_up.result(timeout=60).completion_tokens == 1
    finally:
        workers.close()
