"""Graded reasoning: a chain of thought shortened or dropped, whole answers and streams alike."""

from __future__ import annotations

import copy
import random
from typing import Any

import orjson
import pytest

from modelfence.gateway.rewrite import ClosedEvents
from modelfence.policy.config import Hardening, PolicyConfig
from modelfence.policy.reasoning import SHORTENED, ReasoningTrim
from modelfence.policy.risk import RiskLevel

THOUGHT = "First, 6 times 7. Six sevens are forty-two. Check: 42 / 7 = 6. So the answer is 42."


def whole(message: dict[str, Any], **choice: Any) -> dict[str, Any]:
    return {"object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message, **choice}]}


def test_reasoning_fields_are_shortened_or_dropped_and_the_answer_kept() -> None:
    message = {"role": "assistant", "content": "42", "reasoning_content": THOUGHT}
    out = ReasoningTrim("shorten", 20)(whole(dict(message)))["choices"][0]["message"]
    assert out == {**message, "reasoning_content": THOUGHT[:20] + SHORTENED}
    out = ReasoningTrim("shorten", 500)(whole(dict(message)))["choices"][0]["message"]
    assert out == message  # within the allowance: untouched
    out = ReasoningTrim("drop", 20)(whole(dict(message)))["choices"][0]["message"]
    assert out == {"role": "assistant", "content": "42"}
    details = [{"type": "reasoning.text", "text": THOUGHT}, {"type": "reasoning.encrypted", "data": "x"}]
    out = ReasoningTrim("shorten", 10)(whole(
        {"content": "42", "reasoning": THOUGHT, "reasoning_details": copy.deepcopy(details)}))
    message = out["choices"][0]["message"]
    assert message["reasoning"] == THOUGHT[:10] + SHORTENED
    assert message["reasoning_details"] == [{**details[0], "text": THOUGHT[:10] + SHORTENED}, details[1]]
    out = ReasoningTrim("drop", 10)(whole({"content": "42", "reasoning": THOUGHT,
                                                 "reasoning_details": details}))
    assert out["choices"][0]["message"] == {"content": "42"}
    with pytest.raises(ValueError, match="keep"):
        ReasoningTrim("keep", 10)


@pytest.mark.parametrize(("mode", "content", "expected"), [
    ("shorten", f"<think>{THOUGHT}</think>\n\n42", f"<think>{THOUGHT[:12]}{SHORTENED}</think>\n\n42"),
    ("drop", f"<think>{THOUGHT}</think>\n\n42", "\n\n42"),
    ("drop", f"\n <think>{THOUGHT}</think>42", "\n 42"),
    ("drop", f"<think>{THOUGHT}", ""),  # cut off while thinking: all of it is reasoning
    ("shorten", "<think>short</think>42", "<think>short</think>42"),
    ("drop", "The tag <think> starts a block.", "The tag <think> starts a block."),  # not at the start
    ("drop", "<thinking>", "<thinking>"),
    ("drop", " " * 256 + "<think>x</think>42", " " * 256 + "42"),
    ("drop", " " * 257 + "<think>x</think>42", " " * 257 + "<think>x</think>42"),  # held no longer
    ("drop", "  ", "  "),
    ("shorten", f"[THINK]{THOUGHT}[/THINK]42", f"[THINK]{THOUGHT[:12]}{SHORTENED}[/THINK]42"),
    ("drop", f"\n[THINK]{THOUGHT}[/THINK]\n42", "\n\n42"),
    ("drop", f"[THINK]{THOUGHT}</think>42", ""),  # a block ends with its own closing tag
    ("drop", f"<think>{THOUGHT}[/THINK]42", ""),
    ("drop", "[THINKING] is a word here.", "[THINKING] is a word here."),
])
def test_a_think_block_that_opens_the_content(mode: Any, content: str, expected: str) -> None:
    out = ReasoningTrim(mode, 12)(whole({"content": content}))
    assert out["choices"][0]["message"]["content"] == expected
    for finish in ("stop", None):  # a whole answer is complete, whatever its finish_reason
        legacy = ReasoningTrim(mode, 12)({"choices": [{"index": 0, "text": content, "finish_reason": finish}]})
        assert legacy["choices"][0]["text"] == expected


def stream(trim: ReasoningTrim, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deltas as a stream's events (the last with a finish_reason), through ``trim``."""
    trim.stream = True
    out = []
    for i, delta in enumerate(deltas):
        event = {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) - 1 else None}]}
        out.append(trim(orjson.loads(orjson.dumps(event)))["choices"][0]["delta"])
    return out


