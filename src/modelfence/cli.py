"""The ``modelfence`` command: one Typer per noun, joined here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from copy import copy as clone
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from modelfence.confidential.cli import inspect_command, measure_command, seal_command
from modelfence.config import Config, load_config
from modelfence.errors import ConfigError, ModelFenceError
from modelfence.forensics.cli import verify_app
from modelfence.identity.base import ApiKeyRecord, KeyStore


def _config_after_subcommand(ctx: Any, _param: Any, value: Path | None) -> Path | None:
    if value is not None:
        ctx.find_root().obj = value  # the one place commands read the config path from
    return value


class _ConfigAnywhere(TyperGroup):
    """The root command: ``--config``/``-c`` also works after any subcommand.

    ``modelfence serve --config x.yaml`` is how users of uvicorn and LiteLLM type it. The
    root's own option is copied onto every command below it, where it sets the same value.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        option = next(p for p in self.params if p.name == "config")
        after = clone(option)
        after.expose_value = False
        after.callback = _config_after_subcommand
        pending = list(self.commands.values())
        while pending:
            command = pending.pop()
            if not any(p.name == "config" for p in command.params):
                command.params.append(after)
            if isinstance(command, TyperGroup):
                pending.extend(command.commands.values())


app = typer.Typer(
    cls=_ConfigAnywhere,
    name="modelfence",
    help="Protect a model-inference API from extraction: keys, limits, detection, watermarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys (acts on the configured store).")
config_app = typer.Typer(help="Check configuration files.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(verify_app, name="verify")
app.command("seal")(seal_command)
app.command("inspect")(inspect_command)
app.command("measure-worker")(measure_command)

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config file (default: $MODELFENCE_CONFIG or ./modelfence.yaml)"),
]


def _load(ctx: typer.Context) -> Config:
    try:
        return load_config(ctx.find_root().obj)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from exc


@app.callback()
def main_callback(ctx: typer.Context, config: ConfigOption = None) -> None:
    ctx.obj = config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="bind address (default: server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: server.port)")] = None,
) -> None:
    """Run the gateway."""
    config = _load(ctx)
    from modelfence.app import create_app
    from modelfence.gateway.server import run_gateway

    _setup_logging(config.log_level)
    gateway = create_app(config)
    run_gateway(
        gateway,
        config.server,
        on_close=gateway.metrics.connection_closed,
        on_gc_pause=gateway.metrics.gc_pause,
        host=host or config.server.host,
        port=config.server.port if port is None else port,
        log_level=config.log_level,
    )


@app.command("demo-upstream")
def demo_upstream(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 9000,
    max_logprobs: Annotated[
        int, typer.Option(help="cap on top_logprobs (OpenAI: 20); like vLLM's --max-logprobs")
    ] = 20,
    mark_secret_file: Annotated[
        Path | None,
        typer.Option(help="file with the mark channel key (`modelfence keys mark-secret`); "
                          "default: $MODELFENCE_MARK_SECRET; without it text is not marked"),
    ] = None,
    llm_dir: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False,
                     help="serve this saved SmolLM2 copy (e.g. a fine-tuned suspect) instead"),
    ] = None,
    private_digits: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False,
                     help="serve digits with its sealed head in the isolated worker, from this "
                          "folder; the key comes from the gateway's key broker "
                          "($MODELFENCE_BROKER_URL, $MODELFENCE_BROKER_TOKEN: its confidential.token)"),
    ] = None,
) -> None:
    """Serve the demo models (SmolLM2 chat, MiniLM embeddings, digits classifier)."""
    from modelfence.demo.upstream import run_demo_upstream
    from modelfence.watermark.channel import load_mark_secret

    _setup_logging("info")
    try:
        mark_secret = load_mark_secret(mark_secret_file)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    run_demo_upstream(host, port, max_logprobs=max_logprobs, mark_secret=mark_secret,
                      llm_dir=str(llm_dir) if llm_dir else None,
                      private_digits=str(private_digits) if private_digits else None)


@app.command()
def demo(ctx: typer.Context) -> None:
    """Start the demo upstream and the gateway, run a short scenario, print what happened."""
    from modelfence.demo.scenario import run_demo

    raise typer.Exit(run_demo(Console(width=max(console.width, 120))))


