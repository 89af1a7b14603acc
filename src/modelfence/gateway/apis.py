"""The two client-facing protocols: what a request names and what it will cost.

:class:`OpenAIApi` and :class:`OIPApi` implement one small interface, :class:`Api`, so the
gateway stages never branch on the protocol. Every field the gateway reads, caps or counts
is checked strictly here, at the edge, and a wrong type is a 400 naming the parameter:
upstreams coerce (``"top_logprobs": "20"`` is 20 to some, a float shape dimension is a
row count to others), so a value the policy or the token count would misread must never
get past. Fields the gateway does not read are the upstream's to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from modelfence.errors import BadRequest
from modelfence.operations import Operation

# A rough, cheap, deliberately generous estimate: reservations are settled to real usage.
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_MAX_INT = 2**31 - 1  # bound of every count the gateway reads (tokens, ids, dimensions)
_MAX_CHOICES = 128  # n and best_of, as OpenAI bounds n
MAX_MODEL_NAME = 200
_OIP_DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "FP32", "FP64", "BF16", "BYTES"}
)
_MAX_DIMENSIONS = 16
# Output forms no response stage can read, so their answers would go out unhardened and
# unmarked: binary tensors (Triton's binary data extension), top-k "score:index:label"
# strings (its classification extension), outputs left in the server's shared memory, and
# MLServer's encodings other than numpy's (base64 of the raw floats, strings, ...).
_UNREADABLE_OUTPUTS = ("binary_data", "classification", "shared_memory_region", "content_type")
_READABLE = {"content_type": "np"}  # the one value of these that keeps a JSON tensor
_JSON_TENSORS = "the gateway hardens and marks JSON tensors only: ask for those"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    operation: Operation
    model: str
    stream: bool = False
    prompt_tokens: int = 0  # estimate
    max_output_tokens: int = 0  # what the request may generate at most (0: not a generator)
    inputs: int = 1  # classifier rows, embedding texts or completion prompts it carries
    choices: int = 1  # answers generated per prompt (max of n and best_of)
    wants_usage_chunk: bool = False  # the client asked for stream_options.include_usage


    @property
    def answers(self) -> int:
        """What the client gets back, in an account allowance's rows: inputs × choices."""
        return self.inputs * self.choices


class Api(Protocol):
    kind: str  # matches UpstreamConfig.kind

    def parse(self, operation: Operation, model_in_path: str | None, body: Any) -> ParsedRequest: ...


def invalid(param: str, message: str) -> BadRequest:
    return BadRequest(message, code="invalid_parameter", param=param)


