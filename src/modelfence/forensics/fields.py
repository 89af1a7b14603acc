"""The bounds of a ``verify model`` request, shared by the admin API and the console."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from modelfence.forensics.allowlist import parse_url
from modelfence.forensics.errors import VerifyError


def _suspect_url(url: str) -> str:
    try:
        parse_url(url)
    except VerifyError as exc:
        raise ValueError(str(exc)) from exc
    return url


SuspectUrl = Annotated[str, Field(max_length=2000), AfterValidator(_suspect_url)]
SuspectKind = Literal["chat", "classifier", "embeddings"]
SuspectKey = Annotated[str, Field(min_length=1, max_length=1000, pattern="^[\\x21-\\x7e]+$")]
MaxTokens = Annotated[int, Field(ge=1, le=1024, description="tokens asked per answer")]
