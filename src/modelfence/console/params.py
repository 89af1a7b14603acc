"""The console's query parameters and form fields, checked before any store sees them.

Names follow the admin API's rules (``admin.names``); a bad or unknown parameter is a 400
page that names it, never a silent default.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfence.admin.names import Name, Note
from modelfence.console.data import Sort
from modelfence.console.pictures import Span
from modelfence.detect.actions import Level
from modelfence.detect.overrides import OverrideAction
from modelfence.forensics.fields import MaxTokens, SuspectKey, SuspectKind, SuspectUrl

MAX_PAGE = 1_000_000

ReasonCode = Annotated[str, Field(pattern="^[a-z0-9_]{1,64}$")]
Reason = Annotated[Note, Field(min_length=1, max_length=500)]


class BadParameter(Exception):
    """A parameter the console refuses; ``str()`` is what the 400 page says."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paging(_Params):
    page: int = Field(1, ge=1, le=MAX_PAGE)
    per_page: int = Field(50, ge=1, le=200)


class ClientsQuery(Paging):
    sort: Sort = "risk"
    order: Literal["asc", "desc"] = "desc"
    tier: Name | None = None
    level: Level | None = None
    account: Name | None = None
    entity: Name | None = None
    reason: ReasonCode | None = None
    q: Name | None = None


class AuditQuery(Paging):
    client: Name | None = None


class ClientQuery(_Params):
    name: Name


class ClientPageQuery(ClientQuery):
    done: OverrideAction | Literal["cut"] | None = None  # what the form before just did
    span: Span = "24h"  # the risk chart's


class AccountQuery(_Params):
    id: Name  # the account's id, by the admin API's rules


class CampaignQuery(_Params):
    """``entity``, or ``client`` (its entity, or itself and its direct links): one of them."""

    entity: Name | None = None
    client: Name | None = None
    done: Literal["cut"] | None = None


class LoginForm(_Params):
    token: str = Field(min_length=1, max_length=1000)


class ActForm(_Params):
    client: Name
    action: OverrideAction
    reason: Reason


class CutForm(_Params):
    client: Name
    other: Name
    reason: Reason
    # The campaign view the form was on, to go back to (its entity, or the client it was
    # asked for); neither: back to the client's page.
    back_entity: Name | None = None
    back_client: Name | None = None


class AckForm(_Params):
    alert: int = Field(ge=1)


class TextForm(_Params):
    text: str = Field(min_length=1, max_length=60_000)  # fits the guard's 640 KiB form limit


class ModelForm(_Params):
    """A suspect model to test: the admin API's ``ModelRequest`` bounds, default prompts."""

    url: SuspectUrl
    kind: SuspectKind
    model: Name | None = None
    api_key: SuspectKey | None = None
    client: Name | None = None  # chat only: test this client's keys alone
    max_tokens: MaxTokens = 128


P = TypeVar("P", bound=_Params)


def parse(model: type[P], items: Iterable[tuple[str, str]]) -> P:
    """``model`` from query or form pairs; empty values are absent, repeats are refused."""
    fields: dict[str, str] = {}
    for name, value in items:
        if name in fields:
            raise BadParameter(name[:64], "given more than once")
        if value != "":
            fields[name] = value
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "(form)"
        message = "not a parameter of this page" if error["type"] == "extra_forbidden" else error[
            "msg"
        ].removeprefix("Value error, ")
        raise BadParameter(name[:64], message) from exc
