"""The admin API: API keys and their limits, behind the admin bearer token.

A FastAPI application that ``app.py`` mounts at ``/admin``::

    app.mount("/admin", create_admin_app(
        store=store, admin_token=config.admin_token, tiers=config.limits.tiers,
    ))

Once mounted: ``POST|GET /admin/v1/keys`` (a key may name its ``account`` and that
account's ``metadata``), ``GET|DELETE /admin/v1/keys/{key_id}``,
``POST /admin/v1/keys/{key_id}/revoke``, ``PUT /admin/v1/keys/{key_id}/limits``, and the
OpenAPI document at ``/admin/openapi.json``. Errors are OpenAI-style JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.security import HTTPBearer

from modelfence import __version__
from modelfence.admin.auth import RequireAdminToken
from modelfence.admin.errors import EXCEPTION_HANDLERS, error_responses, invalid_field
from modelfence.admin.names import KeyId
from modelfence.admin.schemas import CreatedKey, CreateKey, Key, KeyList, Limits
from modelfence.identity.accounts import InvalidMetadata
from modelfence.identity.base import KeyStore
from modelfence.identity.failures import AuthFailures

log = logging.getLogger(__name__)

_TOKEN_SOURCE = "the admin token: config `admin_token` or MODELFENCE_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class _Admin:
    store: KeyStore
    tiers: tuple[str, ...]


def _admin(request: Request) -> _Admin:
    admin: _Admin = request.app.state.admin
    return admin


AdminDep = Annotated[_Admin, Depends(_admin)]
KeyIdPath = Annotated[KeyId, Path(description="the key's public id")]
router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=error_responses(401, 503))


@router.post("", status_code=201, responses=error_responses(422))
async def create_key(body: CreateKey, admin: AdminDep) -> CreatedKey:
    """Create an API key. The secret key is in this response only."""
    if body.tier not in admin.tiers:
        allowed = ", ".join(sorted(admin.tiers))
        raise invalid_field(("tier",), f"unknown tier {body.tier!r}; allowed: {allowed}")
    if body.metadata is not None:
        if body.account is None:
            raise invalid_field(("metadata",), "metadata describes an account: name `account`")
        try:
            await admin.store.put_account(body.account, body.metadata.to_metadata())
        except InvalidMetadata as exc:
            raise invalid_field(("metadata", exc.field), exc.reason) from exc
    record, api_key = await admin.store.create(body.client, body.tier, body.account)
    log.info(
        "admin: created key %s for client %r, tier %s, account %r",
        record.key_id,
        record.client,
        record.tier,
        record.account,
    )
    return CreatedKey.from_record(record, api_key=api_key)


@router.get("")
async def list_keys(admin: AdminDep) -> KeyList:
    """Every API key, oldest first (without secrets)."""
    return KeyList(data=[Key.from_record(record) for record in await admin.store.list()])


@router.get("/{key_id}", responses=error_responses(404, 422))
async def get_key(key_id: KeyIdPath, admin: AdminDep) -> Key:
    return Key.from_record(await admin.store.get(key_id))


@router.post("/{key_id}/revoke", responses=error_responses(404, 422))
@router.delete("/{key_id}", responses=error_responses(404, 422))
async def revoke_key(key_id: KeyIdPath, admin: AdminDep) -> Key:
    """Revoke a key; every replica refuses it within seconds. Revoking again changes nothing."""
    record = await admin.store.revoke(key_id)
    log.info("admin: revoked key %s of client %r", record.key_id, record.client)
    return Key.from_record(record)


@router.put("/{key_id}/limits", responses=error_responses(404, 422))
async def set_limits(key_id: KeyIdPath, body: Limits, admin: AdminDep) -> Key:
    """Replace the key's limit overrides; fields left out fall back to the tier's limits."""
    record = await admin.store.set_overrides(key_id, body.to_overrides())
    log.info("admin: set limits of key %s: %s", key_id, body.model_dump(exclude_none=True))
    return Key.from_record(record)


def create_admin_app(
    *,
    store: KeyStore,
    admin_token: str | None,
    tiers: Collection[str],
    failures: AuthFailures,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The admin application; with ``admin_token`` None every route answers 503.

    ``failures`` counts, logs and limits wrong tokens per client address. ``routers``:
    other layers' admin routes (e.g. ``admin.policy.policy_router``), mounted behind the
    same token and error handlers.
    """
    app = FastAPI(
        title="ModelFence admin API",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        # A trailing slash is a 404 like any unknown path, not a redirect to another method.
        redirect_slashes=False,
        # Declares the scheme in the OpenAPI document; RequireAdminToken does the checking.
        dependencies=[Depends(HTTPBearer(auto_error=False, description=_TOKEN_SOURCE))],
    )
    app.state.admin = _Admin(store=store, tiers=tuple(tiers))
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)
    app.add_middleware(
        RequireAdminToken,
        token=admin_token.encode() if admin_token else None,
        public_paths=[app.openapi_url or ""],
        failures=failures,
    )
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    return app
