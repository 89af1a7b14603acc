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
        b'{"data": [{"index": 1, "embedding": [[0.1, 0.2]]}]}',  # nested: not a vector
        b'{"data": [{"index": 1, "embedding": ["a,b", "c"]}]}',  # strings with commas
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2]}], "note": "\\u0000"}',  # a NUL
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2',  # cut short
        b'{"data": {"index": 1, "embedding": [0.1, 0.2]}}',  # data not a list
        b'{"data": [{"index": 1, "embedding": [0.1, 0.2]}], }',  # not JSON
        b'{"data": [{"index": 1, "vector": [0.1, 0.2]}]}',  # no embedding array at all
    ],
    ids=["nested", "strings", "nul", "cut", "not-a-list", "not-json", "no-array"],
)
def test_what_it_cannot_read_it_declines(body: bytes) -> None:
    assert mark_embedding_body(body, TEXTS, marks) is None


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
