"""Laplace noise from an injected generator, so tests can fix the seed.

One numpy call draws an answer's noise for every value at once: per-value draws in Python
cost more than the whole hardening budget on a long answer. numpy's generator is seeded
from operating-system entropy (see :func:`default_rng`), so values are not predictable
from outside the process; it is not a cryptographic generator, and does not need to be:
the noise hides values, it does not protect a secret.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def default_rng() -> np.random.Generator:
    return np.random.default_rng()


def laplace(
    rng: np.random.Generator, scale: float, shape: int | tuple[int, ...]
) -> npt.NDArray[np.float64]:
    """Draws of Laplace(0, ``scale``), as an array of ``shape``."""
    return rng.laplace(0.0, scale, shape)
