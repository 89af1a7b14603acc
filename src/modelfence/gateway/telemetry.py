"""One telemetry event per authenticated request, handed off without waiting.

:class:`EmitEvents` is the first inference stage: it notes the status (from the response
or from the error on its way to the boundary) and, when the request ends, passes the
pipeline an :class:`EventDraft`: the few values of the request its event needs, never the
request context or its body (up to ``server.max_body_bytes`` each, thousands queued). The
request pays for picking those out and a ``put_nowait``; hashing and normalising the
prompt, flattening classifier inputs and reading classifier outputs happen later, when the
pipeline's worker thread calls the draft.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import orjson

from modelfence.errors import GatewayError
from modelfence.gateway.context import RequestContext, context_of
from modelfence.operations import Operation
from modelfence.telemetry.events import EVENT_BYTES, RequestEvent
from modelfence.telemetry.pipeline import EventSource
from modelfence.telemetry.prompts import elicits_reasoning
from modelfence.types import ASGIApp, Message, Receive, Scope, Send

MAX_CAPTURED_OUTPUT = 65_536  # classifier answers are small; larger ones are not parsed
MAX_INPUT_VALUES = 16_384  # 256 rows of 64 features
MAX_INPUT_TEXTS = 256
MAX_INPUT_TEXT_CHARS = 512
# The prompt text an event carries: far more than the detector's embedder reads (256
# tokens); hash and length are of the whole prompt.
MAX_PROMPT_CHARS = 8192
_PARSED_PER_RAW_BYTE = 4  # a parsed JSON tensor holds about this many bytes per raw byte
_PLAIN_NUMBERS = frozenset({int, float})  # input values read as features; not bool


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def prompt_of(operation: Operation | None, body: dict[str, Any]) -> tuple[str, int]:
    """(the text detection embeds, conversation turns): the last user turn for chats."""
    if operation is Operation.CHAT:
        messages = body.get("messages")
        messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        return (_text_of(user.get("content")) if user else ""), len(messages)
    value = body.get("prompt") if operation is Operation.COMPLETIONS else body.get("input")
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), "")
    return (value if isinstance(value, str) else ""), 0


_MAX_SCANNED_TURNS = 32  # turns read for chain-of-thought elicitation ...
_SCANNED_CHARS = 2048  # ... and characters of each
FRAME_WORDS = 3  # opening words of the user turn that make a frame when there is no system message
_FRAME_CHARS = 4096  # of the system messages: a frame is recognised by its opening


def frame_of(operation: Operation | None, body: dict[str, Any]) -> str:
    """A chat's frame: its system (and developer) messages, else the user turn's first words.

    A campaign of many accounts usually sends its instructions in one frame ("Explain step
    by step, showing your reasoning...") around different tasks; honest customers' frames
    are their own or common to many. Empty for other routes.
    """
    if operation is not Operation.CHAT:
        return ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    system, user = [], ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        if message.get("role") in ("system", "developer"):
            system.append(_text_of(message.get("content")))
        elif message.get("role") == "user":
            user = _text_of(message.get("content"))
    if any(part.strip() for part in system):
        return "system\x00" + "\n".join(part[:_FRAME_CHARS] for part in system)[:_FRAME_CHARS]
    opening = " ".join(user[:200].split()[:FRAME_WORDS])
    return "user\x00" + opening if opening else ""


def turns_of(body: dict[str, Any]) -> tuple[str, ...]:
    """The opening of every message of a chat, where an instruction to reason sits (capped
    in number and length, so a draft keeps no huge conversation alive)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ()
    return tuple(
        _text_of(m.get("content"))[:_SCANNED_CHARS]
        for m in messages[:_MAX_SCANNED_TURNS]
        if isinstance(m, dict)
    )


def input_texts_of(body: dict[str, Any]) -> list[str] | None:
    """Every text of an embeddings request (first ``MAX_INPUT_TEXTS``, cut to 512 characters):
    a batch of 16 texts is 16 queries to a detector."""
    value = body.get("input")
    if not isinstance(value, list):
        return None
    texts = [v[:MAX_INPUT_TEXT_CHARS] for v in value[:MAX_INPUT_TEXTS] if isinstance(v, str)]
    return texts or None


def first_tensor(body: dict[str, Any]) -> tuple[Any, Any]:
    """(data, shape) of an OIP request's first input tensor, without copying the data
    beyond the first ``MAX_INPUT_VALUES`` entries."""
    inputs = body.get("inputs")
    tensor = inputs[0] if isinstance(inputs, list) and inputs else None
    if not isinstance(tensor, dict):
        return None, None
    data = tensor.get("data")
    if isinstance(data, list) and len(data) > MAX_INPUT_VALUES:
        data = data[:MAX_INPUT_VALUES]
    return data, tensor.get("shape")


def input_rows_of(data: Any, shape: Any) -> list[list[float]] | None:
    """An OIP input tensor (see :func:`first_tensor`) as rows of features (``shape [n, ...]``:
    n rows).

    A batch is n queries to a detector, not one: an attacker sending 64 images per request
    must look like 64 queries. Rows past ``MAX_INPUT_VALUES`` values are not kept.
    """
    width = _row_width(shape)
    if width and isinstance(data, list) and set(map(type, data)) <= _PLAIN_NUMBERS:
        # The usual flat tensor of JSON numbers: numpy reads it several times faster than
        # the walk below, on the gateway's event loop (bench/stack_cpu.py --route batch64).
        rows = min(len(data), MAX_INPUT_VALUES) // width
        if not rows:
            return None
        flat_rows: list[list[float]] = (
            np.asarray(data[: rows * width], dtype=np.float64).reshape(rows, width).tolist()
        )
        return flat_rows
    flat: list[float] = []
    stack = [data]
    while stack and len(flat) < MAX_INPUT_VALUES:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            flat.append(float(item))
    if not flat:
        return None
    width = width or len(flat)
    return [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)] or None


