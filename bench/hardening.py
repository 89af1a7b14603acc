"""How much does output hardening cost per response? In-process, no network.

Each case is what :class:`~modelfence.gateway.hardening.OutputHardening` does to one
answer: parse the upstream JSON, apply the profile's transform, serialise it again (the
``JsonRewriter`` / ``SSERewriter`` path), plus the per-request ``plan()`` that every
request pays, hardened or not. The DP accountant's round trip (one SQL upsert or one Redis
script) is not included: it is I/O, paid only by clients whose profile adds DP noise.

    python bench/hardening.py            # prints a table; target: <= 200 µs per response
    python bench/hardening.py --json     # the same numbers as JSON

``--efficacy`` instead runs IBM ART's KnockoffNets (random sampling) in-process against the
demo digits classifier with each probability post-processor applied to its answers, and
prints benign accuracy vs the clone's accuracy at 500 / 1,000 / 2,000 queries, for a
soft-label and a labels-only thief. It needs ``adversarial-robustness-toolbox``,
``packaging`` and torch (``pip install adversarial-robustness-toolbox packaging``); it
bypasses the gateway, so quotas and detection play no part in these numbers.

    python bench/hardening.py --efficacy            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.hardening import OutputHardening
from modelfence.gateway.rewrite import JsonRewriter, SSERewriter
from modelfence.identity.base import ApiKeyRecord
from modelfence.policy import (
    LogprobHardening,
    NormalRisk,
    PolicyConfig,
    RiskOverrides,
    RowHardening,
    harden_oip,
)

TARGET_US = 200.0


def chat_body(tokens: int, alternatives: int) -> bytes:
    rng = random.Random(0)
    content = []
    for i in range(tokens):
        top = sorted((-rng.expovariate(1.0) for _ in range(alternatives)), reverse=True)
        content.append({"token": f"t{i}", "logprob": top[0], "bytes": [116],
                        "top_logprobs": [{"token": f"t{i}-{j}", "logprob": lp, "bytes": [116]}
                                         for j, lp in enumerate(top)]})
    return orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "t" * tokens},
         "logprobs": {"content": content, "refusal": None}}]})


def chat_stream(tokens: int, alternatives: int) -> list[bytes]:
    whole = orjson.loads(chat_body(tokens, alternatives))["choices"][0]["logprobs"]["content"]
    return [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": p["token"]},
                                                   "logprobs": {"content": [p]}}]}) + b"\n\n"
            for p in whole]


def oip_body(rows: int) -> bytes:
    rng = random.Random(1)
    data: list[float] = []
    for _ in range(rows):
        raw = [rng.random() ** 4 for _ in range(10)]
        data += [x / sum(raw) for x in raw]
    return orjson.dumps({"model_name": "digits", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [rows, 10], "data": data}]})


def per_call_us(fn: Callable[[], Any], min_seconds: float = 0.3) -> float:
    for _ in range(20):
        fn()
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds:
        for _ in range(50):
            fn()
        n += 50
    return elapsed / n * 1e6


def cases() -> dict[str, Callable[[], Any]]:
    rng = random.Random(2)
    chat16, chat100 = chat_body(16, 5), chat_body(100, 5)
    events = chat_stream(100, 5)
    elevated = LogprobHardening(quantum=0.5, top_k=1)
    noised = LogprobHardening(quantum=0.1, noise_scale=2.0, rng=rng)
    text_only = LogprobHardening(text_only=True)
    oip1, oip32 = oip_body(1), oip_body(32)

    def json_case(body: bytes, transform: Callable[[Any], Any]) -> Callable[[], Any]:
        return lambda: JsonRewriter(transform).feed(body, False)

    def sse_case(transform: Callable[[Any], Any]) -> Callable[[], Any]:
        def run() -> None:
            rewriter = SSERewriter(transform)
            for i, event in enumerate(events):
                rewriter.feed(event, i < len(events) - 1)
        return run

    def rows(mode: str, **extra: Any) -> Callable[[Any], Any]:
        h = RowHardening(mode=mode, rng=rng, **extra)  # type: ignore[arg-type]
        return lambda payload: harden_oip(payload, h)

    stage = OutputHardening(lambda *_: None, policy=PolicyConfig(),  # type: ignore[arg-type]
                            risk=RiskOverrides(NormalRisk()), accountant=None)  # type: ignore[arg-type]
    key = ApiKeyRecord("k", "acme", "default", "mf-", datetime.now(UTC))
    scope = {SCOPE_KEY: RequestContext(route="/v1/chat/completions", started=0.0,
                                       request_id="r", key=key, body={"logprobs": True})}
    return {
        "plan() only (normal risk: pass-through)": lambda: stage.plan(scope),
        "chat 16 tokens x 5 alts: quantise 0.5 + top-1": json_case(chat16, elevated.apply),
        "chat 100 tokens x 5 alts: quantise 0.5 + top-1": json_case(chat100, elevated.apply),
        "chat 100 tokens x 5 alts: DP noise + quantise 0.1": json_case(chat100, noised.apply),
        "chat 100 tokens x 5 alts: text only": json_case(chat100, text_only.apply),
        "chat stream 100 events x 5 alts: quantise + top-1": sse_case(elevated.apply),
        "OIP 1 x 10: labels only": json_case(oip1, rows("labels_only")),
        "OIP 1 x 10: reverse sigmoid": json_case(oip1, rows("reverse_sigmoid")),
        "OIP 1 x 10: OOD-aware + 2 decimals": json_case(oip1, rows("ood_aware", decimals=2)),
        "OIP 1 x 10: DP noise + top-3": json_case(oip1, rows("exact", noise_scale=0.1, top_k=3)),
        "OIP 32 x 10: reverse sigmoid": json_case(oip32, rows("reverse_sigmoid")),
    }


POST_PROCESSORS: dict[str, dict[str, Any]] = {
    "none (exact)": {},
    "rounding, 1 decimal": {"decimals": 1},
    "top-1 (others zeroed)": {"top_k": 1},
    "labels only": {"mode": "labels_only"},
    "reverse sigmoid (beta 0.3, gamma 0.4)": {"mode": "reverse_sigmoid"},
    "OOD-aware (threshold 0.9)": {"mode": "ood_aware"},
    "DP noise (scale 0.1)": {"noise_scale": 0.1},
}
BUDGETS = (500, 1000, 2000)


def efficacy(seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier

    from modelfence.demo.classifier import DigitsClassifier
    from modelfence.policy.probs_hardening import harden_row

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    victim = DigitsClassifier.train(seed=seed, test_size=0.4)
    x, y = DigitsClassifier.dataset()
    # The same split the victim used, then its held-out part halved: the attacker's own
    # images (plus noisy copies, so 2,000 distinct queries exist) and the evaluation set.
    from sklearn.model_selection import train_test_split

    _, x_out, _, y_out = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_pool, x_eval, _, y_eval = train_test_split(
        x_out, y_out, test_size=0.5, random_state=seed, stratify=y_out
    )
    noisy = [np.clip(x_pool + rng.normal(0, 2.0, x_pool.shape), 0, 16) for _ in range(6)]
    pool = np.concatenate([x_pool, *noisy]).astype(np.float32)

    class SoftCrossEntropy(torch.nn.Module):
        # Not torch's CrossEntropyLoss: ART would reduce soft labels to their argmax.
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()

    def thief() -> PyTorchClassifier:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )
        return PyTorchClassifier(
            model, loss=SoftCrossEntropy(), optimizer=torch.optim.Adam(model.parameters(), 1e-3),
            input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0),
        )

    rows = []
    for name, options in POST_PROCESSORS.items():
        h = RowHardening(rng=random.Random(seed), **options)

        def answer(batch: np.ndarray, h: RowHardening = h) -> np.ndarray:
            proba = victim.predict_proba(batch).tolist()
            return np.asarray([harden_row(row, h) for row in proba], dtype=np.float32)

        benign = float((answer(x_eval).argmax(1) == y_eval).mean())
        row: dict[str, Any] = {"post-processor": name, "benign accuracy": round(benign, 3)}
        black_box = BlackBoxClassifier(answer, input_shape=(64,), nb_classes=10)
        for soft in (True, False):
            for budget in BUDGETS:
                np.random.seed(seed)  # KnockoffNets samples its queries with np.random
                attack = KnockoffNets(
                    black_box, batch_size_fit=32, batch_size_query=256, nb_epochs=40,
                    nb_stolen=budget, use_probability=soft, verbose=False,
                )
                clone = attack.extract(x=pool, thieved_classifier=thief())
                accuracy = float((clone.predict(x_eval).argmax(1) == y_eval).mean())
                row[f"{'soft' if soft else 'labels'} @{budget}"] = round(accuracy, 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--efficacy", action="store_true", help="ART KnockoffNets, in-process")
    args = parser.parse_args()
    if args.efficacy:
        print(markdown(efficacy()))
        return
    results = {name: round(per_call_us(fn), 1) for name, fn in cases().items()}
    if args.json:
        print(json.dumps({"target_us": TARGET_US, "us_per_response": results}, indent=2))
        return
    width = max(map(len, results))
    print(f"{'case':<{width}}  µs/response  (target <= {TARGET_US:.0f})")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:>11.1f}  {'PASS' if us <= TARGET_US else 'over'}")


if __name__ == "__main__":
    main()
