"""What a prompt asks for, read the same way by the gateway (events) and the detectors."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Asking for the reasoning, not only the answer: what a distiller of chain-of-thought sends.
CHAIN_OF_THOUGHT = re.compile(
    r"step[- ]by[- ]step|show (your|all) (work|reasoning)|explain your reasoning|"
    r"think (carefully|through)|chain[- ]of[- ]thought|reason about the question|"
    r"lay out the reasoning|numbered steps",
    re.IGNORECASE,
)
_SCAN_CHARS = 8192  # of each message: an instruction to reason sits near its start


def elicits_reasoning(texts: Iterable[str]) -> bool:
    """Whether any of ``texts`` (every turn, system messages included) asks for reasoning."""
    return any(CHAIN_OF_THOUGHT.search(text[:_SCAN_CHARS]) for text in texts)
