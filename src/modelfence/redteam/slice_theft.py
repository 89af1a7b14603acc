"""TEESlice on the digits task: which part of a fine-tuned model to seal, measured by theft.

After Zhang et al., "No Privacy Left Outside: On the (In-)Security of TEE-Shielded DNN
Partition for On-Device ML" (IEEE S&P 2024). A public pre-trained model exists (anyone can
download it); the victim fine-tunes part of it on private data and deploys it with some
layers sealed in the isolated worker and the rest shipped in the clear. The attacker holds
the public model, whatever is shipped, an unlabelled query pool and query access; it
starts its clone from the public weights, replaces them with the shipped ones (kept
fixed), and trains the rest on the answers to its queries.

Populations (load_digits, 8x8, ten classes; disjoint, drawn per seed):

    public    500 images, mirrored left to right: the public model's pre-training task
              (the same classes, another appearance), so that fine-tuning matters
    private   500 images: the victim fine-tunes layers 2 and 4 (layer 0 stays public)
    pool      437 unlabelled images: the attacker's queries, in one order per seed
    test      360 images: accuracy and fidelity (agreement with the victim)

The model is ``nn.Sequential(Linear(64, 128), ReLU, Linear(128, 64), ReLU, Linear(64, 10))``
(state-dict names 0, 2, 4). Deployments, at equal query budgets:

    none          every layer shipped: the clone is the victim, no query needed
    head          layer 4 sealed (probabilities, rounded); the fine-tuned layer 2 shipped
    slice         layers 2 and 4 sealed (probabilities, rounded): every fine-tuned layer
    slice-labels  layers 2 and 4 sealed, labels only
    black-box     every layer sealed (probabilities, rounded)

Every query of a sealed deployment goes through the real pipeline: the private layers are
sealed (``confidential/sealing.py``), a worker is launched and measured
(``launcher.launch``), the key broker releases the key to it after ``sim`` attestation,
the worker serves the private layers under its output policy, and the caller computes the
shipped layers. ``sim`` is simulated: no TEE is involved.

    python -m modelfence.redteam.slice_theft                     # 5 seeds, budgets 25-400
    python -m modelfence.redteam.slice_theft --seeds 0 --budgets 25,100 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from modelfence.confidential.attestation import SimPlatform, SimVerifier
from modelfence.confidential.broker import AuditLog, KeyBroker, ReleasePolicy
from modelfence.confidential.launcher import WorkerClient, launch, provision
from modelfence.confidential.partition import split_module
from modelfence.confidential.sealing import new_key, seal
from modelfence.confidential.worker import read_slice

LAYERS = ("0", "2", "4")  # the Linear modules of the Sequential, in forward order
FINE_TUNED = ("2", "4")  # what the victim trains on its private data
SIZES = {"test": 360, "pool": 437, "private": 500}  # the public population takes the rest


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    sealed: tuple[str, ...]  # layers in the worker: a suffix of LAYERS
    output: str  # the worker's output policy (measured configuration)
    description: str


DEPLOYMENTS = (
    Deployment("none", (), "", "nothing: every weight shipped"),
    Deployment("head", ("4",), "probabilities", "layer 4 (the head); fine-tuned layer 2 shipped"),
    Deployment("slice", FINE_TUNED, "probabilities", "layers 2 and 4: every fine-tuned layer"),
    Deployment("slice-labels", FINE_TUNED, "labels", "layers 2 and 4, labels only"),
    Deployment("black-box", LAYERS, "probabilities", "layers 0, 2 and 4: the whole model"),
)


@dataclass(frozen=True, slots=True)
class Setup:
    """One run's size: every number that changes a result is here."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    budgets: tuple[int, ...] = (25, 50, 100, 200, 400)
    pretrain_steps: int = 300  # full-batch Adam, lr 1e-2
    finetune_steps: int = 300
    attack_steps: int = 500  # full-batch Adam, lr 1e-2, on the queried answers
    learning_rate: float = 1e-2
    decimals: int = 2  # rounding of the probabilities a worker returns


