"""Region marks against early-stopped classifier clones, among 10,000 clients, through a real gateway.

The stack is ``own_stack`` (demo upstream, ``modelfence serve``) with region marks on the
``digits`` model: its profile is the victim's own training split (1,347 digits and their
labels, written to ``digits-profile.npz``), ``watermark.labels.classes: 10``. The
gateway's key store holds ``--clients`` keyed clients (10,000 by default), so the real
``modelfence verify model --kind classifier`` corrects every p-value over all of them.

(a) honest cost: ``--honest`` clients send the victim's 450 held-out digits (never in the
    profile) and the harness's 1,258 held-out digits; accuracy of their answers against
    the unmarked upstream's on the same images. And the share of all 1,797 real digits a
    profile marks when they are not in it (5-fold: each fifth against a profile of the rest).
(b) thieves buy the harness's noise-padded digits pool (539 digits plus noisy copies)
    through the gateway, labels only (CopycatCNN's purchase) or probabilities
    (KnockoffNets random sampling), at each of ``--budgets``, and train the harness's CNN
    the careful way: early stopping on a 10% validation split of their purchases, at most
    30 epochs. Each clone is served over OIP v2 and verified by the real CLI.
(c) adaptive thieves: one that knows the scheme and buys only in-distribution images (the
    539 clean digits), and one that buys every image through two keys and trains on the
    answers the two keys agree on.
(d) true negatives: the victim itself, and the same CNN trained on the pool's true labels.
(e) calibration under the null: for each suspect, how many of the other clients' p-values
    fall below 1e-2, 1e-3 and 1e-4 (uncorrected), against what uniform p-values give.

    python bench/watermark_regions.py            # ~7 minutes on two cores
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from watermark_classifier import Clients, clone_predict, oip_labels

from modelfence.demo.classifier import DigitsClassifier
from modelfence.redteam.attacks import classifier
from modelfence.redteam.benchmarks import OPEN_LIMITS, Footer, fmt_p
from modelfence.redteam.stack import own_stack
from modelfence.redteam.suspects import classifier_server, verify_model
from modelfence.testing.processes import GatewayProcess, http_json
from modelfence.watermark.config import RegionsConfig
from modelfence.watermark.regions import InputProfile

MODEL = "digits"


def write_profile(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The victim's training split as the profile; returns its held-out split."""
    from sklearn.model_selection import train_test_split

    x, y = DigitsClassifier.dataset()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y)  # DigitsClassifier.train's split
    np.savez(path, inputs=x_train, labels=y_train)
    return x_test, y_test


def cross_validated_off_share(folds: int = 5) -> tuple[int, int]:
    """Real digits never in the profile that a profile of the rest marks: each fifth of all
    1,797 digits against a profile fitted (config defaults) on the other four fifths."""
    x, _ = DigitsClassifier.dataset()
    defaults = RegionsConfig(profile_file="-")
    order = np.random.default_rng(0).permutation(len(x))
    off = 0
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        profile = InputProfile.fit(x[rest], honest_rate=defaults.honest_rate, ridge=defaults.ridge,
                                    rank=defaults.rank)
        off += int(profile.off(x[fold].astype(np.float64)).sum())
    return off, len(x)