@app.command()
def detect(
    ctx: typer.Context,
    worker: Annotated[int, typer.Option(help="this worker's number, 0-based")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="how many workers share the partitions")] = 1,
) -> None:
    """Run a detection worker on the Redis event streams (config detection.feed: redis)."""
    from modelfence.detect.process import run_worker
    from modelfence.heap import freeze_startup

    config = _load(ctx)
    _setup_logging(config.log_level)
    if config.detection.feed != "redis":
        errors.print("[red]error:[/red] detection.feed is 'process': `serve` runs the detector itself")
        raise typer.Exit(2)
    try:
        asyncio.run(run_worker(config, worker, workers, on_ready=freeze_startup))
    except (ValueError, ModelFenceError) as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        pass


@app.command()
def calibrate(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option(help="the reference file to write (set detection.reference_file to it)")] = Path("reference.npz"),
    clients: Annotated[int, typer.Option(min=50, help="honest clients to calibrate on")] = 2_000,
    seed: Annotated[int, typer.Option(help="seed of the population")] = 0,
) -> None:
    """Calibrate detection on the built-in honest population (real prompts, human timing).

    Thresholds are set at detection.target_fpr of honest clients; MMD, coverage and
    out-of-distribution detection need the file. A starting point: recalibrate on your own
    traffic with modelfence.detect.calibration.calibrate when you have it.
    """
    config = _load(ctx)
    try:
        from modelfence.redteam.defences import calibrate_reference
    except ImportError as exc:
        errors.print(f"[red]error:[/red] calibration needs the redteam extra: {exc}", highlight=False)
        raise typer.Exit(2) from exc
    reference = calibrate_reference(output, seed=seed, clients=clients, config=config.detection)
    for code, value in sorted(reference.thresholds.items()):
        console.print(f"{code:22} {value:.4g}", highlight=False)
    console.print(f"wrote {output}: set detection.reference_file to it", highlight=False)


@app.command()
def redteam(
    suite: Annotated[str, typer.Option(help="ci (about 8 minutes on 2 cores) or full (the baseline, about 25)")] = "ci",
    scenario: Annotated[str | None, typer.Option(help="run only these scenarios (comma-separated names; adaptive, hydra and paced-hydra are the v2 week-long replays)")] = None,
    gateway: Annotated[str | None, typer.Option(help="drive this gateway (admin token from $MODELFENCE_ADMIN_TOKEN) instead of starting a demo stack")] = None,
    output: Annotated[Path, typer.Option(help="folder for results.json, report.md and plots")] = Path("redteam-results"),
    seed: Annotated[int, typer.Option(help="seed for every random choice")] = 0,
    defended: Annotated[bool, typer.Option(help="own stack with every defence on (detection calibrated on honest traffic, request policy, hardening) instead of the limits-only baseline")] = False,
) -> None:
    """Drive honest and extraction traffic through a gateway and report what happened."""
    import os

    from modelfence.redteam import run_redteam

    try:
        report = run_redteam(
            suite, scenario=scenario, gateway_url=gateway, output=output, seed=seed,
            admin_token=os.environ.get("MODELFENCE_ADMIN_TOKEN"), defended=defended,
            on_done=lambda r: console.print(f"{r.name}: done in {r.seconds} s", highlight=False),
        )
    except ValueError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    except (RuntimeError, OSError) as exc:  # no stack, no gateway, or a key was refused
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    console.print(f"report: {report}", highlight=False)


T = TypeVar("T")