def _row_width(shape: Any) -> int | None:
    if not isinstance(shape, list) or len(shape) < 2:
        return None
    width = 1
    for dim in shape[1:]:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            return None
        width *= dim
    return width


def classifier_output(raw: bytes) -> tuple[int | None, list[float] | None]:
    """(first row's predicted label, each row's top-1 minus top-2 probability) from an
    OIP answer, when it carries probabilities ``[n, classes]``."""
    try:
        output = (orjson.loads(raw).get("outputs") or [])[0]
        data = output["data"]
    except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError):
        return None, None
    if not isinstance(data, list) or not data:
        return None, None
    if len(data) == 1 or all(isinstance(v, int) for v in data):
        return (int(data[0]), None) if isinstance(data[0], (int, float)) else (None, None)
    values = [float(v) for v in data if isinstance(v, (int, float))]
    shape = output.get("shape")
    classes = shape[-1] if isinstance(shape, list) and shape and isinstance(shape[-1], int) else len(values)
    if classes < 2 or len(values) % classes:
        return None, None
    margins = []
    label = None
    for start in range(0, len(values), classes):
        row = values[start : start + classes]
        if label is None:
            label = max(range(classes), key=row.__getitem__)
        top, second = sorted(row, reverse=True)[:2]
        margins.append(top - second)
    return label, margins


def prompt_hash(text: str, key: bytes) -> str:
    normal = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.blake2b(normal.encode(), key=key, digest_size=16).hexdigest()


@dataclass(slots=True)
class EventDraft:
    """One finished request's event, less the costly fields; calling it fills them in.

    Holds the event's plain fields and references to the few parts of the body the rest
    is made from (the prompt, a slice of the input tensor, a capped classifier answer),
    never the context or the body. ``nbytes`` is about what it keeps alive, for the
    pipeline's byte bound.
    """

    event: RequestEvent
    prompt: str
    hash_key: bytes
    tensor: tuple[Any, Any] | None = None  # OIP (data, shape), see first_tensor
    output: list[bytes] | None = None  # OIP answer, when small enough to parse
    nbytes: int = EVENT_BYTES
    frame: str = ""  # see frame_of
    turns: tuple[str, ...] = ()  # every chat turn's text, for chain-of-thought elicitation

    def __call__(self) -> RequestEvent:
        event, text = self.event, self.prompt
        if text:
            event.prompt_hash = prompt_hash(text, self.hash_key)
            event.prompt_len = len(text)
            event.prompt_text = text[:MAX_PROMPT_CHARS]
        if self.frame:
            event.frame_hash = prompt_hash(self.frame, self.hash_key)
        event.cot = elicits_reasoning(self.turns or ([text] if text else []))
        if self.tensor is not None:
            event.input_rows = input_rows_of(*self.tensor)
        if self.output:
            event.output_label, event.output_margins = classifier_output(b"".join(self.output))
        return event


