"""Output hardening against classifier extraction, measured through a real gateway.

A gateway runs one policy — a probability post-processor given to every client, or the
risk-driven default (exact answers until detection raises a client's level) — and
:func:`measure_policy` measures, through it:

- **benign accuracy**: an honest client's top-1 accuracy, from the answers it gets, on the
  digits the victim never trained on (the demo model's own held-out quarter);
- for a **soft-label** thief (it asks for probabilities) and a **labels-only** thief (it
  asks for the ``label`` tensor): ART KnockoffNets (random sampling) through the harness's
  :class:`~modelfence.redteam.attacks.classifier.DigitsOracle`, the clone's accuracy and
  fidelity at each budget, the statuses the gateway answered, and — when the gateway has a
  detector — its first flag and the level the thief ended at. A thief that is refused
  (403, or a 429 longer than it will wait) trains its clone on what it had bought.

::

    with digits_upstream(workdir) as upstream:
        data = victim_split()
        outcome = measure_in_own_stack(
            workdir / "labels-only", upstream.url, secrets.token_hex(16), "labels only",
            postprocessor_overrides(POST_PROCESSORS["labels only"]), data,
            victim_labels(upstream.url, data), budgets=(500, 1000, 2000), seed=0, epochs=25)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from modelfence.redteam import detection
from modelfence.redteam.attacks.classifier import (
    DigitsData,
    DigitsOracle,
    GatewayRefused,
    Send,
    clone_quality,
    run_art,
    seed_everything,
    thief_network,
)
from modelfence.redteam.context import sent_by
from modelfence.redteam.metrics import answered_before
from modelfence.redteam.overrides import config_with
from modelfence.redteam.runner import LiveGateway
from modelfence.redteam.stack import own_stack
from modelfence.redteam.traffic import (
    DIGITS_INFER,
    Exchange,
    PlannedRequest,
    digits_body,
    make_profile,
)
from modelfence.testing.processes import ServiceProcess, free_port, http_json, modelfence_command

# name -> hardening profile (``policy.tiers.<tier>.hardening.<level>``)
POST_PROCESSORS: dict[str, dict[str, Any]] = {
    "exact": {},
    "rounding, 1 decimal": {"prob_decimals": 1},
    "top-1 (others zeroed)": {"prob_top_k": 1},
    "labels only": {"probabilities": "labels_only"},
    "reverse sigmoid (beta 0.3, gamma 0.4)": {"probabilities": "reverse_sigmoid"},
    "OOD-aware (threshold 0.9)": {"probabilities": "ood_aware"},
    "DP noise (scale 0.1)": {"dp_noise": True},  # the default dp: 0.05 / epsilon 0.5
}
RISK_DRIVEN = "risk-driven (default profiles + detection + 60 requests/minute)"
# The default hardening profiles stay; detection escalates clients, a per-key quota caps
# requests. The hashing embedder: classifier traffic needs no text model.
RISK_DRIVEN_OVERRIDES: dict[str, Any] = {
    "detection": {"enabled": True, "embedder": "hashing"},
    "limits": {"tiers": {"default": {"requests_per_minute": 60}}},
}
HONEST_BATCH = 16  # images per honest request
HONEST_GAP_SECONDS = 0.2  # mean pause between honest requests (exponential: not machine-like)
MAX_WAIT_SECONDS = 30.0  # a thief waits out a 429 up to this long, then gives up
POOL_SIZE = 539  # the attacker's own natural digits (the harness's default pool size)


def postprocessor_overrides(profile: dict[str, Any]) -> dict[str, Any]:
    """Config overrides that give every client of the default tier ``profile`` at normal
    risk (so honest and hostile clients alike get it)."""
    return {"policy": {"tiers": {"default": {"hardening": {"normal": profile}}}}}


@contextlib.contextmanager
def digits_upstream(workdir: Path) -> Iterator[ServiceProcess]:
    """The demo upstream, ready once its digits model is (the LLM is never loaded)."""
    port = free_port()
    with ServiceProcess(
        modelfence_command("demo-upstream", "--port", str(port)), port=port,
        ready_path="/v2/models/digits/ready", log_file=workdir / "demo-upstream.log",
        ready_timeout=600,
    ) as upstream:
        yield upstream


def stack_overrides(upstream_url: str, secret: str, policy: Mapping[str, Any]) -> dict[str, Any]:
    """The baseline cut to the classifier upstream, with ``policy`` (overrides) on top.

    Give every gateway of one comparison the same ``secret``: the per-client label
    watermarks (on by default) then mark the same answers, and policies differ only in
    their hardening.
    """
    shared = {"secret": secret, "upstreams": [
        {"name": "demo-oip", "url": upstream_url, "kind": "oip", "models": ["digits"]}]}
    return config_with(shared, policy)


def victim_labels(upstream_url: str, data: DigitsData) -> np.ndarray:
    """The victim's own labels for the held-out digits, asked of the upstream directly."""
    status, body = http_json("POST", upstream_url + DIGITS_INFER,
                             digits_body(data.test, labels_only=True), timeout=120)
    if status != 200:
        raise RuntimeError(f"the upstream answered {status}: {body}")
    return np.asarray(body["outputs"][0]["data"], dtype=np.int64)


