"""After-the-fact text marking stage: per-client lexical marks on answers of hosted upstreams.

For chat and completions answers of the upstreams named in ``watermark.lexical.upstreams``
(those we cannot mark while sampling), each choice's text goes through the client's
:class:`~modelfence.watermark.lexical.LexicalMark`. Whole JSON answers are marked at once; a
stream keeps one streaming rewriter per choice, so each event carries the marked text of
its own delta, less at most the few trailing words still undecided, which follow in a later
event. Whatever is still held when the choice finishes rides on its ``finish_reason`` event;
a stream that ends without one gets an extra event before ``[DONE]``. The marked stream is
character for character the marked whole answer.

Requests for JSON output (``response_format``) pass through untouched, as do other routes,
other upstreams, non-200 answers and unauthenticated requests.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from modelfence.gateway.context import context_of
from modelfence.gateway.rewrite import (
    BodyRewriter,
    ClosedEvents,
    PayloadTransform,
    ResponseRewriting,
    SSERewriter,
    Unread,
)
from modelfence.operations import Operation
from modelfence.types import ASGIApp, Headers, Scope
from modelfence.watermark.config import LexicalConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.lexical import LEXICAL_PURPOSE, LexicalMark, Rewriter
from modelfence.watermark.lexicon import Lexicon, default_lexicon


@dataclass(frozen=True, slots=True)
class _Plan:
    mark: LexicalMark
    chat: bool  # text under message/delta "content"; else under "text" (completions)


class ChoiceMarks:
    """One answer's marking: called on a whole JSON answer, or :meth:`event` per stream event."""

    def __init__(self, mark: LexicalMark, *, chat: bool) -> None:
        self._mark = mark
        self._chat = chat
        self._open: dict[int, Rewriter] = {}  # choices of a stream that have not finished

    def __call__(self, payload: Any) -> Any:
        for choice in _choices(payload):
            holder = choice.get("message") if self._chat else choice
            if not isinstance(holder, dict):
                continue
            content = holder.get(self._key)
            if isinstance(content, str):
                holder[self._key] = self._mark.text(content)
            parts = _text_parts(content)
            if parts:  # one text across its parts, as a stream marks them
                rewriter = self._mark.rewriter()
                for part in parts:
                    part["text"] = rewriter.feed(part["text"])
                parts[-1]["text"] += rewriter.flush()
        return payload

    def event(self, payload: Any) -> Any:
        """Mark one stream event's deltas; a finished choice gets everything still held."""
        for position, choice in enumerate(_choices(payload)):
            index = choice.get("index", 0)
            if not isinstance(index, Hashable):  # an upstream's odd index: the choice's place
                index = position
            rewriter = self._open.get(index)
            if rewriter is None:
                rewriter = self._open[index] = self._mark.rewriter()
            holder = choice.get("delta") if self._chat else choice
            if not isinstance(holder, dict):
                continue
            text = holder.get(self._key)
            if isinstance(text, list):  # content parts: their text parts are the answer's
                self._parts(text, rewriter, index, choice.get("finish_reason") is not None)
                continue
            text = text if isinstance(text, str) else ""
            if choice.get("finish_reason") is not None:
                out = rewriter.flush(text)
                del self._open[index]
            else:
                out = rewriter.feed(text)
            if out or self._key in holder:
                holder[self._key] = out
        return payload

    def _parts(self, content: list[Any], rewriter: Rewriter, index: int, finished: bool) -> None:
        """Mark the text parts of a delta's content list (other parts, such as Magistral's
        thinking, pass as they are); a finished choice's held text ends the list."""
        for part in _text_parts(content):
            part["text"] = rewriter.feed(part["text"])
        if finished:
            rest = rewriter.flush()
            if rest:
                content.append({"type": "text", "text": rest})
            del self._open[index]

    def held(self) -> list[dict[str, Any]]:
        """The text still held by choices that never finished, as stream choices."""
        rests = {index: rewriter.flush() for index, rewriter in self._open.items()}
        self._open.clear()
        return [self._choice(index, rest) for index, rest in rests.items() if rest]

    @property
    def _key(self) -> str:
        return "content" if self._chat else "text"

    def _choice(self, index: int, text: str) -> dict[str, Any]:
        if self._chat:
            return {"index": index, "delta": {"content": text}, "finish_reason": None}
        return {"index": index, "text": text, "finish_reason": None}


def _text_parts(content: Any) -> list[dict[str, Any]]:
    """The ``text`` parts of a content list (none for string content)."""
    if not isinstance(content, list):
        return []
    return [part for part in content if isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str)]


def _choices(payload: Any) -> list[dict[str, Any]]:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


class LexicalWatermark(ResponseRewriting[_Plan]):
    def __init__(
        self, app: ASGIApp, *, config: LexicalConfig, keyring: WatermarkKeyring,
        upstreams: frozenset[str], lexicon: Lexicon | None = None, on_unread: Unread | None = None,
    ) -> None:
        """``upstreams``: the names of the upstreams to mark (``config.upstreams`` resolved)."""
        super().__init__(app, on_unread=on_unread)
        self.config = config
        self.keyring = keyring
        self.upstreams = upstreams
        self.lexicon = lexicon or default_lexicon()

    def plan(self, scope: Scope) -> _Plan | None:
        ctx = context_of(scope)
        operation = ctx.operation
        if ctx.key is None or operation is None or not operation.generates_text:
            return None
        if ctx.upstream not in self.upstreams or _wants_json(ctx.body):
            return None
        seed = self.keyring.key(ctx.key.client).seed(LEXICAL_PURPOSE)
        mark = LexicalMark(self.lexicon, seed, max_change_share=self.config.max_change_share)
        return _Plan(mark, operation is Operation.CHAT)

    async def transform_for(self, scope: Scope, plan: _Plan, status: int) -> PayloadTransform | None:
        return ChoiceMarks(plan.mark, chat=plan.chat) if status == 200 else None

    def body_rewriter(self, headers: Headers, transform: PayloadTransform) -> BodyRewriter | None:
        rewriter = super().body_rewriter(headers, transform)
        if isinstance(rewriter, SSERewriter) and isinstance(transform, ChoiceMarks):
            return ClosedEvents(transform.event, transform.held, self.on_unread)
        return rewriter


def marked_upstreams(config: LexicalConfig, names: Iterable[str]) -> frozenset[str]:
    """The upstream names that ``config`` marks (its entries may be fnmatch patterns)."""
    if not config.enabled:
        return frozenset()
    return frozenset(n for n in names if any(fnmatchcase(n, p) for p in config.upstreams))


def _wants_json(body: dict[str, Any]) -> bool:
    """Whether the client asked for JSON output (a rewritten word could break it)."""
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") != "text"