def event_draft(
    ctx: RequestContext,
    status: int,
    arrival: float,
    latency: float,
    hash_key: bytes,
    output: list[bytes] | None,
) -> EventDraft:
    """The draft of one finished request's event: cheap lookups only (runs on the loop)."""
    assert ctx.key is not None
    body = ctx.body
    operation = ctx.operation
    text, turns = prompt_of(operation, body)
    fp = ctx.fingerprint
    usage = ctx.usage
    logprobs = body.get("logprobs")
    bias = body.get("logit_bias")
    decision = ctx.decision
    texts = input_texts_of(body) if operation is Operation.EMBEDDINGS else None
    tensor = first_tensor(body) if operation is Operation.OIP_INFER else None
    event = RequestEvent(
        ts=arrival,
        request_id=ctx.request_id,
        client=ctx.key.client,
        key_id=ctx.key.key_id,
        tier=ctx.key.tier,
        route=ctx.route,
        model=ctx.model,
        status=status,
        account=ctx.key.account or "",
        trust=ctx.trust,
        ip_prefix=fp.ip_prefix if fp else "",
        fingerprint=fp.digest if fp else "",
        client_library=fp.client_library if fp else "",
        user_agent=fp.user_agent if fp else "",
        temperature=_number(body.get("temperature")),
        top_p=_number(body.get("top_p")),
        max_tokens=_int(body.get("max_completion_tokens") or body.get("max_tokens")),
        n=_int(body.get("n")) or 1,
        logprobs=bool(logprobs),
        top_logprobs=_int(body.get("top_logprobs")) or 0,
        logit_bias_size=len(bias) if isinstance(bias, dict) else 0,
        stream=bool(ctx.parsed and ctx.parsed.stream),
        turns=turns,
        input_texts=texts,
        input_count=ctx.parsed.inputs if ctx.parsed else 0,
        tokens_in=usage.prompt_tokens if usage else 0,
        tokens_out=usage.completion_tokens if usage else 0,
        latency_ms=latency * 1000.0,
        limit_decision=("allowed" if decision.source == "backend" else decision.source)
        if decision
        else ("denied" if status == 429 else "none"),
        risk_level=ctx.risk_level,
    )
    nbytes = EVENT_BYTES + len(text) + sum(map(len, texts or ()))
    if tensor is not None:
        nbytes += _PARSED_PER_RAW_BYTE * len(ctx.raw_body)
    if output:
        nbytes += sum(map(len, output))
    frame = frame_of(operation, body)
    said = turns_of(body) if operation is Operation.CHAT else ()
    nbytes += len(frame) + sum(map(len, said))
    return EventDraft(event, text, hash_key, tensor, output, nbytes, frame, said)


def build_event(
    ctx: RequestContext,
    status: int,
    arrival: float,
    latency: float,
    hash_key: bytes,
    output: list[bytes] | None,
) -> RequestEvent:
    """The event of one finished request, built at once (what the pipeline does later)."""
    return event_draft(ctx, status, arrival, latency, hash_key, output)()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class EmitEvents:
    def __init__(
        self, app: ASGIApp, *, emit: Callable[[EventSource], bool], hash_key: bytes
    ) -> None:
        if len(hash_key) < 16:
            raise ValueError("hash_key must be at least 16 bytes")
        self.app = app
        self.emit = emit
        self.hash_key = hash_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        arrival = time.time()
        status = 0
        output: list[bytes] | None = [] if ctx.operation is Operation.OIP_INFER else None
        size = 0

        async def send_tracked(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif output is not None and size <= MAX_CAPTURED_OUTPUT:
                chunk = message.get("body", b"")
                size += len(chunk)
                output.append(chunk)
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except GatewayError as exc:
            status = status or exc.status
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            if ctx.key is not None:
                latency = time.perf_counter() - ctx.started
                captured = output if size <= MAX_CAPTURED_OUTPUT else None
                try:
                    draft: EventSource = event_draft(
                        ctx, status, arrival, latency, self.hash_key, captured
                    )
                except Exception as exc:  # noqa: BLE001 - never fail the request for its event
                    # Handed on as a builder that fails: the pipeline counts and logs it.
                    draft = partial(_reraise, exc)
                self.emit(draft)


def _reraise(exc: Exception) -> RequestEvent:
    raise exc