def add_population(gateway: GatewayProcess, count: int) -> None:
    """``count`` more keyed clients, so that verification corrects over all of them."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: gateway.create_key(f"client-{i:05d}"), range(max(0, count))))


def region_rows(gateway: GatewayProcess) -> int:
    """Rows the gateway has answered by a region mark so far (its own metric)."""
    metrics = str(http_json("GET", gateway.url + "/metrics")[1])
    match = re.search(r'modelfence_watermark_region_rows_total\{model="digits"\} ([0-9.e+]+)', metrics)
    return int(float(match.group(1))) if match else 0


def buy(clients: Clients, name: str, images: np.ndarray, labels_only: bool) -> np.ndarray:
    """The answers ``name`` buys for ``images``; prints the share answered by its region mark."""
    before = region_rows(clients.gateway)
    oracle = classifier.DigitsOracle(clients.send, name, labels_only=labels_only, batch=64)
    answers = oracle(images)
    marked = region_rows(clients.gateway) - before
    print(f"{name}: {marked} of {len(images)} purchases region-marked ({marked / len(images):.1%})",
          flush=True)
    return answers


def train_clone(images: np.ndarray, answers: np.ndarray, seed: int) -> tuple[Any, int]:
    thief = classifier.thief_network(seed)
    return thief, classifier.fit_early_stopped(thief, images, answers, seed=seed)


def null_counts(per_client: dict[str, float], exclude: set[str]) -> str:
    p = np.array([v for c, v in per_client.items() if c not in exclude])
    return " / ".join(f"{int((p <= t).sum())} ({t * len(p):g})" for t in (1e-2, 1e-3, 1e-4))


def verdict_row(label: str, config: str, predict: Any, quality: dict[str, float] | None,
                thieves: set[str], epochs: int | str) -> str:
    with classifier_server(predict) as suspect:
        v = verify_model(config, suspect.url, "classifier", MODEL)
    named = v["client"] or "none"
    right = " (right)" if named in thieves else (" (WRONG)" if v["client"] else "")
    own = min((v["per_client"].get(t, 1.0) for t in thieves), default=1.0)
    acc = f"{quality['accuracy']:.1%}" if quality else "-"
    return (f"| {label} | {epochs} | {acc} | {fmt_p(own) if thieves else '-'} | "
            f"{fmt_p(v['p_value'])} | {named}{right} | {v['statistic']:.2f} | "
            f"{null_counts(v['per_client'], thieves)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2000,4000", help="images bought per thief")
    parser.add_argument("--clients", type=int, default=10_000, help="keyed clients in all")
    parser.add_argument("--honest", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.set_num_threads(1)
    footer = Footer()
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "digits-profile.npz"
        held_x, held_y = write_profile(profile)
        overrides = {**OPEN_LIMITS, "watermark": {"labels": {
            "classes": classifier.N_CLASSES, "regions": {MODEL: {"profile_file": str(profile)}}}}}
        with own_stack(Path(tmp), overrides=overrides) as gateway:
            config = gateway.args[gateway.args.index("--config") + 1]
            clients = Clients(gateway)
            data = classifier.DigitsData.split(args.seed)
            upstream = gateway.config["upstreams"][1]["url"]

            print(f"## Honest cost of region marks ({args.honest} clients)\n")
            print("| images | unmarked accuracy | marked accuracy | cost | answers changed |")
            print("|---|---:|---:|---:|---:|")
            for label, x, y in (("victim's held-out 450 (not in the profile)", held_x, held_y),
                                ("harness's held-out 1,258", data.test.reshape(-1, 64), data.test_labels)):
                truth = oip_labels(upstream, None, x)
                changed, costs = 0, []
                for i in range(args.honest):
                    name = f"honest-{i}"
                    if name not in clients.keys:
                        clients.add(name)
                    marked = oip_labels(gateway.url, clients.keys[name], x)
                    changed += int((marked != truth).sum())
                    costs.append(float((truth == y).mean() - (marked == y).mean()))
                total = args.honest * len(x)
                print(f"| {label} | {(truth == y).mean():.2%} | {(truth == y).mean() - np.mean(costs):.2%} "
                      f"| {np.mean(costs):.2%} (max {max(costs):.2%}) | {changed} of {total} "
                      f"({changed / total:.2%}) |", flush=True)

            off, total = cross_validated_off_share()
            print(f"\nReal digits marked when not in the profile (5-fold over all {total:,}, "
                  f"profile of the other four fifths): {off} ({off / total:.2%})\n", flush=True)
            started = time.perf_counter()
            add_population(gateway, args.clients - args.honest - 2 * len(budgets) - 3)
            print(f"\n(keyed clients added in {time.perf_counter() - started:.0f} s)\n", file=sys.stderr)

            truth_test = oip_labels(upstream, None, data.test.reshape(-1, 64))
            rows: list[str] = []
            for budget in budgets:
                images, _ = data.padded_pool(budget, args.seed)
                for method, labels_only in (("copycat", True), ("knockoff-random", False)):
                    name = clients.add(f"thief-{method}-{budget}")
                    answers = buy(clients, name, images, labels_only)
                    thief, epochs = train_clone(images, answers, args.seed)
                    quality = classifier.clone_quality(thief, data, truth_test)
                    rows.append(verdict_row(
                        f"{method} ({'labels' if labels_only else 'probs'}), {budget} images",
                        config, clone_predict(thief), quality, {name}, epochs))
                    print(rows[-1], file=sys.stderr, flush=True)

            # Adaptive: only in-distribution purchases (the pool's 539 clean digits).
            name = clients.add("thief-clean-only")
            answers = buy(clients, name, data.pool, True)
            thief, epochs = train_clone(data.pool, answers, args.seed)
            rows.append(verdict_row("adaptive: clean digits only (539)", config, clone_predict(thief),
                                    classifier.clone_quality(thief, data, truth_test), {name}, epochs))
            # Adaptive: two keys, keep the answers they agree on.
            images, _ = data.padded_pool(max(budgets), args.seed)
            a, b = clients.add("thief-two-keys-a"), clients.add("thief-two-keys-b")
            first, second = buy(clients, a, images, True), buy(clients, b, images, True)
            agree = first.argmax(1) == second.argmax(1)
            thief, epochs = train_clone(images[agree], first[agree], args.seed)
            rows.append(verdict_row(
                f"adaptive: two keys, {max(budgets)} images, keeps the {int(agree.sum())} agreed",
                config, clone_predict(thief), classifier.clone_quality(thief, data, truth_test),
                {a, b}, epochs))
            # True negatives.
            x, y = data.padded_pool(max(budgets), args.seed)
            independent, epochs = train_clone(x, np.eye(classifier.N_CLASSES, dtype=np.float32)[y], args.seed + 1)
            rows.append(verdict_row("CNN on the pool's true labels", config, clone_predict(independent),
                                    classifier.clone_quality(independent, data, truth_test), set(), epochs))
            with classifier_server(lambda z: np.eye(classifier.N_CLASSES)[oip_labels(upstream, None, z)]) as s:
                v = verify_model(config, s.url, "classifier", MODEL)
            rows.append(f"| the victim itself (unmarked upstream) | - | - | - | {fmt_p(v['p_value'])} | "
                        f"{v['client'] or 'none'} | {v['statistic']:.2f} | {null_counts(v['per_client'], set())} |")

            print(f"\n## Early-stopped clones, verified by `modelfence verify model` over "
                  f"{args.clients:,} keyed clients (named: Bonferroni p <= 1e-6)\n")
            print("| suspect | epochs | clone accuracy | thief's own p | Bonferroni p | named | hits/moved "
                  "| other clients' p <= 1e-2 / 1e-3 / 1e-4 (uniform expects) |")
            print("|---|---:|---:|---:|---:|---|---:|---|")
            print("\n".join(rows))
    print(f"\n{footer}; one torch thread")


if __name__ == "__main__":
    main()
