"""``modelfence demo``: the real stack on embedded defaults, one short scripted scenario.

It starts the demo upstream (real models) and ``modelfence serve`` as child processes on
free ports, with SQLite and in-process limits in a temporary folder, creates clients through
the admin API, lets a few actors play their parts while a live table shows what happens,
and ends with a summary. An actor is a name, a tier, a role and a list of steps; later
layers add actors (attackers, a botnet) to ``ACTORS`` without touching the rest.
"""

from __future__ import annotations

import secrets
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import openai
from rich.console import Console
from rich.live import Live
from rich.table import Table

from modelfence.confidential.keyfile import write_key_file
from modelfence.confidential.launcher import measurement
from modelfence.demo import private_digits
from modelfence.identity.secret import load_server_secret
from modelfence.testing.processes import (
    GatewayProcess,
    ServiceProcess,
    free_port,
    http_json,
    modelfence_command,
)
from modelfence.watermark.channel import MARK_SECRET_ENV
from modelfence.watermark.keys import WatermarkKeyring

CHAT_MODEL = "smollm2-135m-instruct"
LEAK_TOKENS = 200  # the most each kept answer may run to
# What carol keeps and later leaks, posted together. One story can end after some 60 tokens,
# too few to name a client every time (docs/WATERMARK.md); three answers together name her
# at a p-value far below the threshold however any one of them ends.
LEAKED_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a short story about a baker who wakes up able to hear what bread is thinking.",
    "Describe, step by step, how a small town prepares for its first winter festival.",
)
EMBED_MODEL = "minilm-l6-v2"
CLASSIFIER = "digits"
HYDRA_ACCOUNTS = 24
HISTORY_SIGNUPS = 84  # a week of ordinary sign-ups before the demo: one every two hours


@dataclass
class Session:
    """One actor's view of the gateway, and the tally of what it got back."""

    gateway_url: str
    api_keys: Sequence[str]  # one key per account; an actor of many accounts takes turns
    address: str  # sent as X-Forwarded-For; the demo gateway trusts loopback as its proxy
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    tokens: int = 0
    last: str = ""
    first_refusal: int | None = None  # request number of the first 403
    kept_text: list[str] = field(default_factory=list)  # answers the actor walks away with
    kept_labels: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (images, labels)
    refusals: dict[str, str] = field(default_factory=dict)  # first message per refusal code

    @property
    def headers(self) -> dict[str, str]:
        return {"x-forwarded-for": self.address}

    @property
    def api_key(self) -> str:
        """The key of the current request (``requests`` counts it already)."""
        return self.api_keys[(self.requests - 1) % len(self.api_keys)]

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.gateway_url + "/v1", api_key=self.api_key, max_retries=0, timeout=120,
            default_headers=self.headers,
        )

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        self.requests += 1
        try:
            result = request()
        except (openai.APIStatusError, HTTPFailed) as exc:
            self.statuses[exc.status_code] += 1
            self.last = f"{what}: {exc.status_code} {exc.code}"
            self.refusals.setdefault(str(exc.code), _message(exc))
            if exc.status_code == 403 and self.first_refusal is None:
                self.first_refusal = self.requests
            return None
        self.statuses[200] += 1
        usage = getattr(result, "usage", None)
        self.tokens += getattr(usage, "total_tokens", 0) or 0
        self.last = f"{what}: ok"
        return result


Step = Callable[[Session], None]


@dataclass(frozen=True)
class Actor:
    name: str
    tier: str
    role: str
    steps: Sequence[Step]
    address: str  # where the actor's requests come from
    api_key: str | None = None  # a fixed (bad) key instead of a created one
    account: str | None = None  # the account its key belongs to (registered as new)
    signed_up_days_ago: float | None = None  # the account's sign-up, when not now
    accounts: int = 1  # more: that many accounts "<account>-<n>", one key each, used in turn


