"""Radioactivity: does a language model trained on one client's marked answers carry the mark?

A thief harvests ``--answers`` answers from the demo LLM, all marked for one client (its
key among ``--clients``), and trains a model of its own on them:

- ``--student gru`` (default): a small language model trained from scratch
  (``redteam/students.py``, a GRU over the harvest's tokens), and, as the control, the same
  model trained on ``--control-answers`` unmarked answers of the same LLM;
- ``--student smollm2``: its own copy of SmolLM2-135M-Instruct fine-tuned on the harvest
  (the top ``--train-layers`` transformer layers, loss on the answer tokens).

The students and the untouched SmolLM2 answer probe prompts, scored as ``modelfence verify
model --kind chat`` scores them (distinct (previous, token) pairs, exact binomial test):

(a) p-value of the thief's key vs suspect tokens, supervised (the thief's own prompts) and
    unsupervised (new prompts; Bonferroni over all clients);
(b) the p-values of ``--null-keys`` random client keys for models that never saw a mark:
    uniform if the test is calibrated (one-sample KS test against U(0, 1));
(c) the HTTP path: the suspect served as an OpenAI chat API and questioned by
    ``verify_chat``, as the command and the admin API do.

Harvests and fine-tuned models are cached under ``--workdir``; a rerun skips them.

    python bench/watermark_radioactivity.py                 # about 35 minutes on two busy cores
    python bench/watermark_radioactivity.py --student smollm2 --answers 64 --probes 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kstest

from modelfence.demo.llm import SmolLM, default_cache_dir
from modelfence.forensics.model import Suspect
from modelfence.forensics.radioactivity import DEFAULT_PROBES, green_p_values, verify_chat
from modelfence.forensics.text import demo_tokenizer
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.marked_text import Job, sample_answers
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.students import Example, StudentLM
from modelfence.redteam.suspects import chat_server
from modelfence.watermark.config import TextConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_detect import distinct_pairs
from modelfence.watermark.text_logits import TEXT_PURPOSE, GreenListProcessor

DEFAULTS = TextConfig.model_validate({})
CONTROL_OFFSET = 1000  # the control's prompts start here in the shuffled corpus
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.0f}s] {message}", file=sys.stderr, flush=True)


def harvest(llm: SmolLM, prompts: list[str], processor: GreenListProcessor | None, path: Path,
            args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every prompt answered, with ``processor``'s mark or none (cached as JSONL)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if len(rows) >= len(prompts):
            return rows[: len(prompts)]
    log(f"sampling {len(prompts)} answers for {path.name} ...")
    jobs = [Job(llm.encode_chat([{"role": "user", "content": p}]), processor, None) for p in prompts]
    answers = sample_answers(llm, jobs, batch=args.batch, max_tokens=args.answer_tokens,
                             min_tokens=args.answer_tokens * 3 // 5, seed=args.seed)
    rows = [{"prompt": p, "answer": llm.decode(a.tokens), "tokens": len(a.tokens)}
            for p, a in zip(prompts, answers, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def fine_tune(llm: SmolLM, rows: list[dict[str, Any]], folder: Path,
              args: argparse.Namespace) -> None:
    """Train the top layers on (prompt, answer) pairs, loss on the answer; save the copy."""
    model, eos = llm.model, min(llm.eos_token_ids)
    examples = []
    for row in rows:
        prompt = llm.encode_chat([{"role": "user", "content": row["prompt"]}])
        answer = llm.encode(row["answer"]) + [eos]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = model.model.layers
    trained = [p for layer in layers[len(layers) - args.train_layers :] for p in layer.parameters()]
    trained += list(model.model.norm.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    for epoch in range(args.epochs):
        order = rng.permutation(len(examples))
        for step in range(0, len(order), args.train_batch):
            batch = [examples[i] for i in order[step : step + args.train_batch]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [eos] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            losses.append(loss.item())
        log(f"epoch {epoch + 1}/{args.epochs}: mean loss {np.mean(losses[-len(order) // args.train_batch:]):.3f}")
    model.eval()
    llm.save(folder)
    info = {"first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])),
            "minutes": (time.monotonic() - started) / 60}
    (folder / "training.json").write_text(json.dumps(info))


Answerer = Callable[[list[str], int, int], list[list[int]]]  # (prompts, max_tokens, seed) -> ids


def llm_answerer(llm: SmolLM, args: argparse.Namespace) -> Answerer:
    """Unmarked answers (a suspect is not ours to mark), sampled in batches."""
    def answer(prompts: list[str], max_tokens: int, seed: int) -> list[list[int]]:
        jobs = [Job(llm.encode_chat([{"role": "user", "content": p}]), None, None) for p in prompts]
        return [a.tokens for a in sample_answers(llm, jobs, batch=args.batch, max_tokens=max_tokens, seed=seed)]

    return answer


def student_answerer(llm: SmolLM, student: StudentLM) -> Answerer:
    end = min(llm.eos_token_ids)

    def answer(prompts: list[str], max_tokens: int, seed: int) -> list[list[int]]:
        return [student.answer(llm.encode_chat([{"role": "user", "content": p}]), end=end,
                               max_tokens=max_tokens, seed=seed + i) for i, p in enumerate(prompts)]

    return answer


def answers_of(llm: SmolLM, answer: Answerer, prompts: list[str], args: argparse.Namespace) -> list[list[int]]:
    """Answers re-tokenised from their text, as a verifier sees them."""
    tokenize = demo_tokenizer()
    return [tokenize(llm.decode(ids)) for ids in answer(prompts, args.probe_tokens, args.seed + 7)]


def train_student(llm: SmolLM, rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[StudentLM, list[float]]:
    examples = [Example(llm.encode_chat([{"role": "user", "content": r["prompt"]}]), llm.encode(r["answer"]))
                for r in rows]
    return StudentLM.train(examples, end=min(llm.eos_token_ids), epochs=args.epochs, seed=args.seed)


def curve(answers: list[list[int]], seed: int, keys: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """p-value of one key after the first k answers, for growing k (Bonferroni over ``keys``)."""
    rows = []
    for k in range(1, len(answers) + 1):
        pairs = distinct_pairs(answers[:k])
        greens, p = green_p_values(pairs, [seed], args.gamma)
        rows.append({"answers": k, "tokens": len(pairs[0]), "green": int(greens[0]),
                     "p": float(p[0]), "p_bonferroni": min(1.0, float(p[0]) * keys)})
    return rows


def over_http(llm: SmolLM, answer: Answerer, prompts: list[str], clients: list[str],
              ring: WatermarkKeyring, args: argparse.Namespace) -> dict[str, Any]:
    """The suspect served as an OpenAI chat API and questioned by ``verify_chat``."""
    requests = itertools.count(args.seed + 1000)  # fresh randomness per request, as a server's

    def reply(prompt: str, max_tokens: int) -> str:
        return llm.decode(answer([prompt], max_tokens, next(requests))[0])

    with chat_server(reply) as server:
        suspect = Suspect(server.url, timeout=600)
        try:
            started = time.monotonic()
            verdict = verify_chat(suspect, "suspect", clients, ring, tokenize=demo_tokenizer(),
                                  prompts=prompts, max_tokens=args.probe_tokens, gamma=args.gamma)
            return {**verdict.as_dict(), "seconds": time.monotonic() - started}
        finally:
            suspect.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    corpus = list(load_prompts().all())
    order = rng.permutation(len(corpus))
    harvest_prompts = [corpus[i] for i in order[: args.answers]]
    control_prompts = [corpus[i] for i in order[CONTROL_OFFSET : CONTROL_OFFSET + args.control_answers]]
    ring = WatermarkKeyring(ServerSecret(b"bench-watermark-radioactivity-" + str(args.seed).encode()))
    clients = [f"client-{i:05d}" for i in range(args.clients)]
    seed = ring.key(clients[42]).seed(TEXT_PURPOSE)  # the thief
    tag = f"s{args.seed}-g{args.gamma}-d{args.delta}-t{args.answer_tokens}"

    llm = SmolLM.load(threads=args.threads)
    rows = harvest(llm, harvest_prompts, GreenListProcessor(seed, gamma=args.gamma, delta=args.delta),
                   workdir / f"harvest-{tag}.jsonl", args)
    _, p_harvest = green_p_values(distinct_pairs(demo_tokenizer()(r["answer"]) for r in rows), [seed], args.gamma)
    log(f"harvest: {sum(r['tokens'] for r in rows)} tokens, p of the thief's key {p_harvest[0]:.2g}")

    models: dict[str, Answerer] = {"untouched SmolLM2": llm_answerer(llm, args)}
    training: dict[str, str] = {}
    if args.student == "gru":
        control = harvest(llm, control_prompts, None, workdir / f"control-{tag}.jsonl", args)
        for name, data in (("student (marked harvest)", rows), ("student (unmarked answers)", control)):
            log(f"training {name} from scratch, {args.epochs} epochs ...")
            started = time.monotonic()
            student, losses = train_student(llm, data, args)
            training[name] = (f"{len(data)} answers, {sum(r['tokens'] for r in data)} tokens; loss "
                              f"{losses[0]:.2f} → {losses[-1]:.2f} in {(time.monotonic() - started) / 60:.1f} min")
            models[name] = student_answerer(llm, student)
    else:
        folder = workdir / f"suspect-{tag}-l{args.train_layers}-e{args.epochs}-lr{args.lr}-n{args.answers}"
        if not (folder / "config.json").is_file():
            log(f"fine-tuning the top {args.train_layers} layers, {args.epochs} epochs ...")
            fine_tune(SmolLM.load(threads=args.threads), rows, folder, args)
        info = json.loads((folder / "training.json").read_text())
        training["SmolLM2 fine-tuned (marked harvest)"] = (
            f"{len(rows)} answers; top {args.train_layers} of 30 layers, lr {args.lr}; loss "
            f"{info['first_loss']:.2f} → {info['last_loss']:.2f} in {info['minutes']:.1f} min")
        models["SmolLM2 fine-tuned (marked harvest)"] = llm_answerer(
            SmolLM.from_dir(folder, threads=args.threads), args)

    probes = {"supervised": harvest_prompts[: args.probes], "unsupervised": list(DEFAULT_PROBES[: args.probes])}
    answers = {}
    for name, answer in models.items():
        for mode, prompts in probes.items():
            log(f"{name} answers the {mode} probes ...")
            answers[name, mode] = answers_of(llm, answer, prompts, args)
    curves = {key: curve(a, seed, 1 if key[1] == "supervised" else args.clients, args)
              for key, a in answers.items()}
    null_seeds = [ring.key(f"null-{i}").seed(TEXT_PURPOSE) for i in range(args.null_keys)]
    null = {key: green_p_values(distinct_pairs(a), null_seeds, args.gamma)[1]
            for key, a in answers.items() if "(marked" not in key[0]}
    suspect = next(name for name in models if "(marked" in name)
    http = over_http(llm, models[suspect], probes["unsupervised"][: args.http_probes], clients, ring, args)
    plot(curves, workdir / f"radioactivity-{args.student}.png", args)
    report(args, rows, float(p_harvest[0]), training, curves, null, suspect, http, argv)


def plot(curves: dict[tuple[str, str], list[dict[str, Any]]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (model, mode), rows in curves.items():
        key = "p" if mode == "supervised" else "p_bonferroni"
        ax.plot([r["tokens"] for r in rows], [max(r[key], 1e-300) for r in rows],
                "-" if mode == "supervised" else "--",
                label=f"{model}, {mode}" + ("" if mode == "supervised" else f" (×{args.clients})"))
    ax.axhline(1e-6, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("distinct scored (previous, token) pairs of the model's answers")
    ax.set_ylabel("p-value of the thief's key")
    ax.set_title("Radioactivity: models trained on one client's marked answers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot written to {path}")


def report(args: argparse.Namespace, rows: list[dict[str, Any]], p_harvest: float,
           training: dict[str, str], curves: dict[tuple[str, str], list[dict[str, Any]]],
           null: dict[tuple[str, str], np.ndarray], suspect: str, http: dict[str, Any],
           argv: list[str] | None) -> None:
    command = " ".join(["python bench/watermark_radioactivity.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"\n`{command}` — {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"torch threads {args.threads}, gamma {args.gamma}, delta {args.delta}, "
          f"{args.clients} clients, {time.strftime('%Y-%m-%d')}, {time.monotonic() - T0:.0f} s\n")
    print(f"Harvest: {len(rows)} marked answers, {sum(r['tokens'] for r in rows)} tokens "
          f"(thief's key on the harvest itself: p = {p_harvest:.2g}).\n")
    for name, text in training.items():
        print(f"- {name}: {text}")
    largest = max(rs[-1]["tokens"] for rs in curves.values())
    cuts = [c for c in (100, 250, 500, 1000, 2000, 4000, 8000) if c <= largest]
    print("\n| model | prompts | test | " + " | ".join(f"p @ {c} pairs" for c in cuts)
          + " | all pairs | p (all) |")
    print("|---|---|---|" + "---:|" * (len(cuts) + 2))
    for (model, mode), rs in curves.items():
        key = "p" if mode == "supervised" else "p_bonferroni"
        test = "thief's key" if mode == "supervised" else f"best of {args.clients} (Bonferroni)"
        asked = "the thief's own" if mode == "supervised" else "new"
        at = [next((r[key] for r in rs if r["tokens"] >= c), float("nan")) for c in cuts]
        print(f"| {model} | {asked} | {test} | " + " | ".join(f"{v:.2g}" for v in at)
              + f" | {rs[-1]['tokens']} | {rs[-1][key]:.2g} |")
    print(f"\n| never saw a mark: {args.null_keys} random keys | prompts | pairs | share p ≤ 0.05 "
          "| share p ≤ 0.01 | smallest p | KS vs U(0,1) p |\n|---|---|---:|---:|---:|---:|---:|")
    for (model, mode), p in null.items():
        print(f"| {model} | {mode} | {curves[model, mode][-1]['tokens']} | {np.mean(p <= 0.05):.3f} "
              f"| {np.mean(p <= 0.01):.3f} | {p.min():.2g} | {kstest(p, 'uniform').pvalue:.2g} |")
    print(f"\nOver HTTP ({suspect} served as an OpenAI chat API, `verify_chat` unsupervised over "
          f"{args.clients} clients, {args.http_probes} prompts × {args.probe_tokens} tokens, "
          f"{http['seconds']:.0f} s): ours={http['ours']}, client={http['client']}, "
          f"p={http['p_value']:.2g}, z={http['statistic']:.1f}, pairs={http['samples']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=256, help="marked answers the thief harvests")
    p.add_argument("--answer-tokens", type=int, default=200, help="tokens per harvested answer")
    p.add_argument("--control-answers", type=int, default=128,
                   help="unmarked answers the control student learns from (gru)")
    p.add_argument("--clients", type=int, default=10_000, help="clients tested unsupervised")
    p.add_argument("--student", choices=("gru", "smollm2"), default="gru")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-layers", type=int, default=8, help="smollm2: top layers tuned (of 30)")
    p.add_argument("--lr", type=float, default=1e-4, help="smollm2: learning rate")
    p.add_argument("--train-batch", type=int, default=8, help="smollm2: batch size")
    p.add_argument("--probes", type=int, default=32, help="prompts per probe set")
    p.add_argument("--probe-tokens", type=int, default=160, help="tokens per suspect answer")
    p.add_argument("--http-probes", type=int, default=16, help="prompts of the HTTP check")
    p.add_argument("--null-keys", type=int, default=2000, help="random keys for the null check")
    p.add_argument("--gamma", type=float, default=DEFAULTS.gamma)
    p.add_argument("--delta", type=float, default=DEFAULTS.delta)
    p.add_argument("--batch", type=int, default=32, help="answers sampled together")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(default_cache_dir() / "bench-radioactivity"))
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
