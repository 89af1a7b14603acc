"""Request policy and output hardening through a real ``modelfence serve`` on the fake upstream."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from modelfence.policy.reasoning import SHORTENED
from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json

from .conftest import ADMIN_TOKEN, _merge, base_config
from .services import metric_sum, scrape_metrics

CHAT = "/v1/chat/completions"
INFER = "/v2/models/digits-fake/infer"
ROW = [0.02, 0.6, 0.2, 0.1, 0.08]


def post(url: str, path: str, key: str, body: dict[str, Any]) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=orjson.dumps(body),
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def infer(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": [0.0] * 128}], "fake_probabilities": ROW, **extra}


def pin(gateway: GatewayProcess, client: str, level: str | None) -> None:
    if level is None:
        status, _ = http_json("DELETE", f"{gateway.url}/admin/v1/risk/{client}", token=ADMIN_TOKEN)
    else:
        status, _ = http_json("PUT", f"{gateway.url}/admin/v1/risk/{client}", {"level": level},
                              token=ADMIN_TOKEN)
    assert status == 200


def upstream_requests(upstream: ServiceProcess) -> int:
    return int(http_json("GET", upstream.url + "/_stats")[1]["requests"])


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("policy")
    config = _merge(base_config(fake_upstream.url, workdir), {
        "limits": {"tiers": {"strip": {}, "labels": {}, "small-batches": {}}},
        "policy": {"tiers": {
            "strip": {"request": {"logit_bias_with_logprobs": "strip_logprobs"}},
            "labels": {"request": {"oip_outputs": ["label"]}},
            "small-batches": {"request": {"max_inputs": 4}},
        }},
    })
    with GatewayProcess(config, workdir) as proc:
        yield proc


def test_carlini_combination_is_refused_before_the_upstream(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    key = gateway.create_key("prober")
    before = upstream_requests(fake_upstream)
    status, body = post(gateway.url, CHAT, key, chat(logprobs=True, top_logprobs=5,
                                                     logit_bias={"1234": 100}))
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "policy_violation"
    assert error["param"] == "logit_bias" and "'logprobs'" in error["message"]
    status, body = post(gateway.url, CHAT, key, chat(logprobs=True, top_logprobs=20))
    error = orjson.loads(body)["error"]
    assert status == 400 and error["param"] == "top_logprobs" and "most allowed is 5" in error["message"]
    assert upstream_requests(fake_upstream) == before


def test_strip_logprobs_tier_gets_text_without_logprobs(gateway: GatewayProcess) -> None:
    key = gateway.create_key("stripper", tier="strip")
    status, body = post(gateway.url, CHAT, key, chat(logprobs=True, top_logprobs=3,
                                                     logit_bias={"1": 5}))
    assert status == 200
    choice = orjson.loads(body)["choices"][0]
    assert choice["message"]["content"] and choice["logprobs"] is None


def test_oip_output_controls(gateway: GatewayProcess) -> None:
    key = gateway.create_key("labels-client", tier="labels")
    status, body = post(gateway.url, INFER, key, infer(outputs=[{"name": "probabilities"}]))
    assert status == 400 and orjson.loads(body)["error"]["param"] == "outputs"
    status, body = post(gateway.url, INFER, key, infer())
    assert status == 200 and orjson.loads(body)["outputs"] == []  # probabilities withheld


def test_a_batch_over_the_tiers_cap_is_refused_before_anything_is_answered(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    key = gateway.create_key("batcher", tier="small-batches")
    before = upstream_requests(fake_upstream)
    rows = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 64], "data": [0.0] * 320}],
            "fake_probabilities": ROW}
    status, body = post(gateway.url, INFER, key, rows)
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == "policy_violation" and error["param"] == "inputs"
    assert "5 rows" in error["message"] and "most allowed in one request is 4" in error["message"]
    texts = {"model": "fake-embed", "input": ["a", "b", "c", "d", "e"]}
    status, body = post(gateway.url, "/v1/embeddings", key, texts)
    assert status == 400 and orjson.loads(body)["error"]["param"] == "input"
    assert upstream_requests(fake_upstream) == before
    status, _ = post(gateway.url, INFER, key, infer())  # two rows: within the cap
    assert status == 200


def test_binary_outputs_are_refused_before_the_upstream_answers(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    """Triton would answer binary tensors (or class strings) that no stage can harden."""
    key = gateway.create_key("binary")
    before = upstream_requests(fake_upstream)
    status, body = post(gateway.url, INFER, key, infer(parameters={"binary_data_output": True}))
    assert status == 400 and orjson.loads(body)["error"]["param"] == "parameters"
    asked = [{"name": "probabilities", "parameters": {"classification": 3}}]
    status, body = post(gateway.url, INFER, key, infer(outputs=asked))
    assert status == 400 and orjson.loads(body)["error"]["param"] == "outputs"
    assert upstream_requests(fake_upstream) == before
    # A repeated key: orjson reads the last copy, Triton the first. The upstream gets the
    # body the gateway read, so the first copy never reaches it.
    tensor = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,2],"data":[0,0]}],'

    def post_raw(raw: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=10)
        try:
            conn.request("POST", INFER, raw, {"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, _ = post_raw(tensor + b'"parameters":{"binary_data_output":true,"binary_data_output":false}}')
    assert status == 200
    forwarded = http_json("GET", fake_upstream.url + "/_stats")[1]["last_raw"]
    assert forwarded.count("binary_data_output") == 1 and '"binary_data_output":false' in forwarded
    # A body nested deeper than the gateway can write again is refused, not a 500.
    status, body = post_raw(tensor + b'"parameters":{"custom":' + b"[" * 300 + b"]" * 300 + b"}}")
    assert status == 400 and b"nested deeper" in body


def test_normal_risk_answers_are_byte_identical(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    key = gateway.create_key("benign")
    direct = post(fake_upstream.url, INFER, "-", infer())
    assert post(gateway.url, INFER, key, infer()) == direct


def test_risk_level_changes_apply_to_the_next_request(gateway: GatewayProcess) -> None:
    key = gateway.create_key("suspect")
    request = chat(logprobs=True, top_logprobs=3, fake_chunks=4)
    exact = orjson.loads(post(gateway.url, CHAT, key, request)[1])["choices"][0]["logprobs"]
    assert [t["logprob"] for t in exact["content"]] == [-0.125, -0.25, -0.375, -0.5]

    pin(gateway, "suspect", "elevated")
    elevated = orjson.loads(post(gateway.url, CHAT, key, request)[1])["choices"][0]["logprobs"]
    assert [t["logprob"] for t in elevated["content"]] == [0.0, 0.0, -0.5, -0.5]
    assert all(len(t["top_logprobs"]) == 1 for t in elevated["content"])
    stream = post(gateway.url, CHAT, key, {**request, "stream": True})[1]
    events = [orjson.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["choices"][0]["logprobs"]["content"][0]["logprob"] for e in events] == [
        0.0, 0.0, -0.5, -0.5
    ]
    assert stream.endswith(b"data: [DONE]\n\n")
    # An upstream whose answers open with a byte-order mark (JSON readers skip it) gets no
    # pass: the gateway drops the mark and hardens the answer, whole and streamed.
    marked = {**request, "fake_bom": True}
    whole = post(gateway.url, CHAT, key, marked)[1]
    assert [t["logprob"] for t in orjson.loads(whole)["choices"][0]["logprobs"]["content"]] == [
        0.0, 0.0, -0.5, -0.5]
    stream = post(gateway.url, CHAT, key, {**marked, "stream": True})[1]
    events = [orjson.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["choices"][0]["logprobs"]["content"][0]["logprob"] for e in events] == [
        0.0, 0.0, -0.5, -0.5
    ]
    probabilities = orjson.loads(post(gateway.url, INFER, key, infer())[1])["outputs"][0]["data"]
    assert probabilities[:5] != ROW and probabilities[:5] == probabilities[5:]
    # An answer the stage cannot read goes on as it came, and is counted: never silently.
    before = scrape_metrics(gateway.url)
    status, body = post(gateway.url, CHAT, key, {**request, "fake_nan": True})
    assert status == 200 and b"NaN" in body  # orjson refuses NaN; Python's json writes it
    status, body = post(gateway.url, CHAT, key, {**request, "fake_content_type": "text/plain"})
    unread = orjson.loads(body)["choices"][0]["logprobs"]["content"]
    assert status == 200 and [t["logprob"] for t in unread] == [-0.125, -0.25, -0.375, -0.5]
    # Media types ignore case: an upstream's Application/JSON answer is hardened, and its
    # Text/Event-Stream stream too (and settled: the proxy reads it as a stream).
    status, body = post(gateway.url, CHAT, key, {**request, "fake_content_type": "Application/JSON"})
    hardened = orjson.loads(body)["choices"][0]["logprobs"]["content"]
    assert status == 200 and [t["logprob"] for t in hardened] == [0.0, 0.0, -0.5, -0.5]
    streamed = {**request, "stream": True, "fake_content_type": "Text/Event-Stream"}
    stream = post(gateway.url, CHAT, key, streamed)[1]
    events = [orjson.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["choices"][0]["logprobs"]["content"][0]["logprob"] for e in events] == [
        0.0, 0.0, -0.5, -0.5
    ]
    after = scrape_metrics(gateway.url)
    for reason in ("not_json", "content_type"):
        counted = [metric_sum(m, "modelfence_answers_unread_total", stage="hardening", reason=reason)
                   for m in (before, after)]
        assert counted[1] - counted[0] == 1, reason

    pin(gateway, "suspect", "high")
    assert orjson.loads(post(gateway.url, CHAT, key, request)[1])["choices"][0]["logprobs"] is None
    probabilities = orjson.loads(post(gateway.url, INFER, key, infer())[1])["outputs"][0]["data"]
    assert probabilities[:5] == [0.0, 1.0, 0.0, 0.0, 0.0]

    pin(gateway, "suspect", None)
    again = orjson.loads(post(gateway.url, CHAT, key, request)[1])["choices"][0]["logprobs"]
    assert again == exact


def test_reasoning_is_graded_by_risk_through_the_openai_client(
    gateway: GatewayProcess, request: pytest.FixtureRequest
) -> None:
    thought = "Six sevens: 7, 14, 21, 28, 35, 42. " * 20  # 700 characters
    key = gateway.create_key("thinker")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)
    request.addfinalizer(client.close)
    ask = {"model": "fake-chat", "messages": [{"role": "user", "content": "6 x 7?"}],
           "extra_body": {"fake_reasoning": thought, "fake_text": "42"}}

    def answer() -> tuple[str | None, str | None]:
        message = client.chat.completions.create(**ask).choices[0].message
        return (message.model_extra or {}).get("reasoning_content"), message.content

    def streamed() -> tuple[str, str]:
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(**ask, stream=True):
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
        return reasoning, content

    assert answer() == (thought, "42") and streamed() == (thought, "42")
    pin(gateway, "thinker", "elevated")  # the default: 400 characters
    assert answer() == (thought[:400] + SHORTENED, "42")
    assert streamed() == (thought[:400] + SHORTENED, "42")
    # Logprobs would spell the reasoning out again: they go with it.
    hardened = client.chat.completions.create(**ask, logprobs=True).choices[0]
    assert hardened.logprobs is None and hardened.message.content == "42"
    # A <think> block in the content, its closing tag cut off: the stream (whose upstream
    # sends no event with a finish_reason) ends with what was held back, as the whole has it.
    ask["extra_body"] = {"fake_text": "<think>abc</th"}
    assert answer()[1] == streamed()[1] == "<think>abc</th"
    pin(gateway, "thinker", "high")  # the default: none
    assert answer()[1] == streamed()[1] == ""
    ask["extra_body"] = {"fake_reasoning": thought, "fake_text": "42"}
    assert answer() == (None, "42") and streamed() == ("", "42")
    pin(gateway, "thinker", None)
    assert answer() == (thought, "42")


def thinking_texts(contents: list[Any]) -> str:
    """The text of the thinking parts of Magistral content lists."""
    return "".join(chunk["text"] for content in contents for part in content
                   if part["type"] == "thinking" for chunk in part["thinking"])


def test_magistral_thinking_parts_and_think_tags_are_graded(gateway: GatewayProcess) -> None:
    thought = "Six sevens: 7, 14, 21, 28, 35, 42. " * 20  # 700 characters
    key = gateway.create_key("magistral")
    body = chat(fake_reasoning=thought, fake_thinking_parts=True, fake_text="42")

    def answers() -> tuple[Any, Any]:
        whole = orjson.loads(post(gateway.url, CHAT, key, body)[1])["choices"][0]["message"]["content"]
        raw = post(gateway.url, CHAT, key, {**body, "stream": True})[1]
        deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in raw.split(b"\n\n")
                  if e.startswith(b"data: {")]
        return whole, [d["content"] for d in deltas]

    whole, streamed = answers()
    assert thinking_texts([whole]) == thinking_texts(streamed[:-5]) == thought
    pin(gateway, "magistral", "elevated")
    whole, streamed = answers()
    assert whole[1] == {"type": "text", "text": "42"} and "".join(streamed[-5:]) == "42"
    assert thinking_texts([whole]) == thinking_texts(streamed[:-5]) == thought[:400] + SHORTENED
    pin(gateway, "magistral", "high")
    whole, streamed = answers()
    assert whole == [{"type": "text", "text": "42"}] and not any(streamed[:-5])
    body = chat(fake_text="[THINK]6 x 7 = 42.[/THINK]\n\n42", fake_chunks=6)
    whole, streamed = answers()
    assert whole == "".join(streamed) == "\n\n42"
    pin(gateway, "magistral", None)


def test_an_upstream_whose_template_opens_think_has_its_reasoning_cut(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> None:
    """``think_opened_in_prompt``: the answer starts inside the reasoning, and a lone
    ``</think>`` ends it (an upstream without the flag passes such an answer whole)."""
    workdir = tmp_path_factory.mktemp("think-opened")
    config = base_config(fake_upstream.url, workdir)
    config["upstreams"][0]["think_opened_in_prompt"] = True
    with GatewayProcess(config, workdir) as proc:
        key = proc.create_key("thinker")
        pin(proc, "thinker", "high")
        body = chat(fake_text="Let me think. 6 x 7 = 42.</think>\n\n42", fake_chunks=6)
        status, raw = post(proc.url, CHAT, key, body)
        assert status == 200 and orjson.loads(raw)["choices"][0]["message"]["content"] == "\n\n42"
        streamed = post(proc.url, CHAT, key, {**body, "stream": True})[1]
        events = [orjson.loads(e[6:]) for e in streamed.split(b"\n\n") if e.startswith(b"data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "\n\n42"


def test_admin_shows_the_effective_policy(gateway: GatewayProcess) -> None:
    status, body = http_json("GET", gateway.url + "/admin/v1/policy", token=ADMIN_TOKEN)
    assert status == 200
    assert body["tiers"]["strip"]["request"]["logit_bias_with_logprobs"] == "strip_logprobs"
    assert body["tiers"]["default"]["hardening"]["high"]["text_only"] is True
    status, body = http_json("PUT", gateway.url + "/admin/v1/risk/x", {"level": "extreme"},
                             token=ADMIN_TOKEN)
    assert status == 422