def chat(question: str, *, stream: bool = False) -> Step:
    def step(session: Session) -> None:
        messages = [{"role": "user", "content": question}]
        if not stream:
            session.call(
                "chat",
                lambda: session.client.chat.completions.create(
                    model=CHAT_MODEL, messages=messages, max_tokens=24, seed=7
                ),
            )
            return

        def streamed() -> Any:
            chunks = list(
                session.client.chat.completions.create(
                    model=CHAT_MODEL,
                    messages=messages,
                    max_tokens=24,
                    seed=7,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return chunks[-1]

        session.call("chat stream", streamed)

    return step


def keep_answer(question: str) -> Step:
    """A long answer the actor keeps: it turns up later, leaked, for forensics to trace."""

    def step(session: Session) -> None:
        result = session.call(
            "chat",
            lambda: session.client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": question}],
                max_tokens=LEAK_TOKENS, seed=7,
            ),
        )
        if result is not None and result.choices[0].message.content:
            session.kept_text.append(result.choices[0].message.content)

    return step


def embed(texts: Sequence[str]) -> Step:
    def step(session: Session) -> None:
        session.call(
            "embeddings",
            lambda: session.client.embeddings.create(model=EMBED_MODEL, input=list(texts)),
        )

    return step


class HTTPFailed(Exception):
    """A non-200 answer on a route the openai client does not cover (OIP)."""

    def __init__(self, status_code: int, body: Any) -> None:
        super().__init__(f"{status_code}: {body}")
        self.status_code = status_code
        error = body.get("error") if isinstance(body, dict) else None
        self.code = error.get("code") if isinstance(error, dict) else None
        self.message = error.get("message", "") if isinstance(error, dict) else str(body)


def _message(exc: openai.APIStatusError | HTTPFailed) -> str:
    if isinstance(exc, HTTPFailed):
        return exc.message
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message", exc.message))


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().data, dtype=np.float32)


def _infer(session: Session, images: np.ndarray) -> Any:
    """The classifier's answer body, or ``None`` when the gateway refused."""

    def infer() -> Any:
        tensor = {"name": "input", "shape": list(images.shape), "datatype": "FP32",
                  "data": images.ravel().tolist()}
        status, body = http_json(
            "POST", f"{session.gateway_url}/v2/models/{CLASSIFIER}/infer", {"inputs": [tensor]},
            token=session.api_key, timeout=60, headers=session.headers,
        )
        if status != 200:
            raise HTTPFailed(status, body)
        return body

    return session.call("digits", infer)


def classify(start: int, count: int) -> Step:
    """Send ``count`` digits images (from scikit-learn's bundled set) for classification."""
    return lambda session: _infer(session, _digits()[start : start + count])


def copy_labels(start: int, count: int, noise: int | None = None) -> Step:
    """Buy labels for ``count`` digits and keep them, to train a copy of the classifier;
    with ``noise`` (a seed), each image gets pixel noise first (cheap extra data)."""

    def step(session: Session) -> None:
        images = _digits()[start : start + count]
        if noise is not None:
            jitter = np.random.default_rng(noise).normal(0, 1.0, images.shape)
            images = np.clip(images + jitter, 0, 16).astype(np.float32)
        body = _infer(session, images)
        if body is not None:
            tensor = next(t for t in body["outputs"] if len(t["shape"]) == 2)
            labels = np.asarray(tensor["data"]).reshape(tensor["shape"]).argmax(1)
            session.kept_labels.append((images, labels))

    return step


def probe(seed: int) -> Step:
    """One extraction query: a known digit nudged a little, as synthetic-sample thieves do."""

    def step(session: Session) -> None:
        rng = np.random.default_rng(seed)
        noisy = np.clip(_digits()[seed % 5] + rng.normal(0, 1.5, 64), 0, 16)
        _infer(session, noisy[None, :].astype(np.float32))

    return step


