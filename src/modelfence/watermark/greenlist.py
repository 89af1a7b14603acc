"""The keyed green list shared by the text processor and the text detector (KGW, h = 1).

Whether token ``t`` is green after token ``p`` for a client with seed ``s`` is one integer
hash, ``mix(mix(s ^ mix(p + C)) ^ code(t)) < γ·2⁶⁴`` (SplitMix64 finaliser), so a fraction
``γ`` of the vocabulary is green in every context. Being a pure vectorised function, the
generator computes a whole ``[vocab]`` row per step (~0.2 ms) and the detector a whole
``[clients, tokens]`` matrix at once, which is what makes scoring every client's key cheap.
The seed is the client's secret ``text`` subkey; without it the green lists look random.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CONTEXT = np.uint64(0x9E3779B97F4A7C15)
_TOKEN = np.uint64(0xD1B54A32D192ED03)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix(x: U64) -> U64:
    """SplitMix64's finaliser on arrays (uint64 arithmetic wraps, as intended)."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)  # type: ignore[no-any-return]


def threshold(gamma: float) -> np.uint64:
    """Hashes below this are green: a fraction ``gamma`` in (0, 1) of all 2⁶⁴ values."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"green-list fraction gamma must be in (0, 1), got {gamma}")
    return np.uint64(int(gamma * 2**64))


def token_codes(token_ids: npt.ArrayLike) -> U64:
    """Per-token hash codes ``[n]`` (precompute once for a whole vocabulary)."""
    return mix(np.asarray(token_ids, dtype=np.uint64) * _TOKEN)


def context_codes(seeds: npt.ArrayLike, previous: npt.ArrayLike) -> U64:
    """Codes of (client seed, previous token): broadcasts ``seeds`` against ``previous``."""
    prev = mix(np.asarray(previous, dtype=np.uint64) + _CONTEXT)
    return mix(np.asarray(seeds, dtype=np.uint64) ^ prev)


def is_green(contexts: U64, tokens: U64, cut: np.uint64) -> npt.NDArray[np.bool_]:
    """Green flags for context codes and token codes (broadcast together)."""
    return mix(contexts ^ tokens) < cut  # type: ignore[no-any-return]
