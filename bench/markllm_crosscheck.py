"""Cross-check our green-list detector statistic against MarkLLM's KGW (markllm 0.1.5).

Our green list is our own hash (``watermark/greenlist.py``), so the two detectors are
compared on the same green lists, both ways, on SmolLM2 (the demo LLM), gamma 0.25,
delta 2.0, h = 1, answers sampled at temperature 1 by ``sample_answers``:

(A) MarkLLM's ``KGWLogitsProcessor`` (left hash, its default hash key) marks answers.
    MarkLLM's ``detect_watermark`` scores them; our ``score_text`` scores the same token
    ids with MarkLLM's green-list membership of each (previous, token) pair in place of
    our hash, with our deduplication of repeated pairs and without it.
(B) our ``GreenListProcessor`` marks answers for a client. Our ``score_text`` scores them
    (as ``verify_text`` does); MarkLLM's ``detect_watermark`` scores them with its
    ``get_greenlist_ids`` replaced by our green list for that client's seed.

Unmarked answers to other prompts go through both. MarkLLM pins ``openai==0.28``, so it
lives in its own virtual environment; ``--no-deps`` keeps pip from replacing the CPU
torch (its KGW needs only torch and transformers, found in the system site-packages):

    python -m venv --system-site-packages .venv-markllm
    .venv-markllm/bin/pip install --no-deps markllm==0.1.5
    python bench/markllm_crosscheck.py          # about 6.5 minutes on two busy cores

The script runs itself again inside that environment (``--worker IN OUT``) for all that
needs MarkLLM, exchanging JSON, so our package never imports markllm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import norm

from modelfence.demo.llm import SmolLM
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.benchmarks import Footer
from modelfence.redteam.marked_text import Job, sample_answers
from modelfence.redteam.prompts import load_prompts
from modelfence.watermark import text_detect
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import TEXT_PURPOSE, GreenListProcessor

FOOTER = Footer()  # started with the run
HASH_KEY = 15485863  # MarkLLM's default KGW key (config/KGW.json)
Pairs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


# -- inside the MarkLLM environment ---------------------------------------------------------


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Mark answers with MarkLLM's KGW, and score texts with its detector (both checks)."""
    from markllm.utils.transformers_config import TransformersConfig
    from markllm.watermark.kgw import KGW

    torch.set_num_threads(1)
    llm = SmolLM.load(threads=1)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"algorithm_name": "KGW", "gamma": job["gamma"], "delta": job["delta"],
                   "hash_key": HASH_KEY, "prefix_length": 1, "z_threshold": 4.0,
                   "f_scheme": "time", "window_scheme": "left"}, f)
    kgw = KGW(f.name, TransformersConfig(llm.model, llm.tokenizer, vocab_size=llm.vocab_size,
                                         device="cpu"))
    os.unlink(f.name)
    jobs = [Job(p, kgw.logits_processor, 0) for p in job["prompts"]]
    answers = sample_answers(llm, jobs, batch=job["batch"], max_tokens=job["max_tokens"],
                             min_tokens=job["max_tokens"], seed=job["seed"])
    marked = [llm.decode(a.tokens) for a in answers]

    def markllm_scores(text: str) -> dict[str, Any]:
        ids = llm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        _, flags = kgw.utils.score_sequence(ids)
        return {"text": text, "ids": ids.tolist(), "flags": flags,
                "z": float(kgw.detect_watermark(text)["score"])}

    check_a = [markllm_scores(t) for t in marked + job["unmarked"]]
    check_b = []
    for text, seed in job["ours"]:
        ours = GreenListProcessor(seed, gamma=job["gamma"])
        kgw.utils.get_greenlist_ids = lambda ids, ours=ours: torch.from_numpy(
            np.flatnonzero(ours.green(int(ids[-1]), llm.vocab_size)))
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        check_b.append({"ids": ids, "z": float(kgw.detect_watermark(text)["score"])})
    return {"a": check_a, "b": check_b, "marked": len(marked)}


# -- our side --------------------------------------------------------------------------------


def all_pairs(token_ids: Sequence[int]) -> Pairs:
    """Every consecutive (previous, token) pair, repeats included (MarkLLM's count)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    return ids[:-1], ids[1:]


@contextmanager
def our_scoring(*, dedup: bool, green: dict[tuple[int, int], int] | None = None) -> Iterator[None]:
    """``score_text`` as it is, optionally without deduplication or with another green list."""
    def lookup(seeds: Any, previous: Any, current: Any, gamma: float) -> npt.NDArray[np.int64]:
        assert green is not None
        return np.array([sum(green[(int(p), int(c))] for p, c in zip(previous, current))])

    pairs = text_detect.scored_pairs if dedup else all_pairs
    with patch.object(text_detect, "scored_pairs", pairs):
        if green is None:
            yield
        else:
            with patch.object(text_detect, "green_counts", lookup):
                yield


def membership(ids: list[int], flags: list[int]) -> dict[tuple[int, int], int]:
    """MarkLLM's verdict per (previous, token) pair; with h = 1 it depends on the pair alone."""
    green: dict[tuple[int, int], int] = {}
    for prev, token, flag in zip(ids[:-1], ids[1:], flags[1:], strict=True):
        assert green.setdefault((prev, token), flag) == flag, "membership is not per pair"
    return green


def compare_a(rows: list[dict[str, Any]], tokenize: Any, gamma: float) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        green = membership(row["ids"], row["flags"])
        with our_scoring(dedup=False, green=green):
            plain = text_detect.score_text(row["ids"], [0], gamma=gamma)
        with our_scoring(dedup=True, green=green):
            dedup = text_detect.score_text(row["ids"], [0], gamma=gamma)
        out.append({"markllm": row["z"], "plain": plain, "dedup": dedup,
                    "same_ids": tokenize(row["text"]) == row["ids"]})
    return out


