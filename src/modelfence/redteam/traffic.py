"""The shared vocabulary of the harness: who sends (``ClientProfile``), what they send and
when (``PlannedRequest``), and what came back (``Exchange``).

Scenarios produce plans; the live runner sends them through a gateway and the replay
mode turns the very same plans into telemetry events, which is what makes the two modes
comparable request for request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
DIGITS_INFER = "/v2/models/digits/infer"
LLM_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "minilm-l6-v2"
DIGITS_MODEL = "digits"

# (user agent, extra headers): what real client libraries send.
CLIENT_LIBRARIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("OpenAI/Python 1.54.3", (("x-stainless-lang", "python"), ("x-stainless-package-version", "1.54.3"))),
    ("AsyncOpenAI/Python 1.40.0", (("x-stainless-lang", "python"), ("x-stainless-package-version", "1.40.0"))),
    ("OpenAI/JS 4.52.0", (("x-stainless-lang", "js"), ("x-stainless-package-version", "4.52.0"))),
    ("python-requests/2.32.3", ()),
    ("python-httpx/0.27.0", ()),
    ("Python/3.11 aiohttp/3.9.5", ()),
    ("curl/8.5.0", ()),
    ("Go-http-client/1.1", ()),
    ("axios/1.7.2", ()),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15", ()),
)


@dataclass(frozen=True, slots=True)
class ClientProfile:
    """One simulated account: its gateway client name, fingerprint and role.

    ``campaign`` groups the identities of one actor (a Sybil botnet's keys, a rotating
    attacker's successive accounts) so outcomes can be summed per actor. ``signed_up``,
    ``paid_usd`` and ``verified`` are what the account's trust level is judged on
    (``identity/trust.py``): a new, unpaid, unverified account is on probation.
    """

    name: str
    role: str  # "benign" or "attacker"
    user_agent: str
    ip: str  # sent as X-Forwarded-For; the gateway must trust the harness as a proxy
    extra_headers: tuple[tuple[str, str], ...] = ()
    tier: str = "default"
    campaign: str = ""
    segment: str = ""  # honest population v2: which kind of customer (see populations/week.py)
    # Which order the headers between host and content-length go in (0: the usual one);
    # a careful thief varies it so that its accounts share no fingerprint.
    header_order: int = 0
    # Virtual seconds from the window's start when the account signed up (negative: before
    # it); None: at its first request, as a thief's fresh account does.
    signed_up: float | None = None
    paid_usd: float = 0.0
    verified: bool = False

    @property
    def actor(self) -> str:
        return self.campaign or self.name

    def wire_headers(self, api_key: str, body: bytes, host: str) -> list[tuple[str, str]]:
        """Every header of one request, in the order they go on the wire.

        The gateway fingerprints the order of header names, so the live runner sends
        exactly this list (no client-library defaults) and replay hands the very same
        list to the gateway's own event builder.
        """
        middle = [
            ("user-agent", self.user_agent),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("authorization", f"Bearer {api_key}"),
            ("x-forwarded-for", self.ip),
            *self.extra_headers,
        ]
        if self.header_order:
            middle = _permuted(middle, self.header_order)
        return [("host", host), *middle, ("content-length", str(len(body)))]


def _permuted(items: list[tuple[str, str]], index: int) -> list[tuple[str, str]]:
    """The ``index``-th permutation of ``items`` (lexicographic by position, modulo the
    number of permutations; 0 leaves them as they are)."""
    pool, out = list(items), []
    index %= math.factorial(len(pool))
    for left in range(len(pool), 0, -1):
        position, index = divmod(index, math.factorial(left - 1))
        out.append(pool.pop(position))
    return out


def make_profile(
    rng: np.random.Generator, name: str, role: str, *, subnet: int, host: int | None = None,
    tier: str = "default", campaign: str = "", segment: str = "",
) -> ClientProfile:
    """A profile with a random client library and an address in ``10.<a>.<b>.0/24``.

    Distinct ``subnet`` numbers give distinct /24 prefixes (the gateway's default width).
    """
    agent, extra = CLIENT_LIBRARIES[int(rng.integers(len(CLIENT_LIBRARIES)))]
    host = int(rng.integers(1, 255)) if host is None else host
    ip = f"10.{(subnet // 256) % 256}.{subnet % 256}.{host}"
    return ClientProfile(name, role, agent, ip, extra, tier, campaign, segment)


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request a client will send at virtual time ``at`` (seconds)."""

    at: float
    client: str  # ClientProfile.name
    route: str
    body: Mapping[str, Any]
    purpose: str = "benign"  # benign | extraction | cover (an attacker's benign-looking query)
    turns: int = 0

    @property
    def model(self) -> str:
        return DIGITS_MODEL if self.route == DIGITS_INFER else str(self.body.get("model", ""))

    @property
    def units(self) -> int:
        """Inputs this request pays for: images for the classifier, texts for embeddings,
        one prompt for a chat (the x-axis of every clone-quality curve)."""
        if self.route == DIGITS_INFER:
            return int(self.body["inputs"][0]["shape"][0])
        value = self.body.get("input")
        return len(value) if isinstance(value, list) else 1


@dataclass(slots=True)
class Exchange:
    """A request as sent and what the gateway answered (``body`` is parsed JSON or None)."""

    request: PlannedRequest
    client: str  # the identity that actually sent it (differs after a key rotation)
    status: int
    latency_ms: float
    body: Any = None
    sent_at: float = 0.0  # virtual time when it left
    headers: dict[str, str] = field(default_factory=dict)
    wall_at: float = 0.0  # epoch seconds when it left (compared with detection's flag times)

    @property
    def ok(self) -> bool:
        return self.status == 200

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) from an OpenAI ``usage`` object, else zeros."""
        usage = self.body.get("usage") if isinstance(self.body, dict) else None
        if not isinstance(usage, dict):
            return 0, 0
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def chat_body(messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": LLM_MODEL, "messages": messages, "max_tokens": max_tokens, **extra}


def embeddings_body(texts: list[str]) -> dict[str, Any]:
    return {"model": EMBED_MODEL, "input": texts}


def digits_body(pixels: np.ndarray, *, labels_only: bool = False) -> dict[str, Any]:
    """An OIP v2 request for ``pixels`` float ``[n, 64]`` (0-16 scale)."""
    rows = np.asarray(pixels, dtype=np.float32).reshape(-1, 64)
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(rows.shape),
             "data": [round(float(v), 4) for v in rows.ravel()]}
        ],
        "outputs": [{"name": "label" if labels_only else "probabilities"}],
    }
