"""The public surface of ``modelfence.redteam`` is exactly its ``__all__``."""

from __future__ import annotations

import inspect
from types import ModuleType

from modelfence import redteam


def _isort_style(name: str) -> tuple[int, str]:
    # Constants, then classes, then functions (ruff's RUF022 order).
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_every_exported_name_resolves_and_the_list_is_sorted() -> None:
    assert redteam.__all__ == sorted(redteam.__all__, key=_isort_style)
    for name in redteam.__all__:
        member = getattr(redteam, name)
        if inspect.isclass(member) or inspect.isfunction(member):  # ours, not a re-export
            assert member.__module__.startswith("modelfence.redteam."), name


def test_no_public_name_is_left_out_of_all() -> None:
    public = {
        name for name, value in vars(redteam).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(redteam.__all__)