def _with_store(config: Config, action: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run one store operation from the command line; store errors exit 1 with the reason."""
    from modelfence.identity import SqlKeyStore, load_server_secret
    from modelfence.store import create_tables, open_engine

    async def run() -> T:
        engine = open_engine(config.store)
        try:
            await create_tables(engine)
            secret = load_server_secret(config.secret, config.secret_file)
            prefixes = config.fingerprint
            store = SqlKeyStore(
                engine,
                secret,
                ipv4_prefix=prefixes.ipv4_prefix,
                ipv6_prefix=prefixes.ipv6_prefix,
            )
            return await action(store)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except ModelFenceError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    client: Annotated[str, typer.Option(help="the client (customer) this key belongs to")],
    tier: Annotated[str, typer.Option(help="limits tier from the config")] = "default",
    account: Annotated[
        str | None, typer.Option(help="the account (organisation) the key belongs to")
    ] = None,
    organisation: Annotated[str | None, typer.Option(help="verified organisation")] = None,
    payment: Annotated[
        str | None, typer.Option(help="payment instrument fingerprint from the processor")
    ] = None,
    signup_address: Annotated[
        str | None, typer.Option(help="IP address the account signed up from")
    ] = None,
    email_domain: Annotated[str | None, typer.Option(help="e-mail domain (or address)")] = None,
    created_at: Annotated[
        datetime | None,
        typer.Option(help="account sign-up time, UTC (default: now)", formats=["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    ] = None,
    verified: Annotated[
        bool | None, typer.Option("--verified/--unverified", help="organisation verified")
    ] = None,
    paid_usd: Annotated[float | None, typer.Option(help="paid to date, in dollars")] = None,
) -> None:
    """Create a key, optionally in an account with its sign-up metadata (stored hashed).

    The key itself is printed once, as the last line.
    """
    from modelfence.identity.accounts import InvalidMetadata
    from modelfence.identity.base import AccountMetadata

    config = _load(ctx)
    if tier not in config.limits.tiers:
        errors.print(f"[red]error:[/red] unknown tier {tier!r}; configured: {', '.join(config.limits.tiers)}")
        raise typer.Exit(2)
    metadata = AccountMetadata(
        organisation=organisation,
        payment=payment,
        signup_address=signup_address,
        email_domain=email_domain,
        created_at=None if created_at is None else created_at.replace(tzinfo=UTC),
        verified=verified,
        paid_usd=paid_usd,
    )
    if account is None and metadata != AccountMetadata():
        errors.print("[red]error:[/red] account metadata needs --account", highlight=False)
        raise typer.Exit(2)

    async def create(store: KeyStore) -> tuple[ApiKeyRecord, str]:
        if account is not None and metadata != AccountMetadata():
            await store.put_account(account, metadata)
        return await store.create(client, tier, account)

    try:
        record, secret = _with_store(config, create)
    except InvalidMetadata as exc:
        errors.print(f"[red]error:[/red] --{exc.field.replace('_', '-')}: {exc.reason}", highlight=False)
        raise typer.Exit(2) from exc
    where = "" if record.account is None else f", account {record.account!r}"
    console.print(
        f"created {record.key_id} for client {record.client!r} (tier {record.tier}{where})",
        highlight=False,
    )
    console.print("store the key now; it cannot be shown again:", highlight=False)
    print(secret)


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """List keys (ids and prefixes only; secrets are never stored)."""
    config = _load(ctx)
    records = _with_store(config, lambda store: store.list())
    table = Table("key id", "client", "account", "tier", "prefix", "created", "status")
    for r in records:
        status = "active" if r.active else f"revoked {r.revoked_at:%Y-%m-%d %H:%M}"
        table.add_row(
            r.key_id, r.client, r.account or "-", r.tier, r.prefix + "…",
            f"{r.created_at:%Y-%m-%d %H:%M}", status,
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="e.g. key_3f9a…")]) -> None:
    """Revoke a key; every replica refuses it within 2 seconds."""
    config = _load(ctx)
    record = _with_store(config, lambda store: store.revoke(key_id))
    console.print(f"revoked {record.key_id} (client {record.client!r})", highlight=False)


@keys_app.command("mark-secret")
def keys_mark_secret(ctx: typer.Context) -> None:
    """Print the mark channel key a self-hosted model server needs to mark text per client.

    It is derived from the server secret and reveals no client's watermark key; give it to
    the model server (`modelfence demo-upstream --mark-secret-file`), never to clients.
    """
    from modelfence.identity import load_server_secret
    from modelfence.watermark.keys import WatermarkKeyring

    config = _load(ctx)
    try:
        secret = load_server_secret(config.secret, config.secret_file)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    print(WatermarkKeyring(secret).channel_key().hex())


@config_app.command("check")
def config_check(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Argument(help="config file to check (default: --config)")] = None,
) -> None:
    """Validate a config file offline; exit 2 with the bad key on error."""
    try:
        config = load_config(path or ctx.find_root().obj)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    console.print(
        f"ok: {len(config.upstreams)} upstream(s), {len(config.limits.tiers)} tier(s), "
        f"store {config.store.split('://')[0]}, limits {config.limits.backend.split('://')[0]}",
        highlight=False,
    )


def main() -> None:
    app()
