"""``modelfence verify text|model``: the forensics noun of the command line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated

import typer

from modelfence.config import load_config
from modelfence.errors import ConfigError, ModelFenceError
from modelfence.forensics.model import ModelVerdict
from modelfence.forensics.radioactivity import DEFAULT_PROBES
from modelfence.forensics.service import ChatProbe, Forensics, TextReport

Report = TextReport | ModelVerdict

verify_app = typer.Typer(help="Trace leaked text or a cloned model back to a client.")


def _run(ctx: typer.Context, action: Callable[[Forensics], Awaitable[Report]]) -> None:
    from modelfence.identity import load_server_secret
    from modelfence.store import create_tables, open_engine
    from modelfence.watermark.keys import WatermarkKeyring
    from modelfence.watermark.regions import load_profiles

    async def run() -> Report:
        config = load_config(ctx.find_root().obj)
        engine = open_engine(config.store)
        try:
            await create_tables(engine)
            secret = load_server_secret(config.secret, config.secret_file)
            keyring = WatermarkKeyring(secret, version=config.watermark.key_version)
            profiles = load_profiles(config.watermark.labels.regions)
            return await action(Forensics(engine, keyring, config.watermark, profiles))
        finally:
            await engine.dispose()

    try:
        report = asyncio.run(run())
    except (ConfigError, ModelFenceError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from exc
    typer.echo(json.dumps(report.as_dict(), indent=2))


@verify_app.command("text")
def verify_text_command(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="text file, or - for standard input")],
) -> None:
    """Is this text marked by us, for which client, with what p-value (JSON report; the
    verdict of after-the-fact marks under "after_the_fact")."""
    text = sys.stdin.read() if file == "-" else _read(file)
    _run(ctx, lambda f: f.text(text))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
        raise typer.Exit(1) from exc


@verify_app.command("model")
def verify_model_command(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Option(
            help="base URL of the suspect API (any URL: `forensics.allowed_suspect_urls` "
            "limits only the admin API's verify/model)"
        ),
    ],
    kind: Annotated[str, typer.Option(help="chat | classifier | embeddings")],
    model: Annotated[
        str | None, typer.Option(help="model name at the suspect (default: the demo's)")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="bearer key for the suspect")] = None,
    prompts: Annotated[
        str | None, typer.Option(help="chat: file of prompts, one per line (default: built-in)")
    ] = None,
    client: Annotated[
        str | None, typer.Option(help="chat: supervised, test only this client's keys")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024, help="chat: tokens per answer")] = 128,
    seed: Annotated[
        int | None,
        typer.Option(min=0, max=2**63 - 1, help="chat: ask the suspect to sample reproducibly"),
    ] = None,
) -> None:
    """Query a suspect model and test it for a client's marks (JSON report)."""
    probe = ChatProbe(
        tuple(line.strip() for line in _read(prompts).splitlines() if line.strip())
        if prompts else DEFAULT_PROBES,
        client, max_tokens, seed,
    )
    _run(ctx, lambda f: f.model(url, kind, model, api_key, chat=probe))
