"""Robustness of text marks made at the source: attribution vs tokens under attacks on the text.

Answers are sampled from the demo LLM (SmolLM2-135M-Instruct, CPU, one torch thread) at
``--temperature`` (1) to prompts from the harness's real-prompt corpora, each marked for a random
one of ``--clients`` clients (seeds from a ``WatermarkKeyring``, ``GreenListProcessor``,
gamma and delta from the config defaults or flags), as in ``bench/watermark_text.py``.
The decoded text is then attacked (``modelfence.redteam.text_attacks``):

- none: the answer as it left the gateway;
- delete: ``--delete`` (30%) of its words removed at random;
- substitute: ``--substitute`` (50%) of its words replaced by near-synonyms (nearest
  whole-word tokens in the LLM's input-embedding space, the one the unmarked model finds
  most likely in left context);
- paraphrase: the demo LLM rewrites it ``--chunk-words`` words at a time, sampled without
  a mark (temperature 0.7, top-p 0.9);
- lexical: the after-the-fact (lexical) mark of the answer's own client on top, as if one
  answer got both marks (the gateway never does that: upstreams it marks after the fact get
  no at-source header), at ``--lexical-share`` (0.1, the default ``max_change_share``);
  unmarked answers get a random client's. This measures the interference of the two marks:
  how much at-source attribution the lexical rewrite costs, and (a last table) what the
  after-the-fact verifier says of these texts: it must name no one in text marked only at
  the source, and names the right client, or no one, in text that also got a lexical mark.

Each attacked text is cut to N tokens of re-tokenised text for every N in ``--cuts`` it
is long enough for and traced with ``verify_text`` against every client's key (Bonferroni
over all of them, named when p <= ``--alpha``). The true client's single-key z shows how
much mark is left where naming fails. Unmarked answers go through the same attacks and
cuts to check false attribution.

    python bench/watermark_robustness.py              # 20 answers: about half the run below
    python bench/watermark_robustness.py --answers 40 --unmarked 10   # docs/WATERMARK.md: 29 min
                                                                       # (before the lexical attack)
    python bench/watermark_robustness.py --attacks none,lexical       # the two marks' interference
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from difflib import SequenceMatcher
from typing import Any

import numpy as np

from modelfence.demo.llm import SmolLM
from modelfence.forensics.lexical import verify_lexical
from modelfence.forensics.text import demo_tokenizer, verify_text
from modelfence.redteam.attribution_setup import (
    add_draw_arguments,
    load_and_draw,
    parse_draw_arguments,
)
from modelfence.redteam.benchmarks import Footer
from modelfence.redteam.marked_text import sample_answers
from modelfence.redteam.text_attacks import Substituter, content_kept, delete_words, paraphrase
from modelfence.watermark.config import LexicalConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.lexical import LEXICAL_PURPOSE, LexicalMark, occurrences
from modelfence.watermark.lexical_detect import score_occurrences
from modelfence.watermark.lexicon import default_lexicon
from modelfence.watermark.text_detect import score_text
from modelfence.watermark.text_logits import TEXT_PURPOSE

FOOTER = Footer()  # started with the run


def lexical_marks(texts: list[str], marked_by: list[str], ring: WatermarkKeyring,
                  share: float) -> tuple[list[str], list[float]]:
    """Each text with the after-the-fact mark of the client in ``marked_by``, and how much
    of it changed (one minus the similarity of the word sequences: a contraction written
    out counts about 1.5)."""
    lexicon = default_lexicon()
    out = [LexicalMark(lexicon, ring.key(client).seed(LEXICAL_PURPOSE), max_change_share=share)
           .text(text) for text, client in zip(texts, marked_by, strict=True)]
    return out, [1 - SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()
                 for a, b in zip(texts, out, strict=True)]


def attack(llm: SmolLM, texts: list[str], marked_by: list[str], ring: WatermarkKeyring,
           args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every attack's texts, with what it did: words changed, content kept, length ratio."""
    rng = np.random.default_rng(args.seed + 1)

    def substituted() -> tuple[list[str], list[float]]:
        substitute = Substituter(llm, neighbours=args.neighbours)
        swapped = [substitute(t, args.substitute, rng) for t in texts]
        return [s for s, _ in swapped], [share for _, share in swapped]

    # In the order they draw from ``rng``: with the default attacks a seed gives the texts
    # it always gave (a subset without "substitute" draws other deletions).
    attacks: dict[str, Callable[[], tuple[list[str], list[float]]]] = {
        "substitute": substituted,
        "none": lambda: (texts, [0.0] * len(texts)),
        "delete": lambda: ([delete_words(t, args.delete, rng) for t in texts],
                           [args.delete] * len(texts)),
        "paraphrase": lambda: (paraphrase(llm, texts, chunk_words=args.chunk_words,
                                          max_tokens=args.chunk_tokens, batch=args.batch,
                                          seed=args.seed), [float("nan")] * len(texts)),
        "lexical": lambda: lexical_marks(texts, marked_by, ring, args.lexical_share),
    }
    unknown = set(args.attacks) - set(attacks)
    if unknown:
        raise SystemExit(f"--attacks: unknown {sorted(unknown)}; known: {', '.join(attacks)}")
    done = {}
    for name in (n for n in attacks if n in args.attacks):
        print(f"  attack '{name}' ...", file=sys.stderr)
        done[name] = attacks[name]()
    attacked = {name: done[name] for name in args.attacks}
    tokens = [len(llm.encode(t)) for t in texts]
    return {
        name: {
            "texts": out, "changed": statistics.median(shares),
            "kept": statistics.median(content_kept(a, b) for a, b in zip(texts, out, strict=True)),
            "ratio": statistics.median(
                len(llm.encode(b)) / n for b, n in zip(out, tokens, strict=True)),
            "tokens": statistics.median(len(llm.encode(b)) for b in out),
        }
        for name, (out, shares) in attacked.items()
    }


def trace(texts: list[str], owners: list[int | None], clients: list[str], ring: WatermarkKeyring,
          decode: Callable[[list[int]], str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per cut: right/wrong/not named, and the true client's single-key z and p."""
    tokenize = demo_tokenizer()
    seeds = {o: ring.key(clients[o]).seed(TEXT_PURPOSE) for o in owners if o is not None}
    ids = [tokenize(t) for t in texts]
    rows = []
    for cut in args.cuts:
        row: dict[str, Any] = {"tokens": cut, "texts": 0, "right": 0, "wrong": 0, "alone": 0,
                               "z": [], "smallest_p": 1.0}
        for owner, tokens in zip(owners, ids, strict=True):
            if len(tokens) < cut:
                continue
            text = decode(tokens[:cut])
            verdict = verify_text(text, clients, ring, tokenize=tokenize, gamma=args.gamma,
                                  alpha=args.alpha)
            row["texts"] += 1
            row["smallest_p"] = min(row["smallest_p"], verdict.p_value)
            named = clients.index(verdict.client) if verdict.client else None
            row["right"] += named is not None and named == owner
            row["wrong"] += named is not None and named != owner
            if owner is not None:
                own = score_text(tokenize(text), [seeds[owner]], gamma=args.gamma)
                row["z"].append(own.z)
                row["alone"] += own.p_value <= args.alpha
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    llm, drawn = load_and_draw(seed=args.seed, threads=args.threads, answers=args.answers,
                               clients=args.clients, secret=b"bench-watermark-robustness-")
    ring, clients = drawn.ring, drawn.clients
    jobs = drawn.jobs(gamma=args.gamma, delta=args.delta, unmarked=args.unmarked)
    print(f"sampling {len(jobs)} answers ...", file=sys.stderr)
    answers = sample_answers(llm, jobs, batch=args.batch, max_tokens=args.tokens,
                             min_tokens=args.tokens, seed=args.seed, temperature=args.temperature)
    texts = [llm.decode(a.tokens) for a in answers]
    owners: list[int | None] = [*drawn.owners, *[None] * args.unmarked]
    # Whose after-the-fact mark each answer gets in the "lexical" attack: its own client's,
    # a random client's for the unmarked ones.
    pick = np.random.default_rng(args.seed + 2)
    marked_by = [clients[o] if o is not None else clients[int(pick.integers(len(clients)))]
                 for o in owners]
    print("attacking ...", file=sys.stderr)
    attacks = attack(llm, texts, marked_by, ring, args)
    results = {}
    for name, done in attacks.items():
        print(f"tracing '{name}' ...", file=sys.stderr)
        marked = trace(done["texts"][: args.answers], owners[: args.answers], clients, ring,
                       llm.decode, args)
        unmarked = trace(done["texts"][args.answers :], owners[args.answers :], clients, ring,
                         llm.decode, args)
        results[name] = (marked, unmarked)
    report(args, attacks, results)
    if {"none", "lexical"} <= attacks.keys():
        after_the_fact(attacks, marked_by, clients, ring, args)
    if args.examples:
        for name, done in attacks.items():
            print(f"\n<details><summary>{name}: first answer</summary>\n\n```\n"
                  f"{done['texts'][0][: args.examples]}\n```\n</details>")


def after_the_fact(attacks: dict[str, dict[str, Any]], marked_by: list[str], clients: list[str],
                   ring: WatermarkKeyring, args: argparse.Namespace) -> None:
    """The after-the-fact verifier on the whole texts as sampled ("none": marked at the
    source, and the unmarked ones), then with the lexical mark of ``marked_by`` on top
    ("lexical"): who it names, and the single-key p of the client in ``marked_by``."""
    lexicon = default_lexicon()
    print(f"\n| after-the-fact verifier, whole texts ({len(clients):,} clients) | texts "
          f"| named (p ≤ {args.alpha:g}) | of them the lexical mark's client "
          f"| that client's single-key p ≤ {args.alpha:g} | its single-key p (median) "
          "| scored occurrences (median) |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, label in (("none", "as sampled (marked at the source, and unmarked)"),
                        ("lexical", "then marked after the fact")):
        texts = attacks[name]["texts"]
        verdicts = [verify_lexical(t, clients, ring, lexicon=lexicon, alpha=args.alpha)
                    for t in texts]
        own = [score_occurrences(occurrences(t, lexicon),
                                 [ring.key(who).seed(LEXICAL_PURPOSE)]).p_value
               for t, who in zip(texts, marked_by, strict=True)]
        named = sum(v.client is not None for v in verdicts)
        right = sum(v.client == who for v, who in zip(verdicts, marked_by, strict=True))
        alone = sum(p <= args.alpha for p in own)
        print(f"| {label} | {len(texts)} | {named} | {right if name == 'lexical' else '—'} "
              f"| {alone if name == 'lexical' else '—'} | "
              f"{statistics.median(own):.2g} | "
              f"{statistics.median(v.occurrences_scored for v in verdicts):.0f} |")


def report(args: argparse.Namespace, attacks: dict[str, dict[str, Any]],
           results: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
    print(f"\ntorch threads {args.threads}, temperature {args.temperature}, gamma {args.gamma}, delta {args.delta}, "
          f"{args.clients} clients, alpha {args.alpha:g}, {args.answers} marked + "
          f"{args.unmarked} unmarked answers\n")
    print("| attack | median tokens after | words changed (median) | content kept "
          "(4+ letter words) | length ratio |\n|---|---:|---:|---:|---:|")
    for name, a in attacks.items():
        changed = "—" if math.isnan(a["changed"]) else f"{100 * a['changed']:.0f}%"
        print(f"| {name} | {a['tokens']:.0f} | {changed} | {100 * a['kept']:.0f}% "
              f"| {a['ratio']:.2f} |")
    print(f"\n| attack | tokens | answers | right client named (p ≤ {args.alpha:g}) | wrong "
          f"| not named | true key alone p ≤ {args.alpha:g} | true key z: median (min–max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, (marked, _) in results.items():
        for r in marked:
            if not r["texts"]:
                continue
            share = 100 * r["right"] / r["texts"]
            missed = r["texts"] - r["right"] - r["wrong"]
            z = r["z"]
            print(f"| {name} | {r['tokens']} | {r['texts']} | {r['right']} ({share:.1f}%) "
                  f"| {r['wrong']} | {missed} | {r['alone']} | {statistics.median(z):.1f} "
                  f"({min(z):.1f}–{max(z):.1f}) |")
    print(f"\n| unmarked answers, attack | texts × cuts scored | named (p ≤ {args.alpha:g}) "
          "| smallest p (Bonferroni) |\n|---|---:|---:|---:|")
    for name, (_, unmarked) in results.items():
        scored = sum(r["texts"] for r in unmarked)
        named = sum(r["right"] + r["wrong"] for r in unmarked)
        smallest = min((r["smallest_p"] for r in unmarked if r["texts"]), default=float("nan"))
        print(f"| {name} | {scored} | {named} | {smallest:.2g} |")
    print(f"\n{FOOTER}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=20, help="marked answers")
    p.add_argument("--unmarked", type=int, default=5,
                   help="unmarked answers to the first prompts (false attribution)")
    p.add_argument("--tokens", type=int, default=400,
                   help="tokens per answer (end of text suppressed before)")
    p.add_argument("--cuts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[50, 100, 150, 200, 250, 300, 400],
                   help="token counts each attacked text is cut to (comma-separated)")
    p.add_argument("--delete", type=float, default=0.3, help="share of words deleted")
    p.add_argument("--substitute", type=float, default=0.5, help="share of words substituted")
    p.add_argument("--neighbours", type=int, default=10,
                   help="embedding neighbours considered per substituted word")
    p.add_argument("--chunk-words", type=int, default=60, help="words paraphrased at a time")
    p.add_argument("--chunk-tokens", type=int, default=128,
                   help="most tokens the paraphrase of one chunk may take")
    p.add_argument("--lexical-share", type=float,
                   default=LexicalConfig.model_fields["max_change_share"].default,
                   help="max_change_share of the 'lexical' attack's after-the-fact mark")
    p.add_argument("--attacks", type=lambda s: s.split(","),
                   default=["none", "delete", "substitute", "paraphrase", "lexical"],
                   help="comma-separated subset of none,delete,substitute,paraphrase,lexical")
    p.add_argument("--examples", type=int, default=600,
                   help="characters of the first answer shown per attack (0: none)")
    add_draw_arguments(p, batch=25)
    return parse_draw_arguments(p, argv)


if __name__ == "__main__":
    main()
