"""What the benchmarks of watermarked answers share: a stack that refuses nothing, the footer.

Their numbers are only comparable with the command, the machine and its load beside them,
so every table ends with the same footer.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime

# ``own_stack`` overrides: per-key limits no benchmark reaches, so no answer is a 429.
OPEN_LIMITS = {"limits": {"tiers": {"default": {
    "requests_per_minute": 1_000_000, "tokens_per_minute": 10**9, "concurrent_requests": 64,
    "usd_per_day": 1_000_000}}}}


def fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 0.01 else f"{p:.2f}"


class Footer:
    """Started with the run; ``str`` gives the command, machine, load, date and wall time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    def __str__(self) -> str:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        return (f"command: `python {' '.join(sys.argv)}`  \nmachine: {platform.platform()}, "
                f"{os.cpu_count()} cores, load average at the end {load}  \ndate: {self.date}; "
                f"wall time {time.perf_counter() - self.started:.0f} s")
