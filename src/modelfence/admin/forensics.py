"""Admin routes of forensics: ``POST /admin/v1/verify/text`` and ``/admin/v1/verify/model``.

The same verdicts as ``modelfence verify`` (see :mod:`modelfence.forensics.service`). Bad
input answers 400 or 422, a suspect URL the config does not list 403, an unreachable
suspect 502, and a verification whose optional parts are not installed 501, each with the
reason. Unlike the command line, ``verify/model`` queries only the suspects listed under
``forensics.allowed_suspect_urls`` (see :mod:`modelfence.forensics.allowlist`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from modelfence.admin.errors import error_responses
from modelfence.admin.names import Name
from modelfence.forensics.allowlist import SuspectAllowList
from modelfence.forensics.config import ForensicsConfig
from modelfence.forensics.errors import VerifyError, translated
from modelfence.forensics.fields import MaxTokens, SuspectKey, SuspectKind, SuspectUrl
from modelfence.forensics.model import ModelVerdict
from modelfence.forensics.radioactivity import DEFAULT_PROBES
from modelfence.forensics.service import ChatProbe, Forensics, TextReport

MAX_PROMPTS = 1000
MAX_TEXT = 200_000  # characters; far more than a verdict needs


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: SuspectUrl = Field(
        description="base URL of the suspect API, listed in `forensics.allowed_suspect_urls`"
    )
    kind: SuspectKind
    model: Name | None = Field(None, description="model name at the suspect (default: the demo's)")
    api_key: SuspectKey | None = Field(None, description="bearer key for the suspect")
    # kind "chat" only: the radioactivity probe.
    prompts: list[Annotated[str, Field(max_length=10_000)]] | None = Field(
        None, min_length=1, max_length=MAX_PROMPTS
    )
    client: Name | None = Field(None, description="supervised: test only this client's keys")
    max_tokens: MaxTokens = 128
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="asks the suspect to sample reproducibly"
    )

    def chat_probe(self) -> ChatProbe:
        prompts = tuple(self.prompts) if self.prompts else DEFAULT_PROBES
        return ChatProbe(prompts, self.client, self.max_tokens, self.seed)


def forensics_router(forensics: Forensics, config: ForensicsConfig) -> APIRouter:
    router = APIRouter(
        prefix="/v1/verify", tags=["forensics"], responses=error_responses(400, 401, 422, 501, 503)
    )
    suspects = SuspectAllowList(config.allowed_suspect_urls)

    @router.post("/text")
    async def verify_text(body: TextRequest) -> TextReport:
        """Is this text ours, which client, p-value and tokens scored (at-source marks), and
        the same for after-the-fact marks under ``after_the_fact``."""
        try:
            return await forensics.text(body.text)
        except VerifyError as exc:
            raise translated(exc) from exc

    @router.post("/model", responses=error_responses(403, 502))
    async def verify_model(body: ModelRequest) -> ModelVerdict:
        """Query a suspect model (one the config allows) and test it for each client's marks."""
        try:
            suspects.check(body.url)
            return await forensics.model(
                body.url, body.kind, body.model, body.api_key, chat=body.chat_probe()
            )
        except VerifyError as exc:
            raise translated(exc) from exc

    return router
