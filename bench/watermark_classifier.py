"""Classifier clones through a real gateway: DAWN-style label marks, attribution and cost.

The stack is ``own_stack``: the demo upstream and ``modelfence serve`` with the default
watermark config (rate 0.005, quantum 0.5; ``labels.classes`` 10 so that labels-only
answers are marked too), SQLite store, limits raised so that nothing is refused.

(a) benign cost: ``--honest`` clients send the 1,258 held-out digits through the gateway;
    accuracy of their (marked) answers vs the unmarked upstream's on the same images.
(b) attribution: each thief (``--methods``: ART KnockoffNets random sampling on
    probabilities, CopycatCNN on labels; the harness's small CNN) buys the harness's
    noise-padded digits pool through the gateway, cumulatively up to each of ``--budgets``.
    At each budget a clone is trained for the first of ``--epochs``, then trained on for
    the next ones on the same purchases (a thief training longer), and after each it is
    served over OIP v2 in this process and verified by the real ``modelfence verify model
    --kind classifier`` (binomial test on the ledger's marked inputs, Bonferroni over every
    client in the ledger: thieves and honest clients). True negatives: the upstream's own
    unmarked model, and the same CNN trained on the true labels of the same pool.

    python bench/watermark_classifier.py               # ~11 minutes on two busy cores
    python bench/watermark_classifier.py --budgets 1000,4000,8000 --epochs 25,100,200
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax

from modelfence.redteam.attacks import classifier
from modelfence.redteam.benchmarks import OPEN_LIMITS, Footer, fmt_p
from modelfence.redteam.stack import own_stack
from modelfence.redteam.suspects import classifier_server, verify_model
from modelfence.redteam.traffic import DIGITS_INFER, Exchange, PlannedRequest, digits_body
from modelfence.testing.processes import GatewayProcess, http_json

RATE = 0.005  # watermark.labels.rate, the default
# Limits that refuse nothing; labels-only answers are marked only when the class count is
# configured (``watermark.labels.classes``; by default they are left unmarked).
OVERRIDES = {**OPEN_LIMITS, "watermark": {"labels": {"classes": classifier.N_CLASSES}}}
LABELS_ONLY = {"knockoff-random": False, "copycat": True}
Ledger = dict[str, list[tuple[list[float], int]]]  # client -> (features, watermark label)


class Clients:
    """Keys by client name, and a blocking sender of planned requests through the gateway."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.keys: dict[str, str] = {}

    def add(self, name: str) -> str:
        self.keys[name] = self.gateway.create_key(name)
        return name

    def send(self, plan: PlannedRequest) -> Exchange:
        started = time.perf_counter()
        status, body = http_json("POST", self.gateway.url + plan.route, dict(plan.body),
                                 token=self.keys[plan.client], timeout=300)
        return Exchange(plan, plan.client, status, (time.perf_counter() - started) * 1000, body)


def ledger(db: Path) -> Ledger:
    out: Ledger = {}
    with sqlite3.connect(db) as conn:
        query = "SELECT client, features, label FROM watermark_ledger ORDER BY id"
        for client, features, label in conn.execute(query):
            out.setdefault(client, []).append((json.loads(features), label))
    return out


def settled_ledger(db: Path) -> Ledger:
    """The ledger once the gateway's background writer has caught up (unchanged for 1 s)."""
    rows = ledger(db)
    while True:
        time.sleep(1.0)
        again = ledger(db)
        if again == rows:
            return rows
        rows = again


def oip_labels(url: str, key: str | None, pixels: np.ndarray) -> np.ndarray:
    labels = []
    for start in range(0, len(pixels), 256):
        status, body = http_json("POST", url + DIGITS_INFER, digits_body(pixels[start : start + 256]),
                                 token=key, timeout=300)
        assert status == 200, body
        labels.append(np.asarray(body["outputs"][0]["data"]).reshape(-1, classifier.N_CLASSES).argmax(1))
    return np.concatenate(labels)


