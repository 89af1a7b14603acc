"""Embedding students through a real gateway: EmbMarker/WARDEN-style marks, cost and detection.

The stack is ``own_stack``: the demo upstream (MiniLM-L6-v2, 384-d) and ``modelfence
serve`` with the default watermark config (20 trigger words, 4 targets, full pull at 4
triggers), limits raised so that nothing is refused. A thief harvests the largest of
``--texts`` texts (the harness's prompt corpus plus English WritingBench sentences of 8-80
words, shuffled) through the gateway, 16 per request; the same texts are embedded straight
by the upstream.

(a) cost to the vectors: cosine of each gateway vector to the upstream's, by the number of
    the thief's trigger words in the text;
(b) detection: a ridge student (``redteam.attacks.embeddings.train_student``) on the
    first N harvested pairs, served as ``/v1/embeddings`` in this process, verified by the
    real ``modelfence verify model --kind embeddings`` (every candidate word after 5 benign
    sentences, once for all clients; per client, the exact stratified rank test of its
    triggers against the other words of their targets; Bonferroni over every client with
    a key); true negatives: the student trained on the upstream's unmarked vectors of the
    same texts, and the upstream itself.
    ``--honest`` clients (10,000 by default: the population the p-values are corrected
    for) hold keys and never query: their per-client p-values on the same students show
    how the test behaves for keys whose marks a student cannot carry (uncorrected p below
    0.01 should be about 1% of them, below 1e-4 about one in ten thousand).

(c) key draws: one thief's triggers may be easy or hard for a student to learn, so one run
    is no guarantee for every key. ``--draws`` fresh thief keys each mark the upstream's
    vectors of the same texts exactly as the gateway does (``EmbeddingMark.apply``); a
    student per key and budget is scored on the verification's probes in this process
    (the same functions ``verify model`` runs), corrected for every client with a key.

    python bench/watermark_embeddings.py               # ~20 minutes on two cores
    python bench/watermark_embeddings.py --texts 1000,4000,8000,16000 --honest 1000
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from modelfence.forensics.model import PROBES_PER_WORD, layout_p_value, mean_directions, word_probes
from modelfence.forensics.service import BENIGN
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.attacks import embeddings
from modelfence.redteam.benchmarks import OPEN_LIMITS, Footer, fmt_p
from modelfence.redteam.prompts import SOURCES, load_prompts, package_dir
from modelfence.redteam.stack import own_stack
from modelfence.redteam.suspects import embeddings_server, verify_model
from modelfence.redteam.traffic import EMBED_MODEL, EMBEDDINGS, embeddings_body
from modelfence.testing.processes import http_json
from modelfence.watermark.config import EmbeddingsConfig
from modelfence.watermark.embeddings import candidate_words, embedding_mark, mark_layout
from modelfence.watermark.keys import WatermarkKeyring

THIEF = "thief-embeddings"


def text_pool() -> list[str]:
    """The harness's prompts, then English WritingBench sentences of 8-80 words (deduplicated)."""
    texts = dict.fromkeys(load_prompts().all())
    package, reader = SOURCES["writingbench"]
    root = package_dir(package)
    for document in reader(root) if root is not None else ():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(document.split())):
            if 8 <= len(sentence.split()) <= 80 and sentence.isascii():
                texts.setdefault(sentence)
    return list(texts)