ACTORS: list[Actor] = [
    Actor("alice", "default", "asks questions", [
        chat("What is the capital of France?"),
        chat("Give me one tip for writing clear emails.", stream=True),
        chat("Name a primary colour."),
    ], address="198.51.100.10"),
    Actor("bob", "default", "embeds, classifies", [
        embed(["meeting notes from Monday", "invoice 2231 overdue", "holiday plans"]),
        classify(0, 16),
        classify(16, 16),
    ], address="198.51.100.77"),
    Actor("carol", "default", "keeps long answers", [keep_answer(q) for q in LEAKED_PROMPTS],
          address="198.51.100.23"),
    # Every digit as it is and twice with pixel noise: the noisy copies lie off the model's
    # real inputs, so their labels carry the copycat's region mark, and a copy trained on
    # them learns it even when its training stops early. (With one noisy copy, some key
    # draws left the copy unnamed.)
    Actor("copycat", "default", "buys labels to copy",
          [copy_labels(i, 150, noise) for noise in (None, 1, 2) for i in range(0, 1797, 150)],
          address="203.0.113.60"),
    Actor("trial-user", "trial", "hammers its key", [classify(i, 1) for i in range(10)],
          address="192.0.2.44"),
    Actor("newcomer", "default", "new account, batches", [classify(300 + 32 * i, 32) for i in range(4)],
          address="198.51.100.140", account="newco", signed_up_days_ago=2),
    # Two dozen accounts signed up in one second, each sending one extraction query: no
    # account alone is unusual, the crowd is a sign-up surge and every account is held.
    Actor("hydra", "default", f"{HYDRA_ACCOUNTS} new accounts", [probe(2000 + i) for i in range(HYDRA_ACCOUNTS)],
          address="198.18.0.90", account="hydra", accounts=HYDRA_ACCOUNTS),
    Actor("mallory", "default", "made-up key", [chat("hello")], address="192.0.2.99",
          api_key="mf_" + "x" * 43),
    Actor("thief", "default", "extraction sweep", [probe(i) for i in range(90)],
          address="203.0.113.5"),
    *(
        Actor(f"bot-{n}", "default", "botnet member", [probe(1000 * n + i) for i in range(30)],
              address=f"203.0.113.{20 + n}")
        for n in range(1, 4)
    ),
]


def _keys(gateway: GatewayProcess, actor: Actor) -> list[str]:
    """The actor's keys: its fixed one, or one created per account (backdated sign-ups)."""
    if actor.api_key is not None:
        return [actor.api_key]
    metadata = None
    if actor.signed_up_days_ago is not None:
        signed_up = datetime.now(UTC) - timedelta(days=actor.signed_up_days_ago)
        metadata = {"created_at": signed_up.isoformat()}
    if actor.accounts == 1:
        return [gateway.create_key(actor.name, actor.tier, account=actor.account, metadata=metadata)]
    # One client name for all its accounts: forensics corrects for every client it tests.
    return [gateway.create_key(actor.name, actor.tier, account=f"{actor.account}-{n}", metadata=metadata)
            for n in range(actor.accounts)]


def _sign_up_history(gateway: GatewayProcess) -> None:
    """A week of sign-ups before the demo, as the operator's own store would hold: the
    baseline the sign-up surge watch compares the demo's accounts with."""
    now = datetime.now(UTC)
    for n in range(HISTORY_SIGNUPS):
        created = now - timedelta(days=7) + timedelta(hours=2 * n)
        status, body = http_json("PUT", f"{gateway.url}/admin/v1/accounts/customer-{n}",
                                 {"created_at": created.isoformat(), "paid_usd": 20.0}, token=gateway.admin_token)
        if status != 200:
            raise RuntimeError(f"registering a past account failed: {status} {body}")


