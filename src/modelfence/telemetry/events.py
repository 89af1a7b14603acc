"""One event per request: the unit that telemetry stores and detection consumes.

The gateway fills a :class:`RequestEvent` at the end of every inference request and hands
it to the pipeline without waiting. The red-team harness's replay mode builds the same
events from generated traffic, so both paths feed detection identically.

Privacy: ``prompt_text`` travels to the detector (it needs it for embeddings) but sinks
store it only when configured to; hashes, lengths and embeddings are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class RequestEvent:
    ts: float  # epoch seconds at arrival
    request_id: str
    client: str
    key_id: str
    tier: str
    route: str  # route template, e.g. "/v1/chat/completions"
    model: str
    status: int
    # who it looks like
    account: str = ""  # the key's account (organisation), if it has one
    trust: str = ""  # the account's trust level when the request arrived
    ip_prefix: str = ""
    fingerprint: str = ""  # Fingerprint.digest
    client_library: str = ""
    user_agent: str = ""
    # request parameters that matter for extraction
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias_size: int = 0
    stream: bool = False
    # the input
    prompt_hash: str = ""  # keyed hash of the normalised last user turn / input
    cot: bool = False  # some turn, the system message included, asks for the reasoning
    frame_hash: str = ""  # keyed hash of a chat's frame: system messages + the user turn's opening
    prompt_len: int = 0  # characters
    turns: int = 0  # messages in the conversation (0 for non-chat routes)
    prompt_text: str | None = None  # last user turn / input text; stored only if configured
    input_texts: list[str] | None = None  # embeddings: every input text (capped); never stored
    input_rows: list[list[float]] | None = None  # classifier inputs (OIP): one feature row per input
    input_count: int = 0  # every input it carried (rows, texts, prompts), past the caps above
    # the output, summarised
    output_label: int | None = None  # classifier: predicted class of the first row
    output_margins: list[float] | None = None  # classifier: top-1 minus top-2, per row
    tokens_in: int = 0
    tokens_out: int = 0
    # what the gateway decided
    latency_ms: float = 0.0
    limit_decision: str = "allowed"  # allowed | denied:<dimension> | fail_open | degraded ...
    risk_level: str = "normal"  # the client's risk level when the request arrived
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A shallow field copy: events are never mutated once built, and ``asdict``'s deep
        copy cost several percent of the gateway's CPU (three uses per request)."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}


_FIELD_NAMES = tuple(f.name for f in fields(RequestEvent))


EVENT_BYTES = 1024  # an event's fixed fields, roughly
_FLOAT_BYTES = 32  # a float in a list: the object and its slot


def approx_bytes(event: RequestEvent) -> int:
    """Roughly the memory ``event`` holds, counting its variable-size parts: what the
    pipeline's byte bounds add up (cheap: no walk over strings)."""
    size = EVENT_BYTES + len(event.prompt_text or "")
    if event.input_texts:
        size += sum(map(len, event.input_texts)) + 64 * len(event.input_texts)
    if event.input_rows:
        size += sum(map(len, event.input_rows)) * _FLOAT_BYTES
    if event.output_margins:
        size += len(event.output_margins) * _FLOAT_BYTES
    return size
