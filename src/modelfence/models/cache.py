"""Where converted model files are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MODELFENCE_CACHE_DIR``, or ``~/.cache/modelfence``."""
    env = os.environ.get("MODELFENCE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelfence"
