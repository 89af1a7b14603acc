"""Where converted model files are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "MODELFENCE_CACHE_DIR"  # a setting of the process, not of the config file


def default_cache_dir() -> Path:
    """``$MODELFENCE_CACHE_DIR``, or ``~/.cache/modelfence``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelfence"
