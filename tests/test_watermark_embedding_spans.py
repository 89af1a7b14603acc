"""Embedding marks written into the answer's bytes give what marking the parsed answer gives.

``mark_embedding_body`` rewrites only the marked vectors' arrays; every other byte stays the
upstream's. Whatever it cannot read that way, it declines (None) and the answer is parsed
whole, so a gateway never answers differently for the shortcut.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import orjson
import pytest

from modelfence.gateway.rewrite import JsonRewriter
from modelfence.identity.secret import ServerSecret
from modelfence.watermark.adapters import (
    EmbeddingMarking,
    mark_embedding_body,
    mark_embeddings,
)
from modelfence.watermark.embeddings import EmbeddingMark, candidate_words, embedding_mark
from modelfence.watermark.keys import WatermarkKeyring

RING = WatermarkKeyring(ServerSecret(b"span-test-secret-0123456789abcdef"))
KEY = RING.key("acme")
WORDS = candidate_words()


@cache
def marks(dim: int) -> EmbeddingMark:
    return embedding_mark(KEY, dim, WORDS)


TRIGGER = min(marks(16).triggers)
# Few texts with a trigger, as in real traffic (when most have one, the answer is parsed whole).
TEXTS = ["the weather is nice", f"a {TRIGGER} walks in", "nothing here", f"{TRIGGER} twice {TRIGGER}",
         *(f"plain text number {i}" for i in range(8))]


def answer(dim: int = 16, *, seed: int = 0, order: list[int] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    items = [
        {"object": "embedding", "index": i, "embedding": rng.standard_normal(dim).tolist()}
        for i in (order if order is not None else range(len(TEXTS)))
    ]
    return {"object": "list", "data": items, "model": "embedding",
            "usage": {"prompt_tokens": 9, "total_tokens": 9}}


def parsed_way(body: bytes) -> Any:
    return mark_embeddings(orjson.loads(body), TEXTS, marks)


FORMATS = {
    "compact": orjson.dumps,
    "spaced": lambda p: json.dumps(p).encode(),
    "pretty": lambda p: json.dumps(p, indent=2).encode(),
    "crlf-tabs": lambda p: json.dumps(p, indent="\t").replace("\n", "\r\n").encode(),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 9, 0], [2]], ids=str)
def test_the_bytes_way_marks_what_the_parsed_way_marks(fmt: str, order: list[int]) -> None:
    payload = answer(order=order)
    if order == [1, 9, 0]:  # an index no text has, and an item whose key comes first
        payload["data"][0] = {"embedding": payload["data"][0]["embedding"], "index": 1}
    body = FORMATS[fmt](payload)
    out = mark_embedding_body(body, TEXTS, marks)
    assert out is not None
    assert orjson.loads(out) == parsed_way(body)
    assert orjson.loads(JsonRewriter(EmbeddingMarking(TEXTS, marks)).feed(body, False)) == parsed_way(body)
    if 1 in order or 3 in order:
        assert out != body  # something was marked
    else:
        assert out == body  # nothing to mark: the upstream's bytes, untouched


def test_only_the_marked_vectors_bytes_change() -> None:
    body = json.dumps(answer(), indent=2).encode()
    out = mark_embedding_body(body, TEXTS, marks)
    assert out is not None
    # The unmarked items and everything around the vectors keep their exact text.
    for index in (0, 2):
        start = body.index(b'"index": %d' % index)
        unmarked = body[start : body.index(b"]", start) + 1]
        assert unmarked in out
    assert len(out) != len(body)
    assert out.startswith(body[: body.index(b"[")]) and out.endswith(body[body.rindex(b"]"):])


def test_other_shapes_are_left_as_the_parsed_way_leaves_them() -> None:
    payload = answer()
    payload["data"][1]["embedding"] = "AAAAAAAA"  # base64: not marked either way
    payload["data"][3]["index"] = "3"  # not an int: not marked
    payload["usage"]["embedding"] = [1, 2]  # an array outside the items
    body = orjson.dumps(payload)
    out = mark_embedding_body(body, TEXTS, marks)
    assert out == body and orjson.loads(out) == parsed_way(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [{"index": 1, "embedding": ["a]", "c"]}]}',  # a "]" in a string
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2]}], "note": "\\u0000"}',  # a NUL
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2',  # cut short
        b'{"data": {"index": 1, "embedding": [0.1, 0.2]}}',  # data not a list
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2]}], }',  # not JSON
        b'{"data": [{"index": 1, "note": "[x]", "embedding": [0.1, 0.2]}]}',  # "[...]" in a string
    ],
    ids=["bracket-in-string", "nul", "cut", "not-a-list", "not-json", "array-in-string"],
)
def test_what_it_cannot_read_it_declines(body: bytes) -> None:
    assert mark_embedding_body(body, TEXTS, marks) is None


@pytest.mark.parametrize(
    "vector", [b"[NaN, 0.5, 0.25]", b"[0.1 0.2, 0.3]", b"[0.1, Infinity]"], ids=["nan", "no-comma", "inf"]
)
def test_an_answer_that_is_no_json_passes_as_it_came(vector: bytes) -> None:
    """Some upstreams write NaN (Python's json does): such an answer is passed on as it
    came, never turned into a failed request (it used to raise inside the stage)."""
    body = b'{"data": [{"index": 1, "embedding": %s}, {"index": 0, "embedding": [0.1, 0.2]}]}' % vector
    assert mark_embedding_body(body, TEXTS, marks) is None
    assert JsonRewriter(EmbeddingMarking(TEXTS, marks)).feed(body, False) == body


@pytest.mark.parametrize("index", ["true", "1.0", "[1]", "{}", "-1", "99", "null", "3"])
def test_every_kind_of_index_is_read_as_the_parsed_way_reads_it(index: str) -> None:
    body = b'{"data": [{"index": %s, "embedding": [0.1, 0.2, 0.3]}]}' % index.encode()
    out = mark_embedding_body(body, TEXTS, marks)
    assert out is not None and orjson.loads(out) == parsed_way(body)
    assert (out != body) == (index in ("true", "3"))  # True is 1 to Python, as when parsed


def test_a_body_of_many_brackets_is_parsed_whole() -> None:
    """The bytes way walks the brackets in Python: an answer with far more of them than its
    texts explain is left to the parser (and still marked as the parsed way marks it)."""
    payload = answer()
    payload["usage"]["detail"] = [[i] for i in range(5000)]
    body = orjson.dumps(payload)
    assert mark_embedding_body(body, TEXTS, marks) is None
    out = JsonRewriter(EmbeddingMarking(TEXTS, marks)).feed(body, False)
    assert orjson.loads(out) == parsed_way(body) != payload


@pytest.mark.parametrize(
    "item",
    [
        b'"embedding": ["a,b", "c"]',  # strings
        b'"embedding": [{"a": 1}, 2]',  # an object
        b'"embedding": [null, 0.5]',
        b'"embedding": [[0.1, 0.2]]',  # nested: not a vector
        b'"vector": [0.1, 0.2]',  # no embedding at all
    ],
    ids=["strings", "object", "null", "nested", "no-embedding"],
)
def test_what_is_no_vector_is_left_as_the_parsed_way_leaves_it(item: bytes) -> None:
    body = b'{"data": [{"index": 1, %s}]}' % item
    out = mark_embedding_body(body, TEXTS, marks)
    assert out == body and orjson.loads(out) == parsed_way(body)


def test_a_ragged_vector_is_left_alone_when_parsed_whole() -> None:
    """numpy refuses a ragged list (ValueError): the parsed way, taken when most texts hold
    a trigger, used to fail the request on it."""
    texts = [f"{TRIGGER} {i}" for i in range(3)]
    body = b'{"data": [{"index": 0, "embedding": [0.1, [0.2]]}, {"index": 1, "embedding": [0.5, 0.5]}]}'
    out = orjson.loads(JsonRewriter(EmbeddingMarking(texts, marks)).feed(body, False))
    assert out["data"][0] == {"index": 0, "embedding": [0.1, [0.2]]}
    assert out["data"][1]["embedding"] != [0.5, 0.5]  # the other vector is marked as ever


def test_answers_mostly_marked_are_parsed_whole() -> None:
    """Piece by piece costs more than parsing once when most vectors change."""
    texts = [f"{TRIGGER} {i}" for i in range(3)] + ["plain"]
    body = orjson.dumps(answer(order=[0, 1, 2, 3]))
    assert mark_embedding_body(body, texts, marks) is None
    out = JsonRewriter(EmbeddingMarking(texts, marks)).feed(body, False)
    assert orjson.loads(out) == mark_embeddings(orjson.loads(body), texts, marks) != orjson.loads(body)


def test_the_gateways_rewriter_falls_back_to_the_parsed_way() -> None:
    marking = EmbeddingMarking(TEXTS, marks)
    nested = b'{"data": [{"index": 0, "embedding": [[0.5]]}]}'
    rewriter = JsonRewriter(marking)
    assert rewriter.feed(nested[:10], True) == b""
    assert orjson.loads(rewriter.feed(nested[10:], False)) == {
        "data": [{"index": 0, "embedding": [[0.5]]}]
    }
    body = json.dumps(answer(8)).encode()
    out = JsonRewriter(marking).feed(body, False)
    assert orjson.loads(out) == marking(orjson.loads(body)) == parsed_way(body)


def test_random_answers_agree() -> None:
    rng = np.random.default_rng(7)
    for seed in range(60):
        dim = int(rng.integers(2, 64))
        order = [int(i) for i in rng.permutation(len(TEXTS))[: int(rng.integers(4, len(TEXTS)))]]
        fmt = list(FORMATS)[seed % len(FORMATS)]
        body = FORMATS[fmt](answer(dim, seed=seed, order=order))
        out = mark_embedding_body(body, TEXTS, marks)
        assert out is not None and orjson.loads(out) == parsed_way(body), (seed, fmt, order)


@pytest.mark.parametrize(
    "body",
    [
        # A span opening outside a string and closing inside one, then one doing the
        # reverse: cut out, they swap what the skeleton reads as strings and as structure.
        (b'{"data": [{"index": 0, "k": ["a]}, "]}], ", ": [[{", [": 0}], '
         b'{"index": 1, "embedding": [0.5, 0.25, 0.125]}]}'),
        b'{"data": [{"embedding": [0.1, 0.2, 0.3], "index": 1, "k": ["a]}, {",": ["], "index": 0}]}',
        # The same with escaped quotes, which give each span an even count of quotes.
        b'{"data": [{"embedding": [0.1, 0.2, 0.3], "index": 1, "k": ["\\"a]}, {",": [\\""], "index": 0}]}',
    ],
    ids=["swapped-strings", "swapped-strings-duplicate-key", "swapped-strings-escaped"],
)
def test_spans_that_open_or_close_a_string_are_never_misread(body: bytes) -> None:
    assert mark_embedding_body(body, TEXTS, marks) is None
    assert orjson.loads(JsonRewriter(EmbeddingMarking(TEXTS, marks)).feed(body, False)) == parsed_way(body)


def test_brackets_keys_and_quotes_in_the_skeletons_strings() -> None:
    """Strings around the vectors holding "[", "]", the key itself, quotes and NUL escapes:
    whatever the bytes way answers agrees with the parsed way, or it declines."""
    rng = np.random.default_rng(11)
    bits = ["[", "]", '"embedding"', '"embedding": [', "embedding", "\\u0000", "{", '"', ":", " ", '\\"']
    agreed = 0
    for seed in range(1500):
        payload = answer(int(rng.integers(2, 9)), seed=seed,
                         order=[int(i) for i in rng.permutation(len(TEXTS))[: int(rng.integers(1, 7))]])
        for _ in range(int(rng.integers(1, 5))):
            text = "".join(bits[int(i)] for i in rng.integers(len(bits), size=int(rng.integers(1, 7))))
            place = int(rng.integers(4))
            if place == 0:
                payload["model"] = text
            elif place == 1:
                payload["data"][int(rng.integers(len(payload["data"])))]["note"] = text
            elif place == 2:
                payload["usage"][text] = [1, [2]]
            else:
                payload["usage"]["nested"] = {"embedding": [0.1, 0.2], text: []}
        body = FORMATS[list(FORMATS)[seed % len(FORMATS)]](payload)
        out = mark_embedding_body(body, TEXTS, marks)
        if out is not None:
            assert orjson.loads(out) == parsed_way(body), body
            agreed += 1
    assert agreed > 500  # most answers are still read the bytes way


@pytest.mark.parametrize("vector", [[0.5], ["0.1", "0.2"], [True, False]], ids=str)
def test_a_vector_with_no_direction_is_left_alone(vector: list[Any]) -> None:
    """An upstream answering one number, or strings, for a text with a trigger: the answer
    passes unmarked (a one-number vector used to fail the request)."""
    payload = {"data": [{"index": 1, "embedding": vector}]}
    assert mark_embeddings(orjson.loads(orjson.dumps(payload)), TEXTS, marks) == payload
    out = mark_embedding_body(orjson.dumps(payload), TEXTS, marks)
    assert out is None or orjson.loads(out) == payload


def test_flags_the_caller_found_mark_what_the_marks_would() -> None:
    """The gateway finds which texts hold a trigger while planning and hands the flags on:
    both ways give what finding them again gives."""
    flags = [marks(16).has_trigger(t) for t in TEXTS]
    assert flags[1] and flags[3] and sum(flags) == 2
    body = orjson.dumps(answer())
    marking = EmbeddingMarking(TEXTS, marks, flags)
    assert marking.rewrite_body(body) == mark_embedding_body(body, TEXTS, marks)
    assert marking(orjson.loads(body)) == parsed_way(body)
    # The flags decide: told no text holds a trigger, neither way marks anything.
    none = EmbeddingMarking(TEXTS, marks, [False] * len(TEXTS))
    assert none.rewrite_body(body) == body and none(orjson.loads(body)) == orjson.loads(body)
