"""``modelfence demo-upstream``: real local models behind the APIs the gateway protects.

One Starlette app serves

- OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (both also as SSE
  streams), ``/v1/embeddings`` and ``/v1/models``, backed by SmolLM2-135M-Instruct
  (:mod:`.llm`) and MiniLM (:mod:`.embedder`);
- Open Inference Protocol v2 (KServe/Triton) ``/v2/...`` for the ``digits`` classifier
  (:mod:`.classifier`);
- ``/healthz``: which models are loaded (``?ready=all`` answers 200 only once all are).

Models load in a background thread at start-up; a request for a model still loading waits
for it, and one whose model failed to load gets 503 with ``Retry-After`` and the reason.
Model work runs in worker threads, never on the event loop: the LLM in one dedicated
thread (one generation at a time), the embedder and classifier in another.

In-process use (tests, notebooks)::

    app = create_demo_upstream_app()
    transport = httpx.ASGITransport(app=app)   # lifespan does not run: models load lazily
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        r = await client.post("/v1/embeddings", json={"model": "minilm-l6-v2", "input": "hi"})

The source-watermark layer plugs in through ``logits_processor_for``: a callable given the
request headers that returns a logits processor for that request, or ``None``. Given the
mark channel key, ``run_demo_upstream`` uses :class:`~modelfence.watermark.channel.MarkVerifier`:
it reads the gateway's sealed ``x-modelfence-mark`` header and marks that client's text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from modelfence import __version__
from modelfence.demo import classifier as digits
from modelfence.demo import llm as smollm
from modelfence.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from modelfence.gateway.responses import error_payload
from modelfence.models import embedder as minilm

if TYPE_CHECKING:
    from modelfence.demo.classifier import DigitsClassifier
    from modelfence.demo.llm import LogitsProcessor, SamplingParams, SmolLM, StreamEvent
    from modelfence.models.embedder import TextEmbedder

logger = logging.getLogger(__name__)

T = TypeVar("T")
ProcessorFactory = Callable[[Mapping[str, str]], "LogitsProcessor | None"]

MAX_BODY_BYTES = 8 * 1024 * 1024
CHAT_DEFAULT_MAX_TOKENS = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
MAX_EMBEDDING_INPUTS = 2048
MAX_OIP_ROWS = 10_000
RETRY_AFTER_SECONDS = 30
OWNER = "modelfence-demo"
NUMERIC_DATATYPES = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64"} | {
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
}

# -- models: loaded once, in the background ----------------------------------------------


class ModelSlot(Generic[T]):
    """One model and its loading state: ``pending`` → ``loading`` → ``ready`` | ``failed``.

    ``await slot.get()`` starts loading if nobody has, waits for it, and raises
    :class:`ServiceUnavailable` (with ``Retry-After``) if it failed; a failed model is tried
    again by the first request after ``retry_after`` seconds.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        loader: Callable[[], T],
        executor: ThreadPoolExecutor,
        *,
        retry_after: float = RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.kind = kind
        self._loader = loader
        self._executor = executor
        self._retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._future: Future[T] | None = None
        self._started_at = 0.0
        self._failed_at = 0.0
        self.load_seconds: float | None = None

    @property
    def state(self) -> str:
        future = self._future
        if future is None:
            return "pending"
        if not future.done():
            return "loading"
        return "failed" if _failure(future) is not None else "ready"

    @property
    def error(self) -> str | None:
        future = self._future
        exc = _failure(future) if future is not None and future.done() else None
        return None if exc is None else f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        """Queue the load unless it is queued, running, done, or failed too recently."""
        with self._lock:
            future = self._future
            if future is not None:
                if not future.done() or _failure(future) is None:
                    return
                if self._clock() - self._failed_at < self._retry_after:
                    return
            self._future = self._executor.submit(self._load)

    def _load(self) -> T:
        self._started_at = time.perf_counter()
        logger.info("loading %s %s", self.kind, self.name)
        try:
            value = self._loader()
        except BaseException:
            self._failed_at = self._clock()
            logger.exception("could not load %s", self.name)
            raise
        self.load_seconds = time.perf_counter() - self._started_at
        logger.info("%s ready in %.1f s", self.name, self.load_seconds)
        return value

    async def get(self) -> T:
        self.start()
        future = self._future
        assert future is not None
        try:
            # shield: a client that gives up must not cancel a load others wait for.
            return await asyncio.shield(asyncio.wrap_future(future))
        except Exception as exc:
            raise ServiceUnavailable(
                f"model {self.name!r} failed to load: {type(exc).__name__}: {exc}",
                code="model_unavailable",
                headers=[(b"retry-after", str(int(self._retry_after)).encode())],
            ) from exc

    def value(self) -> T | None:
        """The model if it is loaded, without waiting."""
        future = self._future
        if future is not None and future.done() and _failure(future) is None:
            return future.result()
        return None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "state": self.state}
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.error is not None:
            info["error"] = self.error
        model = self.value()
        if model is not None:
            for attr in ("loaded_from", "test_accuracy", "dimensions"):
                if hasattr(model, attr):
                    info[attr] = getattr(model, attr)
        return info


