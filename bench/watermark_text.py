"""Text marks made at the source: cost per token, attribution among many clients, quality.

Everything runs on the demo LLM (SmolLM2-135M-Instruct, CPU) with the processor the demo
upstream uses (``GreenListProcessor``; gamma and delta from the config defaults or flags):

(a) cost: ms per generated token of ``SmolLM.generate`` (the demo upstream's own loop)
    with and without the processor, alternating runs, and the processor alone per call;
(b) attribution: ``--answers`` answers to prompts from ``modelfence.redteam.prompts``, each
    marked for a random one of ``--clients`` clients, cut to 50/100/150/200 tokens and
    traced with ``verify_text`` (every client's key scored, Bonferroni over all of them,
    named when p <= ``--alpha``); false attribution on ``--unmarked`` unmarked answers and
    on human-written texts of at least 50 tokens (prompts not asked);
(c) quality: perplexity of marked and unmarked answers to the same prompts, scored by the
    unmarked model.

Answers for (b) and (c) are sampled at ``--temperature`` (1, top_p 1, as the demo upstream
does by default) in batches through ``model.generate``; end-of-text and other special
tokens are suppressed until ``--min-tokens`` (220) so that every answer is long enough for
each cut. With ``--min-tokens 0`` answers stop where the model ends them: a cut counts
only the answers that long, and a last row traces every answer whole.

    python bench/watermark_text.py                   # about 10 minutes on two busy cores
    python bench/watermark_text.py --answers 200 --unmarked 100 --human 5000
    python bench/watermark_text.py --temperature 0.7 --min-tokens 0 --answers 200
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from modelfence.demo.llm import SamplingParams, SmolLM
from modelfence.forensics.text import demo_tokenizer, verify_text
from modelfence.redteam.attribution_setup import (
    add_draw_arguments,
    load_and_draw,
    parse_draw_arguments,
)
from modelfence.redteam.marked_text import Answer, sample_answers
from modelfence.redteam.prompts import load_prompts
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import GreenListProcessor

CUTS = (50, 100, 150, 200)
T0 = time.monotonic()


def per_token_cost(llm: SmolLM, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, float]:
    """ms/token of the demo upstream's own generation loop, with and without the mark."""
    processor = GreenListProcessor(12345, gamma=args.gamma, delta=args.delta)
    params = SamplingParams(max_tokens=args.cost_tokens, temperature=1.0, seed=args.seed)
    times: dict[str, list[float]] = {"off": [], "on": []}
    llm.generate(prompts[0], SamplingParams(max_tokens=4))  # warm-up
    for prompt in prompts[: args.cost_runs]:
        for arm in ("off", "on", "on", "off"):  # balanced against drifting machine load
            started = time.perf_counter()
            out = llm.generate(prompt, params, logits_processor=processor if arm == "on" else None)
            times[arm].append((time.perf_counter() - started) * 1000 / max(1, out.completion_tokens))
    scores = torch.randn(1, llm.vocab_size)
    ids = torch.tensor([[17, 42]])
    processor(ids, scores)  # token codes computed once, as in serving
    calls = 200
    started = time.perf_counter()
    for i in range(calls):
        ids[0, -1] = i
        processor(ids, scores)
    alone = (time.perf_counter() - started) * 1000 / calls
    return {"off": statistics.median(times["off"]), "on": statistics.median(times["on"]),
            "alone": alone}


def perplexity(llm: SmolLM, answer: Answer) -> float:
    """exp(mean negative log-likelihood) of the answer's tokens under the unmarked model."""
    ids = torch.tensor([answer.prompt + answer.tokens])
    with torch.inference_mode():
        logits = llm.model(input_ids=ids).logits[0, len(answer.prompt) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer.tokens))
    return math.exp(float(nll))


def attribution(answers: list[Answer], clients: list[str], ring: WatermarkKeyring,
                llm: SmolLM, args: argparse.Namespace) -> list[dict[str, Any]]:
    tokenize = demo_tokenizer()
    # Re-tokenised text, as `modelfence verify text` sees a leak (not the sampled ids).
    texts = [tokenize(llm.decode(a.tokens)) for a in answers]
    rows = []
    for cut in (*CUTS, None):  # None: every answer whole, however long
        right = wrong = scored = 0
        p_values = []
        for answer, ids in zip(answers, texts, strict=True):
            if cut is not None and len(ids) < cut:
                continue
            verdict = verify_text(llm.decode(ids[:cut]), clients, ring, tokenize=tokenize,
                                  gamma=args.gamma, alpha=args.alpha)
            scored += 1
            p_values.append(verdict.p_value)
            if verdict.ours:
                named = clients.index(verdict.client) if verdict.client else -1
                right += named == answer.client
                wrong += named != answer.client
        tokens = cut if cut is not None else f"whole answer (median {statistics.median(map(len, texts)):.0f})"
        rows.append({"tokens": tokens, "scored": scored, "right": right, "wrong": wrong,
                     "median_p": statistics.median(p_values) if p_values else float("nan")})
    return rows


