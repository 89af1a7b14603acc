"""A thread that always wants the GIL: what a busy writer thread does to the event loop."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def busy_thread(switch_interval: float) -> Iterator[None]:
    """Run a thread spinning in Python, with ``sys.setswitchinterval(switch_interval)``:
    a call that releases the GIL may then wait that long to get it back."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    interval = sys.getswitchinterval()
    thread = threading.Thread(target=spin, daemon=True)
    sys.setswitchinterval(switch_interval)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join()