def _failure(future: Future[Any]) -> BaseException | None:
    """Why a finished load failed (cancelled at shut-down counts), or ``None``."""
    if future.cancelled():
        return RuntimeError("loading was cancelled (the server is shutting down)")
    return future.exception()


class DemoModels:
    """The three demo models, loaded one after the other in one background thread.

    Loaders default to the real models; tests and library users may pass their own (a
    ``lambda: already_loaded`` shares one model between several apps).
    """

    def __init__(
        self,
        *,
        threads: int | None = None,
        llm_loader: Callable[[], SmolLM] | None = None,
        embedder_loader: Callable[[], TextEmbedder] | None = None,
        classifier_loader: Callable[[], DigitsClassifier] | None = None,
        classifier_apart: bool = False,
    ) -> None:
        """``threads`` caps the CPU threads of the LLM and the embedder (default: theirs).
        ``classifier_apart`` loads the classifier in a thread of its own: a loader that waits
        for another service (the key broker) must not hold up the other models."""
        self._loading = ThreadPoolExecutor(1, thread_name_prefix="modelfence-demo-load")
        self._apart = ThreadPoolExecutor(1, thread_name_prefix="modelfence-demo-classifier") \
            if classifier_apart else None
        # The quick models first, so embeddings and digits answer while SmolLM2 loads.
        self.digits: ModelSlot[DigitsClassifier] = ModelSlot(
            digits.MODEL_NAME,
            "classifier",
            classifier_loader or digits.DigitsClassifier.train,
            self._apart or self._loading,
        )
        self.embedder: ModelSlot[TextEmbedder] = ModelSlot(
            minilm.MODEL_NAME,
            "embedding",
            embedder_loader or functools.partial(minilm.TextEmbedder.load, threads=threads),
            self._loading,
        )
        self.llm: ModelSlot[SmolLM] = ModelSlot(
            smollm.MODEL_NAME,
            "llm",
            llm_loader or functools.partial(smollm.SmolLM.load, threads=threads),
            self._loading,
        )

    @property
    def slots(self) -> tuple[ModelSlot[Any], ...]:
        return (self.digits, self.embedder, self.llm)

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def health(self) -> dict[str, Any]:
        states = {slot.state for slot in self.slots}
        if states == {"ready"}:
            status = "ready"
        elif "failed" in states:
            status = "degraded"
        else:
            status = "loading"
        return {"status": status, "models": {s.name: s.describe() for s in self.slots}}

    def close(self) -> None:
        self._loading.shutdown(wait=False, cancel_futures=True)
        if self._apart is not None:
            self._apart.shutdown(wait=False, cancel_futures=True)


# -- running model work off the event loop -----------------------------------------------

_DONE = object()


