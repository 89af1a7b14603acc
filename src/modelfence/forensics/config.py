"""The ``forensics:`` config section: what the admin API's ``verify model`` may query."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelfence.forensics.allowlist import parse_entry


class ForensicsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_suspect_urls: tuple[str, ...] = Field(
        (),
        description=(
            "suspect APIs `POST /admin/v1/verify/model` may query: base URLs "
            "(scheme, host, port and path prefix must match) or bare hosts (any port); "
            "empty refuses every URL. The `modelfence verify model` command is not limited."
        ),
    )

    @field_validator("allowed_suspect_urls")
    @classmethod
    def _entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parse_entry(entry)
        return value
