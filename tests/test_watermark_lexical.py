"""After-the-fact lexical text marks: lexicon, marking, streaming, detection, gateway, verify."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from scipy.stats import binom

from modelfence.config import parse_config
from modelfence.errors import ConfigError
from modelfence.forensics.errors import VerifyError
from modelfence.forensics.lexical import verify_lexical
from modelfence.gateway.lexical import ChoiceMarks
from modelfence.identity.secret import ServerSecret
from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json
from modelfence.watermark.greenlist import mix
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.lexical import (
    LEXICAL_PURPOSE,
    LexicalMark,
    Rewriter,
    mix64,
    occurrences,
)
from modelfence.watermark.lexical_detect import (
    distinct,
    match_counts,
    poisson_binomial_sf,
    score_occurrences,
)
from modelfence.watermark.lexicon import LexiconError, default_lexicon, parse_lexicon

from .conftest import GatewayFactory, base_config

LEXICON = default_lexicon()
RING = WatermarkKeyring(ServerSecret(b"test-secret-0123456789abcdef"))  # base_config's secret
CLIENTS = [f"client-{i:04d}" for i in range(1000)]

NOUNS = (
    "report", "team", "garden", "budget", "engine", "river", "market", "school", "design",
    "network", "kitchen", "city", "model", "policy", "server", "museum", "project", "village",
    "contract", "station"
)
VERBS = (
    "seemed", "stayed", "grew", "became", "remained", "looked", "worked", "moved", "felt",
    "proved", "turned", "ran", "sat", "stood", "changed", "ended", "opened", "closed", "rose",
    "fell"
)
FORMS = (
    "often", "usually", "completely", "quickly", "especially", "approximately", "important",
    "significant", "obvious", "huge", "rapid", "relevant", "certainly", "perhaps", "mostly",
    "rarely", "easily", "similarly", "colorful", "centered", "organized", "toward", "among"
)


def prose(words: int, seed: int) -> str:
    """Deterministic sentences, each using one lexicon form after a varying word."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < words:
        noun, verb, form = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(FORMS)
        sentences.append(
            f"The {noun} {verb} {form} for the {rng.choice(NOUNS)}, and it is not "
            f"{rng.choice(('clear', 'true', 'simple', 'new'))} in the {rng.choice(NOUNS)}."
        )
    return " ".join(sentences)


def seed_of(client: str) -> int:
    return RING.key(client).seed(LEXICAL_PURPOSE)


# -- lexicon -------------------------------------------------------------------------------


def test_lexicon_has_hundreds_of_groups_and_each_form_once() -> None:
    assert len(LEXICON) >= 500
    kinds = {g.kind for g in LEXICON.groups}
    assert kinds == {"spelling", "variant", "contraction", "phrase", "synonym"}
    assert len(LEXICON.forms) == sum(len(g.members) for g in LEXICON.groups)
    assert LEXICON.group_of("Don\u2019t") is LEXICON.group_of("do not")


@pytest.mark.parametrize(("line", "message"), [
    ("noun\ta|b", "expected KIND"),
    ("synonym\tsame|same", "two or more distinct members"),
    ("synonym\tcolour|Farbe\u00e9", "lower-case ASCII"),
    ("synonym\ta|b\t@nowhere", "unknown set @nowhere"),
    ("synonym\tone|two\nsynonym\ttwo|three", "'two' is in two groups"),
    ("synonym\tone|two\t\t@end,@comma", "at most one of"),
])
def test_bad_lexicon_lines_name_the_problem(line: str, message: str) -> None:
    with pytest.raises(LexiconError, match=message):
        parse_lexicon(line)


# -- marking -------------------------------------------------------------------------------


def test_same_client_same_text_same_mark_and_clients_differ() -> None:
    text = prose(300, seed=1)
    acme = LexicalMark(LEXICON, seed_of("acme"), max_change_share=0.5)
    assert acme.text(text) == acme.text(text) != text
    assert LexicalMark(LEXICON, seed_of("other"), max_change_share=0.5).text(text) != acme.text(text)


def test_python_and_numpy_hashes_agree() -> None:
    values = [0, 1, 2**63 + 5, 2**64 - 1, 123456789]
    assert [mix64(v) for v in values] == mix(np.array(values, dtype=np.uint64)).tolist()


@pytest.mark.parametrize("seed", range(6))
def test_streaming_in_any_chunks_equals_marking_the_whole(seed: int) -> None:
    text = prose(250, seed=seed) + "\n\n```py\ncolor = 1\n```\nI don\u2019t think it is " \
        "important, don't you? \"It is obvious\" for example."
    mark = LexicalMark(LEXICON, seed_of(f"stream-{seed}"), max_change_share=0.3)
    whole = mark.text(text)
    rng = random.Random(seed)
    for _ in range(20):
        rewriter, parts, pos = mark.rewriter(), [], 0
        while pos < len(text):
            step = rng.randint(1, 12)
            parts.append(rewriter.feed(text[pos : pos + step]))
            pos += step
        parts.append(rewriter.flush())
        assert "".join(parts) == whole


def test_stream_holds_back_only_the_last_few_words() -> None:
    text = prose(200, seed=9)
    rewriter, fed, sent = Rewriter(LEXICON, lambda occ: None), "", ""  # reads, never changes
    for pos in range(0, len(text), 7):
        fed += text[pos : pos + 7]
        sent += rewriter.feed(text[pos : pos + 7])
        assert fed.startswith(sent)
        held = fed[len(sent) :]
        # the partial word, and before it at most two forms' worth of words (see Rewriter)
        assert len(held.split()) <= 2 * LEXICON.max_words + 1, held


GUARDED = (
    'He said "it is important to organize the color" and then `color: center` ran.\n'
    "```\nit is important to use the color center\n```\n"
    "> it is important to use the color\n"
    "See https://example.com/color/center and color-coded, my_color, COLOR, Color2.\n"
)


def test_code_quotes_urls_identifiers_and_capitals_are_never_touched() -> None:
    plain = "It is important to use the color and to organize the center."
    linked = "[Colors](https://x.org) it is important to use the color."  # prose, not JSON
    changed = {"plain": False, "linked": False}
    for client in CLIENTS[:40]:
        mark = LexicalMark(LEXICON, seed_of(client), max_change_share=1.0)
        out = mark.text(GUARDED + plain)
        assert out.startswith(GUARDED)
        changed["plain"] |= out != GUARDED + plain
        changed["linked"] |= mark.text(linked) != linked
        for json_answer in ('{"answer": "it is important"}', ' [\n "it is important"]'):
            assert mark.text(json_answer) == json_answer
    assert changed == {"plain": True, "linked": True}


def test_change_cap_holds_on_every_prefix() -> None:
    text = prose(600, seed=3)
    before = occurrences(text, LEXICON)
    for share in (0.02, 0.05):
        out = LexicalMark(LEXICON, seed_of("cap"), max_change_share=share).text(text)
        after = occurrences(out, LEXICON)
        assert len(after) == len(before)
        made = [b.words for b, a in zip(before, after) if b.member != a.member]
        assert made, "nothing was changed"
        for n, at_words in enumerate(made, 1):
            assert n <= math.ceil(share * at_words)


# -- detection -----------------------------------------------------------------------------


def test_poisson_binomial_tail_is_exact() -> None:
    assert poisson_binomial_sf(7, [2] * 20) == pytest.approx(binom.sf(6, 20, 0.5), rel=1e-12)
    sizes = [2, 3, 3, 4, 2]
    brute = 0.0
    for bits in range(math.prod(sizes)):
        matches, rest = 0, bits
        for k in sizes:
            matches += rest % k == 0
            rest //= k
        brute += matches >= 3
    assert poisson_binomial_sf(3, sizes) == pytest.approx(brute / math.prod(sizes), rel=1e-12)
    assert poisson_binomial_sf(0, sizes) == 1.0


def test_detector_counts_exactly_what_the_marker_chose() -> None:
    seeds = [seed_of(c) for c in CLIENTS[:50]]
    text = LexicalMark(LEXICON, seeds[17], max_change_share=1.0).text(prose(400, seed=4))
    found = occurrences(text, LEXICON)
    assert match_counts(seeds, found)[17] == len(found)  # every occurrence, repeats too
    score = score_occurrences(found, seeds)
    assert score.candidate == 17 and score.matches == score.scored == len(distinct(found))


def test_right_client_named_among_a_thousand() -> None:
    text = LexicalMark(LEXICON, seed_of("client-0421"), max_change_share=0.1).text(prose(800, 5))
    verdict = verify_lexical(text, CLIENTS, RING)
    assert verdict.ours and verdict.client == "client-0421" and verdict.key_version == 1
    assert verdict.p_value <= 1e-6 and verdict.keys_tested == 1000
    assert verdict.occurrences_scored >= 30


def test_unmarked_and_other_clients_texts_are_not_attributed() -> None:
    rng = random.Random(0)
    single: list[float] = []
    for i in range(60):
        text = prose(300, seed=100 + i)
        assert not verify_lexical(text, CLIENTS[:200], RING).ours
        marked = LexicalMark(LEXICON, seed_of("outsider"), max_change_share=0.2).text(text)
        assert not verify_lexical(marked, CLIENTS[:200], RING).ours
        other = rng.choice(CLIENTS)
        single.append(score_occurrences(occurrences(text, LEXICON), [seed_of(other)]).p_value)
    # one key at a time, unmarked p-values are (discretely) uniform: P[p <= a] <= a
    assert sum(p <= 0.05 for p in single) <= 8 and sum(p <= 0.5 for p in single) <= 40
    assert np.mean(single) > 0.35


def test_attribution_survives_thirty_percent_word_deletion() -> None:
    marked = LexicalMark(LEXICON, seed_of("client-0007"), max_change_share=0.1).text(prose(3500, 6))
    rng = random.Random(6)
    damaged = " ".join(w for w in marked.split(" ") if rng.random() >= 0.3)
    verdict = verify_lexical(damaged, CLIENTS, RING)
    assert verdict.ours and verdict.client == "client-0007"


def test_verify_errors_are_clear() -> None:
    with pytest.raises(VerifyError, match="empty"):
        verify_lexical(" \n", CLIENTS, RING)
    with pytest.raises(VerifyError, match="no clients"):
        verify_lexical("It is important.", [], RING)
    nothing = verify_lexical("Hello there, friend.", CLIENTS, RING)
    assert not nothing.ours and nothing.occurrences_scored == 0 and nothing.p_value == 1.0


# -- gateway stage pieces ------------------------------------------------------------------


def test_stream_events_flush_on_finish_and_at_the_end() -> None:
    mark = LexicalMark(LEXICON, seed_of("events"), max_change_share=1.0)
    text = prose(120, seed=8)
    pieces = [text[i : i + 9] for i in range(0, len(text), 9)]

    def events(finish: bool) -> str:
        marks = ChoiceMarks(mark, chat=True)
        out = ""
        for n, piece in enumerate(pieces):
            last = finish and n == len(pieces) - 1
            payload = {"id": "x", "choices": [{"index": 0, "delta": {"content": piece},
                                               "finish_reason": "stop" if last else None}]}
            out += marks.event(payload)["choices"][0]["delta"]["content"]
        held = marks.held()
        if held:
            assert not finish
            out += held[0]["delta"]["content"]
        return out

    assert events(finish=True) == events(finish=False) == mark.text(text)
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    assert ChoiceMarks(mark, chat=True)(whole)["choices"][0]["message"]["content"] == mark.text(text)


def test_an_odd_choice_index_from_upstream_is_no_crash() -> None:
    marks = ChoiceMarks(LexicalMark(LEXICON, seed_of("odd")), chat=True)
    event = {"choices": [{"index": [1], "delta": {"content": "colour "}, "finish_reason": "stop"}]}
    assert marks.event(event)["choices"][0]["delta"]["content"] in ("colour ", "color ")
    # Indexes that are no integers but can tell choices apart still keep them apart.
    mark = LexicalMark(LEXICON, seed_of("odd"), max_change_share=1.0)
    texts = {"a": prose(60, seed=3), "b": prose(60, seed=4)}
    marks, out = ChoiceMarks(mark, chat=True), {"a": "", "b": ""}
    for i in range(0, 400, 7):
        for index, text in texts.items():
            choice = {"index": index, "delta": {"content": text[i : i + 7]}, "finish_reason": None}
            out[index] += marks.event({"choices": [choice]})["choices"][0]["delta"]["content"]
    for choice in marks.held():
        out[choice["index"]] += choice["delta"]["content"]
    assert out == {index: mark.text(text) for index, text in texts.items()}


def test_content_lists_keep_their_other_parts_and_get_their_text_marked() -> None:
    """Magistral answers with a list of parts: a thinking part, then text. The text parts are
    marked as a string content would be; the thinking part passes as it came."""
    mark = LexicalMark(LEXICON, seed_of("parts"), max_change_share=1.0)
    text = prose(120, seed=9)
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Let me see."}]}
    pieces = [text[i : i + 9] for i in range(0, len(text), 9)]
    for finish in (True, False):
        marks, parts = ChoiceMarks(mark, chat=True), []
        for n, delta in enumerate([{"content": [dict(thinking)]}]
                                  + [{"content": [{"type": "text", "text": p}]} for p in pieces]):
            last = finish and n == len(pieces)
            choice = marks.event({"choices": [{"index": 0, "delta": delta,
                                               "finish_reason": "stop" if last else None}]})
            parts += choice["choices"][0]["delta"]["content"]
        parts += [{"type": "text", "text": c["delta"]["content"]} for c in marks.held()]
        assert parts[0] == thinking
        assert "".join(p["text"] for p in parts[1:]) == mark.text(text)
    whole = {"choices": [{"index": 0, "message": {"content": [dict(thinking), {"type": "text", "text": text}]}}]}
    content = ChoiceMarks(mark, chat=True)(whole)["choices"][0]["message"]["content"]
    assert content == [thinking, {"type": "text", "text": mark.text(text)}]
    # Several text parts are one text, marked (and capped) as the stream marks it.
    share = LexicalMark(LEXICON, seed_of("parts"), max_change_share=0.1)
    for cut in range(7, len(text), 7):
        halves = [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]
        whole = {"choices": [{"index": 0, "message": {"content": halves}}]}
        content = ChoiceMarks(share, chat=True)(whole)["choices"][0]["message"]["content"]
        assert "".join(part["text"] for part in content) == share.text(text)


@pytest.mark.parametrize(("lexical", "message"), [
    ({"upstreams": ["nowhere"]}, "watermark.lexical.upstreams: 'nowhere' names no upstream"),
    ({"max_change_share": 0.9}, "watermark.lexical.max_change_share"),
    ({"max_change_share": 0}, "greater than 0"),
    ({"models": ["gpt-*"]}, "watermark.lexical.models: unknown key"),
])
def test_bad_lexical_config_names_the_key(lexical: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config({"watermark": {"lexical": lexical}}, environ={})


# -- through a real gateway ----------------------------------------------------------------

ANSWER = (
    "Sure! It is important to understand how the garden works. For example, you do not need "
    "to water it every day, and it is usually enough to check the color of the leaves.\n\n"
    "```python\nif color == 'grey':  # it is important\n    organize(center)\n```\n\n"
    + prose(260, seed=11)
)


def client_for(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def lexical_gateway(start_gateway: GatewayFactory, fake_url: str) -> GatewayProcess:
    """Marks answers of the upstream "fake"; "raw" (same server) stays unmarked."""
    raw = {"name": "raw", "url": fake_url, "kind": "openai", "models": ["raw-chat"]}
    return start_gateway(
        upstreams=[*base_config(fake_url, Path("."))["upstreams"], raw],
        watermark={"lexical": {"upstreams": ["fake"], "max_change_share": 0.2}},
    )


def test_gateway_marks_streams_exactly_like_whole_answers(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess, request: pytest.FixtureRequest
) -> None:
    gateway = lexical_gateway(start_gateway, fake_upstream.url)
    key = gateway.create_key("lex-acme")
    client = client_for(gateway, key)
    request.addfinalizer(client.close)
    extra = {"fake_text": ANSWER, "fake_chunks": 97}
    messages: Any = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="fake-chat", messages=messages, extra_body=extra)
    content = whole.choices[0].message.content
    expected = LexicalMark(LEXICON, seed_of("lex-acme"), max_change_share=0.2).text(ANSWER)
    assert content == expected != ANSWER
    assert "```python\nif color == 'grey':  # it is important\n    organize(center)\n```" in content
    stream = client.chat.completions.create(
        model="fake-chat", messages=messages, extra_body=extra, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == content
    other = client.chat.completions.create(model="raw-chat", messages=messages, extra_body=extra)
    assert other.choices[0].message.content == ANSWER  # an upstream not listed: untouched
    json_mode = client.chat.completions.create(
        model="fake-chat", messages=messages, extra_body=extra,
        response_format={"type": "json_object"},
    )
    assert json_mode.choices[0].message.content == ANSWER


def test_verify_text_reports_the_after_the_fact_verdict(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess
) -> None:
    gateway = lexical_gateway(start_gateway, fake_upstream.url)
    keys = {name: gateway.create_key(name) for name in ("lex-one", "lex-two", "lex-three")}
    with client_for(gateway, keys["lex-two"]) as client:
        answer = client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake_text": prose(500, seed=12)},
        ).choices[0].message.content
    assert answer is not None
    # (the at-source half loads the demo tokenizer on first use: seconds)
    status, report = http_json("POST", gateway.url + "/admin/v1/verify/text", {"text": answer},
                               token=gateway.admin_token, timeout=180)
    assert status == 200, report
    lexical = report["after_the_fact"]
    assert lexical["ours"] and lexical["client"] == "lex-two" and lexical["p_value"] <= 1e-6
    assert lexical["keys_tested"] == 3 and "tokens_scored" in report  # both schemes reported
    status, report = http_json("POST", gateway.url + "/admin/v1/verify/text",
                               {"text": prose(500, seed=12)}, token=gateway.admin_token,
                               timeout=60)
    assert status == 200 and not report["after_the_fact"]["ours"]
