"""The two client-facing protocols: what a request names and what it will cost.

:class:`OpenAIApi` and :class:`OIPApi` implement one small interface, :class:`Api`, so the
gateway stages never branch on the protocol. Validation here is about what the gateway
itself relies on (model, stream, sizes); everything else is the upstream's to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from modelfence.errors import BadRequest

# A rough, cheap, deliberately generous estimate: reservations are settled to real usage.
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    stream: bool = False
    prompt_tokens: int = 0  # estimate
    max_output_tokens: int = 0  # what the request may generate at most (0: not a generator)
    wants_usage_chunk: bool = False  # the client asked for stream_options.include_usage


class Api(Protocol):
    kind: str  # matches UpstreamConfig.kind

    def parse(self, route: str, model_in_path: str | None, body: Any) -> ParsedRequest: ...


def _expect_text(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise BadRequest(f"'{name}' is required", param=name)
    value = body[name]
    if not isinstance(value, (str, list)):
        raise BadRequest(
            f"'{name}' must be a string or an array, got {type(value).__name__}", param=name
        )
    return value


def _text_tokens(value: Any) -> int:
    """Estimated tokens in a prompt, message content or embedding input of any shape."""
    if isinstance(value, str):
        return len(value) // _CHARS_PER_TOKEN + 1
    if isinstance(value, list):
        if value and isinstance(value[0], int):  # pre-tokenised input
            return len(value)
        return sum(_text_tokens(item) for item in value)
    if isinstance(value, dict):
        return _text_tokens(value.get("text") or value.get("content") or "")
    return 0


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer, got {value!r}", param=name)
    return value


class OpenAIApi:
    kind = "openai"

    def __init__(self, default_max_tokens: int) -> None:
        self._default_max_tokens = default_max_tokens

    def parse(self, route: str, model_in_path: str | None, body: Any) -> ParsedRequest:
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a non-empty string", param="model")
        if route == "/v1/embeddings":
            tokens = _text_tokens(_expect_text(body, "input"))
            return ParsedRequest(model=model, prompt_tokens=tokens)
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise BadRequest(f"'stream' must be a boolean, got {stream!r}", param="stream")
        if route == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty array", param="messages")
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    raise BadRequest(f"'messages[{i}]' must be an object", param="messages")
            prompt = sum(_text_tokens(m.get("content")) + _TOKENS_PER_MESSAGE for m in messages)
            limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
        else:  # /v1/completions
            prompt = _text_tokens(_expect_text(body, "prompt"))
            limit = _positive_int(body, "max_tokens")
        choices = _positive_int(body, "n") or 1
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        wants_usage = bool(stream and options and options.get("include_usage"))
        return ParsedRequest(
            model=model,
            stream=bool(stream),
            prompt_tokens=prompt,
            max_output_tokens=(limit or self._default_max_tokens) * choices,
            wants_usage_chunk=wants_usage,
        )


class OIPApi:
    """Open Inference Protocol v2: the model is in the path, the body carries tensors."""

    kind = "oip"

    def parse(self, route: str, model_in_path: str | None, body: Any) -> ParsedRequest:
        if not model_in_path:
            raise BadRequest("the model name is missing from the path")
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("'inputs' must be a non-empty array of tensors", param="inputs")
        for i, tensor in enumerate(inputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise BadRequest(f"'inputs[{i}]' must be a tensor object with a name", param="inputs")
            if not isinstance(tensor.get("shape"), list) or "data" not in tensor:
                raise BadRequest(f"'inputs[{i}]' needs 'shape' and 'data'", param="inputs")
        # A classifier's "tokens" are its inputs: the first dimension of the first tensor
        # (a batch of 64 images is 64), so token limits and per-token prices bound and
        # bill images, not requests.
        first = inputs[0]["shape"][0] if inputs[0]["shape"] else 1
        rows = first if isinstance(first, int) and not isinstance(first, bool) and first > 0 else 1
        return ParsedRequest(model=model_in_path, prompt_tokens=rows)


def usage_from_response(payload: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI response or usage chunk, if it has usage."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion
