"""Would scoring only the positions where the model had a choice name more leaked texts?

A green-list bias can move a token only where the model was unsure; where it was sure, the
token is green by chance (gamma). A verifier that holds the model can compute the entropy
of each position's next-token distribution and score only the pairs above a threshold
(SWEET, Lee et al. 2023): fewer pairs, more of them green. A leak comes without its prompt,
so the entropy here is the demo LLM's on the answer's own text. The selection depends on
no key, so the exact binomial test over the kept distinct pairs stays exact.

Answers are drawn as ``bench/watermark_text.py`` draws them (the same prompts and clients
for a seed) and sampled as it samples with ``--min-tokens 0 --max-tokens <cut + 20>``
(answers end on their own), re-tokenised, cut to ``--cut`` tokens, and scored against
every client's key (Bonferroni over ``--clients``). Each distinct (previous, token) pair
counts once, judged by the entropy where it first occurs. Prints:

(a) per entropy band, the distinct pairs there and the share of them green under the
    owner's key (gamma without a mark);
(b) per threshold, the answers named (right client at p <= ``--alpha``), wrong clients
    named, the median scored pairs, and unmarked answers named. Picking the best row
    afterwards is a choice made on this draw: confirm it on another ``--seed``.

    python bench/watermark_entropy.py --temperature 0.7 --answers 100 --seed 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
from itertools import pairwise

import numpy as np
import torch

from modelfence.demo.llm import SmolLM
from modelfence.forensics.text import candidate_seeds, demo_tokenizer
from modelfence.redteam.attribution_setup import (
    add_draw_arguments,
    load_and_draw,
    parse_draw_arguments,
)
from modelfence.redteam.benchmarks import Footer
from modelfence.redteam.marked_text import sample_answers
from modelfence.watermark.greenlist import context_codes, is_green, threshold, token_codes
from modelfence.watermark.text_detect import score_pairs
from modelfence.watermark.text_logits import TEXT_PURPOSE

BANDS = (0.0, 0.1, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))
THRESHOLDS = (0.0, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0)
FOOTER = Footer()  # started with the run


def entropies(llm: SmolLM, ids: list[int]) -> np.ndarray:
    """Entropy (nats) of the model's distribution for each of ``ids[1:]`` given the text
    before it (the first token is the only context of the second)."""
    with torch.inference_mode():
        logits = llm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return (-(logp.exp() * logp).sum(-1)).numpy()


def first_pairs(ids: list[int]) -> np.ndarray:
    """Which positions ``1..`` hold the first occurrence of their (previous, token) pair."""
    pairs = np.stack([ids[:-1], ids[1:]], axis=1)
    keep = np.zeros(len(pairs), dtype=bool)
    keep[np.unique(pairs, axis=0, return_index=True)[1]] = True
    return keep


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    llm, d = load_and_draw(seed=args.seed, threads=args.threads, answers=args.answers,
                           clients=args.clients, secret=b"bench-watermark-text-")
    print(f"generating {args.answers} marked and {args.unmarked} unmarked answers ...",
          file=sys.stderr)
    jobs = d.jobs(gamma=args.gamma, delta=args.delta, unmarked=args.unmarked)
    answers = sample_answers(llm, jobs, batch=args.batch, max_tokens=args.cut + 20,
                             min_tokens=0, seed=args.seed, temperature=args.temperature)
    candidates, seeds = candidate_seeds(d.clients, d.ring)
    tokenize, cut = demo_tokenizer(), threshold(args.gamma)
    texts = []  # (owner or None, token ids, entropies, first-occurrence mask), long enough only
    for answer in answers:
        ids = tokenize(llm.decode(answer.tokens))[: args.cut]
        if len(ids) == args.cut:
            texts.append((answer.client, ids, entropies(llm, ids), first_pairs(ids)))
    if not any(owner is not None for owner, *_ in texts):
        sys.exit(f"no marked answer reached {args.cut} tokens: lower --cut or raise --answers")

    bands: list[tuple[np.ndarray, np.ndarray]] = []
    for owner, ids, ent, first in texts:
        if owner is None:
            continue
        # The seed the answer was marked with (GreenListProcessor.for_key, the current key).
        seed = np.asarray([[d.ring.key(d.clients[owner]).seed(TEXT_PURPOSE)]], dtype=np.uint64)
        green = is_green(context_codes(seed, np.asarray(ids[:-1])), token_codes(np.asarray(ids[1:])), cut)[0]
        bands.append((ent[first], green[first]))
    ent_all = np.concatenate([e for e, _ in bands])
    green_all = np.concatenate([g for _, g in bands])

    rows = []
    for tau in THRESHOLDS:
        right = wrong = fp = 0
        scored = []
        for owner, ids, ent, first in texts:
            keep = first & (ent >= tau)  # distinct pairs: the first occurrence decides
            pairs = (np.asarray(ids[:-1])[keep], np.asarray(ids[1:])[keep])
            score = score_pairs(pairs, seeds, gamma=args.gamma)
            named = score.p_adjusted <= args.alpha
            if owner is None:
                fp += named
                continue
            scored.append(score.tokens_scored)
            ours = score.candidate is not None and candidates[score.candidate][0] == d.clients[owner]
            right += named and ours
            wrong += named and not ours
        rows.append((tau, right, wrong, statistics.median(scored), fp))
    report(args, texts, ent_all, green_all, rows)


def report(args: argparse.Namespace, texts: list, ent: np.ndarray,
           green: np.ndarray, rows: list) -> None:
    marked = sum(owner is not None for owner, *_ in texts)
    print(f"\ntemperature {args.temperature}, gamma {args.gamma}, delta {args.delta}, "
          f"{args.clients} clients, alpha {args.alpha:g}; {marked} of {args.answers} marked "
          f"answers and {len(texts) - marked} of {args.unmarked} unmarked reached {args.cut} "
          "tokens\n")
    print("| entropy (nats) | distinct pairs | share | green under the owner's key |")
    print("|---|---:|---:|---:|")
    for low, high in pairwise(BANDS):
        band = (ent >= low) & (ent < high)
        share = float(green[band].mean()) if band.any() else float("nan")
        print(f"| [{low:g}, {high:g}) | {int(band.sum())} | {band.mean():.0%} | {share:.3f} |")
    print(f"| all | {len(ent)} | 100% | {float(green.mean()):.3f} |\n")
    print(f"| scored where entropy ≥ | right client named (p ≤ {args.alpha:g}) | wrong client "
          "| median pairs scored | unmarked named |")
    print("|---:|---:|---:|---:|---:|")
    for tau, right, wrong, pairs, fp in rows:
        print(f"| {tau:g} | {right} of {marked} ({100 * right / max(marked, 1):.1f}%) | {wrong} "
              f"| {pairs:.0f} | {fp} of {len(texts) - marked} |")
    print(f"\n{FOOTER}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=100, help="marked answers")
    p.add_argument("--unmarked", type=int, default=20, help="unmarked answers to the first prompts")
    p.add_argument("--cut", type=int, default=200, help="tokens of each answer scored")
    add_draw_arguments(p, batch=35)
    return parse_draw_arguments(p, argv)


if __name__ == "__main__":
    main()