def victim_split(seed: int = 0, victim_seed: int = 0) -> DigitsData:
    """The demo victim's own split: evaluation on its held-out quarter (450 digits); the
    attacker's pool is ``POOL_SIZE`` digits of its training part — natural data from the
    victim's own distribution, the thief's best case."""
    from sklearn.model_selection import train_test_split

    from modelfence.demo.classifier import DigitsClassifier

    x, y = DigitsClassifier.dataset()
    # The same call DigitsClassifier.train makes (test_size=0.25, random_state=victim_seed).
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=victim_seed, stratify=y
    )
    pick = np.random.default_rng(seed).permutation(len(x_train))[:POOL_SIZE]
    images = (-1, 1, 8, 8)
    return DigitsData(x_train[pick].reshape(images), y_train[pick], x_test.reshape(images), y_test)


def patient(send: Send, max_wait: float = MAX_WAIT_SECONDS) -> Send:
    """``send`` that waits out a 429 (its ``Retry-After``) and tries again, as a thief
    who respects quotas would; a longer wait, or any other answer, is returned as it is."""

    def call(plan: PlannedRequest) -> Exchange:
        while True:
            exchange = send(plan)
            wait = float(exchange.headers.get("retry-after") or 1.0)
            if exchange.status != 429 or wait > max_wait:
                return exchange
            time.sleep(wait)

    return call


def paced(send: Send, rng: np.random.Generator, mean_gap: float) -> Send:
    """``send`` after an exponential pause: a person's irregular rhythm, not a machine's."""

    def call(plan: PlannedRequest) -> Exchange:
        time.sleep(float(rng.exponential(mean_gap)))
        return send(plan)

    return call


@dataclass
class ClonePoint:
    budget: int
    rows_bought: int  # images the thief had answered when its clone was trained
    accuracy: float | None  # on the held-out digits (None: nothing bought)
    fidelity: float | None  # agreement with the victim's own labels
    stopped: str | None = None  # why the thief stopped short of this budget


@dataclass
class ThiefOutcome:
    client: str
    labels_only: bool
    curve: list[ClonePoint] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    first_flag: str | None = None  # "<level> after <n> rows answered"
    final_level: str | None = None


@dataclass
class PolicyOutcome:
    policy: str
    benign_accuracy: float | None  # None: the honest client was refused before any answer
    benign_rows: int  # honest images answered
    benign_statuses: dict[int, int]
    benign_final_level: str | None
    thieves: list[ThiefOutcome]
    detection: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _statuses(exchanges: list[Exchange]) -> dict[int, int]:
    return dict(sorted(Counter(e.status for e in exchanges).items()))


def _bought_clone(oracle: DigitsOracle, data: DigitsData, victim_labels: np.ndarray,
                  seed: int, epochs: int) -> dict[str, float]:
    """The clone a refused thief trains on what it bought (KnockoffNets' own fit step)."""
    images, answers = oracle.purchased()
    seed_everything(seed)
    thief = thief_network(seed)
    thief.fit(images, answers, nb_epochs=epochs, batch_size=32, verbose=False)
    return clone_quality(thief, data, victim_labels)