def joined(deltas: list[dict[str, Any]], name: str) -> str:
    return "".join(d.get(name) or "" for d in deltas)


def sse(trim: ReasoningTrim, deltas: list[dict[str, Any]], done: bool) -> list[dict[str, Any]]:
    """The deltas as a stream's bytes, no event with a finish_reason (as some servers send
    them), through the stage's event rewriter: the choices' deltas that come out."""
    events = b"".join(b"data: " + orjson.dumps({"choices": [
        {"index": 0, "delta": d, "finish_reason": None}]}) + b"\n\n" for d in deltas)
    trim.stream = True
    rewriter = ClosedEvents(trim, trim.held)
    out = rewriter.feed(events, True) + rewriter.feed(b"data: [DONE]\n\n" if done else b"", False)
    assert out.endswith(b"data: [DONE]\n\n") == done
    return [orjson.loads(e[6:])["choices"][0]["delta"] for e in out.split(b"\n\n") if e.startswith(b"data: {")]


CONTENTS = {  # for a <think> the model writes, and for one the chat template opened
    False: (f"<think>{THOUGHT}</think>\n\nThe answer is 42.", f" \n<think>{THOUGHT}",
            "Plain answer, no thinking. <think> later is text.", "<thin", "   ",
            f"<think>{THOUGHT}</th", " " * 300 + f"<think>{THOUGHT}</think>42",
            " " * 250 + f"<think>{THOUGHT}</think>42", f"[THINK]{THOUGHT}[/THINK]\n\n42",
            f" [THINK]{THOUGHT}[/THI", "[THIN", f"<think>{THOUGHT}[/THINK]42</think>x"),
    True: (f"{THOUGHT}</think>\n\nThe answer is 42.", f"{THOUGHT}</th", THOUGHT, "</think>42"),
}


@pytest.mark.parametrize("opened", [False, True])
@pytest.mark.parametrize("mode", ["shorten", "drop"])
def test_a_stream_gets_what_the_whole_answer_gets_however_it_is_cut(mode: Any, opened: bool) -> None:
    rng = random.Random(7)
    for content in CONTENTS[opened]:
        want = ReasoningTrim(mode, 25, opened=opened)(whole({"content": content}))["choices"][0]["message"]
        for trial in range(200):
            cuts = sorted(rng.sample(range(1, len(content)), min(len(content) - 1, rng.randint(1, 12))))
            pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)], strict=True)]
            deltas = stream(ReasoningTrim(mode, 25, opened=opened), [{"content": p} for p in pieces] + [{}])
            assert joined(deltas, "content") == want["content"], pieces
            # A stream whose last event has no finish_reason: what is held goes out at the end.
            unfinished = sse(ReasoningTrim(mode, 25, opened=opened), [{"content": p} for p in pieces],
                             trial % 2 == 0)
            assert joined(unfinished, "content") == want["content"], pieces


@pytest.mark.parametrize(("mode", "content", "expected"), [
    ("drop", f"{THOUGHT}</think>\n\n42", "\n\n42"),
    ("shorten", f"{THOUGHT}</think>42", f"{THOUGHT[:12]}{SHORTENED}</think>42"),
    ("drop", THOUGHT, ""),  # no </think>: reasoning throughout (cut off while thinking)
])
def test_a_think_block_the_chat_template_opened(mode: Any, content: str, expected: str) -> None:
    out = ReasoningTrim(mode, 12, opened=True)(whole({"content": content}))
    assert out["choices"][0]["message"]["content"] == expected
    assert ReasoningTrim(mode, 12, opened=True).rewrite_body(b'{"choices":[]}') is None  # always read