@dataclass
class Populations:
    public_x: np.ndarray
    public_y: np.ndarray
    private_x: np.ndarray
    private_y: np.ndarray
    pool_x: np.ndarray  # in the attacker's query order
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass
class SliceTheftResult:
    setup: dict[str, Any]
    victim_accuracy: list[float] = field(default_factory=list)  # per seed
    public_accuracy: list[float] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # deployment, seed, budget, metrics
    latency_us: dict[str, dict[str, float]] = field(default_factory=dict)  # per sealed deployment
    mismatches: int = 0  # worker answers that differ from the same arithmetic in-process
    seconds: float = 0.0

    def cell(self, deployment: str, budget: int, metric: str) -> tuple[float, float]:
        """Mean and standard deviation over seeds of ``metric`` (fidelity, clone_accuracy)."""
        values = [r[metric] for r in self.runs if r["deployment"] == deployment and r["budget"] == budget]
        if not values:
            raise KeyError(f"no runs for {deployment} at {budget} queries")
        return float(np.mean(values)), float(np.std(values))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def populations(seed: int) -> Populations:
    """Disjoint test, pool, private and public sets; the public set mirrored left to right."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = np.cumsum([SIZES["test"], SIZES["pool"], SIZES["private"]])
    test, pool, private, public = np.split(order, cut)
    mirrored = x[public].reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64).copy()
    return Populations(mirrored, y[public], x[private], y[private], x[pool], x[test], y[test])


def mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model: torch.nn.Sequential, x: np.ndarray, targets: np.ndarray, layers: Sequence[str],
          steps: int, lr: float) -> None:
    """Full-batch Adam on ``layers`` only: cross-entropy on labels (1-D targets) or on soft
    targets (rows of probabilities)."""
    params = [p for name, p in model.named_parameters() if name.split(".")[0] in layers]
    frozen = [p for name, p in model.named_parameters() if name.split(".")[0] not in layers]
    for p in frozen:
        p.requires_grad_(False)
    optimiser = torch.optim.Adam(params, lr=lr)
    inputs, wanted = torch.from_numpy(x), torch.from_numpy(targets)
    for _ in range(steps):
        optimiser.zero_grad()
        logits = model(inputs)
        if wanted.ndim == 1:
            loss = torch.nn.functional.cross_entropy(logits, wanted)
        else:
            loss = -(wanted * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    for p in frozen:
        p.requires_grad_(True)


def predict(model: torch.nn.Sequential, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(x)).argmax(dim=1).numpy(), dtype=np.int64)


def public_layers(shipped: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """What the caller computes from the shipped tensors: each shipped Linear, then ReLU
    (the sealed part follows), float32 as sent to the worker."""
    h = rows.astype(np.float32)
    for layer in LAYERS:
        if f"{layer}.weight" in shipped:
            h = np.maximum(h @ shipped[f"{layer}.weight"].T + shipped[f"{layer}.bias"], 0.0)
    return h.astype(np.float32)


class SealedDeployment:
    """The victim deployed with ``deployment.sealed`` in a launched, attested worker."""

    def __init__(self, victim: torch.nn.Sequential, deployment: Deployment, folder: Path,
                 decimals: int) -> None:
        if deployment.sealed != LAYERS[len(LAYERS) - len(deployment.sealed):]:
            raise ValueError("the sealed layers must be the model's last ones")
        self.shipped, private = split_module(victim, list(deployment.sealed))
        self.output = deployment.output
        self.decimals = decimals
        self.local = read_slice(private)  # the same arithmetic in-process, for comparison
        kek, platform = new_key(), SimPlatform()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        sealed = folder / f"{deployment.name}.sealed"
        seal(private, sealed, kek=kek, artifact_id=f"digits-{deployment.name}", version=1)
        config: dict[str, object] = {"output": deployment.output}
        if deployment.output == "probabilities":
            config["decimals"] = decimals
        self.worker = launch(json.dumps(config).encode(), folder / deployment.name, platform)
        try:
            policy = ReleasePolicy("development", frozenset({"sim"}), frozenset({self.worker.measurement}))
            broker = KeyBroker(kek, policy, {"sim": SimVerifier(platform.public_key)}, AuditLog())
            self.client = WorkerClient(self.worker.socket_path)
            provision(self.client, broker, sealed)
        except BaseException:
            self.worker.stop()
            raise

    def query(self, row: np.ndarray) -> np.ndarray:
        """One API call for one image: labels [1] or rounded probabilities [1, 10]."""
        features = public_layers(self.shipped, row[None, :])
        answer, data = self.client.call("infer", features.tobytes(), dtype="float32",
                                        shape=list(features.shape))
        if answer["output"] == "labels":
            return np.frombuffer(data, "<i4").astype(np.int64)
        return np.frombuffer(data, "<f4").reshape(answer["shape"])

    def in_process(self, row: np.ndarray) -> np.ndarray:
        """The same answer with the private layers computed in the caller."""
        probabilities = self.local.probabilities(public_layers(self.shipped, row[None, :]))
        if self.output == "labels":
            return np.asarray(probabilities.argmax(axis=1), dtype=np.int64)
        return np.round(probabilities, self.decimals).astype(np.float32)

    def close(self) -> None:
        self.client.close()
        self.worker.stop()


def _timed(call: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    answer = call()
    return answer, time.perf_counter() - started


def steal(public: torch.nn.Sequential, shipped: Mapping[str, np.ndarray], queries: np.ndarray,
          answers: np.ndarray, setup: Setup) -> torch.nn.Sequential:
    """The attacker's clone: the public model, the shipped tensors in place of its own (kept
    fixed), every other layer trained on the answers (soft targets, or labels)."""
    clone = copy.deepcopy(public)
    state = clone.state_dict()
    state.update({name: torch.from_numpy(np.array(t)) for name, t in shipped.items()})
    clone.load_state_dict(state)
    trainable = [layer for layer in LAYERS if f"{layer}.weight" not in shipped]
    if trainable:
        if answers.ndim == 2:
            answers = answers / answers.sum(axis=1, keepdims=True)
        train(clone, queries, answers, trainable, setup.attack_steps, setup.learning_rate)
    return clone


def run_seed(seed: int, setup: Setup, folder: Path, result: SliceTheftResult,
             timings: dict[str, list[tuple[float, float]]]) -> None:
    torch.manual_seed(seed)
    data = populations(seed)
    public = mlp()
    train(public, data.public_x, data.public_y, LAYERS, setup.pretrain_steps, setup.learning_rate)
    victim = copy.deepcopy(public)
    train(victim, data.private_x, data.private_y, FINE_TUNED, setup.finetune_steps, setup.learning_rate)
    victim.eval()
    truth = predict(victim, data.test_x)
    result.victim_accuracy.append(float((truth == data.test_y).mean()))
    result.public_accuracy.append(float((predict(public, data.test_x) == data.test_y).mean()))
    most = max(setup.budgets)
    for deployment in DEPLOYMENTS:
        if not deployment.sealed:  # everything shipped: the clone is the victim
            for budget in setup.budgets:
                result.runs.append({"deployment": deployment.name, "seed": seed, "budget": budget,
                                    "clone_accuracy": result.victim_accuracy[-1], "fidelity": 1.0})
            continue
        served = SealedDeployment(victim, deployment, folder / f"seed{seed}", setup.decimals)
        answers = []
        try:
            for row in data.pool_x[:most]:  # alternating, so both see the same machine
                answer, outside = _timed(partial(served.query, row))
                local, inside = _timed(partial(served.in_process, row))
                result.mismatches += int(not np.array_equal(answer, local))
                timings.setdefault(deployment.name, []).append((inside, outside))
                answers.append(answer)
        finally:
            served.close()
        stacked = np.concatenate(answers).astype(np.float32 if deployment.output != "labels" else np.int64)
        for budget in setup.budgets:
            torch.manual_seed(seed * 10_007 + budget)
            clone = steal(public, served.shipped, data.pool_x[:budget], stacked[:budget], setup)
            guess = predict(clone, data.test_x)
            result.runs.append({"deployment": deployment.name, "seed": seed, "budget": budget,
                                "clone_accuracy": float((guess == data.test_y).mean()),
                                "fidelity": float((guess == truth).mean())})


def run(setup: Setup | None = None) -> SliceTheftResult:
    """Every deployment, seed and budget of ``setup``; a few minutes on 2 cores by default."""
    setup = setup or Setup()
    if max(setup.budgets) > SIZES["pool"] or min(setup.budgets) < 1:
        raise ValueError(f"budgets must be 1-{SIZES['pool']} queries (the pool's size)")
    started = time.perf_counter()
    result = SliceTheftResult(setup=asdict(setup))
    timings: dict[str, list[tuple[float, float]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and comparable: one thread, every seed fixed
    try:
        with tempfile.TemporaryDirectory(prefix="mf-slices-") as folder:
            for seed in setup.seeds:
                run_seed(seed, setup, Path(folder), result, timings)
    finally:
        torch.set_num_threads(threads)
    for name, pairs in timings.items():
        inside, outside = (np.array(side) * 1e6 for side in zip(*pairs, strict=True))
        result.latency_us[name] = {
            "in_process_p50": float(np.percentile(inside, 50)), "in_process_p99": float(np.percentile(inside, 99)),
            "worker_p50": float(np.percentile(outside, 50)), "worker_p99": float(np.percentile(outside, 99)),
            "calls": len(pairs),
        }
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def format_table(result: SliceTheftResult) -> str:
    """Markdown: fidelity and clone accuracy (mean ± sd over seeds) per deployment and
    budget, the victim's and the public model's accuracy, and what a call costs."""
    budgets = result.setup["budgets"]
    seeds = len(result.setup["seeds"])
    victim, public = result.victim_accuracy, result.public_accuracy
    lines = [(f"Victim accuracy {np.mean(victim):.3f} ± {np.std(victim):.3f}; public model "
              f"{np.mean(public):.3f} ± {np.std(public):.3f} (test set, {seeds} seeds)."),
             (f"Sealed deployments answer probabilities rounded to {result.setup['decimals']} decimals "
              "(slice-labels: labels only). The attacker starts from the public model, keeps the shipped "
              f"layers fixed and trains the others on its answers ({result.setup['attack_steps']} "
              "full-batch Adam steps)."), ""]
    for metric, title in (("fidelity", "Fidelity (agreement with the victim on the test set)"),
                          ("clone_accuracy", "Clone accuracy on the test set")):
        lines += [f"{title}, mean ± sd over {seeds} seeds, by queries:", "",
                  "| deployment | sealed in the worker | " + " | ".join(str(b) for b in budgets) + " |",
                  "|---|---|" + "---:|" * len(budgets)]
        for deployment in DEPLOYMENTS:
            cells = [result.cell(deployment.name, b, metric) for b in budgets]
            lines.append(f"| {deployment.name} | {deployment.description} | "
                         + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")
        lines.append("")
    lines += ["Per call, one image (public layers in the caller; private ones in the worker or in-process):", "",
              "| deployment | in-process p50 / p99 µs | through the worker p50 / p99 µs | added p50 µs |",
              "|---|---:|---:|---:|"]
    for name, t in result.latency_us.items():
        lines.append(f"| {name} | {t['in_process_p50']:.0f} / {t['in_process_p99']:.0f} | "
                     f"{t['worker_p50']:.0f} / {t['worker_p99']:.0f} | "
                     f"{t['worker_p50'] - t['in_process_p50']:.0f} |")
    lines += ["", (f"Worker answers differing from the in-process arithmetic: {result.mismatches}. "
                   f"{result.seconds} s.")]
    return "\n".join(lines)


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default = Setup()
    parser.add_argument("--seeds", type=_numbers, default=default.seeds, help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--budgets", type=_numbers, default=default.budgets,
                        help="queries, e.g. 25,50,100,200,400")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    try:
        result = run(Setup(seeds=args.seeds, budgets=args.budgets))
    except ValueError as exc:
        parser.error(str(exc))
    print(format_table(result))
    if args.json:
        args.json.write_text(result.to_json())


if __name__ == "__main__":
    main()
