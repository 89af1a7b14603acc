"""Output hardening against classifier extraction, through a real gateway.

Starts the demo upstream once (its digits model only), then one gateway per policy — the
red-team harness's baseline gateway, deep-merged with a probability post-processor at the
default tier's normal level (so every client gets it), and one in risk-driven mode
(default profiles, detection on, 60 requests/minute per key). Through each it measures an
honest client's accuracy and a soft-label and a labels-only ART KnockoffNets thief
(``modelfence.redteam.hardening``), and prints the tables of ``docs/HARDENING.md``.
Needs ``adversarial-robustness-toolbox`` and torch (the ``demo`` extra).

    python bench/hardening_efficacy.py                          # ~15-25 min on 2 loaded cores
    python bench/hardening_efficacy.py --only exact,risk --budgets 100 --epochs 5
    python bench/hardening_efficacy.py --json /tmp/efficacy.json
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from modelfence.config import DetectionConfig
from modelfence.redteam.defences import calibrate_reference
from modelfence.redteam.hardening import (
    POST_PROCESSORS,
    RISK_DRIVEN,
    RISK_DRIVEN_OVERRIDES,
    PolicyOutcome,
    ThiefOutcome,
    digits_upstream,
    measure_in_own_stack,
    postprocessor_overrides,
    victim_labels,
    victim_split,
)
from modelfence.redteam.overrides import config_with
from modelfence.redteam.suites import SUITES


def policies() -> dict[str, dict[str, Any]]:
    """Every policy measured: name -> config overrides."""
    named = {name: postprocessor_overrides(profile) for name, profile in POST_PROCESSORS.items()}
    return {**named, RISK_DRIVEN: RISK_DRIVEN_OVERRIDES}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _clone_cells(thief: ThiefOutcome, budgets: tuple[int, ...]) -> list[str]:
    by_budget = {p.budget: p for p in thief.curve}
    last = thief.curve[-1] if thief.curve else None
    cells = []
    for budget in budgets:
        point = by_budget.get(budget)
        if point is None and last is not None and last.stopped:
            point = last  # stopped earlier: the clone stays what it was
        if point is None:
            cells.append("–")
            continue
        text = f"{_cell(point.accuracy)} ({_cell(point.fidelity)})"
        cells.append(text + (f" [{point.rows_bought} rows]" if point.stopped else ""))
    return cells


def clone_table(outcomes: list[PolicyOutcome], budgets: tuple[int, ...]) -> str:
    """Benign accuracy and clone accuracy (fidelity) per policy, thief and budget."""
    header = ["policy", "benign accuracy",
              *(f"soft @{b}" for b in budgets), *(f"labels @{b}" for b in budgets)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for o in outcomes:
        soft, labels = o.thieves
        benign = _cell(o.benign_accuracy)
        lines.append("| " + " | ".join([o.policy, benign, *_clone_cells(soft, budgets),
                                        *_clone_cells(labels, budgets)]) + " |")
    return "\n".join(lines)


def defender_table(outcomes: list[PolicyOutcome]) -> str:
    """What the gateway did to each client, for the policies with a detector."""
    lines = ["| policy | client | statuses (count) | first flag | level at the end | stopped |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        if not o.detection:
            continue
        lines.append(f"| {o.policy} | honest | {o.benign_statuses} | – | {o.benign_final_level} | "
                     f"{'–' if o.benign_accuracy is not None else 'refused'} |")
        for t in o.thieves:
            stopped = next((p.stopped for p in t.curve if p.stopped), None) or "–"
            kind = "labels-only thief" if t.labels_only else "soft-label thief"
            lines.append(f"| {o.policy} | {kind} | {t.statuses} | {t.first_flag or 'never'} | "
                         f"{t.final_level} | {stopped} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="500,1000,2000", help="comma-separated queries")
    parser.add_argument("--epochs", type=int, default=SUITES["full"].thief_epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated prefixes of policy names")
    parser.add_argument("--json", type=Path, help="also write every outcome here")
    args = parser.parse_args()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    chosen = {name: o for name, o in policies().items()
              if not args.only or any(name.startswith(p.strip()) for p in args.only.split(","))}

    import torch

    torch.set_num_threads(1)  # a shared machine: one core for the thieves' training
    started = time.perf_counter()
    data = victim_split(args.seed)
    secret = secrets.token_hex(16)  # one for all gateways: the same watermark keys
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="modelfence-efficacy-") as tmp, \
            digits_upstream(Path(tmp)) as upstream:
        labels = victim_labels(upstream.url, data)
        victim = float((labels == data.test_labels).mean())
        if RISK_DRIVEN in chosen:
            # Detection as deployed: thresholds and the volume medians calibrated on an
            # honest population (the classifier space does not depend on the text embedder).
            reference = Path(tmp) / "reference.npz"
            calibrate_reference(reference, seed=args.seed,
                                config=DetectionConfig.model_validate({"embedder": "hashing"}))
            chosen[RISK_DRIVEN] = config_with(
                chosen[RISK_DRIVEN], {"detection": {"reference_file": str(reference)}})
        for i, (name, overrides) in enumerate(chosen.items()):
            outcome = measure_in_own_stack(Path(tmp) / f"policy-{i}", upstream.url, secret, name,
                                           overrides, data, labels, budgets=budgets,
                                           seed=args.seed, epochs=args.epochs)
            outcomes.append(outcome)
            print(json.dumps(outcome.to_dict()), flush=True)
    print(f"\n{len(outcomes)} policies, {time.perf_counter() - started:.0f} s; "
          f"budgets {budgets}, {args.epochs} thief epochs, seed {args.seed}; the victim's own "
          f"accuracy on the {len(labels)} held-out digits (upstream, direct): {victim:.3f}\n")
    print(clone_table(outcomes, budgets))
    if any(o.detection for o in outcomes):
        print("\n" + defender_table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([o.to_dict() for o in outcomes], indent=2))


if __name__ == "__main__":
    main()
