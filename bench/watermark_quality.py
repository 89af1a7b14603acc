"""Do text marks cost answers? Task accuracy of the demo LLM with and without the mark.

Perplexity (``bench/watermark_text.py``) says how surprised the unmarked model is by marked
text, not whether marked answers are worse. This asks the demo LLM (SmolLM2-135M-Instruct,
CPU) short questions with one checkable answer (capitals, sums, opposites, colours,
counts: ``QUESTIONS``, written for this benchmark, never used to tune the mark) and scores
each answer by whether it contains the expected word. Three arms sample every question
``--samples`` times at ``--temperature`` with natural stopping, each answer marked for a
random client of ``--clients`` (the demo upstream's ``GreenListProcessor``, config gamma
and delta) or unmarked:

- ``unmarked A`` and ``unmarked B``: two independent unmarked draws (B gives the noise
  floor: how often two unmarked answers to the same question already disagree);
- ``marked``: the same questions, marked.

It prints each arm's accuracy, the marked − unmarked difference with a 95% interval
(questions resampled: answers to one question are not independent), and how often the
marked answer agrees (both right or both wrong) with unmarked A, next to how often
unmarked B does.

    python bench/watermark_quality.py                     # ~5 minutes on two cores
    python bench/watermark_quality.py --temperature 0.7 --samples 8
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import numpy as np

from modelfence.redteam.attribution_setup import add_draw_arguments
from modelfence.redteam.marked_text import Job, sample_answers
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import GreenListProcessor

T0 = time.monotonic()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Russia": "Moscow", "Egypt": "Cairo", "England": "London",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Austria": "Vienna", "Poland": "Warsaw", "China": "Beijing",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "day": "night", "fast": "slow",
    "happy": "sad", "open": "closed", "light": "dark", "old": "new", "wet": "dry",
    "early": "late", "full": "empty", "hard": "soft", "rich": "poor", "win": "lose",
}
FACTS = {
    "What colour is the sky on a clear day?": "blue",
    "What colour is grass?": "green",
    "What colour is snow?": "white",
    "What colour is a ripe banana?": "yellow",
    "What colour is coal?": "black",
    "What colour are most fire trucks?": "red",
    "What animal says moo?": "cow",
    "What animal barks?": "dog",
    "Which planet do we live on?": "earth",
    "What do bees make?": "honey",
    "What is frozen water called?": "ice",
    "Which star is closest to the Earth?": "sun",
    "What is the largest ocean on Earth?": "pacific",
    "How many legs does a spider have?": "8|eight",
    "How many legs does a dog have?": "4|four",
    "How many days are there in a week?": "7|seven",
    "How many months are there in a year?": "12|twelve",
    "How many hours are in a day?": "24|twenty-four|twenty four",
    "How many sides does a triangle have?": "3|three",
    "How many minutes are in an hour?": "60|sixty",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen"]


def questions() -> list[tuple[str, str]]:
    """(question, accepted answers as a regex alternation): 75 in all."""
    out = [(f"What is the capital of {country}?", city.lower())
           for country, city in CAPITALS.items()]
    out += [(f"What is the opposite of {word}?", opposite) for word, opposite in OPPOSITES.items()]
    out += [(q, a) for q, a in FACTS.items()]
    pairs = [(2, 3), (4, 5), (1, 6), (3, 3), (7, 2), (5, 4), (6, 3), (8, 1), (2, 7), (9, 0),
             (4, 4), (3, 5), (6, 6), (7, 7), (8, 9), (5, 5), (9, 2), (6, 2), (1, 1), (3, 9)]
    out += [(f"What is {a} plus {b}?", f"{a + b}|{NUMBER_WORDS[a + b]}") for a, b in pairs]
    return out


def correct(answer: str, accepted: str) -> bool:
    return re.search(rf"\b(?:{accepted})\b", answer.lower()) is not None


def interval(diffs: np.ndarray, rng: np.random.Generator, draws: int = 10_000) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-question differences."""
    means = diffs[rng.integers(0, len(diffs), (draws, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from modelfence.demo.llm import SmolLM
    from modelfence.identity.secret import ServerSecret

    torch.set_num_threads(args.threads)
    llm = SmolLM.load(threads=args.threads)
    rng = np.random.default_rng(args.seed)
    ring = WatermarkKeyring(ServerSecret(b"bench-watermark-quality-" + str(args.seed).encode()))
    asked = questions()
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q, _ in asked]
    rounds = [p for p in prompts for _ in range(args.samples)]  # question-major
    owners = rng.integers(0, args.clients, len(rounds))
    arms = {
        "unmarked A": [Job(p, None, None) for p in rounds],
        "unmarked B": [Job(p, None, None) for p in rounds],
        "marked": [
            Job(p, GreenListProcessor.for_key(ring.key(f"client-{int(c):05d}"), gamma=args.gamma,
                                              delta=args.delta), int(c))
            for p, c in zip(rounds, owners, strict=True)
        ],
    }
    right: dict[str, np.ndarray] = {}
    for i, (name, jobs) in enumerate(arms.items()):
        print(f"sampling {name}: {len(jobs)} answers ...", file=sys.stderr)
        answers = sample_answers(llm, jobs, batch=args.batch, max_tokens=args.max_tokens,
                                 seed=args.seed * 1000 + i * 100_003, temperature=args.temperature)
        texts = [llm.decode(a.tokens) for a in answers]
        right[name] = np.array([correct(t, asked[j // args.samples][1])
                                for j, t in enumerate(texts)]).reshape(len(asked), args.samples)
    report(args, argv, right, rng)


def report(args: argparse.Namespace, argv: list[str] | None, right: dict[str, np.ndarray],
           rng: np.random.Generator) -> None:
    command = " ".join(["python bench/watermark_quality.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_questions, samples = right["marked"].shape
    print(f"\n`{command}` — {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
          f"temperature {args.temperature}, gamma {args.gamma}, delta {args.delta}, "
          f"{n_questions} questions x {samples} samples per arm, "
          f"{time.monotonic() - T0:.0f} s\n")
    base = right["unmarked A"]
    print("| arm | accuracy | minus unmarked A (95% interval, questions resampled) "
          "| agrees with unmarked A |\n|---|---:|---:|---:|")
    for name, hits in right.items():
        diff = hits.mean(axis=1) - base.mean(axis=1)
        low, high = interval(diff, rng)
        agree = float((hits == base).mean())
        cells = ("–", "–") if name == "unmarked A" else (
            f"{100 * diff.mean():+.1f} pts ({100 * low:+.1f}, {100 * high:+.1f})", f"{100 * agree:.1f}%")
        print(f"| {name} | {100 * hits.mean():.1f}% | {cells[0]} | {cells[1]} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4, help="answers per question per arm")
    p.add_argument("--max-tokens", type=int, default=48, help="most tokens per answer")
    add_draw_arguments(p, batch=50)
    args = p.parse_args(argv)
    if args.samples < 1 or args.max_tokens < 1:
        p.error("--samples and --max-tokens must be >= 1")
    return args


if __name__ == "__main__":
    main()
