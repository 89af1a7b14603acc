"""Partition a model into what is sealed and what is shipped in the clear.

A protected part is named the way its framework names modules: ``head`` covers
``head.weight`` and ``head.bias``; ``adapter.*`` or ``layers.11.*`` are globs over tensor
names. Protect what was privately trained (a head, an adapter, a slice): shielding only
the last layer of an otherwise public model barely slows a thief (docs/CONFIDENTIAL.md).

    public, private = split(state, ["head", "adapters.*"])     # numpy arrays by name
    public, private = split_module(torch_model, ["classifier"]) # any .state_dict() holder
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Protocol

import numpy as np

from modelfence.errors import ModelFenceError


class PartitionError(ModelFenceError):
    """A protected name matches nothing, or a tensor cannot be carried as numpy."""


class HasStateDict(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...


def protects(pattern: str, name: str) -> bool:
    """``head`` protects ``head`` and ``head.*``; a pattern with ``*?[`` is a glob."""
    if any(c in pattern for c in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def split(
    tensors: Mapping[str, np.ndarray], protected: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(public, private): every tensor a pattern names is private. A pattern that names
    nothing is an error (a typo would otherwise ship the head in the clear)."""
    if not protected:
        raise PartitionError("name at least one protected module or pattern")
    unused = [p for p in protected if not any(protects(p, name) for name in tensors)]
    if unused:
        raise PartitionError(f"protected {', '.join(map(repr, unused))} matches no tensor; "
                             f"tensors start {', '.join(sorted(tensors)[:5])}")
    private = {n: t for n, t in tensors.items() if any(protects(p, n) for p in protected)}
    public = {n: t for n, t in tensors.items() if n not in private}
    return public, private


def split_module(
    module: HasStateDict, protected: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`split` over a PyTorch module's state dict (or anything with ``state_dict()``),
    as numpy arrays; bfloat16, which numpy lacks, is refused by name."""
    tensors: dict[str, np.ndarray] = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "detach"):
            if str(getattr(value, "dtype", "")) == "torch.bfloat16":
                raise PartitionError(f"{name} is bfloat16, which numpy cannot hold; convert it "
                                     "to float32 before sealing")
            value = value.detach().cpu().numpy()
        tensors[name] = np.asarray(value)
    return split(tensors, protected)
