"""Serve a stolen model over the API ``modelfence verify model`` queries, in-process.

A clone trained by the harness lives in the harness's own process; forensics tests it
the way it would test anyone's deployment, over HTTP: a classifier as Open Inference
Protocol v2 (``POST /v2/models/{name}/infer``, a ``probabilities`` tensor), an embedder
as OpenAI ``POST /v1/embeddings``, a chat model as ``POST /v1/chat/completions``. A
stdlib threading server is enough: verification sends a few requests, and the server needs
no event loop beside the caller's.
:func:`verify_model` then runs the real ``modelfence verify model`` command against it.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import numpy as np

from modelfence.testing.processes import modelfence_command

Answer = Callable[[str, dict[str, Any]], dict[str, Any] | None]  # (path, body) -> JSON or 404
Predict = Callable[[np.ndarray], np.ndarray]  # [n, features] -> probabilities [n, classes]
Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> vectors [n, dim]
Reply = Callable[[str, int], str]  # (prompt, max_tokens) -> answer text


class SuspectServer:
    """A JSON-over-HTTP server on a free loopback port, in a daemon thread."""

    def __init__(self, answer: Answer) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                reply = answer(self.path, body)
                raw = json.dumps(reply if reply is not None else {"error": "not found"}).encode()
                self.send_response(200 if reply is not None else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                """Silent: a verification's requests are not worth a log line each."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def classifier_server(predict: Predict, model: str = "digits") -> SuspectServer:
    """``predict`` behind ``/v2/models/{model}/infer`` (one ``[n, features]`` input tensor)."""

    def answer(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if path != f"/v2/models/{model}/infer":
            return None
        tensor = body["inputs"][0]
        probabilities = np.asarray(predict(np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])))
        return {"model_name": model, "outputs": [{
            "name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
            "data": probabilities.ravel().tolist()}]}

    return SuspectServer(answer)


def embeddings_server(embed: Embed) -> SuspectServer:
    """``embed`` behind ``/v1/embeddings`` (``input``: a text or a list of texts)."""

    def answer(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if path != "/v1/embeddings":
            return None
        texts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
        vectors = np.asarray(embed(texts), dtype=np.float64)
        return {"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    return SuspectServer(answer)


def chat_server(reply: Reply) -> SuspectServer:
    """``reply(prompt, max_tokens)`` behind ``/v1/chat/completions`` (the last user message)."""

    def answer(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if path != "/v1/chat/completions":
            return None
        text = reply(str(body["messages"][-1]["content"]), int(body.get("max_tokens") or 128))
        return {"object": "chat.completion", "model": body.get("model"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    return SuspectServer(answer)


def verify_model(config: str, url: str, kind: str, model: str) -> dict[str, Any]:
    """The JSON verdict of ``modelfence --config CONFIG verify model`` on the suspect at ``url``."""
    done = subprocess.run(
        modelfence_command("--config", config, "verify", "model", "--url", url, "--kind", kind,
                           "--model", model),
        capture_output=True, text=True, check=False, timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"verify model failed: {done.stderr.strip()}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]