def test_an_unterminated_last_event_is_cut_and_the_held_text_follows_it() -> None:
    trim = ReasoningTrim("drop", 0)
    trim.stream = True
    rewriter = ClosedEvents(trim, trim.held)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"<thi"},"finish_reason":null}]}\n\n'
    last = (b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"SECRET"},'
            b'"logprobs":{"content":[1]},"finish_reason":null}]}')
    out = rewriter.feed(first, True) + rewriter.feed(last, False)
    assert b"SECRET" not in out and b'"logprobs":{' not in out
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["", None, "<thi"]
    trim = ReasoningTrim("drop", 0)
    trim.stream = True
    rewriter = ClosedEvents(trim, trim.held)
    out = rewriter.feed(first, True) + rewriter.feed(b"data: [DONE]", False)
    *_, held, done, end = out.split(b"\n\n")
    assert orjson.loads(held[6:])["choices"][0]["delta"] == {"content": "<thi"}
    assert (done, end) == (b"data: [DONE]", b"")  # the held text goes out before [DONE]


def test_reasoning_deltas_share_one_allowance_per_choice() -> None:
    pieces = [THOUGHT[i : i + 9] for i in range(0, len(THOUGHT), 9)]
    deltas = stream(ReasoningTrim("shorten", 30), [{"reasoning_content": p} for p in pieces]
                    + [{"content": "42"}])
    assert joined(deltas, "reasoning_content") == THOUGHT[:30] + SHORTENED
    assert joined(deltas, "content") == "42"
    deltas = stream(ReasoningTrim("drop", 30), [{"reasoning_content": p} for p in pieces]
                    + [{"content": "42"}])
    assert all("reasoning_content" not in d for d in deltas) and joined(deltas, "content") == "42"
    # Two choices of one stream (n=2) each have their own, found by index, not by position.
    trim = ReasoningTrim("shorten", 5)
    trim.stream = True
    first = trim({"choices": [{"index": 1, "delta": {"reasoning_content": "abcd"}, "finish_reason": None}]})
    assert first["choices"][0]["delta"] == {"reasoning_content": "abcd"}
    second = trim({"choices": [{"index": 0, "delta": {"reasoning_content": "abcd"}, "finish_reason": None},
                               {"index": 1, "delta": {"reasoning_content": "efgh"}, "finish_reason": None}]})
    assert [c["delta"]["reasoning_content"] for c in second["choices"]] == ["abcd", "e" + SHORTENED]


def mistral(thinking: Any, answer: str = "42") -> list[dict[str, Any]]:
    """A Magistral content list: a thinking part, then the answer's text part."""
    return [{"type": "thinking", "thinking": thinking}, {"type": "text", "text": answer}]


