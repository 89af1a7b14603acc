"""A fast fake inference server speaking OpenAI and Open Inference Protocol v2.

It answers instantly with fixed content, so gateway overhead can be measured against it
and gateway behaviour tested without loading a model. Requests can script it through
extra body fields, which the gateway forwards untouched:

- ``"fake_delay": seconds`` — wait before answering (timeouts, concurrency leases);
- ``"fake_status": 500`` — answer with that status;
- ``"fake_chunks": n`` — number of content chunks in a stream (default 5);
- ``"fake_text": "..."`` — the chat answer's content instead of the fixed words; a stream
  cuts it into ``fake_chunks`` equal pieces, mid-word as real streams do;
- ``"fake_chunk_delay": seconds`` — pause between stream chunks;
- ``"fake_probabilities": [p0, p1, ...]`` — the probability row every OIP input gets
  (default ten times 0.1);
- ``"fake_labels_only": true`` — OIP answers carry only each row's label (the argmax).
- ``"fake_nan": true`` — embedding vectors start with ``NaN``, as Python's ``json`` writes
  it (no JSON: what a degenerate model behind a Python server answers); so does the first
  log-probability of a chat answer that has them.
- ``"fake_content_type": "..."`` — a chat answer's content type (whole or streamed)
  instead of JSON's or ``text/event-stream``; ``fake_nan`` answers are always JSON.
- ``"fake_reasoning": "..."`` — a reasoning model's chain of thought: the chat message's
  ``reasoning_content`` (DeepSeek, vLLM's reasoning parsers); a stream sends it in
  ``fake_chunks`` ``reasoning_content`` deltas before the content. With
  ``"fake_thinking_parts": true`` it comes as Mistral's Magistral sends it instead: a
  ``thinking`` part of a content list (``{"type": "thinking", "thinking": [{"type": "text",
  "text": ...}]}``) before the answer's ``text`` part, streamed as one such part per delta.

Chat completions with ``"logprobs": true`` carry fixed log-probabilities, with
``top_logprobs`` alternatives per token; with ``"fake_bom": true`` the answer (whole, or
the stream as its own first chunk) opens with a UTF-8 byte-order mark.

``GET /_stats`` reports how many inference requests arrived, and of the last one the
``x-modelfence-*`` headers (what the gateway told the upstream), the raw path with its
query string, the JSON body and its bytes as they came (``last_raw``, text); ``POST
/_reset`` zeroes it.

    python -m modelfence.testing.fake_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import orjson
from aiohttp import web

_MODELS = ["fake-chat", "fake-embed"]
_WORDS = ["The", " answer", " is", " forty", "-two", ".", " Thanks", " for", " asking", "!"]


def _logprobs(position: int, alternatives: int) -> dict[str, Any]:
    """A fixed, distinct log-probability entry for the token at ``position``."""
    word = _WORDS[position % len(_WORDS)]
    chosen = -0.125 * (position % 4 + 1)
    top = [{"token": word, "logprob": chosen, "bytes": list(word.encode())}]
    top += [{"token": f"alt{j}", "logprob": chosen - 0.75 * j, "bytes": [97]}
            for j in range(1, alternatives)]
    return {"token": word, "logprob": chosen, "bytes": list(word.encode()),
            "top_logprobs": top[:alternatives]}


def _thinking_part(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def _choice_logprobs(body: dict[str, Any], positions: range) -> dict[str, Any] | None:
    if not body.get("logprobs"):
        return None
    alternatives = int(body.get("top_logprobs") or 0)
    return {"content": [_logprobs(i, alternatives) for i in positions], "refusal": None}


_BOM = "\ufeff".encode()  # spelled here, not taken from the gateway it tests


def _json(payload: Any, status: int = 200, opening: bytes = b"",
          content_type: str = "application/json") -> web.Response:
    return web.Response(body=opening + orjson.dumps(payload), status=status,
                        content_type=content_type)


def _python_json(payload: Any) -> web.Response:
    """JSON as Python's ``json`` writes it: ``NaN`` where orjson would write null."""
    return web.Response(body=json.dumps(payload).encode(), content_type="application/json")


