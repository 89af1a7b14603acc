"""Graded reasoning: how much of a reasoning model's chain of thought a client gets.

Reasoning traces are what distillation campaigns harvest: a student trained on a strong
model's step-by-step reasoning learns more from each answer than from the final answers
alone. A hardening profile's ``reasoning`` says what a client at that level gets of them:
``keep`` (all), ``shorten`` (the first ``reasoning_max_chars`` characters, then
:data:`SHORTENED`) or ``drop`` (none). The answer itself is never touched, but a choice's
logprobs go with its reasoning: their tokens would spell it out again.

Reasoning is read where OpenAI-compatible servers put it: ``reasoning_content`` (DeepSeek,
the vLLM and SGLang reasoning parsers) or ``reasoning`` (OpenRouter, newer vLLM) in a
choice's ``message`` or stream ``delta``, the texts of ``reasoning_details`` items, the
``thinking`` parts of a content list (Mistral's Magistral), and a ``<think>…</think>`` or
``[THINK]…[/THINK]`` block that opens the content (servers without a reasoning parser,
whose chat template leaves the opening tag to the model). Each of these places has its own
allowance per choice (servers send ``reasoning_details`` beside ``reasoning``, not instead).

One :class:`ReasoningTrim` serves one answer: a stream's events go through it in order,
and each choice's allowances run across them. A tag split between events is
held back until an event decides it; a choice's last event (the one with a
``finish_reason``), or :meth:`ReasoningTrim.held` at the end of the stream, sends
whatever is still held, so a stream gets what the whole answer would.

>>> trim = ReasoningTrim("shorten", 5)
>>> trim({"choices": [{"message": {"reasoning_content": "abcdefgh", "content": "42"}}]})
{'choices': [{'message': {'reasoning_content': 'abcde […]', 'content': '42'}}]}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ReasoningMode = Literal["keep", "shorten", "drop"]
SHORTENED = " […]"  # ends a shortened reasoning, so a reader knows there was more
OPEN, CLOSE = "<think>", "</think>"
# The tags that open and close a block of reasoning at the start of the content: DeepSeek-R1,
# Qwen3 and QwQ write <think>; Magistral's [THINK] is a special token, seen where the server
# keeps those in the text (vLLM strips them unless a request sets skip_special_tokens false).
TAGS = {OPEN: CLOSE, "[THINK]": "[/THINK]"}
_BLOCK = "block"  # the allowance of a choice's opening block, whichever its tags
MAX_LEAD = 256  # whitespace before an opening tag that still opens the content
_FIELDS = ("reasoning_content", "reasoning")
_DETAIL_TEXTS = ("text", "summary")
_KEPT = frozenset({"type", "signature"})  # strings of a thinking part that reveal nothing
_UNDECIDED, _INSIDE, _OUTSIDE = 0, 1, 2  # where a choice's content is: a block or not


@dataclass(slots=True)
class _Allowance:
    left: int  # characters of reasoning that may still pass
    marked: bool = False  # SHORTENED was written


@dataclass(slots=True)
class _Choice:
    allowances: dict[str, _Allowance] = field(default_factory=dict)  # by where the reasoning is
    place: int = _UNDECIDED
    held: str = ""  # content held back: what may still become a tag
    held_in: str = "content"  # "text" for a legacy completion
    close: str = CLOSE  # the tag that ends the block the content is in


class ReasoningTrim:
    """The reasoning of one answer (whole, or a stream's events in order) cut to a profile.

    ``first``: a transform each payload goes through before (the logprob hardening).
    ``opened``: the content starts inside the reasoning, up to ``</think>`` (a chat template
    that opens ``<think>`` in the prompt); content without one is reasoning throughout.
    ``stream``: set when the answer is an event stream; in a whole answer every choice is
    complete, whatever its ``finish_reason``.
    """

    __slots__ = ("_choices", "_first", "_max_chars", "_mode", "_opened", "stream")

    def __init__(
        self, mode: ReasoningMode, max_chars: int, first: Callable[[Any], Any] | None = None,
        *, opened: bool = False,
    ) -> None:
        if mode == "keep":
            raise ValueError("reasoning 'keep' has nothing to cut: leave the answer alone")
        self._mode = mode
        self._max_chars = max_chars if mode == "shorten" else 0
        self._first = first
        self._opened = opened
        self._choices: dict[int, _Choice] = {}
        self.stream = False

    def rewrite_body(self, body: bytes) -> bytes | None:
        """A whole answer that names no reasoning field, holds no ``think`` (``thinking``
        parts included), no ``THINK`` and no ``\\u`` escape (the one JSON escape that can
        hide a letter) goes back as it came: most answers have no reasoning, and parsing
        and writing them again would change nothing but bytes. None: parse it."""
        if self._first is None and not self._opened and not any(
            word in body for word in (b"reasoning", b"think", b"THINK", b"\\u")
        ):
            return body
        return None

    def __call__(self, payload: Any) -> Any:
        """Cut ``payload``'s reasoning in place and return it (anything else is untouched)."""
        if self._first is not None:
            payload = self._first(payload)
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            return payload
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            key = index if isinstance(index, int) else position
            state = self._choices.get(key)
            if state is None:
                state = self._choices[key] = _Choice(place=_INSIDE if self._opened else _UNDECIDED)
            part = choice.get("message") if "message" in choice else choice.get("delta")
            final = not self.stream or choice.get("finish_reason") is not None
            seen = False
            if isinstance(part, dict):
                content = part.get("content")
                if isinstance(content, list) and content:  # before drop empties it
                    self._before_parts(content, state, final)
                seen = self._fields(part, state)
                seen = self._text(part, "content", state, final) or seen
            if "text" in choice:  # legacy completions
                state.held_in = "text"
                seen = self._text(choice, "text", state, final) or seen
            if seen and choice.get("logprobs") is not None:
                choice["logprobs"] = None
        return payload

    def held(self) -> list[dict[str, Any]]:
        """The content still held by choices that never finished, as stream choices (sent
        by the stage as one more event before the stream ends)."""
        choices = []
        for index, state in self._choices.items():
            if state.held:
                holder: dict[str, Any] = {state.held_in: ""}
                self._text(holder, state.held_in, state, final=True)
                choice: dict[str, Any] = {"index": index, "finish_reason": None}
                choices.append({**choice, "text": holder["text"]} if state.held_in == "text"
                               else {**choice, "delta": holder})
        return choices

    def _fields(self, part: dict[str, Any], state: _Choice) -> bool:
        """Cut the reasoning fields of a message or delta, and the thinking parts of its
        content list; whether there was any."""
        seen = False
        for name in _FIELDS:
            value = part.get(name)
            if isinstance(value, str):
                seen = seen or bool(value)
                if self._mode == "drop":
                    del part[name]
                else:
                    part[name] = self._allow(value, state, name)
        details = part.get("reasoning_details")
        if isinstance(details, list):
            seen = seen or bool(details)
            if self._mode == "drop":
                del part["reasoning_details"]
                return seen
            for item in details:
                for name in _DETAIL_TEXTS if isinstance(item, dict) else ():
                    if isinstance(item.get(name), str):
                        item[name] = self._allow(item[name], state, "reasoning_details")
        content = part.get("content")
        if isinstance(content, list):
            seen = self._thinking_parts(content, state) or seen
        return seen

    def _thinking_parts(self, content: list[Any], state: _Choice) -> bool:
        """Cut the ``thinking`` parts of a content list (Mistral: ``{"type": "thinking",
        "thinking": [{"type": "text", "text": ...}]}``, or the text itself); whether there
        were any. Parts of other types are the answer."""
        parts = [i for i, item in enumerate(content)
                 if isinstance(item, dict) and item.get("type") == "thinking"]
        if self._mode == "drop":
            for i in reversed(parts):
                del content[i]
            return bool(parts)
        for i in parts:
            self._cut_texts(content[i], state)
        return bool(parts)

    def _cut_texts(self, part: dict[str, Any], state: _Choice) -> None:
        """Every string of a thinking part but its ``type`` and ``signature`` (opaque),
        in order and however nested, cut to the choice's allowance: a shape this does not
        know is cut too, not passed whole. Walked without recursion (JSON may nest 1,024
        deep)."""
        stack: list[tuple[Any, Any]] = [(part, key) for key in reversed(part) if key not in _KEPT]
        while stack:
            holder, key = stack.pop()
            value = holder[key]
            if isinstance(value, str):
                holder[key] = self._allow(value, state, "thinking")
            elif isinstance(value, list):
                stack.extend((value, i) for i in reversed(range(len(value))))
            elif isinstance(value, dict):
                stack.extend((value, name) for name in reversed(value) if name not in _KEPT)

    def _allow(self, text: str, state: _Choice, where: str) -> str:
        """What passes of the next ``text`` of reasoning found ``where``."""
        allowance = state.allowances.get(where)
        if allowance is None:
            allowance = state.allowances[where] = _Allowance(self._max_chars)
        kept = text[: allowance.left]
        allowance.left -= len(kept)
        if len(kept) < len(text) and self._mode == "shorten" and not allowance.marked:
            allowance.marked = True
            return kept + SHORTENED
        return kept

    def _text(self, part: dict[str, Any], name: str, state: _Choice, final: bool) -> bool:
        """Cut a block of reasoning (:data:`TAGS`) that opens ``part[name]`` (content, or a
        completion's text); whether this piece held any of it."""
        value = part.get(name)
        if isinstance(value, list):
            return False  # content parts: see _before_parts
        if not isinstance(value, str) and not (final and state.held):
            return False
        text = state.held + (value if isinstance(value, str) else "")
        state.held = ""
        out: list[str] = []
        seen = False
        while text:
            if state.place == _UNDECIDED:
                opened = text.lstrip()
                if len(text) - len(opened) > MAX_LEAD:
                    state.place = _OUTSIDE
                    continue
                if not final and any(len(opened) < len(tag) and tag.startswith(opened) for tag in TAGS):
                    state.held = text  # whitespace so far, or a tag cut short: wait
                    break
                tag = next((tag for tag in TAGS if opened.startswith(tag)), None)
                if tag is None:
                    state.place = _OUTSIDE
                    continue
                state.place, state.close, seen = _INSIDE, TAGS[tag], True
                out.append(text[: len(text) - len(opened)])
                if self._mode == "shorten":
                    out.append(tag)
                text = opened[len(tag) :]
            elif state.place == _INSIDE:
                seen = True
                end = text.find(state.close)
                if end < 0:
                    keep = 0 if final else _tag_prefix(text, state.close)
                    out.append(self._allow(text[: len(text) - keep], state, _BLOCK))
                    state.held = text[len(text) - keep :]
                    break
                out.append(self._allow(text[:end], state, _BLOCK))
                if self._mode == "shorten":
                    out.append(state.close)
                state.place = _OUTSIDE
                text = text[end + len(state.close) :]
            else:
                out.append(text)
                break
        if isinstance(value, str) or out:
            part[name] = "".join(out)
        return seen

    def _before_parts(self, parts: list[Any], state: _Choice, final: bool) -> None:
        """A content list with parts, before any block opened: no block can open the
        content any more (the whole answer's list is not read for tags either), so text
        held as a possible opening goes out before the list, as text. An open block stays
        open, its closing tag may still come; at the choice's last event what it holds is
        cut and goes out there."""
        if state.place == _UNDECIDED:
            state.place, text = _OUTSIDE, state.held
        elif state.place == _INSIDE and final:
            text = self._allow(state.held, state, _BLOCK)
        else:
            return
        state.held = ""
        if text:
            parts.insert(0, {"type": "text", "text": text})


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (0: none)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