def _await_surge(gateway: GatewayProcess, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The surges the gateway found, once its registry's polls have seen every hydra
    account: a poll that lands while the keys are still being created finds a surge of
    the first few, which grows with the next polls."""
    deadline = time.monotonic() + timeout
    while True:
        _, view = http_json("GET", gateway.url + "/admin/v1/signups", token=gateway.admin_token)
        surges: list[dict[str, Any]] = view.get("surges", [])
        whole = bool(surges) and surges[-1]["accounts"] >= HYDRA_ACCOUNTS
        if whole or time.monotonic() > deadline:
            return surges
        time.sleep(0.1)


def _surge_line(surges: Sequence[dict[str, Any]]) -> str:
    if not surges:
        return "no sign-up surge found"
    surge = surges[-1]
    return (f"one sign-up surge of {surge['accounts']} accounts where {surge['expected']:.1f} were expected, "
            "every unverified one held")


def demo_config(upstream_url: str, workdir: Path,
                confidential: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "upstreams": [
            {
                "name": "demo",
                "url": upstream_url,
                "kind": "openai",
                "models": [CHAT_MODEL, EMBED_MODEL],
            },
            {"name": "classifiers", "url": upstream_url, "kind": "oip", "models": [CLASSIFIER]},
        ],
        "store": f"sqlite:///{workdir / 'modelfence.db'}",
        "secret_file": str(workdir / "modelfence.secret"),
        "admin_token": secrets.token_urlsafe(24),
        "server": {"trusted_proxies": ["127.0.0.0/8"]},  # actors name their address in XFF
        "forensics": {"allowed_suspect_urls": ["127.0.0.1"]},  # the copied model, on loopback
        # Off-distribution digits are answered by each client's region mark.
        "watermark": {"labels": {"regions": {CLASSIFIER: {
            "profile_file": str(workdir / "digits" / private_digits.PROFILE_FILE)}}}},
        "limits": {
            "backend": "memory",
            "tiers": {
                "default": {
                    "requests_per_minute": 60,
                    "tokens_per_minute": 50_000,
                    "concurrent_requests": 4,
                    "usd_per_day": 5,
                },
                "trial": {
                    "requests_per_minute": 4,
                    "tokens_per_minute": 2_000,
                    "concurrent_requests": 1,
                    "usd_per_day": 0.5,
                },
            },
        },
        # A new account's first days: 80 rows (images, texts, prompts) a day, not the default 300,
        # so that the newcomer meets its allowance within the demo.
        "accounts": {"allowances": {"probation": {"rows_per_day": 80}}},
        "prices": {
            CHAT_MODEL: {"input_per_1k_tokens": 0.0005, "output_per_1k_tokens": 0.0015},
            EMBED_MODEL: {"input_per_1k_tokens": 0.0001},
            CLASSIFIER: {"per_request": 0.0001},
        },
        **({"confidential": confidential} if confidential else {}),
    }


def _seal_digits_head(workdir: Path, token: str) -> dict[str, Any]:
    """The model owner's part: seal the digits head under a new key-encryption key, and the
    gateway's key-broker config that releases it only to the measured worker (``sim``)."""
    folder = workdir / "digits"
    kek = write_key_file(workdir / "broker.key", "confidential.kek_file")
    platform = private_digits.prepare(folder, kek)
    return {
        "enabled": True,
        "token": token,
        "kek_file": str(workdir / "broker.key"),
        "audit_log": str(workdir / "confidential-audit.jsonl"),
        "tee_types": ["sim"],
        "measurements": [measurement(private_digits.WORKER_CONFIG)],
        "sim_platform_public_key": platform.public_key().public_bytes_raw().hex(),
        "min_artifact_versions": {private_digits.ARTIFACT_ID: 1},
    }


def _confidential_summary(gateway: GatewayProcess, upstream: ServiceProcess) -> tuple[str, bool]:
    """What the key broker decided for the digits head, and whether the worker serves it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the upstream provisions once the gateway answers
        status, _ = http_json("GET", upstream.url + f"/healthz?ready={CLASSIFIER}")
        if status == 200:
            break
        time.sleep(0.2)
    _, audit = http_json("GET", gateway.url + "/admin/v1/confidential/audit",
                         token=gateway.admin_token)
    _, ready = http_json("GET", gateway.url + "/readyz")
    released = [r for r in audit.get("data", []) if r.get("decision") == "released"]
    level = str(ready.get("confidential", {}).get("security_level", "off"))
    if not released:
        return f"confidential: no key release recorded ({audit.get('data')})", False
    record = released[-1]
    return (
        f"confidential: key of {record['artifact_id']} v{record['version']} released to the "
        f"attested worker (measurement {record['measurement'][:16]}…, tee {record['tee_type']}); "
        f"the worker serves {CLASSIFIER}'s head. Security level: {level.upper()}"
        + (" (no TEE on this machine: nothing here is protected by hardware)"
           if level == "simulated" else ""),
        status == 200,
    )


def _table(actors: Sequence[Actor], sessions: dict[str, Session], title: str) -> Table:
    table = Table(title=title)
    for column in ("client", "tier", "role"):
        table.add_column(column)
    for column in ("requests", "ok", "429", "401", "403", "tokens"):
        table.add_column(column, justify="right")
    table.add_column("last")
    for actor in actors:
        s = sessions[actor.name]
        table.add_row(
            actor.name,
            actor.tier,
            actor.role,
            str(s.requests),
            str(s.statuses[200]),
            str(s.statuses[429]),
            str(s.statuses[401]),
            str(s.statuses[403]),
            str(s.tokens),
            s.last,
        )
    return table


def _limit_decisions(metrics: str) -> dict[str, float]:
    decisions: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("modelfence_limit_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            decision = labels.split('decision="')[1].split('"')[0]
            dimension = labels.split('dimension="')[1].split('"')[0]
            name = decision if decision == "allowed" else f"denied ({dimension})"
            decisions[name] = decisions.get(name, 0) + float(value)
    return decisions


def _detections(
    console: Console, scored: Sequence[dict[str, Any]], sessions: dict[str, Session]
) -> set[str]:
    """Print who detection flagged, when and why; return their names."""
    table = Table(title="detection: who was flagged, when, and why")
    for column in ("client", "level", "risk", "refused from request", "entity", "top reason"):
        table.add_column(column)
    flagged = set()
    for record in scored:
        session = sessions.get(record["client"])
        first = session.first_refusal if session else None
        if record["level"] == "normal" and first is None:
            continue
        flagged.add(record["client"])
        reason = record["reasons"][0]["text"] if record["reasons"] else ""
        table.add_row(record["client"], record["level"], f"{record['risk']:.2f}",
                      str(first or "-"), record["entity"] or "-", reason)
    console.print(table)
    return flagged


def _copy_classifier(stolen: Sequence[tuple[np.ndarray, np.ndarray]]) -> Any:
    """The copycat's own classifier, trained the careful way: it stops when a tenth of its
    bought labels, held out, stop improving (so it does not memorise single answers)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    images = np.concatenate([x for x, _ in stolen])
    labels = np.concatenate([y for _, y in stolen])
    network = MLPClassifier((256,), early_stopping=True, validation_fraction=0.1,
                            n_iter_no_change=5, max_iter=30, random_state=0)
    with warnings.catch_warnings():  # stopping at max_iter is the point, not news
        warnings.simplefilter("ignore", ConvergenceWarning)
        return network.fit(images / 16, labels)


def _trace(gateway: GatewayProcess, sessions: dict[str, Session]) -> tuple[Table, dict[str, str | None]]:
    """Forensics: which account took the answers that leaked and the classifier that was copied."""
    from modelfence.redteam.suspects import classifier_server

    table = Table(title="forensics: where did the leaked answers and the copied model come from?")
    for column in ("evidence", "traced to", "p-value", "how"):
        table.add_column(column)
    named: dict[str, str | None] = {}
    leaked = sessions["carol"].kept_text
    if leaked:
        status, verdict = http_json("POST", gateway.url + "/admin/v1/verify/text",
                                    {"text": "\n\n".join(leaked)},
                                    token=gateway.admin_token, timeout=300)
        named["leak"] = verdict.get("client") if status == 200 else None
        table.add_row(f"{len(leaked)} answers posted online", named["leak"] or "nobody",
                      f"{verdict.get('p_value', 1.0):.1e}",
                      f"text mark, {verdict.get('tokens_scored', 0)} token pairs")
    stolen = sessions["copycat"].kept_labels
    if stolen:
        clone = _copy_classifier(stolen)
        with classifier_server(lambda x: clone.predict_proba(x / 16), CLASSIFIER) as suspect:
            status, verdict = http_json(
                "POST", gateway.url + "/admin/v1/verify/model",
                {"url": suspect.url, "kind": "classifier", "model": CLASSIFIER},
                token=gateway.admin_token, timeout=300,
            )
        named["clone"] = verdict.get("client") if status == 200 else None
        table.add_row(f"a classifier trained on {sum(len(y) for _, y in stolen)} bought labels, "
                      "stopped early",
                      named["clone"] or "nobody", f"{verdict.get('p_value', 1.0):.1e}",
                      f"region mark, {verdict.get('samples', 0)} noisy probes asked")
    return table, named


def run_demo(console: Console, actors: Sequence[Actor] = ACTORS) -> int:
    with tempfile.TemporaryDirectory(prefix="modelfence-demo-") as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        console.print(
            "[bold]ModelFence demo[/bold]: starting the demo upstream (SmolLM2, MiniLM, "
            "digits; the first run prepares SmolLM2 once, later runs take seconds) …"
        )
        started = time.monotonic()
        # The secret is made here, before either process starts, so that the upstream can
        # be given the mark channel key and mark each client's text while sampling.
        secret_file = workdir / "modelfence.secret"
        secret_file.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        keyring = WatermarkKeyring(load_server_secret(None, secret_file))
        broker_token = secrets.token_urlsafe(24)
        confidential = _seal_digits_head(workdir, broker_token)
        gateway_port = free_port()
        upstream = ServiceProcess(
            modelfence_command("demo-upstream", "--port", str(upstream_port),
                               "--private-digits", str(workdir / "digits")),
            port=upstream_port,
            # digits waits for the gateway's key broker, which starts next.
            ready_path=f"/healthz?ready={EMBED_MODEL},{CHAT_MODEL}",
            env={MARK_SECRET_ENV: keyring.channel_key().hex(),
                 private_digits.BROKER_URL_ENV: f"http://127.0.0.1:{gateway_port}",
                 private_digits.BROKER_TOKEN_ENV: broker_token},
            log_file=workdir / "demo-upstream.log",
            ready_timeout=900,
        )
        with upstream:
            console.print(
                f"  upstream ready in {time.monotonic() - started:.1f}s on {upstream.url}"
            )
            gateway = GatewayProcess(demo_config(upstream.url, workdir, confidential), workdir,
                                     port=gateway_port)
            with gateway:
                console.print(f"  gateway ready on {gateway.url} (SQLite, in-process limits)")
                sealed, serving = _confidential_summary(gateway, upstream)
                console.print(f"  {sealed}\n", highlight=False)
                _sign_up_history(gateway)
                sessions = {a.name: Session(gateway.url, _keys(gateway, a), a.address) for a in actors}
                surges = _await_surge(gateway)
                with Live(
                    _table(actors, sessions, "running …"), console=console, refresh_per_second=8
                ) as live:
                    for round_ in range(max(len(a.steps) for a in actors)):
                        for actor in actors:
                            if round_ < len(actor.steps):
                                actor.steps[round_](sessions[actor.name])
                                live.update(_table(actors, sessions, "running …"))
                    live.update(_table(actors, sessions, "summary"))
                _, metrics = http_json("GET", gateway.url + "/metrics")
                time.sleep(2)  # the detector's last verdicts reach the admin API
                _, scored = http_json("GET", gateway.url + "/admin/v1/clients",
                                      token=gateway.admin_token)
                forensics, named = _trace(gateway, sessions)
        decisions = _limit_decisions(metrics)
        console.print(
            "limit decisions: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(decisions.items()))
        )
        flagged = _detections(console, scored.get("data", []), sessions)
        probation = sessions["newcomer"].refusals.get("probation_limit")
        console.print(f"newcomer (a new, unverified account): {probation or 'never limited'}",
                      highlight=False)
        hydra = sessions["hydra"]
        console.print(
            f"hydra ({HYDRA_ACCOUNTS} accounts signed up in one second): {_surge_line(surges)}; "
            f"{hydra.statuses[200]} of {hydra.requests} queries answered. "
            f"{hydra.refusals.get('probation_limit', '')}\n",
            highlight=False,
        )
        console.print(forensics)
        ok = (
            sessions["alice"].statuses[200] == len(actors[0].steps)
            and sessions["trial-user"].statuses[429] > 0
            and probation is not None
            and surges
            and hydra.statuses[200] == 0
            and "thief" in flagged
            and not flagged & {"alice", "bob"}
            and named == {"leak": "carol", "clone": "copycat"}
            and serving
        )
        console.print(
            "[green]demo finished[/green]" if ok else "[red]demo finished with surprises[/red]"
        )
        return 0 if ok else 1