class _Workers:
    """Worker threads: one for the LLM (generations queue up), one for the light models."""

    def __init__(self) -> None:
        self.llm = ThreadPoolExecutor(1, thread_name_prefix="modelfence-demo-llm")
        self.light = ThreadPoolExecutor(1, thread_name_prefix="modelfence-demo-light")
        self.cancels: set[threading.Event] = set()

    async def run_light(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.light, fn)

    async def generate(
        self,
        request: Request,
        llm: SmolLM,
        prompt: list[int],
        params: SamplingParams,
        processor: LogitsProcessor | None,
    ) -> smollm.Generation:
        """The whole generation; :class:`_ClientGone` if the client leaves before it ends.

        The server does not cancel a plain request whose client left, so this watches for
        the disconnect itself: otherwise one abandoned long generation would hold the only
        LLM thread for everyone.
        """
        cancel = threading.Event()
        self.cancels.add(cancel)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(
            self.llm,
            lambda: llm.generate(prompt, params, logits_processor=processor, cancel=cancel),
        )
        gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
        try:
            racing: list[asyncio.Future[Any]] = [work, gone]
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise _ClientGone
            return work.result()
        finally:
            cancel.set()  # stops the generation at the next token if it still runs
            gone.cancel()
            self.cancels.discard(cancel)

    async def stream(
        self,
        llm: SmolLM,
        prompt: list[int],
        params: SamplingParams,
        processor: LogitsProcessor | None,
    ) -> AsyncIterator[StreamEvent]:
        """Events of ``llm.stream`` as they come, produced in the LLM thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        self.cancels.add(cancel)

        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for event in llm.stream(prompt, params, logits_processor=processor, cancel=cancel):
                    post(event)
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                post(exc)
            else:
                post(_DONE)

        loop.run_in_executor(self.llm, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            self.cancels.discard(cancel)

    def close(self) -> None:
        for cancel in list(self.cancels):
            cancel.set()
        self.llm.shutdown(wait=False, cancel_futures=True)
        self.light.shutdown(wait=False, cancel_futures=True)


class _ClientGone(Exception):
    """The client disconnected; nobody will read the response."""


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (call after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        # Servers block here until the client leaves; the pause only guards against one
        # that answers at once, which would otherwise make this a busy loop.
        await asyncio.sleep(0.05)


# -- request parsing ---------------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise BadRequest("the client disconnected while sending the body") from exc
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return body


class _Fields:
    """Typed access to a request body; every mistake is a 400 naming the parameter."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body

    def _bad(self, name: str, expected: str) -> BadRequest:
        value = self.body.get(name)
        shown = orjson.dumps(value).decode()[:80]
        return BadRequest(
            f"'{name}' must be {expected}, got {shown}", code="invalid_value", param=name
        )

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise BadRequest(
                    f"'{name}' is required", code="missing_required_parameter", param=name
                )
            return None
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(name, "a boolean")
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, "an integer")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(name, "a number")
        return float(value)

    def stop(self) -> tuple[str, ...]:
        value = self.body.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise self._bad("stop", "a string or a list of strings")

    def logit_bias(self) -> dict[int, float]:
        value = self.body.get("logit_bias")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad("logit_bias", "an object mapping token ids to numbers")
        bias: dict[int, float] = {}
        for key, number in value.items():
            if not key.lstrip("-").isdigit() or isinstance(number, bool):
                raise self._bad("logit_bias", "an object mapping token ids to numbers")
            if not isinstance(number, int | float):
                raise self._bad("logit_bias", "an object mapping token ids to numbers")
            bias[int(key)] = float(number)
        return bias


def _check_model(fields: _Fields, served: str) -> str:
    model = fields.string("model", required=True)
    assert model is not None
    if model != served:
        raise NotFound(
            f"The model '{model}' does not exist; this endpoint serves '{served}'",
            code="model_not_found",
            param="model",
        )
    return model


def _reject(fields: _Fields, names: Sequence[str], what: str) -> None:
    for name in names:
        if fields.present(name):
            raise BadRequest(
                f"'{name}' is not supported by {what}", code="unsupported_parameter", param=name
            )


def _sampling(
    fields: _Fields, max_tokens: int, *, logprobs: bool, top: int, top_limit: int
) -> SamplingParams:
    try:
        return smollm.SamplingParams(
            max_tokens=max_tokens,
            temperature=fields.number("temperature", 1.0),
            top_p=fields.number("top_p", 1.0),
            n=fields.integer("n", 1) or 0,
            seed=fields.integer("seed"),
            stop=fields.stop(),
            logit_bias=fields.logit_bias(),
            logprobs=logprobs,
            top_logprobs=top,
            presence_penalty=fields.number("presence_penalty", 0.0),
            frequency_penalty=fields.number("frequency_penalty", 0.0),
            max_top_logprobs=top_limit,
        )
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_value") from exc


def _requested_max_tokens(fields: _Fields, names: Sequence[str]) -> int | None:
    for name in names:
        value = fields.integer(name)
        if value is not None:
            return value
    return None


def _default_max_tokens(default: int, prompt_len: int, context: int) -> int:
    return max(1, min(default, context - prompt_len))


