"""What a verification needs from the deployment: the keyring, the clients, their ledgers.

Shared by ``modelfence verify`` and the admin routes, so both give the same verdicts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.forensics.errors import VerifyError
from modelfence.forensics.lexical import verify_lexical
from modelfence.forensics.model import Suspect, verify_classifier, verify_embeddings
from modelfence.forensics.text import demo_tokenizer, verify_text
from modelfence.store import transaction
from modelfence.store.schema import api_keys
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.embeddings import candidate_words, embedding_mark
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.ledger import ledger_clients, marked_inputs

# Benign probe sentences for the embedding test (the trigger probes append triggers to them).
BENIGN = tuple(
    f"{subject} {verb} the {thing} {when}."
    for subject in ("The team", "My friend", "A visitor", "Our neighbour")
    for verb in ("checked", "moved", "described", "ignored", "repaired")
    for thing, when in (("old table", "yesterday"), ("report", "this morning"))
)


@dataclass(frozen=True, slots=True)
class Forensics:
    engine: AsyncEngine
    keyring: WatermarkKeyring
    config: WatermarkConfig

    async def clients(self) -> list[str]:
        async with transaction(self.engine) as conn:
            rows = await conn.execute(select(api_keys.c.client).distinct())
            return sorted(r[0] for r in rows)

    async def text(self, text: str) -> dict[str, Any]:
        clients = await self.clients()
        # Tokenizer loading and scoring are CPU work: kept off the event loop.
        verdict = await asyncio.to_thread(
            lambda: verify_text(
                text, clients, self.keyring, tokenize=demo_tokenizer(), gamma=self.config.text.gamma
            )
        )
        lexical = await asyncio.to_thread(verify_lexical, text, clients, self.keyring)
        return {**verdict.as_dict(), "after_the_fact": lexical.as_dict()}

    async def model(self, url: str, kind: str, model: str, api_key: str | None) -> dict[str, Any]:
        suspect = Suspect(url, api_key)
        try:
            if kind == "classifier":
                ledgers = {c: await marked_inputs(self.engine, c) for c in await ledger_clients(self.engine)}
                verdict = await asyncio.to_thread(verify_classifier, suspect, model, ledgers)
                return verdict.as_dict()
            if kind == "embeddings":
                words = candidate_words()
                c = self.config.embeddings
                dim = (await asyncio.to_thread(suspect.embeddings, model, BENIGN[:1])).shape[1]
                marks = {
                    client: embedding_mark(self.keyring.key(client), dim, words, n_triggers=c.triggers,
                                           n_targets=c.targets, max_triggers=c.max_triggers)
                    for client in await self.clients()
                }
                result = await asyncio.to_thread(verify_embeddings, suspect, model, marks, BENIGN)
                return result.as_dict()
            raise VerifyError(f"unknown kind {kind!r}: use classifier or embeddings")
        finally:
            suspect.close()