async def _steal(
    gateway: LiveGateway, client: str, labels_only: bool, data: DigitsData,
    victim_labels: np.ndarray, budgets: tuple[int, ...], seed: int, epochs: int,
) -> ThiefOutcome:
    outcome = ThiefOutcome(client, labels_only)
    oracle = DigitsOracle(patient(gateway.blocking_send), client, labels_only=labels_only)
    for budget in budgets:
        try:
            thief = await asyncio.to_thread(
                run_art, "knockoff-random", oracle, data, budget, seed, epochs
            )
        except GatewayRefused as refused:
            stopped = f"{refused.exchange.status} after {oracle.rows_queried} rows"
            quality: dict[str, float] = {}
            if oracle.rows_queried:
                quality = await asyncio.to_thread(
                    _bought_clone, oracle, data, victim_labels, seed, epochs
                )
            outcome.curve.append(ClonePoint(budget, oracle.rows_queried, quality.get("accuracy"),
                                            quality.get("fidelity"), stopped))
            break
        quality = clone_quality(thief, data, victim_labels)
        outcome.curve.append(
            ClonePoint(budget, oracle.rows_queried, quality["accuracy"], quality["fidelity"])
        )
    return outcome


async def _final_level(gateway: LiveGateway, client: str) -> str | None:
    status, body = await gateway.admin("GET", f"/admin/v1/clients/{quote(client, safe='')}")
    record = body.get("record") if status == 200 and isinstance(body, dict) else None
    return str(record.get("level")) if isinstance(record, dict) else None


async def measure_policy(
    gateway: LiveGateway, policy: str, data: DigitsData, victim_labels: np.ndarray, *,
    budgets: tuple[int, ...], seed: int, epochs: int,
) -> PolicyOutcome:
    """Benign accuracy, then a soft-label and a labels-only thief, through ``gateway``."""
    started, since = time.perf_counter(), len(gateway.exchanges)
    rng = np.random.default_rng(seed)
    honest, soft, labels = (make_profile(rng, name, role, subnet=subnet) for name, role, subnet in (
        ("honest", "benign", 10), ("thief-soft", "attacker", 20), ("thief-labels", "attacker", 30)))
    await gateway.register([honest, soft, labels])

    honest_send = paced(patient(gateway.blocking_send), rng, HONEST_GAP_SECONDS)
    oracle = DigitsOracle(honest_send, honest.name, batch=HONEST_BATCH)
    try:
        answers = await asyncio.to_thread(oracle, data.test)
        benign: float | None = float((answers.argmax(axis=1) == data.test_labels).mean())
    except GatewayRefused:
        _, answers = oracle.purchased()
        benign = None  # refused part-way: reported with the statuses, not as an accuracy

    thieves = [
        await _steal(gateway, client.name, only, data, victim_labels, budgets, seed, epochs)
        for client, only in ((soft, False), (labels, True))
    ]
    found = await detection.flags(gateway, [honest.name, soft.name, labels.name])
    for thief in thieves:
        sent = sent_by(gateway, [thief.client], since)
        thief.statuses = _statuses(sent)
        flag = (found or {}).get(thief.client)
        if flag is not None:
            _, rows = answered_before(sent, flag.at)
            thief.first_flag = f"{flag.level} after {rows} rows"
        if found is not None:
            thief.final_level = await _final_level(gateway, thief.client)
    return PolicyOutcome(
        policy=policy, benign_accuracy=None if benign is None else round(benign, 3),
        benign_rows=len(answers), benign_statuses=_statuses(sent_by(gateway, [honest.name], since)),
        benign_final_level=await _final_level(gateway, honest.name) if found is not None else None,
        thieves=thieves, detection=found is not None,
        seconds=round(time.perf_counter() - started, 1),
    )


def measure_in_own_stack(
    workdir: Path, upstream_url: str, secret: str, policy: str, overrides: Mapping[str, Any],
    data: DigitsData, labels: np.ndarray, *, budgets: tuple[int, ...], seed: int, epochs: int,
) -> PolicyOutcome:
    """Start a gateway with ``overrides`` in front of ``upstream_url`` and measure it."""

    async def run(url: str, token: str) -> PolicyOutcome:
        async with LiveGateway(url, token) as gateway:
            return await measure_policy(gateway, policy, data, labels, budgets=budgets,
                                        seed=seed, epochs=epochs)

    workdir.mkdir(parents=True, exist_ok=True)
    with own_stack(workdir, upstream_url, stack_overrides(upstream_url, secret, overrides)) as gw:
        return asyncio.run(run(gw.url, gw.admin_token))