def _chat_messages(fields: _Fields) -> list[dict[str, str]]:
    messages = fields.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' must be a non-empty list", code="invalid_value", param="messages"
        )
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object", code="invalid_value", param=where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadRequest(
                f"'{where}.role' must be one of system, developer, user, assistant; got {role!r}",
                code="invalid_value",
                param=f"{where}.role",
            )
        parsed.append({"role": role, "content": _message_text(message.get("content"), where)})
    return parsed


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"'{where}.content' parts must be {{'type': 'text', 'text': str}}; "
                    "this model reads text only",
                    code="invalid_value",
                    param=f"{where}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(
        f"'{where}.content' must be a string or a list of text parts",
        code="invalid_value",
        param=f"{where}.content",
    )


# -- responses ---------------------------------------------------------------------------


def _json(payload: Any, status: int = 200, headers: Sequence[tuple[bytes, bytes]] = ()) -> Response:
    response = Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
    )
    for name, value in headers:
        response.headers[name.decode()] = value.decode()
    return response


def _openai_error(exc: GatewayError) -> Response:
    return _json(error_payload(exc), exc.status, exc.headers)


def _stream_failure(exc: Exception, what: str) -> bytes:
    """The SSE error event a stream ends with when generation fails after it started."""
    if not isinstance(exc, GatewayError):
        logger.exception("%s stream failed", what)
        exc = GatewayError(str(exc))
    return _sse(error_payload(exc))


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _chat_logprobs(tokens: Sequence[smollm.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [
                    {"token": c.token, "logprob": c.logprob, "bytes": list(c.bytes)} for c in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _legacy_logprobs(tokens: Sequence[smollm.TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{c.token: c.logprob for c in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- the app -----------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class _Demo:
    models: DemoModels
    workers: _Workers
    processor_for: ProcessorFactory | None
    max_body_bytes: int
    max_logprobs: int

    def processor(self, request: Request) -> LogitsProcessor | None:
        return self.processor_for(request.headers) if self.processor_for else None

    # OpenAI-compatible routes ---------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        fields = _Fields(await _read_json(request, self.max_body_bytes))
        model = _check_model(fields, smollm.MODEL_NAME)
        _reject(fields, ("tools", "functions", "audio"), "this model")
        messages = _chat_messages(fields)
        stream = fields.boolean("stream")
        include_usage = _stream_options(fields, stream)
        logprobs = fields.boolean("logprobs")
        top = fields.integer("top_logprobs", 0) or 0
        _check_response_format(fields)
        requested = _requested_max_tokens(fields, ("max_completion_tokens", "max_tokens"))
        # Parameters are checked before waiting for the model: a bad request fails at once.
        params = _sampling(
            fields, requested or 1, logprobs=logprobs, top=top, top_limit=self.max_logprobs
        )
        llm = await self.models.llm.get()
        prompt = llm.encode_chat(messages)
        if requested is None:
            default = _default_max_tokens(CHAT_DEFAULT_MAX_TOKENS, len(prompt), llm.context_length)
            params = dataclasses.replace(params, max_tokens=default)
        _check_runnable(llm, prompt, params)
        processor = self.processor(request)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if stream:
            events = self.workers.stream(llm, prompt, params, processor)
            body = _chat_chunks(events, ident, created, model, len(prompt), include_usage, logprobs)
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await self.workers.generate(request, llm, prompt, params, processor)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": _chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return _json(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _usage(result.prompt_tokens, result.completion_tokens),
            }
        )

    async def completions(self, request: Request) -> Response:
        fields = _Fields(await _read_json(request, self.max_body_bytes))
        model = _check_model(fields, smollm.MODEL_NAME)
        if fields.boolean("echo"):
            raise BadRequest("'echo' is not supported", code="unsupported_parameter", param="echo")
        _reject(fields, ("suffix",), "this model")
        best_of = fields.integer("best_of")
        if best_of is not None and best_of != (fields.integer("n", 1) or 1):
            raise BadRequest(
                "'best_of' other than n is not supported",
                code="unsupported_parameter",
                param="best_of",
            )
        stream = fields.boolean("stream")
        include_usage = _stream_options(fields, stream)
        logprobs_n = fields.integer("logprobs")
        if logprobs_n is not None and not 0 <= logprobs_n <= self.max_logprobs:
            raise BadRequest(
                f"'logprobs' must be between 0 and {self.max_logprobs}",
                code="invalid_value",
                param="logprobs",
            )
        requested = _requested_max_tokens(fields, ("max_tokens",))
        params = _sampling(
            fields,
            requested or 1,
            logprobs=logprobs_n is not None,
            top=logprobs_n or 0,
            top_limit=self.max_logprobs,
        )
        llm = await self.models.llm.get()
        prompts = _prompts(fields, llm)
        if requested is None:
            longest = max(len(p) for p in prompts)
            default = _default_max_tokens(
                COMPLETIONS_DEFAULT_MAX_TOKENS, longest, llm.context_length
            )
            params = dataclasses.replace(params, max_tokens=default)
        for prompt in prompts:
            _check_runnable(llm, prompt, params)
        processor = self.processor(request)
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        offsets = [len(llm.decode(p)) for p in prompts]
        if stream:
            body = self._completion_chunks(
                llm, prompts, params, processor, ident, created, model, include_usage, offsets
            )
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        choices = []
        prompt_tokens = completion_tokens = 0
        for p_index, prompt in enumerate(prompts):
            result = await self.workers.generate(request, llm, prompt, params, processor)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for c in result.choices:
                choices.append(
                    {
                        "text": c.text,
                        "index": p_index * params.n + c.index,
                        "logprobs": _legacy_logprobs(c.logprobs, offsets[p_index])
                        if c.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                )
        return _json(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )

    async def _completion_chunks(
        self,
        llm: SmolLM,
        prompts: list[list[int]],
        params: SamplingParams,
        processor: LogitsProcessor | None,
        ident: str,
        created: int,
        model: str,
        include_usage: bool,
        offsets: list[int],
    ) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
        }
        completion = 0
        try:
            for p_index, prompt in enumerate(prompts):
                done: dict[int, int] = {}
                position = dict.fromkeys(range(params.n), offsets[p_index])
                async for event in self.workers.stream(llm, prompt, params, processor):
                    lp = None
                    if params.logprobs:
                        lp = _legacy_logprobs(event.logprobs, position[event.index])
                        position[event.index] += sum(len(t.token) for t in event.logprobs)
                    choice = {
                        "text": event.text,
                        "index": p_index * params.n + event.index,
                        "logprobs": lp,
                        "finish_reason": event.finish_reason,
                    }
                    if event.finish_reason is not None:
                        done[event.index] = event.completion_tokens
                    yield _sse(
                        {**base, "choices": [choice], **({"usage": None} if include_usage else {})}
                    )
                completion += sum(done.values())
            if include_usage:
                prompt_tokens = sum(len(p) for p in prompts)
                yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
            yield SSE_DONE
        except Exception as exc:
            yield _stream_failure(exc, "completion")

    async def embeddings(self, request: Request) -> Response:
        fields = _Fields(await _read_json(request, self.max_body_bytes))
        model = _check_model(fields, minilm.MODEL_NAME)
        texts = _embedding_inputs(fields)
        encoding = fields.string("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest(
                "'encoding_format' must be 'float' or 'base64'",
                code="invalid_value",
                param="encoding_format",
            )
        dimensions = fields.integer("dimensions")
        if dimensions is not None and dimensions != minilm.DIMENSIONS:
            raise BadRequest(
                f"'dimensions' must be {minilm.DIMENSIONS} for {model}",
                code="invalid_value",
                param="dimensions",
            )
        embedder = await self.models.embedder.get()
        batch = await self.workers.run_light(lambda: embedder.embed_with_usage(texts))
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(row.astype("<f4").tobytes()).decode()
                    if encoding == "base64"
                    else row
                ),
            }
            for i, row in enumerate(batch.vectors)
        ]
        usage = {"prompt_tokens": batch.total_tokens, "total_tokens": batch.total_tokens}
        return _json({"object": "list", "data": data, "model": model, "usage": usage})

    async def list_models(self, request: Request) -> Response:
        return _json(
            {
                "object": "list",
                "data": [_model_card(m) for m in (smollm.MODEL_NAME, minilm.MODEL_NAME)],
            }
        )

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in (smollm.MODEL_NAME, minilm.MODEL_NAME):
            raise NotFound(
                f"The model '{name}' does not exist", code="model_not_found", param="model"
            )
        return _json(_model_card(name))

    # Open Inference Protocol v2 -------------------------------------------------------

    async def oip_server(self, request: Request) -> Response:
        return _json({"name": OWNER, "version": __version__, "extensions": []})

    async def oip_live(self, request: Request) -> Response:
        return _json({"live": True})

    async def oip_ready(self, request: Request) -> Response:
        self.models.digits.start()
        ready = self.models.digits.state == "ready"
        return _json({"ready": ready}, 200 if ready else 503)

    async def oip_metadata(self, request: Request) -> Response:
        _oip_model(request)
        return _json(digits.oip_metadata())

    async def oip_model_ready(self, request: Request) -> Response:
        name = _oip_model(request)
        self.models.digits.start()
        ready = self.models.digits.state == "ready"
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def oip_infer(self, request: Request) -> Response:
        _oip_model(request)
        body = await _read_json(request, self.max_body_bytes)
        x, wanted = _oip_inputs(body)
        model = await self.models.digits.get()
        proba = await self.workers.run_light(lambda: model.predict_proba(x))
        outputs = []
        for name in wanted:
            if name == digits.PROBABILITIES_OUTPUT:
                outputs.append(
                    {
                        "name": name,
                        "shape": list(proba.shape),
                        "datatype": "FP32",
                        "data": proba.ravel(),
                    }
                )
            else:
                labels = proba.argmax(axis=1).astype(np.int64)
                outputs.append(
                    {"name": name, "shape": [len(labels)], "datatype": "INT64", "data": labels}
                )
        response: dict[str, Any] = {
            "model_name": digits.MODEL_NAME,
            "model_version": digits.MODEL_VERSION,
        }
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        response["outputs"] = outputs
        return _json(response)

    # health -----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        self.models.start()
        report = self.models.health()
        wanted = request.query_params.get("ready")
        if wanted is None:
            return _json(report)
        names = [s.name for s in self.models.slots] if wanted == "all" else wanted.split(",")
        unknown = [n for n in names if n not in report["models"]]
        if unknown:
            return _json({"error": f"unknown model(s): {', '.join(unknown)}", **report}, 400)
        ready = all(report["models"][n]["state"] == "ready" for n in names)
        return _json(report, 200 if ready else 503)


def _stream_options(fields: _Fields, stream: bool) -> bool:
    options = fields.body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise BadRequest(
            "'stream_options' is only allowed when 'stream' is true",
            code="invalid_value",
            param="stream_options",
        )
    if not isinstance(options, dict):
        raise BadRequest(
            "'stream_options' must be an object", code="invalid_value", param="stream_options"
        )
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest(
            "'stream_options.include_usage' must be a boolean",
            code="invalid_value",
            param="stream_options",
        )
    return include


def _check_response_format(fields: _Fields) -> None:
    fmt = fields.body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        raise BadRequest(
            "'response_format' other than {'type': 'text'} is not supported",
            code="unsupported_parameter",
            param="response_format",
        )


def _check_runnable(llm: SmolLM, prompt: list[int], params: SamplingParams) -> None:
    try:
        llm.check(prompt, params)
    except ValueError as exc:
        code = "context_length_exceeded" if "context length" in str(exc) else "invalid_value"
        raise BadRequest(str(exc), code=code) from exc


def _prompts(fields: _Fields, llm: SmolLM) -> list[list[int]]:
    """``prompt`` as token ids: a string, a list of strings, a token list, or a list of those."""
    value = fields.body.get("prompt")

    def one(item: Any) -> list[int]:
        if isinstance(item, str):
            ids = llm.encode(item)
            # An empty prompt starts from the beginning-of-text token, as OpenAI's does.
            return ids or [llm.bos_token_id]
        if (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        ):
            return list(item)
        raise BadRequest(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of those",
            code="invalid_value",
            param="prompt",
        )

    if value is None:
        raise BadRequest("'prompt' is required", code="missing_required_parameter", param="prompt")
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        prompts = [one(v) for v in value]
    else:
        prompts = [one(value)]
    if len(prompts) > 16:
        raise BadRequest("at most 16 prompts per request", code="invalid_value", param="prompt")
    return prompts


def _embedding_inputs(fields: _Fields) -> list[str]:
    value = fields.body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(
            "'input' must be a non-empty string or a non-empty list of strings "
            "(token arrays are not supported)",
            code="invalid_value",
            param="input",
        )
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(
            f"'input' takes at most {MAX_EMBEDDING_INPUTS} items",
            code="invalid_value",
            param="input",
        )
    if any(not t for t in texts):
        raise BadRequest(
            "'input' must not contain empty strings", code="invalid_value", param="input"
        )
    return texts


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


async def _chat_chunks(
    events: AsyncIterator[StreamEvent],
    ident: str,
    created: int,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's chat chunk sequence: role, content deltas, finish, [usage], [DONE]."""
    base: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if include_usage:
        base["usage"] = None

    def chunk(
        index: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    started: set[int] = set()
    completion = 0
    try:
        async for event in events:
            if event.index not in started:
                started.add(event.index)
                yield chunk(event.index, {"role": "assistant", "content": "", "refusal": None})
            if event.text or event.logprobs:
                lp = _chat_logprobs(event.logprobs) if logprobs else None
                yield chunk(event.index, {"content": event.text}, lp)
            if event.finish_reason is not None:
                completion += event.completion_tokens
                yield chunk(event.index, {}, None, event.finish_reason)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
        yield SSE_DONE
    except Exception as exc:
        yield _stream_failure(exc, "chat")


class _OipError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _oip_model(request: Request) -> str:
    name = str(request.path_params["model"])
    version = request.path_params.get("version")
    if name != digits.MODEL_NAME:
        raise _OipError(404, f"model '{name}' not found; this server serves '{digits.MODEL_NAME}'")
    if version is not None and version != digits.MODEL_VERSION:
        raise _OipError(404, f"model '{name}' has no version '{version}'")
    return name


def _oip_inputs(body: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
    """The ``[N, 64]`` pixels and the output names a v2 inference request asks for."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _OipError(400, f"'inputs' must be a list with one tensor, '{digits.INPUT_NAME}'")
    tensor = inputs[0]
    if tensor.get("name") != digits.INPUT_NAME:
        raise _OipError(
            400, f"unexpected input {tensor.get('name')!r}; expected '{digits.INPUT_NAME}'"
        )
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC_DATATYPES:
        raise _OipError(
            400, f"input datatype must be FP32 (or another numeric type), got {datatype!r}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1] != digits.N_FEATURES
        or not 1 <= shape[0] <= MAX_OIP_ROWS
    ):
        raise _OipError(
            400,
            f"input shape must be [N, {digits.N_FEATURES}] with 1 <= N <= {MAX_OIP_ROWS}, got {shape!r}",
        )
    data = tensor.get("data")
    if not isinstance(data, list):
        raise _OipError(400, "input 'data' must be a list of numbers (flat or nested)")
    try:
        flat = np.asarray(_flatten(data), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _OipError(400, "input 'data' must contain only numbers") from exc
    if flat.size != shape[0] * shape[1]:
        raise _OipError(
            400, f"input 'data' has {flat.size} values; shape {shape} needs {shape[0] * shape[1]}"
        )
    try:
        x = digits.check_pixels(flat.reshape(shape))
    except ValueError as exc:
        raise _OipError(400, str(exc)) from exc
    wanted = [digits.PROBABILITIES_OUTPUT]
    outputs = body.get("outputs")
    if outputs is not None:
        known = (digits.PROBABILITIES_OUTPUT, digits.LABEL_OUTPUT)
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, dict) and o.get("name") in known for o in outputs)
        ):
            raise _OipError(
                400,
                f"'outputs' must be a non-empty list of {{'name': ...}} with names in {list(known)}",
            )
        wanted = list(dict.fromkeys(o["name"] for o in outputs))
    return x, wanted


def _flatten(data: list[Any]) -> list[float]:
    """Row-major values of flat data, or of one level of nesting (``[[64 values], ...]``)."""
    rows = data if data and all(isinstance(row, list) for row in data) else [data]
    values: list[float] = []
    for row in rows:
        for item in row:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise TypeError("not a number")
            values.append(item)
    return values


def _openai_route(handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; never read
        except GatewayError as exc:
            return _openai_error(exc)
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return _openai_error(GatewayError("internal error in the demo upstream"))

    return endpoint


def _oip_route(handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except _OipError as exc:
            return _json({"error": exc.message}, exc.status)
        except GatewayError as exc:
            return _json({"error": exc.message}, exc.status, exc.headers)
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return _json({"error": "internal error in the demo upstream"}, 500)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods, answered in the format of the API the path belongs to."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/v2"):
        return _json({"error": exc.detail}, exc.status_code)
    error = GatewayError(f"{request.method} {request.url.path}: {exc.detail}", code="not_found")
    error.status = exc.status_code
    error.type = "invalid_request_error"
    if exc.status_code == 405:
        error.code = "method_not_allowed"
    return _openai_error(error)


def create_demo_upstream_app(
    models: DemoModels | None = None,
    *,
    preload: bool = True,
    logits_processor_for: ProcessorFactory | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_logprobs: int = smollm.MAX_TOP_LOGPROBS,
) -> Starlette:
    """The demo upstream as an ASGI app.

    With ``preload`` the lifespan start-up queues every model's load in the background
    (the server answers at once; ``/healthz?ready=all`` turns 200 when all are loaded).
    Without a lifespan (e.g. ``httpx.ASGITransport``) each model loads on first use.
    """
    models = models or DemoModels()
    demo = _Demo(models, _Workers(), logits_processor_for, max_body_bytes, max_logprobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if preload:
            models.start()
        try:
            yield
        finally:
            demo.workers.close()
            models.close()

    v1, v2 = _openai_route, _oip_route
    routes = [
        Route("/v1/chat/completions", v1(demo.chat), methods=["POST"]),
        Route("/v1/completions", v1(demo.completions), methods=["POST"]),
        Route("/v1/embeddings", v1(demo.embeddings), methods=["POST"]),
        Route("/v1/models", v1(demo.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", v1(demo.get_model), methods=["GET"]),
        Route("/v2", v2(demo.oip_server), methods=["GET"]),
        Route("/v2/health/live", v2(demo.oip_live), methods=["GET"]),
        Route("/v2/health/ready", v2(demo.oip_ready), methods=["GET"]),
        Route("/v2/models/{model}", v2(demo.oip_metadata), methods=["GET"]),
        Route("/v2/models/{model}/ready", v2(demo.oip_model_ready), methods=["GET"]),
        Route("/v2/models/{model}/infer", v2(demo.oip_infer), methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}", v2(demo.oip_metadata), methods=["GET"]),
        Route(
            "/v2/models/{model}/versions/{version}/ready", v2(demo.oip_model_ready), methods=["GET"]
        ),
        Route("/v2/models/{model}/versions/{version}/infer", v2(demo.oip_infer), methods=["POST"]),
        Route("/healthz", demo.healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.models = models
    return app


def _private_digits(folder: Path) -> DigitsClassifier:
    """``digits`` with its head in the isolated worker: started from the loading thread,
    which lives as long as the server (the worker dies with the thread that started it)."""
    from modelfence.demo import private_digits

    with private_digits.broker_from_environment() as broker:
        return private_digits.load(folder, broker)


def run_demo_upstream(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    max_logprobs: int = smollm.MAX_TOP_LOGPROBS,
    threads: int | None = None,
    mark_secret: bytes | None = None,
    llm_dir: str | None = None,
    private_digits: str | None = None,
) -> None:
    """Serve the demo models with uvicorn until interrupted (``modelfence demo-upstream``).

    ``max_logprobs`` caps ``top_logprobs`` like vLLM's ``--max-logprobs``: 20 as OpenAI by
    default; an undefended deployment may raise it, which the red-team logit probe uses.
    ``threads`` (default ``$MODELFENCE_DEMO_THREADS``, else 1) caps each model's CPU
    threads: the demo shares a small machine with the gateway and the detector, and one
    thread per model measured fastest there. With ``mark_secret`` (the mark channel key)
    chat and completions answers carry the text mark of the client the gateway names.
    ``llm_dir`` serves a SmolLM2 copy saved with ``SmolLM.save`` (say, a model fine-tuned
    on harvested answers, as a suspect for ``verify model --kind chat``) under the same name.
    ``private_digits`` serves ``digits`` from a folder written by ``private_digits.prepare``:
    its sealed head runs in the isolated worker, provisioned by the gateway's key broker
    (``$MODELFENCE_BROKER_URL``, ``$MODELFENCE_BROKER_TOKEN``: its ``confidential.token``;
    attestation simulated).
    """
    import uvicorn

    from modelfence.watermark.channel import MarkVerifier

    if threads is None:
        threads = int(os.environ.get("MODELFENCE_DEMO_THREADS", "1"))
    if mark_secret is None:
        logger.info("no mark secret: answers carry no text mark")
    uvicorn.run(
        create_demo_upstream_app(
            DemoModels(
                threads=threads,
                llm_loader=functools.partial(smollm.SmolLM.from_dir, llm_dir, threads=threads)
                if llm_dir else None,
                classifier_loader=functools.partial(_private_digits, Path(private_digits))
                if private_digits else None,
                classifier_apart=private_digits is not None,
            ),
            max_logprobs=max_logprobs,
            logits_processor_for=MarkVerifier(mark_secret) if mark_secret else None,
        ),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