def _shown(value: Any) -> str:
    """A client value for an error message, cut short (it may be huge or hostile)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model_name(name: Any, *, param: str = "model") -> str:
    """A model name the gateway will route, label and forward: 1 to 200 printable
    characters, no backslash, not ``.`` or ``..`` (a path segment upstream)."""
    if not isinstance(name, str) or not name:
        raise invalid(param, f"'{param}' is required and must be a non-empty string")
    if len(name) > MAX_MODEL_NAME:
        raise invalid(param, f"'{param}' is longer than {MAX_MODEL_NAME} characters")
    if not name.isprintable() or "\\" in name or name in (".", ".."):
        raise invalid(
            param, f"'{param}' may hold only printable characters, no backslash, and not . or .."
        )
    return name


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict[str, Any], name: str, *, minimum: int, maximum: int = _MAX_INT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise invalid(
            name, f"'{name}' must be an integer from {minimum} to {maximum}, got {_shown(value)}"
        )
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {_shown(value)}")
    return bool(value)


def _number(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise invalid(name, f"'{name}' must be a non-negative number, got {_shown(value)}")


def _logit_bias(body: dict[str, Any]) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in bias.values()
    ):
        raise invalid("logit_bias", "'logit_bias' must be an object of token ids to numbers")


def _token_ids(value: list[Any], name: str) -> None:
    # Type set, min and max run in C: a megabyte of ids is checked in about a millisecond.
    if set(map(type, value)) != {int} or min(value) < 0 or max(value) > _MAX_INT:
        raise invalid(name, f"'{name}' token ids must be integers from 0 to {_MAX_INT}")


def _texts(body: dict[str, Any], name: str) -> tuple[int, int]:
    """(estimated tokens, number of prompts) of a prompt or embedding input: a string, an
    array of strings, an array of token ids, or an array of such arrays."""
    if name not in body:
        raise invalid(name, f"'{name}' is required")
    value = body[name]
    shape = f"'{name}' must be a string, an array of strings, or (arrays of) token ids"
    if isinstance(value, str):
        return len(value) // _CHARS_PER_TOKEN + 1, 1
    if not isinstance(value, list) or not value:
        raise invalid(name, shape)
    if isinstance(value[0], str):
        if not all(isinstance(item, str) for item in value):
            raise invalid(name, shape)
        return sum(len(item) // _CHARS_PER_TOKEN + 1 for item in value), len(value)
    if isinstance(value[0], list):
        for item in value:
            if not isinstance(item, list) or not item:
                raise invalid(name, shape)
            _token_ids(item, name)
        return sum(len(item) for item in value), len(value)
    _token_ids(value, name)  # one pass; a string or array among the ids fails here too
    return len(value), 1


def _message_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of objects")
    tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid("messages", f"'messages[{i}]' must be an object")
        if "role" in message and not isinstance(message["role"], str):
            raise invalid("messages", f"'messages[{i}].role' must be a string")
        tokens += _content_tokens(message.get("content"), i) + _TOKENS_PER_MESSAGE
    return tokens


def _content_tokens(content: Any, i: int) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content) // _CHARS_PER_TOKEN + 1
    if not isinstance(content, list):
        raise invalid("messages", f"'messages[{i}].content' must be a string or an array of parts")
    tokens = 0
    for part in content:
        if not isinstance(part, dict):
            raise invalid("messages", f"'messages[{i}].content' parts must be objects")
        text = part.get("text")
        if text is not None and not isinstance(text, str):
            raise invalid("messages", f"'messages[{i}].content' part text must be a string")
        tokens += len(text or "") // _CHARS_PER_TOKEN + 1
    return tokens


class OpenAIApi:
    kind = "openai"

    def __init__(self, default_max_tokens: int) -> None:
        self._default_max_tokens = default_max_tokens

    def parse(self, operation: Operation, model_in_path: str | None, body: Any) -> ParsedRequest:
        body = _object(body)
        model = check_model_name(body.get("model"))
        if operation is Operation.EMBEDDINGS:
            tokens, texts = _texts(body, "input")
            _int(body, "dimensions", minimum=1)
            return ParsedRequest(operation, model, prompt_tokens=tokens, inputs=texts)
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("stream_options", "'stream_options' must be an object")
        wants_usage = stream and options is not None and _bool(options, "include_usage")
        _number(body, "temperature")
        _number(body, "top_p")
        _int(body, "top_logprobs", minimum=0)
        _logit_bias(body)
        if operation is Operation.CHAT:
            prompt, prompts = _message_tokens(body.get("messages")), 1
            _bool(body, "logprobs")
            limit = _int(body, "max_completion_tokens", minimum=1) or _int(
                body, "max_tokens", minimum=1
            )
        else:
            prompt, prompts = _texts(body, "prompt")
            _int(body, "logprobs", minimum=0)
            _bool(body, "echo")
            limit = _int(body, "max_tokens", minimum=1)
        # An upstream generates best_of candidates (at least n) for every prompt of an array.
        choices = max(
            _int(body, "n", minimum=1, maximum=_MAX_CHOICES) or 1,
            _int(body, "best_of", minimum=1, maximum=_MAX_CHOICES) or 1,
        )
        return ParsedRequest(
            operation,
            model,
            stream=stream,
            prompt_tokens=prompt,
            max_output_tokens=(limit or self._default_max_tokens) * choices * prompts,
            wants_usage_chunk=wants_usage,
            inputs=prompts,
            choices=choices,
        )


def _leaves(data: list[Any], depth: int = 0) -> int:
    """Elements of a flat or nested tensor ``data`` array (its first item tells which: a
    flat array of a megabyte is counted in O(1), not walked on the event loop)."""
    if depth > _MAX_DIMENSIONS:
        raise invalid("inputs", "tensor data is nested deeper than its shape")
    if not data or not isinstance(data[0], list):
        return len(data)
    if set(map(type, data)) == {list} and list not in {type(row[0]) for row in data if row}:
        return sum(map(len, data))  # rows of scalars (the usual batch): one step per row
    return sum(_leaves(item, depth + 1) if isinstance(item, list) else 1 for item in data)


def _tensor_rows(i: int, tensor: Any) -> int:
    """The first dimension of one input tensor, after checking name, shape, datatype, data."""
    where = f"inputs[{i}]"
    if not isinstance(tensor, dict):
        raise invalid("inputs", f"'{where}' must be a tensor object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_MODEL_NAME:
        raise invalid("inputs", f"'{where}.name' must be a non-empty string")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMENSIONS
        or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= _MAX_INT for d in shape)
    ):
        raise invalid(
            "inputs", f"'{where}.shape' must be an array of at most {_MAX_DIMENSIONS} "
            "non-negative integers"
        )
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in _OIP_DATATYPES:
        raise invalid("inputs", f"'{where}.datatype' must be one of {sorted(_OIP_DATATYPES)}")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise invalid("inputs", f"'{where}.data' must be an array")
    size = 1
    for d in shape:
        size *= d
    if _leaves(data) != size:
        raise invalid("inputs", f"'{where}.data' does not hold the {size} elements of its shape")
    return shape[0] if shape else 1


class OIPApi:
    """Open Inference Protocol v2: the model is in the path, the body carries tensors."""

    kind = "oip"

    def parse(self, operation: Operation, model_in_path: str | None, body: Any) -> ParsedRequest:
        model = check_model_name(model_in_path or None)
        body = _object(body)
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise invalid("inputs", "'inputs' must be a non-empty array of tensors")
        outputs = body.get("outputs")
        if outputs is not None and (
            not isinstance(outputs, list)
            or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
        ):
            raise invalid("outputs", "'outputs' must be an array of objects with a name")
        parameters = body.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid("parameters", "'parameters' must be an object")
        if parameters and parameters.get("binary_data_output") not in (None, False):
            raise invalid("parameters", f"'parameters.binary_data_output': {_JSON_TENSORS}")
        for i, output in enumerate(outputs or ()):
            asked = output.get("parameters")
            if asked is not None and not isinstance(asked, dict):
                raise invalid("outputs", f"'outputs[{i}].parameters' must be an object")
            for name in _UNREADABLE_OUTPUTS if asked else ():
                if asked.get(name) not in (None, False, _READABLE.get(name)):
                    raise invalid("outputs", f"'outputs[{i}].parameters.{name}': {_JSON_TENSORS}")
        # A classifier's "tokens" are its inputs: the first dimension of the largest batch
        # (64 images are 64), so token limits and per-token prices bound and bill images,
        # not requests.
        rows = max(_tensor_rows(i, tensor) for i, tensor in enumerate(inputs))
        return ParsedRequest(operation, model, prompt_tokens=max(rows, 1), inputs=max(rows, 1))


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
