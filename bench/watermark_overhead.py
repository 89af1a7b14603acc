"""Overhead per response of the label, probability and embedding marks.

(a) the stage alone, as the gateway runs it: the ``OutputWatermark`` stage of the default
    config decides from the request context (``plan``), builds the answer's transform
    (``transform_for``) and rewrites the JSON body (``JsonRewriter``: parse, mark,
    serialise). Answers are real: the digits classifier's OIP v2 answers (10-class
    probabilities, or labels only with ``labels.classes`` 10) and MiniLM's 384-d vectors,
    in batches of 1 and 32. "typical" inputs are held-out digits and corpus texts (about
    0.5% of rows marked, few texts with triggers); "worst" are rows all in the client's
    watermark set and texts all carrying triggers; "one trigger" is a 32-text batch with one
    trigger text, the common case. Also the mark alone (the transform on the decoded
    payload; the stage itself rewrites only the marked vectors' bytes). p50/p99 in µs, wall clock and the thread's CPU time.
(b) end to end (``--e2e``): two gateways on one demo upstream, marks on (defaults) and off,
    requests alternated over keep-alive connections; p50/p99 latency and the ratio.

    python bench/watermark_overhead.py                 # ~8 minutes on two busy cores
    python bench/watermark_overhead.py --runs 3000 --e2e 300     # the numbers in docs/WATERMARK.md
    python bench/watermark_overhead.py --e2e 0 --cases "one trigger"   # the cases named so
(c) beside a baseline (``--baseline <other checkout>/src``): the stage of this tree and of
    the other on the same answers, each in its own process, both pinned to one core and
    taking turns of 100 answers, so that a machine whose speed drifts between runs slows
    both alike (on a 2-core VM, p50 moved by up to 1.8x within minutes); p50/p99 wall µs
    and the ratio, for the region-mark cases too; and whether the two stages wrote the same
    bytes for every answer (a change that should not alter the marks must say "the same").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from modelfence.demo.classifier import DigitsClassifier
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.rewrite import JsonRewriter
from modelfence.gateway.watermark import OutputWatermark, RegionMarks
from modelfence.identity.base import ApiKeyRecord
from modelfence.identity.secret import ServerSecret
from modelfence.models.embedder import TextEmbedder
from modelfence.operations import Operation
from modelfence.redteam.benchmarks import OPEN_LIMITS, Footer
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.stack import own_stack
from modelfence.redteam.traffic import DIGITS_INFER, digits_body, embeddings_body
from modelfence.watermark.config import RegionsConfig, WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.labels import label_mark
from modelfence.watermark.regions import InputProfile

CLIENT = "bench-client"
OFF = {"watermark": {"labels": {"enabled": False}, "embeddings": {"enabled": False}}}


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


class Stage:
    """The gateway's watermark stage with the default config (labels-only answers marked)."""

    def __init__(self, profile: InputProfile | None = None) -> None:
        """With ``profile``, the ``digits`` model has region marks with it (the defaults)."""
        labels: dict[str, Any] = {"classes": 10}
        if profile is not None:
            labels["regions"] = {"digits": {"profile_file": "(fitted in memory)"}}
        config = WatermarkConfig.model_validate({"labels": labels})
        self.keyring = WatermarkKeyring(ServerSecret(b"bench-secret-0123456789abcdef0123"))
        regions = RegionMarks(config, {"digits": profile}) if profile is not None else None
        self.stage = OutputWatermark(None, config=config, keyring=self.keyring, ledger=None,  # type: ignore[arg-type]
                                     regions=regions)
        self.key = ApiKeyRecord("k1", CLIENT, "default", "mf_", datetime.now(UTC))

    def scope(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        ctx = RequestContext(route=route, started=0.0, request_id="bench", key=self.key, body=body,
                             path_model="digits" if route == Operation.OIP_INFER.route else None)
        return {SCOPE_KEY: ctx}

    async def rewrite(self, route: str, body: dict[str, Any], raw: bytes) -> bytes:
        """One answer through the stage: plan, transform, JSON rewrite (when planned: an
        embeddings answer whose texts carry no trigger passes through unparsed)."""
        transform = await self.transform(route, body)
        return raw if transform is _untouched else JsonRewriter(transform).feed(raw, False)

    async def transform(self, route: str, body: dict[str, Any]) -> Callable[[Any], Any]:
        scope = self.scope(route, body)
        plan = self.stage.plan(scope)
        if plan is None:
            return _untouched
        transform = await self.stage.transform_for(scope, plan, 200)
        assert transform is not None
        return transform


def _untouched(payload: Any) -> Any:
    """The identity, and the sentinel for "the stage stepped aside"."""
    return payload


def oip_answer(model: DigitsClassifier, rows: np.ndarray, labels_only: bool) -> dict[str, Any]:
    proba = model.predict_proba(rows)
    if labels_only:
        tensor = {"name": "label", "datatype": "INT64", "shape": [len(rows)],
                  "data": proba.argmax(1).tolist()}
    else:
        tensor = {"name": "probabilities", "datatype": "FP32", "shape": list(proba.shape),
                  "data": proba.ravel().tolist()}
    return {"model_name": "digits", "model_version": "1", "outputs": [tensor]}


def marked_rows(stage: Stage, pool: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` noisy digits that fall in the client's watermark set (the worst case)."""
    key, found = stage.keyring.key(CLIENT), list[np.ndarray]()
    while len(found) < count:
        row = np.clip(pool[rng.integers(len(pool))] + rng.normal(0, 1.0, 64), 0, 16).round(4)
        if label_mark(key, row, rate=0.005, quantum=0.5).marked:
            found.append(row)
    return np.asarray(found, dtype=np.float32)


def time_cases(stage: Stage, cases: dict[str, list[tuple[str, dict[str, Any], bytes]]],
               runs: int) -> list[str]:
    """Rows of the stage table: per case, whole-stage and mark-only wall/CPU p50/p99 in µs."""

    async def measure() -> list[str]:
        out = []
        for name, answers in cases.items():
            for route, body, raw in answers[:20]:  # warm-up: caches, first-call costs
                await stage.rewrite(route, body, raw)
            samples: dict[str, list[float]] = {"stage": [], "stage_cpu": [], "mark": [], "mark_cpu": []}
            for (route, body, raw), _ in zip(itertools.cycle(answers), range(runs), strict=False):
                t0, c0 = time.perf_counter(), time.thread_time()
                await stage.rewrite(route, body, raw)
                samples["stage"].append((time.perf_counter() - t0) * 1e6)
                samples["stage_cpu"].append((time.thread_time() - c0) * 1e6)
                transform, payload = await stage.transform(route, body), orjson.loads(raw)
                t0, c0 = time.perf_counter(), time.thread_time()
                transform(payload)
                samples["mark"].append((time.perf_counter() - t0) * 1e6)
                samples["mark_cpu"].append((time.thread_time() - c0) * 1e6)
            cells = " | ".join("{:.0f} / {:.0f}".format(*percentiles(v)) for v in samples.values())
            out.append(f"| {name} | {len(raw)} | {cells} |")
            print(out[-1], file=sys.stderr, flush=True)
        return out

    return asyncio.run(measure())


def build_cases(stage: Stage, rng: np.random.Generator) -> dict[str, list[tuple[str, dict[str, Any], bytes]]]:
    model = DigitsClassifier.train()
    digits, _ = DigitsClassifier.dataset()
    worst = marked_rows(stage, digits, rng, 64)
    embedder = TextEmbedder.load(threads=1)
    texts = list(load_prompts().all())
    mark = stage.stage.embedding_marks.get(stage.keyring.key(CLIENT), 384)  # type: ignore[union-attr]
    plain = [t for t in texts if mark.counts(t).sum() == 0]
    triggers = sorted(mark.triggers)
    rich = [f"{t} {triggers[i % len(triggers)]} {triggers[(i + 7) % len(triggers)]}" for i, t in enumerate(plain)]
    cases: dict[str, list[tuple[str, dict[str, Any], bytes]]] = {}
    for batch in (1, 32):
        for kind, labels_only in (("probabilities", False), ("labels only", True)):
            for inputs, pool in (("typical", digits), ("worst", worst)):
                answers = []
                for _ in range(16):
                    rows = pool[rng.choice(len(pool), batch, replace=False)]
                    body = digits_body(rows, labels_only=labels_only)
                    answers.append((Operation.OIP_INFER.route, body, orjson.dumps(oip_answer(model, rows, labels_only))))
                cases[f"{kind}, batch {batch}, {inputs}"] = answers
        for inputs in ("typical", "one trigger", "worst") if batch > 1 else ("typical", "worst"):
            answers = []
            for _ in range(16):
                pool_texts = rich if inputs == "worst" else plain
                chosen = [pool_texts[int(i)] for i in rng.choice(len(pool_texts), batch, replace=False)]
                if inputs == "one trigger":  # the common case: ~5% of texts carry a trigger
                    chosen[int(rng.integers(batch))] = rich[int(rng.integers(len(rich)))]
                vectors = embedder.embed(chosen)
                payload = {"object": "list", "model": "minilm-l6-v2", "data": [
                    {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}
                answers.append((Operation.EMBEDDINGS.route, embeddings_body(chosen), orjson.dumps(payload)))
            cases[f"embeddings 384-d, batch {batch}, {inputs}"] = answers
    return cases


def region_cases(rng: np.random.Generator) -> tuple[Stage, dict[str, list[tuple[str, dict[str, Any], bytes]]]]:
    """A stage with region marks on ``digits`` (profile: the model's training split, the
    config's defaults) and its answers: real digits (almost never off-distribution) and
    noisy ones (nearly all off, so nearly every row is marked)."""
    from sklearn.model_selection import train_test_split

    model = DigitsClassifier.train()
    digits, labels = DigitsClassifier.dataset()
    train, held = train_test_split(digits, test_size=0.25, random_state=0, stratify=labels)
    defaults = RegionsConfig(profile_file="-")
    stage = Stage(InputProfile.fit(train, honest_rate=defaults.honest_rate, ridge=defaults.ridge,
                                      rank=defaults.rank))
    noisy = np.clip(held + rng.normal(0, 1.0, held.shape), 0, 16).astype(np.float32)
    cases: dict[str, list[tuple[str, dict[str, Any], bytes]]] = {}
    for batch in (1, 32):
        for inputs, pool in (("real digits", held), ("noisy digits", noisy)):
            answers = []
            for _ in range(16):
                rows = pool[rng.choice(len(pool), batch, replace=False)]
                answers.append((Operation.OIP_INFER.route, digits_body(rows),
                                orjson.dumps(oip_answer(model, rows, False))))
            cases[f"region marks, probabilities, batch {batch}, {inputs}"] = answers
    return stage, cases


def end_to_end(requests: int, rng: np.random.Generator) -> list[str]:
    digits, _ = DigitsClassifier.dataset()
    texts = list(load_prompts().all())
    workloads = {
        f"digits probabilities, batch {b}": [(DIGITS_INFER, digits_body(digits[rng.choice(len(digits), b)]))
                                            for _ in range(64)]
        for b in (1, 32)
    } | {
        f"embeddings, batch {b}": [("/v1/embeddings", embeddings_body([texts[int(i)] for i in rng.choice(len(texts), b)]))
                                   for _ in range(64)]
        for b in (1, 32)
    }
    out = []
    with tempfile.TemporaryDirectory() as tmp, own_stack(Path(tmp), overrides=OPEN_LIMITS) as on:
        upstream = on.config["upstreams"][0]["url"]
        (Path(tmp) / "off").mkdir()
        with own_stack(Path(tmp) / "off", upstream, overrides=OPEN_LIMITS | OFF) as off:
            sessions = {
                arm: httpx.Client(base_url=gw.url, timeout=120,
                                  headers={"authorization": f"Bearer {gw.create_key(CLIENT)}"})
                for arm, gw in (("on", on), ("off", off))
            }
            for name, bodies in workloads.items():
                latency: dict[str, list[float]] = {"on": [], "off": []}
                for i in range(requests + 10):
                    route, body = bodies[i % len(bodies)]
                    for arm in (("on", "off") if i % 2 else ("off", "on")):
                        t0 = time.perf_counter()
                        response = sessions[arm].post(route, json=body)
                        assert response.status_code == 200, response.text
                        if i >= 10:  # the first requests warm connections and caches
                            latency[arm].append((time.perf_counter() - t0) * 1000)
                (on50, on99), (off50, off99) = percentiles(latency["on"]), percentiles(latency["off"])
                out.append(f"| {name} | {requests} | {off50:.2f} / {off99:.2f} | {on50:.2f} / {on99:.2f} | "
                           f"{on50 / off50:.3f} / {on99 / off99:.3f} |")
                print(out[-1], file=sys.stderr, flush=True)
            for session in sessions.values():
                session.close()
    return out


TURN = 100  # answers one tree times before the other takes its turn


def worker(args: argparse.Namespace) -> None:
    """One side of ``--baseline``: build the cases, say which ``modelfence`` was imported
    and a digest of the answers, then time the stage on as many answers of a case as each
    line of stdin asks, answering the wall times (µs). The protocol keeps file descriptor
    1 to itself: anything else that writes there (native code included) goes to stderr."""
    import modelfence

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    stages: dict[str, Stage] = {}
    cases: dict[str, list[tuple[str, dict[str, Any], bytes]]] = {}
    rng = np.random.default_rng(args.seed)  # drawn from in main's order: the same answers
    marks = Stage()
    for stage, built in ((marks, build_cases(marks, rng)), region_cases(rng)):
        for name, answers in chosen(built, args.cases).items():
            stages[name], cases[name] = stage, answers
    digest = hashlib.sha256(orjson.dumps(
        [[name, [[route, body, raw.decode()] for route, body, raw in answers]] for name, answers in cases.items()]))

    async def rewritten() -> str:
        written = hashlib.sha256()
        for name, answers in cases.items():
            for route, body, raw in answers:
                written.update(await stages[name].rewrite(route, body, raw))
        return written.hexdigest()

    out.write(json.dumps({"module": modelfence.__file__, "cases": list(cases),
                          "answers": digest.hexdigest(), "rewritten": asyncio.run(rewritten())}) + "\n")
    out.flush()
    served = dict.fromkeys(cases, 0)

    async def serve() -> None:
        for line in sys.stdin:
            name, count = json.loads(line)
            answers, stage = cases[name], stages[name]
            if served[name] == 0:
                for route, body, raw in answers[:20]:  # warm-up: caches, first-call costs
                    await stage.rewrite(route, body, raw)
            times = []
            for i in range(served[name], served[name] + count):
                route, body, raw = answers[i % len(answers)]
                t0 = time.perf_counter()
                await stage.rewrite(route, body, raw)
                times.append((time.perf_counter() - t0) * 1e6)
            served[name] += count
            out.write(json.dumps(times) + "\n")
            out.flush()

    asyncio.run(serve())


def side_by_side(args: argparse.Namespace) -> list[str]:
    """Rows: per case, the stage of this tree and of ``args.baseline``, each in its own
    process, both pinned to one core, taking turns of ``TURN`` answers (the first turn
    alternating): a machine whose speed drifts slows both alike. Each worker must have
    imported the tree it was given, and both must have built the same answers."""
    trees = {"this tree": Path(__file__).resolve().parent.parent / "src", "baseline": args.baseline.resolve()}
    command = [sys.executable, __file__, "--worker", "--seed", str(args.seed), "--cases", args.cases]
    workers: dict[str, subprocess.Popen[str]] = {}
    try:
        for arm, src in trees.items():
            workers[arm] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True, env={**os.environ, "PYTHONPATH": str(src)})
        core = {max(os.sched_getaffinity(0))}
        for process in workers.values():
            os.sched_setaffinity(process.pid, core)

        def ask(arm: str, request: Any) -> Any:
            stdin, stdout = workers[arm].stdin, workers[arm].stdout
            assert stdin is not None and stdout is not None
            if request is not None:
                stdin.write(json.dumps(request) + "\n")
                stdin.flush()
            line = stdout.readline()
            if not line:
                raise SystemExit(f"the {arm} worker ({trees[arm]}) stopped; its stderr says why")
            return json.loads(line)

        ready = {arm: ask(arm, None) for arm in workers}
        for arm, src in trees.items():
            # A path with no modelfence package falls back to the installed one.
            if Path(ready[arm]["module"]).resolve() != src / "modelfence" / "__init__.py":
                raise SystemExit(f"the {arm} worker imported {ready[arm]['module']}, not the "
                                 f"modelfence of {src}: is that a checkout's src?")
        if ready["this tree"]["answers"] != ready["baseline"]["answers"]:
            raise SystemExit("the two trees built different answers: the timings would not compare")
        same = ready["this tree"]["rewritten"] == ready["baseline"]["rewritten"]
        verdict = "the two stages wrote " + ("the same bytes for every answer" if same else
                                             "different bytes (a change of what is marked or how)")
        print(verdict, file=sys.stderr, flush=True)
        rows = []
        for name in ready["this tree"]["cases"]:
            samples: dict[str, list[float]] = {arm: [] for arm in workers}
            for turn, done in enumerate(range(0, args.runs, TURN)):
                for arm in list(workers)[:: 1 if turn % 2 else -1]:
                    samples[arm] += ask(arm, [name, min(TURN, args.runs - done)])
            (o50, o99), (b50, b99) = (percentiles(v) for v in samples.values())
            rows.append(f"| {name} | {o50:.0f} / {o99:.0f} | {b50:.0f} / {b99:.0f} | "
                        f"{o50 / b50:.2f} / {o99 / b99:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
        return [*rows, "", verdict]
    finally:
        for process in workers.values():
            process.kill()
            process.wait()


def chosen(cases: dict[str, Any], text: str) -> dict[str, Any]:
    """The cases ``--cases`` names: timing one alone is steadier on a noisy machine."""
    return {name: answers for name, answers in cases.items() if text in name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000, help="answers timed per case")
    parser.add_argument("--e2e", type=int, default=100, help="request pairs per workload; 0: skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="",
                        help="time only the in-process cases whose name holds this text")
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="another checkout's src: the stage of both, side by side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.baseline is not None and args.baseline.resolve() == Path(__file__).resolve().parent.parent / "src":
        parser.error("--baseline names this tree's own src")
    import torch

    torch.set_num_threads(1)
    if args.worker:
        worker(args)
        return
    footer = Footer()
    if args.baseline is not None:
        rows = side_by_side(args)
        print(f"## Watermark stage per answer, this tree beside {args.baseline} ({args.runs} "
              f"answers per case, turns of {TURN}, one core)\n")
        print("| answer | this tree wall p50 / p99 µs | baseline wall p50 / p99 µs | ratio p50 / p99 |")
        print("|---|---:|---:|---:|")
        print("\n".join(rows) + "\n")
        print(f"{footer}; one torch thread")
        return
    rng = np.random.default_rng(args.seed)
    stage = Stage()
    rows = time_cases(stage, chosen(build_cases(stage, rng), args.cases), args.runs)
    region_stage, regions = region_cases(rng)
    rows += time_cases(region_stage, chosen(regions, args.cases), args.runs)
    print(f"## Watermark stage per answer, in process ({args.runs} answers per case)\n")
    print("| answer | bytes | stage wall p50 / p99 µs | stage CPU p50 / p99 µs | "
          "mark alone wall p50 / p99 µs | mark alone CPU p50 / p99 µs |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows) + "\n")
    if args.e2e:
        e2e = end_to_end(args.e2e, rng)
        print(f"## End to end through the gateway, marks off vs on ({args.e2e} alternated pairs)\n")
        print("| request | pairs | off p50 / p99 ms | on p50 / p99 ms | ratio on/off p50 / p99 |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(e2e) + "\n")
    print(f"{footer}; one torch thread")


if __name__ == "__main__":
    main()