def clone_predict(thief: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: softmax(thief.predict(x.reshape(-1, 1, 8, 8).astype(np.float32)), axis=1)


def ideal_marks(alpha: float, clients: int) -> int:
    """Marked inputs a clone must reproduce, all of them, for Bonferroni p <= alpha."""
    return int(np.ceil(np.log(alpha / clients) / np.log(1 / (classifier.N_CLASSES - 1))))


def benign_cost(args: argparse.Namespace, clients: Clients, truth: np.ndarray,
                data: classifier.DigitsData) -> None:
    print(f"## Benign accuracy cost of label marks ({len(data.test)} held-out digits, rate {RATE})\n")
    print("| client | unmarked accuracy | marked accuracy | cost | answers changed |")
    print("|---|---:|---:|---:|---:|")
    clean = float((truth == data.test_labels).mean())
    costs, changed = [], 0
    for i in range(args.honest):
        name = clients.add(f"honest-{i}")
        marked = oip_labels(clients.gateway.url, clients.keys[name], data.test.reshape(-1, 64))
        acc = float((marked == data.test_labels).mean())
        costs.append(clean - acc)
        changed += int((marked != truth).sum())
        print(f"| {name} | {clean:.2%} | {acc:.2%} | {clean - acc:.2%} | {int((marked != truth).sum())} |")
    total = args.honest * len(data.test)
    print(f"| **all {args.honest}** | {clean:.2%} | {clean - np.mean(costs):.2%} | "
          f"**{np.mean(costs):.2%}** (max {max(costs):.2%}) | {changed} of {total} "
          f"({changed / total:.2%}) |\n", flush=True)


def attribution(args: argparse.Namespace, clients: Clients, truth: np.ndarray,
                data: classifier.DigitsData, config: str) -> list[str]:
    db = Path(clients.gateway.config["store"].removeprefix("sqlite:///"))
    rows: list[str] = []
    for method in args.methods:
        name = clients.add(f"thief-{method}")
        oracle = classifier.DigitsOracle(clients.send, name, labels_only=LABELS_ONLY[method], batch=64)
        for budget in args.budgets:
            thief = classifier.run_art(method, oracle, data, budget, args.seed, args.epochs[0])
            marks = settled_ledger(db).get(name, [])
            for done, epochs in zip([0, *args.epochs], args.epochs, strict=False):
                if done:
                    images, answers = oracle.purchased()
                    thief.fit(images, answers, nb_epochs=epochs - done, batch_size=32, verbose=False)
                predict = clone_predict(thief)
                predicted = predict(np.asarray([f for f, _ in marks])).argmax(1) if marks else []
                reproduced = sum(int(p == label) for p, (_, label) in zip(predicted, marks, strict=True))
                with classifier_server(predict) as suspect:
                    verdict = verify_model(config, suspect.url, "classifier", "digits")
                quality = classifier.clone_quality(thief, data, truth)
                named = verdict["client"] or "none"
                rows.append(
                    f"| {method} ({'labels' if LABELS_ONLY[method] else 'probs'}) | {epochs} | "
                    f"{oracle.rows_queried} | {len(marks)} | {reproduced} | "
                    f"{fmt_p(verdict['per_client'].get(name, 1.0))} | {fmt_p(verdict['p_value'])} | "
                    f"{named}{' (right)' if named == name else ''} | {quality['accuracy']:.1%} | "
                    f"{quality['fidelity']:.1%} |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def negatives(args: argparse.Namespace, clients: Clients, truth: np.ndarray,
              data: classifier.DigitsData, config: str) -> None:
    upstream = clients.gateway.config["upstreams"][1]["url"]
    independent = classifier.thief_network(args.seed + 1)
    x, y = data.padded_pool(max(args.budgets), args.seed)
    independent.fit(x, np.eye(classifier.N_CLASSES)[y], nb_epochs=args.epochs[-1], batch_size=32,
                    verbose=False)
    accuracy = {upstream: float((truth == data.test_labels).mean())}
    print("| true negative | Bonferroni p | smallest per-client p | named | accuracy |")
    print("|---|---:|---:|---|---:|")
    with classifier_server(clone_predict(independent)) as server:
        accuracy[server.url] = classifier.clone_quality(independent, data, truth)["accuracy"]
        for label, url in (("the victim itself (upstream, unmarked)", upstream),
                           (f"CNN trained {args.epochs[-1]} epochs on true labels, same pool", server.url)):
            verdict = verify_model(config, url, "classifier", "digits")
            print(f"| {label} | {fmt_p(verdict['p_value'])} | "
                  f"{fmt_p(min(verdict['per_client'].values()))} | {verdict['client'] or 'none'} | "
                  f"{accuracy[url]:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1000,2000,4000", help="images bought, cumulative")
    parser.add_argument("--methods", default="knockoff-random,copycat")
    parser.add_argument("--epochs", default="25,100", help="clone training, increasing")
    parser.add_argument("--honest", type=int, default=4, help="honest clients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.epochs = [int(e) for e in args.epochs.split(",")]
    args.methods = args.methods.split(",")
    torch.set_num_threads(1)
    footer = Footer()
    with tempfile.TemporaryDirectory() as tmp, own_stack(Path(tmp), overrides=OVERRIDES) as gateway:
        config = gateway.args[gateway.args.index("--config") + 1]
        clients = Clients(gateway)
        data = classifier.DigitsData.split(args.seed)
        truth = oip_labels(gateway.config["upstreams"][1]["url"], None, data.test.reshape(-1, 64))
        benign_cost(args, clients, truth, data)
        rows = attribution(args, clients, truth, data, config)
        counts = {client: len(marks) for client, marks in settled_ledger(
            Path(gateway.config["store"].removeprefix("sqlite:///"))).items()}
        print(f"## Clone attribution (ledger: {len(counts)} clients, {sum(counts.values())} "
              "marked inputs; named: Bonferroni p <= 1e-6, verify's alpha)\n")
        print("| attack | epochs | images bought | thief's marked inputs | reproduced | thief p | "
              "Bonferroni p | named | clone accuracy | fidelity |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        print("\n".join(rows) + "\n")
        negatives(args, clients, truth, data, config)
    k = len(counts)
    print(f"\nA clone that reproduced every mark would need {ideal_marks(1e-9, k)} marked inputs "
          f"for Bonferroni p <= 1e-9 over {k} clients (~{ideal_marks(1e-9, k) / RATE:.0f} images "
          f"at rate {RATE}) and {ideal_marks(2.0**-64, k)} for 2^-64 "
          f"(~{ideal_marks(2.0**-64, k) / RATE:.0f} images).\n")
    print(f"{footer}; one torch thread")


if __name__ == "__main__":
    main()
