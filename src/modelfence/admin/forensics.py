"""Admin routes of forensics: ``POST /admin/v1/verify/text`` and ``/admin/v1/verify/model``.

The same verdicts as ``modelfence verify`` (see :mod:`modelfence.forensics.service`); bad
input answers 400 and an unreachable suspect 502, each with the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from modelfence.forensics.errors import SuspectUnreachable, VerifyError
from modelfence.forensics.radioactivity import DEFAULT_PROBES
from modelfence.forensics.service import ChatProbe, Forensics

MAX_PROMPTS = 1000


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    kind: Literal["chat", "classifier", "embeddings"]
    model: str | None = Field(None, description="model name at the suspect (default: the demo's)")
    api_key: str | None = None
    # kind "chat" only: the radioactivity probe.
    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)
    client: str | None = Field(None, description="supervised: test only this client's keys")
    max_tokens: int = Field(128, ge=1, le=1024, description="tokens asked per answer")

    def chat_probe(self) -> ChatProbe:
        prompts = tuple(self.prompts) if self.prompts else DEFAULT_PROBES
        return ChatProbe(prompts, self.client, self.max_tokens)


def forensics_router(forensics: Forensics) -> APIRouter:
    router = APIRouter(prefix="/v1/verify", tags=["forensics"])

    @router.post("/text")
    async def verify_text(body: TextRequest) -> dict[str, Any]:
        """Is this text ours, which client, p-value and tokens scored (at-source marks), and
        the same for after-the-fact marks under ``after_the_fact``."""
        try:
            return await forensics.text(body.text)
        except VerifyError as exc:
            raise HTTPException(400, str(exc)) from exc

    @router.post("/model")
    async def verify_model(body: ModelRequest) -> dict[str, Any]:
        """Query a suspect model and test it for each client's marks."""
        try:
            return await forensics.model(body.url, body.kind, body.model, body.api_key,
                                         chat=body.chat_probe())
        except SuspectUnreachable as exc:
            raise HTTPException(502, str(exc)) from exc
        except VerifyError as exc:
            raise HTTPException(400, str(exc)) from exc

    return router
