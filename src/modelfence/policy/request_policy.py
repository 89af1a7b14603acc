"""Request rules: refuse (or neutralise) what leaks the model, before anything is spent.

Why these rules: ``logit_bias`` plus ``logprobs`` lets a client read chosen logits one
bias at a time and recover the final projection layer (Carlini et al. 2024; Finlayson et
al. 2024); wide ``top_logprobs``, many bias entries and large ``n`` multiply what each
paid request reveals. :func:`apply_rules` checks one parsed body against a tier's
:class:`~modelfence.policy.config.RequestRules`::

    >>> apply_rules(RequestRules(), "/v1/chat/completions",
    ...             {"logprobs": True, "logit_bias": {"42": 5}})
    Traceback (most recent call last):
    BadRequest: 'logit_bias' cannot be combined with 'logprobs' on this tier ...

It returns ``None`` when the body passes as it is, or the body to send upstream instead
(``strip_logprobs``). The demo upstream cannot return the unbiased distribution's
logprobs, so "neutralise" here means dropping the logprobs, never faking them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from modelfence.errors import BadRequest
from modelfence.policy.config import RequestRules

CODE = "policy_violation"
OIP_INFER = "/v2/models/{name}/infer"
_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_TOKEN_CAPS = ("max_tokens", "max_completion_tokens")
_CHOICE_CAPS = ("n", "best_of")


def _violation(param: str, message: str) -> BadRequest:
    return BadRequest(f"{message} (request policy of this tier)", code=CODE, param=param)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # absent or malformed: the upstream's validation answers for the shape
    return value


def _cap(body: dict[str, Any], names: Iterable[str], limit: float | None) -> None:
    if limit is None:
        return
    for name in names:
        value = _number(body, name)
        if value is not None and value > limit:
            raise _violation(name, f"'{name}' is {value:g}; the most allowed is {limit:g}")


def wants_logprobs(route: str, body: dict[str, Any]) -> bool:
    """Whether the answer will carry log-probabilities."""
    if route == _CHAT:
        return bool(body.get("logprobs")) or bool(_number(body, "top_logprobs"))
    if route == _COMPLETIONS:
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


def without_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}


def narrowed_request(
    route: str, body: dict[str, Any], *, text_only: bool, top_k: int | None
) -> dict[str, Any] | None:
    """The request to send upstream so it returns no more logprobs than the client may get,
    or None when it already asks for no more.

    Only the upstream's work and the answer's size change: the hardened answer is the same
    (an upstream's top ``k`` alternatives are the first ``k`` of its top ``n``).
    """
    if text_only:
        stripped = without_logprobs(body)
        return stripped if len(stripped) < len(body) else None
    name = {_CHAT: "top_logprobs", _COMPLETIONS: "logprobs"}.get(route)
    if name is None or top_k is None:
        return None
    asked = body.get(name)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked <= top_k:
        return None
    return {**body, name: top_k}


def _check_llm(rules: RequestRules, route: str, body: dict[str, Any]) -> dict[str, Any] | None:
    _cap(body, ("top_logprobs",) if route == _CHAT else ("logprobs",), rules.max_top_logprobs)
    _cap(body, _CHOICE_CAPS, rules.max_n)
    _cap(body, _TOKEN_CAPS, rules.max_tokens)
    if body.get("echo") is True and not rules.allow_echo:
        raise _violation("echo", "'echo' is not allowed; allowed values: false")
    bias = body.get("logit_bias")
    _check_logit_bias(rules, bias)
    if not bias or not wants_logprobs(route, body):
        return None
    if rules.logit_bias_with_logprobs == "forbid":
        raise _violation(
            "logit_bias",
            "'logit_bias' cannot be combined with 'logprobs' on this tier; send one or the other",
        )
    if rules.logit_bias_with_logprobs == "strip_logprobs":
        return without_logprobs(body)
    return None


def _check_oip(rules: RequestRules, body: dict[str, Any]) -> None:
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


def apply_rules(rules: RequestRules, route: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Raise :class:`BadRequest` on a violation; return a rewritten body, or None."""
    if route in (_CHAT, _COMPLETIONS):
        return _check_llm(rules, route, body)
    if route == OIP_INFER:
        _check_oip(rules, body)
    return None
