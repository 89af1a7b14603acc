"""SSETap: usage recorded, usage the client did not ask for removed, nothing held back."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from modelfence.gateway.rewrite import ClosedEvents, JsonRewriter, SSERewriter
from modelfence.gateway.streaming import SSETap


def _event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


CHUNKS = [
    _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None}),
    _event({"id": "c", "choices": [{"index": 0, "delta": {"content": "!"}}], "usage": None}),
    _event({"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}),
    b"data: [DONE]\n\n",
]


def _events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


def test_strips_what_include_usage_added_but_records_usage() -> None:
    tap = SSETap(strip_usage=True)
    out = b"".join(tap.feed(chunk) for chunk in CHUNKS) + tap.flush()
    events = _events(out)
    assert len(events) == 3
    assert events[-1] == b"data: [DONE]"
    for event in events[:-1]:
        payload = orjson.loads(event[6:])
        assert "usage" not in payload
        assert payload["choices"]
    assert tap.usage == (7, 2)
    assert tap.content_events == 2


def test_keeps_usage_when_the_client_asked_for_it() -> None:
    tap = SSETap(strip_usage=False)
    out = b"".join(tap.feed(chunk) for chunk in CHUNKS) + tap.flush()
    assert out == b"".join(CHUNKS)
    assert tap.usage == (7, 2)


def test_complete_events_are_forwarded_at_once() -> None:
    tap = SSETap(strip_usage=True)
    first = tap.feed(CHUNKS[0][:10])
    assert first == b""  # a partial event waits for its end ...
    second = tap.feed(CHUNKS[0][10:])
    assert _events(second)  # ... and goes out as soon as it is complete


def test_crlf_streams_are_understood() -> None:
    tap = SSETap(strip_usage=True)
    out = b"".join(tap.feed(c.replace(b"\n", b"\r\n")) for c in CHUNKS)
    assert tap.usage == (7, 2)
    assert len(_events(out)) == 3


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_output(cuts: list[int]) -> None:
    whole = b"".join(CHUNKS)
    reference = SSETap(strip_usage=True)
    expected = reference.feed(whole) + reference.flush()
    tap = SSETap(strip_usage=True)
    out, pos = [], 0
    for cut in cuts:
        out.append(tap.feed(whole[pos : pos + cut]))
        pos += cut
    out.append(tap.feed(whole[pos:]))
    out.append(tap.flush())
    assert b"".join(out) == expected
    assert tap.usage == (7, 2)


FRAMINGS = {  # what the spec allows besides "data: {...}\n\n"
    "CRLF": lambda event: event.replace(b"\n", b"\r\n"),
    "CR": lambda event: event.replace(b"\n", b"\r"),
    "no space after data:": lambda event: event.replace(b"data: ", b"data:"),
    "an event field first": lambda event: b"event: message\n" + event,
    "a byte-order mark first": lambda event: event,
}
OPENINGS = {"a byte-order mark first": "\ufeff".encode()}  # before the stream's first event


@given(st.sampled_from(sorted(FRAMINGS)), st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_every_framing_of_the_spec_is_read_and_rewritten(framing: str, cuts: list[int]) -> None:
    """However the upstream frames its events, and wherever the bytes are cut, usage is
    recorded and stripped and every stage after the proxy rewrites every event."""
    whole = OPENINGS.get(framing, b"") + b"".join(FRAMINGS[framing](c) for c in CHUNKS)
    tap, out, pos = SSETap(strip_usage=True), [], 0
    for cut in cuts:
        out.append(tap.feed(whole[pos : pos + cut]))
        pos += cut
    out.append(tap.feed(whole[pos:]) + tap.flush())
    assert tap.usage == (7, 2) and tap.content_events == 2
    rewritten = SSERewriter(lambda payload: {**payload, "seen": True}).feed(b"".join(out), False)
    events = _events(rewritten)
    assert len(events) == 3 and events[-1].endswith(b"data: [DONE]")
    for event in events[:-1]:
        payload = orjson.loads(event.rpartition(b"data: ")[2])
        assert payload["seen"] and "usage" not in payload
        assert event.startswith(b"event: message\n") == (framing == "an event field first")
    assert events[0].startswith((b"event: ", b"data: "))


def test_a_stream_of_only_part_of_a_byte_order_mark_is_passed_on() -> None:
    tap = SSETap(strip_usage=True)
    assert tap.feed(b"\xef") == tap.feed(b"\xbb") == b""
    assert tap.flush() == b"\xef\xbb"  # nothing lost: what came goes on
    tap = SSETap(strip_usage=True)
    assert tap.feed(b"\xef\xbb\xbf") + tap.flush() == b""  # a whole mark and nothing else
    tap, plain = SSETap(strip_usage=True), SSETap(strip_usage=True)
    assert tap.feed(b"\xef") + tap.feed(b"\xbb\xbf") + tap.feed(CHUNKS[0]) == plain.feed(CHUNKS[0])
    assert tap.feed(b"\xef\xbb\xbf") == b""  # a mark later in the stream is no opening: kept
    assert tap.flush() == b"\xef\xbb\xbf"


def test_events_a_stage_cannot_read_are_counted_and_passed_on() -> None:
    unread: list[str] = []
    rewriter = SSERewriter(lambda payload: {**payload, "seen": True}, unread.append)
    stream = b'data: {"a": NaN}\n\n: a comment\n\ndata: {"a": 1}\n\ndata: [DONE]\n\n'
    out = rewriter.feed(stream, False)
    assert out.startswith(b'data: {"a": NaN}\n\n') and b'"seen":true' in out
    assert unread == ["not_json"]  # the comment, the answer read and [DONE] are not counted
    rewriter.feed(b'data: {"b": NaN}\n\n', False)
    assert unread == ["not_json"]  # once per answer, however many of its events


def test_answers_too_deep_to_write_go_on_as_they_came_and_are_counted() -> None:
    deep = b'{"a": ' + b"[" * 300 + b"]" * 300 + b"}"  # orjson reads 1,024 levels, writes 254
    unread: list[str] = []
    assert JsonRewriter(lambda payload: payload, unread.append).feed(deep, False) == deep
    events = SSERewriter(lambda payload: payload, unread.append)
    assert events.feed(b"data: " + deep + b"\n\n", False) == b"data: " + deep + b"\n\n"
    assert unread == ["too_deep", "too_deep"]
    tap = SSETap(strip_usage=True)  # the proxy writes events again to strip "usage"
    event = b'data: {"choices": [{"x": ' + b"[" * 300 + b"]" * 300 + b'}], "usage": null}\n\n'
    assert tap.feed(event) == event
    held = ClosedEvents(lambda payload: payload, lambda: [{"index": 0, "delta": {"content": "x"}}])
    model = b'{"choices": [{"index": 0, "delta": {}}], "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    closed = held.feed(b"data: " + model + b"\n\n", False)  # too deep to copy: choices alone
    assert closed == b"data: " + model + b'\n\ndata: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