class FakeUpstream:
    def __init__(self) -> None:
        self.requests = 0
        self.gateway_headers: dict[str, str] = {}
        self.last_path = ""
        self.last_body: Any = None
        self.last_raw = ""

    async def _body(self, request: web.Request) -> dict[str, Any]:
        self.requests += 1
        self.gateway_headers = {
            k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-modelfence-")
        }
        self.last_path = request.raw_path
        raw = await request.read()
        self.last_raw = raw.decode("utf-8", "replace")
        body = self.last_body = orjson.loads(raw)
        if body.get("fake_delay"):
            await asyncio.sleep(float(body["fake_delay"]))
        return body  # type: ignore[no-any-return]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if body.get("fake_status"):
            return _json({"error": {"message": "scripted failure"}}, body["fake_status"])
        chunks = int(body.get("fake_chunks", 5))
        script = body.get("fake_text")
        if isinstance(script, str):
            pieces = [script[len(script) * i // chunks : len(script) * (i + 1) // chunks]
                      for i in range(chunks)]
        else:
            pieces = [_WORDS[i % len(_WORDS)] for i in range(chunks)]
        text = "".join(pieces)
        reasoning = body.get("fake_reasoning")
        thoughts = [reasoning[len(reasoning) * i // chunks : len(reasoning) * (i + 1) // chunks]
                    for i in range(chunks)] if isinstance(reasoning, str) else []
        usage = {"prompt_tokens": 11, "completion_tokens": chunks, "total_tokens": 11 + chunks}
        created = int(time.time())
        parts = bool(thoughts) and bool(body.get("fake_thinking_parts"))
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if parts:
            message["content"] = [_thinking_part(str(reasoning)), {"type": "text", "text": text}]
        elif thoughts:
            message["reasoning_content"] = reasoning
        bom = _BOM if body.get("fake_bom") else b""
        content_type = body.get("fake_content_type")
        if not body.get("stream"):
            answer = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": created,
                "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": message,
                             "logprobs": _choice_logprobs(body, range(chunks))}],
                "usage": usage,
            }
            logprobs = answer["choices"][0]["logprobs"]
            if body.get("fake_nan") and logprobs:
                logprobs["content"][0]["logprob"] = float("nan")
                return _python_json(answer)
            return _json(answer, opening=bom, content_type=content_type or "application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"content-type": content_type or "text/event-stream"})
        await response.prepare(request)
        if bom:
            await response.write(bom)
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
                "model": body.get("model")}
        delay = float(body.get("fake_chunk_delay", 0))
        for thought in thoughts:
            delta = {"content": [_thinking_part(thought)]} if parts else {"reasoning_content": thought}
            event = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        for i in range(chunks):
            delta = {"content": pieces[i]}
            chunk: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": delta,
                                                          "finish_reason": None}]}
            if body.get("logprobs"):
                chunk["choices"][0]["logprobs"] = _choice_logprobs(body, range(i, i + 1))
            if include_usage:
                chunk["usage"] = None
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if delay:
                await asyncio.sleep(delay)
        if include_usage:
            final = {**base, "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return _json({"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                      "choices": [{"index": 0, "text": " forty-two", "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        first = float("nan") if body.get("fake_nan") else 0.125
        data = [{"object": "embedding", "index": i, "embedding": [first] + [0.125] * 7}
                for i in range(len(inputs))]
        payload = {"object": "list", "data": data, "model": body.get("model"),
                   "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}}
        if body.get("fake_nan"):  # orjson would write null
            return _python_json(payload)
        return _json(payload)

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                  "owned_by": "fake"} for m in _MODELS]})

    async def infer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        shape = body["inputs"][0]["shape"]
        rows = int(shape[0]) if shape else 1
        row = body.get("fake_probabilities") or [0.1] * 10
        if body.get("fake_labels_only"):
            top = max(range(len(row)), key=row.__getitem__)
            return _json({"model_name": request.match_info["name"], "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [rows], "data": [top] * rows}]})
        return _json({"model_name": request.match_info["name"], "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [rows, len(row)],
             "data": row * rows}]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.last_path = request.raw_path
        return _json({"name": name, "platform": "fake",
                      "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                      "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]})

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def stats(self, request: web.Request) -> web.Response:
        return _json({"requests": self.requests, "gateway_headers": self.gateway_headers,
                      "last_path": self.last_path, "last_body": self.last_body,
                      "last_raw": self.last_raw})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests = 0
        self.gateway_headers = {}
        self.last_path, self.last_body, self.last_raw = "", None, ""
        return _json({"requests": 0})


def create_fake_upstream() -> web.Application:
    fake = FakeUpstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(
        [
            web.post("/v1/chat/completions", fake.chat),
            web.post("/v1/completions", fake.completions),
            web.post("/v1/embeddings", fake.embeddings),
            web.get("/v1/models", fake.models),
            web.post("/v2/models/{name}/infer", fake.infer),
            web.get("/v2/models/{name}", fake.model_metadata),
            web.get("/v2/health/ready", fake.ready),
            web.get("/_stats", fake.stats),
            web.post("/_reset", fake.reset),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(create_fake_upstream(), host=args.host, port=args.port, access_log=None,
                print=None, loop=loop)


if __name__ == "__main__":
    main()