def compare_b(texts: list[tuple[str, int]], markllm: list[dict[str, Any]], tokenize: Any,
              gamma: float) -> list[dict[str, Any]]:
    out = []
    for (text, seed), theirs in zip(texts, markllm, strict=True):
        ids = tokenize(text)
        with our_scoring(dedup=False):
            plain = text_detect.score_text(ids, [seed], gamma=gamma)
        dedup = text_detect.score_text(ids, [seed], gamma=gamma)  # verify_text's statistic
        out.append({"markllm": theirs["z"], "plain": plain, "dedup": dedup,
                    "same_ids": ids == theirs["ids"]})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        source, target = args.worker
        Path(target).write_text(json.dumps(worker(json.loads(Path(source).read_text()))))
        return
    from modelfence.forensics.text import demo_tokenizer

    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(1)
    llm = SmolLM.load(threads=1)
    corpus = list(load_prompts().all())
    picked = [corpus[int(i)] for i in rng.choice(len(corpus), 3 * args.texts, replace=False)]
    prompts = [llm.encode_chat([{"role": "user", "content": p}]) for p in picked]
    ring = WatermarkKeyring(ServerSecret(b"bench-markllm-crosscheck-" + str(args.seed).encode()))
    seeds = [ring.key(f"client-{i:05d}").seed(TEXT_PURPOSE) for i in range(args.texts)]
    jobs = [Job(p, GreenListProcessor(s, gamma=args.gamma, delta=args.delta), i)
            for i, (p, s) in enumerate(zip(prompts[: args.texts], seeds, strict=True))]
    jobs += [Job(p, None, None) for p in prompts[args.texts : 2 * args.texts]]
    print(f"sampling {len(jobs)} of our answers ...", file=sys.stderr)
    ours = [llm.decode(a.tokens) for a in sample_answers(
        llm, jobs, batch=args.batch, max_tokens=args.max_tokens, min_tokens=args.max_tokens,
        seed=args.seed)]
    unmarked = ours[args.texts :]
    # Unmarked answers are scored under the same seeds as the marked ones.
    job = {"prompts": prompts[2 * args.texts :], "unmarked": unmarked, "gamma": args.gamma,
           "delta": args.delta, "max_tokens": args.max_tokens, "batch": args.batch,
           "seed": args.seed + 1, "ours": list(zip(ours, seeds + seeds, strict=True))}
    print(f"running MarkLLM in {args.markllm_python} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp, "in.json"), Path(tmp, "out.json")
        source.write_text(json.dumps(job))
        subprocess.run([args.markllm_python, __file__, "--worker", str(source), str(target)],
                       check=True)
        result = json.loads(target.read_text())
    tokenize = demo_tokenizer()
    checks = {
        "A: MarkLLM's KGW marks, its green lists": (
            compare_a(result["a"], tokenize, args.gamma), result["marked"]),
        "B: our marks, our green lists": (
            compare_b(job["ours"], result["b"], tokenize, args.gamma), args.texts),
    }
    report(args, checks)


def summary(rows: list[dict[str, Any]]) -> str:
    markllm = np.array([r["markllm"] for r in rows])
    plain = np.array([r["plain"].z for r in rows])
    dedup = np.array([r["dedup"].z for r in rows])
    # Exact binomial vs MarkLLM's normal tail on the same (T, green): the approximation alone.
    ratio = [np.log10(r["plain"].p_value / max(norm.sf(r["markllm"]), 1e-300)) for r in rows]
    return (f"{len(rows)} | {np.median(markllm):.2f} | {np.median(plain):.2f} "
            f"| {np.abs(plain - markllm).max():.1e} | {np.median(dedup):.2f} "
            f"| {np.mean(dedup - markllm):+.2f} | {np.abs(dedup - markllm).max():.2f} "
            f"| {np.corrcoef(dedup, markllm)[0, 1]:.4f} | {statistics.median(ratio):+.2f} "
            f"| {sum(r['same_ids'] for r in rows)}/{len(rows)}")


def report(args: argparse.Namespace, checks: dict[str, tuple[list[dict[str, Any]], int]]) -> None:
    print(f"\nmarkllm 0.1.5, torch threads 1, gamma {args.gamma}, delta {args.delta}, "
          f"{args.max_tokens}-token answers\n")
    print("| check | texts | z MarkLLM (median) | z ours, no dedup | max abs diff | z ours, "
          "dedup | mean diff (dedup − MarkLLM) | max abs diff | correlation (dedup) "
          "| log10 p exact/normal (median) | same token ids |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rows, marked) in checks.items():
        for kind, part in (("marked", rows[:marked]), ("unmarked", rows[marked:])):
            print(f"| {name}, {kind} | {summary(part)} |")
    print("\n| check | text | kind | tokens scored (all / distinct) | green (all / distinct) "
          "| z MarkLLM | z ours, no dedup | z ours, dedup | p exact (dedup) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, (rows, marked) in checks.items():
        for i, r in enumerate(rows):
            plain, dedup = r["plain"], r["dedup"]
            print(f"| {name[0]} | {i} | {'marked' if i < marked else 'unmarked'} "
                  f"| {plain.tokens_scored} / {dedup.tokens_scored} "
                  f"| {plain.green} / {dedup.green} "
                  f"| {r['markllm']:.3f} | {plain.z:.3f} | {dedup.z:.3f} | {dedup.p_value:.2g} |")
    print(f"\n{FOOTER}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=20, help="marked answers per check (and unmarked)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per answer")
    p.add_argument("--gamma", type=float, default=0.25)
    p.add_argument("--delta", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--markllm-python", default=".venv-markllm/bin/python",
                   help="python of the environment with markllm installed")
    p.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
