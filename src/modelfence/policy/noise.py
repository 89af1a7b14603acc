"""Laplace noise from an injected generator, so tests can fix the seed.

``random.Random`` rather than ``secrets``: a system-randomness call per value would cost
more than the whole hardening budget (~1 µs each). The generator is seeded from
``os.urandom`` in production (see :func:`default_rng`), so values are not predictable
from outside the process.
"""

from __future__ import annotations

import math
import os
import random


def default_rng() -> random.Random:
    return random.Random(os.urandom(32))


def laplace(rng: random.Random, scale: float) -> float:
    """One draw of Laplace(0, ``scale``) by inverting its CDF."""
    u = rng.random() - 0.5
    return -scale * math.copysign(math.log1p(-2.0 * abs(u)), u)