def embed_all(url: str, key: str | None, texts: Sequence[str]) -> np.ndarray:
    vectors = []
    for start in range(0, len(texts), embeddings.BATCH):
        batch = list(texts[start : start + embeddings.BATCH])
        status, body = http_json("POST", url + EMBEDDINGS, embeddings_body(batch), token=key, timeout=300)
        assert status == 200, body
        vectors += [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    return np.asarray(vectors, dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", default="500,1000,2000,4000", help="harvested texts per student")
    parser.add_argument("--honest", type=int, default=10_000, help="honest clients (keys only)")
    parser.add_argument("--draws", type=int, default=12, help="thief keys drawn for (c); 0 skips it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    budgets = [int(n) for n in args.texts.split(",")]
    footer = Footer()
    pool = text_pool()
    order = np.random.default_rng(args.seed).permutation(len(pool))
    held_out = [pool[i] for i in order[:200]]
    texts = [pool[i] for i in order[200 : 200 + max(budgets)]]
    with tempfile.TemporaryDirectory() as tmp, own_stack(Path(tmp), overrides=OPEN_LIMITS) as gateway:
        config = gateway.args[gateway.args.index("--config") + 1]
        upstream = gateway.config["upstreams"][0]["url"]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(gateway.create_key, (f"honest-{i}" for i in range(args.honest))))
        t0 = time.perf_counter()
        marked = embed_all(gateway.url, gateway.create_key(THIEF), texts)
        harvest_s = time.perf_counter() - t0
        clean, truth = embed_all(upstream, None, texts), embed_all(upstream, None, held_out)
        ring = WatermarkKeyring(ServerSecret(gateway.config["secret"].encode()))  # as serve does
        mark = embedding_mark(ring.key(THIEF), clean.shape[1], candidate_words())
        counts = np.array([mark.counts(t).sum() for t in texts])
        cos = cosines(marked, clean)
        print(f"## Gateway vs upstream vectors ({len(texts)} harvested texts, {clean.shape[1]} "
              f"dims, harvest {harvest_s:.0f} s)\n")
        print("| thief's trigger words in the text | texts | min cosine | 1st percentile | median | max |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, mask in (("none", counts == 0), ("1", counts == 1), ("2-3", (counts >= 2) & (counts < 4)),
                            ("4 or more", counts >= 4)):
            if mask.any():
                c = cos[mask]
                print(f"| {label} | {mask.sum()} | {c.min():.6f} | {np.percentile(c, 1):.6f} | "
                      f"{np.median(c):.6f} | {c.max():.6f} |")
        print(f"\n## Student detection (verify model over the {args.honest + 1} clients with a key; "
              "named: Bonferroni p <= 1e-6)\n")
        print("| student trained on | texts | with thief's triggers | thief p | Bonferroni p | named | "
              "AUC triggers > other words (best client) | honest p < 0.01 | honest p < 1e-4 | "
              "smallest honest p | cosine to victim (held out) | verify s |")
        print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        suspects = [("gateway answers", n, marked) for n in budgets] + [
            ("upstream, unmarked (true negative)", budgets[-1], clean),
            ("none: the victim itself, unmarked (true negative)", 0, None)]
        for label, n, vectors in suspects:
            started = time.perf_counter()
            if vectors is None:
                verdict, agreement = verify_model(config, upstream, "embeddings", EMBED_MODEL), 1.0
                verify_s = time.perf_counter() - started
            else:
                student = embeddings.train_student(texts[:n], vectors[:n])
                with embeddings_server(student.predict) as suspect:  # type: ignore[attr-defined]
                    started = time.perf_counter()
                    verdict = verify_model(config, suspect.url, "embeddings", EMBED_MODEL)
                    verify_s = time.perf_counter() - started
                agreement = embeddings.student_agreement(student, held_out, truth)
            named = verdict["client"] or "none"
            honest = [p for c, p in verdict["per_client"].items() if c != THIEF]
            print(f"| {label} | {n} | {int((counts[:n] > 0).sum())} | "
                  f"{fmt_p(verdict['per_client'][THIEF])} | {fmt_p(verdict['p_value'])} | "
                  f"{named}{' (right)' if named == THIEF else ''} | {verdict['statistic']:.2f} | "
                  f"{sum(p < 0.01 for p in honest)} of {len(honest)} | {sum(p < 1e-4 for p in honest)} | "
                  f"{fmt_p(min(honest))} | {agreement:.3f} | {verify_s:.0f} |", flush=True)
        key_draws(args, texts, clean, budgets, population=args.honest + 1)
    print(f"\n{footer}")


def key_draws(args: argparse.Namespace, texts: Sequence[str], clean: np.ndarray,
              budgets: Sequence[int], *, population: int) -> None:
    if args.draws == 0:
        return
    words = candidate_words()
    probes = word_probes(words, BENIGN[:PROBES_PER_WORD], EmbeddingsConfig().max_triggers)
    ring = WatermarkKeyring(ServerSecret(os.urandom(32)))
    print(f"\n## Key draws ({args.draws} thief keys; p corrected for {population:,} clients)\n")
    print("| texts | draws named (p ≤ 1e-6) | corrected p: min | median | max | texts with the thief's triggers (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in budgets:
        p_values, marked_texts = [], []
        for draw in range(args.draws):
            key = ring.key(f"draw-{draw}")
            mark = embedding_mark(key, clean.shape[1], words)
            marked = np.asarray([mark.apply(v, t) or v for v, t in zip(clean[:n], texts[:n], strict=True)])
            marked_texts.append(sum(mark.counts(t).sum() > 0 for t in texts[:n]))
            student = embeddings.train_student(texts[:n], marked)
            directions = mean_directions(np.asarray(student.predict(probes)), len(words))  # type: ignore[attr-defined]
            p, _ = layout_p_value(directions, mark_layout(key, clean.shape[1], words))
            p_values.append(min(1.0, p * population))
        print(f"| {n} | {sum(p <= 1e-6 for p in p_values)} of {args.draws} | {fmt_p(min(p_values))} | "
              f"{fmt_p(float(np.median(p_values)))} | {fmt_p(max(p_values))} | "
              f"{np.median(marked_texts):.0f} |", flush=True)


if __name__ == "__main__":
    main()