def false_attribution(texts: list[str], clients: list[str], ring: WatermarkKeyring,
                      args: argparse.Namespace) -> dict[str, Any]:
    tokenize = demo_tokenizer()
    named, lengths, smallest = 0, [], 1.0
    for text in texts:
        verdict = verify_text(text, clients, ring, tokenize=tokenize, gamma=args.gamma,
                              alpha=args.alpha)
        named += verdict.ours
        lengths.append(verdict.tokens_scored)
        smallest = min(smallest, verdict.p_value)
    return {"texts": len(texts), "median_tokens": statistics.median(lengths) if lengths else 0,
            "named": named, "smallest_p": smallest}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    llm, d = load_and_draw(seed=args.seed, threads=args.threads, answers=args.answers,
                           clients=args.clients, secret=b"bench-watermark-text-")
    picked, prompts, ring, clients = d.picked, d.prompts, d.ring, d.clients
    corpus = list(load_prompts().all())

    print(f"(a) cost per token, {args.cost_runs} prompts x {args.cost_tokens} tokens ...",
          file=sys.stderr)
    cost = per_token_cost(llm, prompts, args)
    print("(b, c) generating answers ...", file=sys.stderr)
    jobs = d.jobs(gamma=args.gamma, delta=args.delta, unmarked=args.unmarked)
    answers = sample_answers(llm, jobs, batch=args.batch, max_tokens=args.max_tokens,
                             min_tokens=args.min_tokens, seed=args.seed,
                             temperature=args.temperature)
    marked, unmarked = answers[: args.answers], answers[args.answers :]
    print("(b) tracing ...", file=sys.stderr)
    rows = attribution(marked, clients, ring, llm, args)
    asked, tokenize = set(picked), demo_tokenizer()
    # Only texts long enough for the shortest cut: a 10-token text could never be named.
    human = [t for t in corpus if t not in asked and len(tokenize(t)) >= CUTS[0]][: args.human]
    nulls = {
        "unmarked answers": false_attribution([llm.decode(a.tokens) for a in unmarked], clients,
                                              ring, args),
        "human-written prompts": false_attribution(human, clients, ring, args),
    }
    print("(c) perplexity ...", file=sys.stderr)
    ppl = {
        "marked": [perplexity(llm, a) for a in marked[: args.unmarked]],
        "unmarked": [perplexity(llm, a) for a in unmarked],
    }
    report(args, cost, rows, nulls, ppl, argv)


def report(args: argparse.Namespace, cost: dict[str, float], rows: list[dict[str, Any]],
           nulls: dict[str, dict[str, Any]], ppl: dict[str, list[float]],
           argv: list[str] | None) -> None:
    command = " ".join(["python bench/watermark_text.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n`{command}` — {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
          f"torch threads {args.threads}, temperature {args.temperature}, "
          f"min tokens {args.min_tokens}, gamma {args.gamma}, delta {args.delta}, "
          f"{args.clients} clients, alpha {args.alpha:g}, {time.monotonic() - T0:.0f} s\n")
    overhead = 100 * (cost["on"] / cost["off"] - 1)
    print("| generation (demo upstream loop) | ms/token |\n|---|---:|")
    print(f"| without mark | {cost['off']:.1f} |\n| with mark | {cost['on']:.1f} ({overhead:+.1f}%) |")
    print(f"| processor alone, per token | {cost['alone']:.3f} |\n")
    print(f"| tokens of marked text | answers | right client named (p ≤ {args.alpha:g}) "
          "| wrong client named | not named | median p (Bonferroni) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = 100 * r["right"] / r["scored"] if r["scored"] else float("nan")
        missed = r["scored"] - r["right"] - r["wrong"]
        print(f"| {r['tokens']} | {r['scored']} | {r['right']} ({share:.1f}%) | {r['wrong']} "
              f"| {missed} | {r['median_p']:.2g} |")
    print(f"\n| unmarked text | texts | median tokens | named (p ≤ {args.alpha:g}) | smallest p |")
    print("|---|---:|---:|---:|---:|")
    for name, n in nulls.items():
        print(f"| {name} | {n['texts']} | {n['median_tokens']:.0f} | {n['named']} "
              f"| {n['smallest_p']:.2g} |")
    print("\n| answers (same prompts) | n | perplexity mean | median |\n|---|---:|---:|---:|")
    for name, values in ppl.items():
        if values:
            print(f"| {name} | {len(values)} | {statistics.mean(values):.2f} "
                  f"| {statistics.median(values):.2f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=50, help="marked answers (>= 50 for the table)")
    p.add_argument("--unmarked", type=int, default=20,
                   help="unmarked answers to the first prompts (false attribution, perplexity)")
    p.add_argument("--human", type=int, default=1000, help="human-written texts scored as unmarked")
    # Sampled ids re-tokenise into a few percent fewer tokens: 10% spare keeps the 200 cut full.
    p.add_argument("--max-tokens", type=int, default=220)
    p.add_argument("--min-tokens", type=int, default=220,
                   help="end of text suppressed before this many tokens")
    p.add_argument("--cost-runs", type=int, default=3, help="prompts timed with and without mark")
    p.add_argument("--cost-tokens", type=int, default=48)
    add_draw_arguments(p, batch=35)
    args = parse_draw_arguments(p, argv)
    if args.min_tokens > args.max_tokens:
        p.error("--min-tokens must not exceed --max-tokens")
    return args


if __name__ == "__main__":
    main()
