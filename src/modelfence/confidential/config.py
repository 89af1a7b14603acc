"""The ``confidential:`` config section: the gateway's key broker for sealed model parts.

The model server (where the isolated worker runs) asks the gateway's broker routes
(``/confidential/v1``, behind a token of their own, not the admin token) for a challenge
and a key release; this section says what the broker accepts. ``sim`` is the only
platform on machines without a TEE, and everything it attests is labelled ``simulated``;
the ``production`` profile refuses it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TeeType = Literal["sim", "tdx", "sev-snp", "nitro"]
_MEASUREMENT = re.compile(r"[0-9a-f]{96}")
_ARTIFACT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ConfidentialConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="serve the key broker under /confidential/v1")
    token: str | None = Field(
        None, min_length=16, repr=False,
        description="bearer token of the broker's routes (/confidential/v1/...), for model "
                    "servers; env MODELFENCE_BROKER_TOKEN. Not the admin token",
    )
    profile: Literal["development", "production"] = Field(
        "development", description="production refuses sim and debug evidence"
    )
    kek_file: str | None = Field(
        None, description="the key-encryption key (`modelfence seal --new-key`), mode 0600"
    )
    audit_log: str | None = Field(
        None, description="hash-chained JSON lines of every release decision; none keeps them in memory"
    )
    tee_types: tuple[TeeType, ...] = ("sim",)
    measurements: tuple[str, ...] = Field(
        (), description="allowed worker measurements: SHA-384, 96 lowercase hex digits"
    )
    min_security_version: int = Field(1, ge=0, le=2**32 - 1)
    min_artifact_versions: dict[str, int] = Field(
        default_factory=dict, description="artifact id -> lowest release version (no rollback)"
    )
    sim_platform_public_key: str | None = Field(
        None, description="the sim platform's Ed25519 public key, 64 hex digits"
    )
    nonce_ttl_seconds: float = Field(60.0, gt=0, le=3600)

    @field_validator("measurements")
    @classmethod
    def _measurements(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for measurement in value:
            if not _MEASUREMENT.fullmatch(measurement):
                raise ValueError("each measurement is 96 lowercase hex digits (SHA-384)")
        return value

    @field_validator("min_artifact_versions")
    @classmethod
    def _versions(cls, value: dict[str, int]) -> dict[str, int]:
        for name, version in value.items():
            if not _ARTIFACT_ID.fullmatch(name):
                raise ValueError("artifact ids are 1-128 of A-Z a-z 0-9 . _ -")
            if not 1 <= version <= 2**31 - 1:
                raise ValueError(f"{name}: a version from 1 to 2147483647")
        return value

    @field_validator("sim_platform_public_key")
    @classmethod
    def _platform_key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("64 lowercase hex digits (a raw Ed25519 public key)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ConfidentialConfig:
        if not self.tee_types:
            raise ValueError("confidential.tee_types: name at least one of sim, tdx, sev-snp, nitro")
        if not self.enabled:
            return self
        if self.kek_file is None:
            raise ValueError("confidential.kek_file: required when confidential.enabled")
        if self.token is None:
            raise ValueError("confidential.token: required when confidential.enabled (or "
                             "MODELFENCE_BROKER_TOKEN); model servers present it, not the admin token")
        if not self.measurements:
            raise ValueError("confidential.measurements: name at least one worker measurement")
        if self.profile == "production" and "sim" in self.tee_types:
            raise ValueError("confidential.tee_types: the production profile refuses 'sim' "
                             "(simulated); allowed: tdx, sev-snp, nitro")
        if "sim" in self.tee_types and self.sim_platform_public_key is None:
            raise ValueError("confidential.sim_platform_public_key: required when tee_types "
                             "holds 'sim'")
        return self

    @property
    def security_level(self) -> str:
        """What the broker's releases can be worth: ``simulated`` if it accepts ``sim``."""
        if not self.enabled:
            return "off"
        return "simulated" if "sim" in self.tee_types else "hardware"
