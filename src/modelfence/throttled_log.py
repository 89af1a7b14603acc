"""Log lines that a failing dependency or a flood would otherwise repeat on every request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """At most one line per ``interval`` seconds, each saying how many were held back.

    >>> outage = ThrottledLog(logging.getLogger("modelfence"), interval=10.0)
    >>> outage.warning("Redis unreachable: %s", "timeout")   # logged
    >>> outage.warning("Redis unreachable: %s", "timeout")   # held back, counted
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held_back = 0

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object) -> None:
        self.log(logging.ERROR, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._held_back += 1
            return
        if self._held_back:
            message += " (%d similar lines held back)"
            args += (self._held_back,)
        self._logger.log(level, message, *args)
        self._held_back = 0
        self._next = now + self._interval
