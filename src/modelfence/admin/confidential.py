"""The key broker's HTTP face: where a model server's worker gets its sealed part's key.

``create_broker_app`` is mounted at ``/confidential`` behind a token of its own (not the
admin token: the model server that provisions workers gets nothing else):
``POST /confidential/v1/challenge`` issues a nonce; ``POST /confidential/v1/release`` takes
the sealed part's header, the worker's evidence over that nonce and its X25519 key, and
answers the data key wrapped to that worker (403 with the broker's reason when refused).
``confidential_audit_router`` adds ``GET /admin/v1/confidential/audit`` to the admin API:
the latest decisions held in memory. Every answer carries the broker's ``security_level``
(``simulated`` when it accepts ``sim``). The wrapped key is useless to anyone but the
attested worker, so it may cross the wire; the token should not cross it in the clear.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from modelfence import __version__
from modelfence.admin.auth import RequireAdminToken
from modelfence.admin.errors import EXCEPTION_HANDLERS, error_responses, invalid_field
from modelfence.confidential.attestation import Evidence
from modelfence.confidential.broker import KeyBroker, ReleaseRefused
from modelfence.confidential.sealing import SealedHeader, SealError, parse_header
from modelfence.errors import PermissionDenied
from modelfence.identity.failures import AuthFailures

log = logging.getLogger(__name__)

MAX_HEADER_CHARS = 2_000_000  # base64 of a manifest of several thousand tensors
MAX_EVIDENCE_CHARS = 90_000  # base64 of 64 KiB, the largest evidence a verifier reads
HEX_32 = "^[0-9a-f]{64}$"


class Challenge(BaseModel):
    nonce: str = Field(description="32 bytes, hex; answer it once, within ttl_seconds")
    ttl_seconds: float
    security_level: str


class EvidenceBody(BaseModel):
    """``Evidence.to_dict()``, each field bounded: hostile evidence is a 422, not a 500."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tee_type: Literal["sim", "tdx", "sev-snp", "nitro"]
    measurement: str = Field(max_length=128)
    debug: bool
    security_version: int = Field(ge=0, le=2**32 - 1)
    report_data: str = Field(pattern="^[0-9a-f]{128}$")
    issued_at: float = Field(ge=0, le=2**40, allow_inf_nan=False)
    signature: str = Field(max_length=256, pattern="^[0-9a-f]*$")
    raw: str = Field("", max_length=MAX_EVIDENCE_CHARS)
    aux: str = Field("", max_length=MAX_EVIDENCE_CHARS)


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    header: str = Field(
        min_length=1, max_length=MAX_HEADER_CHARS,
        description="the sealed file's header as stored (what its digest covers), base64",
    )
    evidence: EvidenceBody = Field(description="the worker's evidence, as Evidence.to_dict()")
    public_key: str = Field(pattern=HEX_32, description="the worker's X25519 public key, hex")
    nonce: str = Field(pattern=HEX_32, description="the challenge being answered, hex")


class Release(BaseModel):
    ephemeral_public_key: str
    nonce: str
    ciphertext: str
    security_level: str


class AuditRecords(BaseModel):
    security_level: str
    data: list[dict[str, Any]]


def _header(encoded: str) -> SealedHeader:
    try:
        return parse_header(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise invalid_field(("header",), "not base64") from exc
    except SealError as exc:
        raise invalid_field(("header",), str(exc)) from exc


def _broker_router(broker: KeyBroker, security_level: str) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["key broker"], responses=error_responses(401, 503))

    @router.post("/challenge")
    async def challenge() -> Challenge:
        return Challenge(nonce=broker.challenge().hex(), ttl_seconds=broker.nonce_ttl,
                         security_level=security_level)

    @router.post("/release", responses=error_responses(403, 422))
    async def release(body: ReleaseRequest) -> Release:
        """The data key wrapped to the attested worker; 403 names the check that failed."""
        header = _header(body.header)
        try:
            evidence = Evidence.from_dict(body.evidence.model_dump())
        except ValueError as exc:
            raise invalid_field(("evidence",), str(exc)) from exc
        try:
            # Off the event loop: verification and the fsynced audit append take milliseconds.
            released = await asyncio.to_thread(
                broker.release, header, evidence, bytes.fromhex(body.public_key),
                bytes.fromhex(body.nonce),
            )
        except ReleaseRefused as exc:
            log.warning("confidential: key release for %s v%d refused: %s",
                        header.artifact_id, header.version, exc)
            raise PermissionDenied(str(exc), code="release_refused") from exc
        log.info("confidential: released the key of %s v%d (%s)", header.artifact_id,
                 header.version, released.security_level)
        return Release(ephemeral_public_key=released.ephemeral_public_key.hex(),
                       nonce=released.nonce.hex(), ciphertext=released.ciphertext.hex(),
                       security_level=released.security_level)

    return router


def create_broker_app(broker: KeyBroker, *, token: str, failures: AuthFailures,
                      security_level: str) -> FastAPI:
    """The broker's routes as an application of their own, behind ``confidential.token``."""
    app = FastAPI(title="ModelFence key broker", version=__version__, openapi_url=None,
                  docs_url=None, redoc_url=None, redirect_slashes=False)
    app.include_router(_broker_router(broker, security_level))
    app.add_middleware(
        RequireAdminToken, token=token.encode(), public_paths=[], failures=failures,
        label="key broker token", title="The key broker",
        setting="`confidential.token` in the config or MODELFENCE_BROKER_TOKEN",
    )
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    return app


def confidential_audit_router(broker: KeyBroker, security_level: str) -> APIRouter:
    router = APIRouter(prefix="/v1/confidential", tags=["confidential"],
                       responses=error_responses(401, 503))

    @router.get("/audit")
    async def audit(limit: int = Query(100, ge=1, le=10_000)) -> AuditRecords:
        """The latest release decisions held in memory, newest last, each with its security
        level (the chain itself is checked when the log file is opened at start-up)."""
        return AuditRecords(security_level=security_level, data=broker.audit.latest(limit))

    return router
