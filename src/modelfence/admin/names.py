"""The names the admin API accepts (clients, entities, key ids) and its free-text notes.

Checked at the edge, before any store sees them: PostgreSQL refuses NUL and text that has
no UTF-8 form (a lone surrogate is valid JSON), keeps client names in ``VARCHAR(200)``, and
a control character in a name would forge lines in the audit log. Used as the type of a
body field or, wrapped in ``Path()``, of a path parameter::

    async def get_client(client: Annotated[Name, Path()]) -> ...

so a bad name is a 422 that names the parameter, and the OpenAPI document shows the rule.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_NAME_LENGTH = 200  # the width of the `client` columns
MAX_NOTE_LENGTH = 2000

# What the OpenAPI document states; `_printable` below is the exact check (it also refuses
# the format, private-use, unassigned and surrogate code points a pattern cannot name).
_NO_CONTROLS = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
_NO_CONTROLS_BUT_LINES = "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f]*$"


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable text: no control, format or unassigned characters")
    return value


def _text(value: str) -> str:
    if not value.replace("\n", " ").replace("\t", " ").replace("\r", " ").isprintable():
        raise ValueError(
            "must be printable text (tabs and line breaks allowed): no control, format or "
            "unassigned characters"
        )
    return value


Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        json_schema_extra={"pattern": _NO_CONTROLS},
    ),
    AfterValidator(_printable),
]
"""A client, entity or account name: 1-200 printable characters (spaces allowed)."""

Note = Annotated[
    str,
    Field(max_length=MAX_NOTE_LENGTH, json_schema_extra={"pattern": _NO_CONTROLS_BUT_LINES}),
    AfterValidator(_text),
]
"""Free text an operator writes into the audit log: printable, tabs and line breaks allowed."""

KeyId = Annotated[str, Field(pattern="^key_[0-9a-f]{12}$", examples=["key_1f9a0c33be42"])]
"""A public API key id as ``new_key_id`` makes them."""