def test_thinking_parts_of_a_content_list_are_shortened_or_dropped() -> None:
    for thinking in ([{"type": "text", "text": THOUGHT}], THOUGHT):
        out = ReasoningTrim("drop", 10)(whole({"role": "assistant", "content": mistral(copy.deepcopy(thinking))}))
        assert out["choices"][0]["message"]["content"] == [{"type": "text", "text": "42"}]
        out = ReasoningTrim("shorten", 10)(whole({"content": mistral(copy.deepcopy(thinking))}))
        cut = THOUGHT[:10] + SHORTENED
        assert out["choices"][0]["message"]["content"] == mistral(
            [{"type": "text", "text": cut}] if isinstance(thinking, list) else cut)
    # Streamed, one allowance runs across the choice's thinking parts.
    pieces = [THOUGHT[i : i + 9] for i in range(0, len(THOUGHT), 9)]
    deltas = stream(ReasoningTrim("shorten", 30),
                    [{"content": [{"type": "thinking", "thinking": [{"type": "text", "text": p}]}]}
                     for p in pieces] + [{"content": "42"}])
    thoughts = "".join(c["thinking"][0]["text"] for d in deltas[:-1] for c in d["content"])
    assert thoughts == THOUGHT[:30] + SHORTENED and deltas[-1]["content"] == "42"
    deltas = stream(ReasoningTrim("drop", 30), [{"content": mistral(p, "")} for p in pieces])
    assert all(d["content"] == [{"type": "text", "text": ""}] for d in deltas)
    logprobs = {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": []}]}
    out = ReasoningTrim("shorten", 500)(whole({"content": mistral("short")}, logprobs=logprobs))
    assert out["choices"][0]["logprobs"] is None  # their tokens would spell the thinking out


def test_text_held_for_a_tag_goes_out_before_a_content_list() -> None:
    deltas = stream(ReasoningTrim("drop", 0), [{"content": " <th"}, {"content": mistral("secret", "42")}, {}])
    assert deltas[0] == {"content": ""}
    assert deltas[1]["content"] == [{"type": "text", "text": " <th"}, {"type": "text", "text": "42"}]
    # An open block stays open across a content list; nothing of it passes.
    trim = ReasoningTrim("drop", 0)
    deltas = stream(trim, [{"content": "<think>abc</th"}, {"content": mistral("x", "42")}, {"content": "ink>ok"}])
    assert [d["content"] for d in deltas] == ["", [{"type": "text", "text": "42"}], "ok"]
    # After a content list no block opens the content: a tag in later text is text, as in
    # the whole answer (whose list is not read for tags).
    answer = "  [THINK]x[/THINK]42"
    whole_content = ReasoningTrim("drop", 0)(whole({"content": mistral("t", answer)}))["choices"][0]["message"]["content"]
    deltas = stream(ReasoningTrim("drop", 0), [{"content": mistral("t", "")}, {"content": answer[:4]},
                                               {"content": answer[4:]}])
    assert whole_content[0]["text"] == "".join(d["content"] for d in deltas[1:]) == answer


def test_an_empty_content_list_changes_nothing_and_a_last_list_event_sends_what_is_held() -> None:
    deltas = stream(ReasoningTrim("drop", 0), [{"role": "assistant", "content": []},
                                               {"content": "<think>secret</think>"}, {"content": "42"}])
    assert [d["content"] for d in deltas] == [[], "", "42"]  # as the whole "<think>secret</think>42"
    trim = ReasoningTrim("shorten", 100)
    deltas = stream(trim, [{"content": "<think>abc</th"}, {"content": mistral("x", "42")}])
    assert deltas[-1]["content"][0] == {"type": "text", "text": "</th"}  # in the finishing event
    assert trim.held() == []


def test_thinking_parts_of_any_shape_are_cut_not_passed() -> None:
    shapes = [{"type": "text", "text": THOUGHT}, [[THOUGHT]], {"text": [{"type": "text", "text": THOUGHT}]},
              [{"type": "text", "text": {"value": THOUGHT}}], [{"content": THOUGHT}]]
    for thinking in shapes:
        content = [{"type": "thinking", "thinking": copy.deepcopy(thinking)}, {"type": "text", "text": "42"}]
        out = ReasoningTrim("shorten", 10)(whole({"content": content}))["choices"][0]["message"]["content"]
        assert THOUGHT not in orjson.dumps(out).decode() and (THOUGHT[:10] + SHORTENED) in orjson.dumps(out).decode()
        assert out[1] == {"type": "text", "text": "42"}
    for key in ("text", "summary"):  # beside the type, not under "thinking"
        part = {"type": "thinking", key: THOUGHT, "signature": "opaque-" * 30}
        out = ReasoningTrim("shorten", 10)(whole({"content": [part]}))["choices"][0]["message"]["content"]
        assert out == [{**part, key: THOUGHT[:10] + SHORTENED}]  # the signature is kept
    deep: Any = THOUGHT
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    out = ReasoningTrim("shorten", 10)(whole({"content": [{"type": "thinking", "thinking": deep}]}))
    innermost = out["choices"][0]["message"]["content"][0]["thinking"]
    while isinstance(innermost, list):
        innermost = innermost[0]
    assert innermost == THOUGHT[:10] + SHORTENED


def test_each_place_of_reasoning_has_its_own_allowance() -> None:
    out = ReasoningTrim("shorten", 5)(whole({"content": "42", "reasoning_content": "abcdefgh",
                                            "reasoning": "abcdefgh"}))
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "abcde" + SHORTENED


def test_logprobs_go_with_the_reasoning_they_would_spell_out() -> None:
    logprobs = {"content": [{"token": "<think>", "logprob": -0.1, "top_logprobs": []}]}
    out = ReasoningTrim("drop", 0)(whole({"content": "<think>secret</think>42"}, logprobs=logprobs))
    assert out["choices"][0]["logprobs"] is None and out["choices"][0]["message"]["content"] == "42"
    out = ReasoningTrim("drop", 0)(whole({"content": "42"}, logprobs=logprobs))
    assert out["choices"][0]["logprobs"] == logprobs  # no reasoning: kept
    legacy = {"choices": [{"index": 0, "text": "<think>secret</think>42", "finish_reason": "stop",
                           "logprobs": {"tokens": ["<think>", "secret"], "text_offset": [0, 7]}}]}
    assert ReasoningTrim("shorten", 3)(legacy)["choices"][0]["logprobs"] is None
    trim, events = ReasoningTrim("shorten", 3), []
    trim.stream = True
    for delta in ({"reasoning_content": "secret"}, {"content": "<think>more"}, {"content": "</think>4"},
                  {"content": "2"}):
        event = {"choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}]}
        events.append(trim(event)["choices"][0]["logprobs"])
    assert events == [None, None, None, logprobs]


def test_answers_without_reasoning_go_back_as_they_came() -> None:
    body = orjson.dumps(whole({"role": "assistant", "content": "42"})) + b" "
    assert ReasoningTrim("drop", 0).rewrite_body(body) is body
    for escaped in (b'{"choices":[{"message":{"content":"\\u003cthink\\u003eabc\\u003c/think\\u003e42"}}]}',
                    b'{"choices":[{"message":{"content":"<\\u0074hink>abc</\\u0074hink>42"}}]}'):
        assert ReasoningTrim("drop", 0).rewrite_body(escaped) is None  # parsed: the tag is there
        assert ReasoningTrim("drop", 0)(orjson.loads(escaped))["choices"][0]["message"]["content"] == "42"
    for marked in (orjson.dumps(whole({"content": mistral("secret")})),
                   orjson.dumps(whole({"content": "[THINK]secret[/THINK]42"}))):
        assert ReasoningTrim("drop", 0).rewrite_body(marked) is None
    hardened_first = ReasoningTrim("drop", 0, first=lambda payload: payload)
    assert hardened_first.rewrite_body(body) is None  # the logprob hardening must see it


def test_an_allowance_that_cuts_nothing_keeps_a_profile_the_identity() -> None:
    assert Hardening(reasoning_max_chars=1000).is_identity
    assert not Hardening(reasoning="shorten").is_identity
    assert Hardening(reasoning="drop").for_classifiers.is_identity


def test_the_default_policy_grades_reasoning_by_risk() -> None:
    tier = PolicyConfig().for_tier("default")
    assert tier.profile(RiskLevel.NORMAL).reasoning == "keep"
    assert tier.profile(RiskLevel.ELEVATED).reasoning == "shorten"
    assert tier.profile(RiskLevel.ELEVATED).reasoning_max_chars == 400
    assert tier.profile(RiskLevel.HIGH).reasoning == "drop"
