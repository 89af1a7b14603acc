"""Request rules: refuse (or neutralise) what leaks the model, before anything is spent.

Why these rules: ``logit_bias`` plus ``logprobs`` lets a client read chosen logits one
bias at a time and recover the final projection layer (Carlini et al. 2024; Finlayson et
al. 2024); wide ``top_logprobs``, many bias entries and large ``n`` multiply what each
paid request reveals. :func:`apply_rules` checks one parsed body against a tier's
:class:`~modelfence.policy.config.RequestRules`::

    >>> apply_rules(RequestRules(), Operation.CHAT,
    ...             {"logprobs": True, "logit_bias": {"42": 5}})
    Traceback (most recent call last):
    BadRequest: 'logit_bias' cannot be combined with 'logprobs' on this tier ...

The client's body is never changed: a rule that neutralises (``strip_logprobs``) returns
*overrides*, fields to set in (or, with :data:`OMIT`, drop from) the body sent upstream,
merged once by the proxy (:func:`upstream_payload`). Detection still sees what the client
asked. The demo upstream cannot return the unbiased distribution's logprobs, so
"neutralise" here means dropping the logprobs, never faking them.

Types are checked before these rules run (:mod:`modelfence.gateway.apis`), so a number
here is a number.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from modelfence.errors import BadRequest
from modelfence.operations import Operation
from modelfence.policy.config import RequestRules

CODE = "policy_violation"
_TOKEN_CAPS = ("max_tokens", "max_completion_tokens")
_CHOICE_CAPS = ("n", "best_of")
# Where each text operation asks for alternatives per token.
_ALTERNATIVES = {Operation.CHAT: "top_logprobs", Operation.COMPLETIONS: "logprobs"}


class Omit(enum.Enum):
    """An override value: leave the field out of the upstream body."""

    OMIT = "omit"


OMIT = Omit.OMIT
Overrides = dict[str, Any]  # field -> value for the upstream body (or OMIT)


def upstream_payload(body: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The client's body with ``overrides`` applied (a new dict; ``body`` is not touched)."""
    merged = {**body, **overrides}
    return {k: v for k, v in merged.items() if v is not OMIT}


def _violation(param: str, message: str) -> BadRequest:
    return BadRequest(f"{message} (request policy of this tier)", code=CODE, param=param)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # absent or malformed: the upstream's validation answers for the shape
    return value


def _cap(body: Mapping[str, Any], names: Iterable[str], limit: float | None) -> None:
    if limit is None:
        return
    for name in names:
        value = _number(body, name)
        if value is not None and value > limit:
            raise _violation(name, f"'{name}' is {value:g}; the most allowed is {limit:g}")


def wants_logprobs(operation: Operation, body: Mapping[str, Any]) -> bool:
    """Whether the answer will carry log-probabilities."""
    if operation is Operation.CHAT:
        return bool(body.get("logprobs")) or bool(_number(body, "top_logprobs"))
    if operation is Operation.COMPLETIONS:
        return body.get("logprobs") is not None
    return False


def _check_logit_bias(rules: RequestRules, bias: Any) -> None:
    if not isinstance(bias, dict):
        return
    if rules.max_logit_bias_entries is not None and len(bias) > rules.max_logit_bias_entries:
        raise _violation(
            "logit_bias",
            f"'logit_bias' has {len(bias)} entries; the most allowed is "
            f"{rules.max_logit_bias_entries}",
        )
    limit = rules.max_logit_bias_magnitude
    if limit is None:
        return
    for token, value in bias.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > limit:
            raise _violation(
                "logit_bias",
                f"'logit_bias' entry {token!r} is {value:g}; magnitudes above {limit:g} "
                "are not allowed",
            )


def without_logprobs(body: Mapping[str, Any]) -> Overrides:
    """Overrides that drop every logprobs field the body has."""
    return {k: OMIT for k in ("logprobs", "top_logprobs") if k in body}


def narrowed_request(
    operation: Operation, body: Mapping[str, Any], *, text_only: bool, top_k: int | None
) -> Overrides:
    """Overrides so the upstream returns no more logprobs than the client may get (empty
    when the request already asks for no more).

    Only the upstream's work and the answer's size change: the hardened answer is the same
    (an upstream's top ``k`` alternatives are the first ``k`` of its top ``n``).
    """
    if text_only:
        return without_logprobs(body)
    name = _ALTERNATIVES.get(operation)
    if name is None or top_k is None:
        return {}
    asked = body.get(name)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked <= top_k:
        return {}
    return {name: top_k}


def _check_llm(rules: RequestRules, operation: Operation, body: Mapping[str, Any]) -> Overrides:
    _cap(body, (_ALTERNATIVES[operation],), rules.max_top_logprobs)
    _cap(body, _CHOICE_CAPS, rules.max_n)
    _cap(body, _TOKEN_CAPS, rules.max_tokens)
    if body.get("echo") is True and not rules.allow_echo:
        raise _violation("echo", "'echo' is not allowed; allowed values: false")
    bias = body.get("logit_bias")
    _check_logit_bias(rules, bias)
    if not bias or not wants_logprobs(operation, body):
        return {}
    if rules.logit_bias_with_logprobs == "forbid":
        raise _violation(
            "logit_bias",
            "'logit_bias' cannot be combined with 'logprobs' on this tier; send one or the other",
        )
    if rules.logit_bias_with_logprobs == "strip_logprobs":
        return without_logprobs(body)
    return {}


def _check_oip(rules: RequestRules, body: Mapping[str, Any]) -> None:
    allowed = rules.oip_outputs
    outputs = body.get("outputs")
    if allowed is None or not isinstance(outputs, list):
        return
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in allowed:
            raise _violation(
                "outputs", f"output {name!r} is not available; allowed outputs: {list(allowed)}"
            )


# Where each operation carries its inputs, and what one of them is called.
_INPUTS = {Operation.OIP_INFER: ("inputs", "rows"), Operation.EMBEDDINGS: ("input", "texts"),
           Operation.COMPLETIONS: ("prompt", "prompts")}


def _check_inputs(rules: RequestRules, operation: Operation, inputs: int) -> None:
    limit = rules.max_inputs
    if limit is None or inputs <= limit or operation not in _INPUTS:
        return
    param, unit = _INPUTS[operation]
    raise _violation(
        param, f"'{param}' carries {inputs} {unit}; the most allowed in one request is {limit}"
    )


def apply_rules(
    rules: RequestRules, operation: Operation, body: Mapping[str, Any], *, inputs: int = 1
) -> Overrides:
    """Raise :class:`BadRequest` on a violation; return overrides for the upstream body.

    ``inputs`` is the request's batch size as the parser counted it (rows, texts, prompts).
    """
    _check_inputs(rules, operation, inputs)
    if operation.generates_text:
        return _check_llm(rules, operation, body)
    if operation is Operation.OIP_INFER:
        _check_oip(rules, body)
    return {}
