"""Admin routes of forensics: ``POST /admin/v1/verify/text`` and ``/admin/v1/verify/model``.

The same verdicts as ``modelfence verify`` (see :mod:`modelfence.forensics.service`); bad
input answers 400 and an unreachable suspect 502, each with the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from modelfence.forensics.errors import SuspectUnreachable, VerifyError
from modelfence.forensics.service import Forensics


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    kind: Literal["classifier", "embeddings"]
    model: str = "digits"
    api_key: str | None = None


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
            return await forensics.model(body.url, body.kind, body.model, body.api_key)
        except SuspectUnreachable as exc:
            raise HTTPException(502, str(exc)) from exc
        except VerifyError as exc:
            raise HTTPException(400, str(exc)) from exc

    return router
