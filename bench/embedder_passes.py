"""What a MiniLM text costs on one thread, by how many padded tokens share a forward pass.

The texts are the distinct prompts of the detector bench's population
(``bench/detector_throughput.py``: honest chat clients with real prompts and one
extractor of every kind), cut at the detector's ``EMBED_CHARS``. For each
``batch_tokens`` budget (``TextEmbedder``'s cap on rows × longest text per pass; "none" is
64 rows a pass whatever their length) it prints the CPU milliseconds per text (best of
``--repeats``, ``time.process_time``), texts/s per core, and the largest difference from
embedding each of the first 100 texts alone (the grouping must not change a vector).

``--quantized`` adds the model that multiplies in int8 (``TextEmbedder.load(quantized=True)``,
the detector's ``minilm-int8``) at the default budget, side by side with float32 in the same
run: its cost per text, and the cosine of each of its vectors to the float32 one.
``--build-cost`` instead builds that model into an empty cache and prints how long it took
and the most scratch space it held at once, in the system temporary directory
(onnxruntime's tools) and in the cache (sampled every 10 ms).

    python bench/embedder_passes.py
    python bench/embedder_passes.py --texts 400 --budgets 128,256
    python bench/embedder_passes.py --budgets 256 --quantized
    python bench/embedder_passes.py --build-cost
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from detector_throughput import build_events, machine_line, minilm_unavailable, uptime

from modelfence.detect.engine import EMBED_CHARS, _texts_of
from modelfence.models.embedder import BATCH_TOKENS, TextEmbedder, quantized_model

UNBOUNDED = 1 << 30


def distinct_texts(count: int, seed: int) -> list[str]:
    events = build_events(count * 12, seed)  # about one text in eight is new
    texts = (t[:EMBED_CHARS] for e in events if not e.input_rows for t in _texts_of(e))
    return list(dict.fromkeys(texts))[:count]


def measure(texts: Sequence[str], budget: int, repeats: int, quantized: bool = False
            ) -> tuple[float, np.ndarray]:
    embedder = TextEmbedder.load(threads=1, batch_tokens=budget, quantized=quantized)
    embedder.embed(texts[:32])  # warm-up
    best, vectors = float("inf"), np.empty(0)
    for _ in range(repeats):
        started = time.process_time()
        vectors = embedder.embed(texts)
        best = min(best, time.process_time() - started)
    return best / len(texts), vectors


def megabytes(folder: str) -> float:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # a file the build just removed
                total += os.path.getsize(os.path.join(root, name))
    return total / 1e6


def build_cost() -> str:
    """One build of the int8 copy into an empty cache, with the scratch space it held."""
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as cache:
        peaks = {scratch: 0.0, cache: 0.0}
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.01):
                for folder, peak in list(peaks.items()):
                    peaks[folder] = max(peak, megabytes(folder))

        watcher = threading.Thread(target=watch, daemon=True)
        system_tmp, tempfile.tempdir = tempfile.tempdir, scratch  # onnxruntime's tools use it
        watcher.start()
        try:
            started = time.perf_counter()
            built = quantized_model(cache_dir=Path(cache))
            seconds = time.perf_counter() - started
        finally:
            tempfile.tempdir = system_tmp
            done.set()
            watcher.join()
        return (f"built in {seconds:.1f} s: {built.stat().st_size / 1e6:.1f} MB; peak scratch "
                f"{peaks[scratch]:.0f} MB in the system temporary directory, "
                f"{peaks[cache]:.0f} MB in the cache")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000, help="distinct texts (default 1,000)")
    parser.add_argument("--budgets", default=f"none,128,{BATCH_TOKENS},512",
                        help="batch_tokens values, comma-separated; none: no cap")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quantized", action="store_true",
                        help="also the int8 model against float32 (cost, cosine)")
    parser.add_argument("--build-cost", action="store_true",
                        help="only build the int8 model once, timed, with its scratch space")
    args = parser.parse_args(argv)
    if args.build_cost:
        print(f"machine: {machine_line()}; load {uptime()}")
        print(build_cost())
        return 0
    if (why := minilm_unavailable(quantized=args.quantized)) is not None:
        print(f"MiniLM cannot run here: {why}")
        return 1
    texts = distinct_texts(args.texts, args.seed)
    single = TextEmbedder.load(threads=1)
    tokens = single.count_tokens(texts)
    print(f"# embedder passes, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {machine_line()}; load {uptime()}")
    print(f"{len(texts):,} distinct texts, tokens p50 {int(np.median(tokens))}, "
          f"p90 {int(np.percentile(tokens, 90))}, max {max(tokens)}\n")
    alone = np.stack([single.embed([t])[0] for t in texts[:100]])
    print("| batch_tokens | CPU ms/text | texts/s per core | max |Δ| vs alone |")
    print("|---|---:|---:|---:|")
    for name in args.budgets.split(","):
        budget = UNBOUNDED if name == "none" else int(name)
        per_text, vectors = measure(texts, budget, args.repeats)
        delta = float(np.abs(vectors[:100] - alone).max())
        print(f"| {name} | {per_text * 1e3:.2f} | {1 / per_text:,.0f} | {delta:.1e} |")
    if args.quantized:
        print(f"\n| model (batch_tokens {BATCH_TOKENS}) | CPU ms/text | texts/s per core "
              "| cosine to float32: min / p1 / mean |")
        print("|---|---:|---:|---|")
        # Interleaved, best of repeats each, so the machine's drift hits both alike.
        runs = [(measure(texts, BATCH_TOKENS, 1), measure(texts, BATCH_TOKENS, 1, True))
                for _ in range(args.repeats)]
        exact = runs[0][0][1]
        for label, which in (("float32 (minilm)", 0), ("int8 (minilm-int8)", 1)):
            per_text = min(run[which][0] for run in runs)
            cosine = np.sum(runs[0][which][1] * exact, axis=1)
            print(f"| {label} | {per_text * 1e3:.2f} | {1 / per_text:,.0f} | {cosine.min():.4f}"
                  f" / {np.percentile(cosine, 1):.4f} / {cosine.mean():.4f} |")
    print(f"\nload {uptime()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
