"""Real human-written prompts, read from files that ship inside installed wheels.

Benign traffic must look like people, or a false-positive rate measured on it means
nothing; these corpora were written by people for other purposes (question answering,
assistant evaluation, chat bots). The wheels are installed with ``--no-deps`` and never
imported: files are found through ``importlib.util.find_spec`` and read by path.

    corpus = load_prompts()
    corpus.sources        # {"freshqa": 600, "persistbench": 500, ...}
    corpus.by_source["chatterbot"][:3]
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

INSTALL_HINT = "pip install --no-deps inspect-evals chatterbot-corpus"


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it (``None`` if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _freshqa(root: Path) -> Iterator[str]:
    path = root / "abstention_bench/data/freshqa/FreshQA_v12182024.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    # The file opens with a warning line and a blank row before its header.
    start = next(i for i, line in enumerate(lines) if line.startswith("id,"))
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        yield row.get("question") or ""


def _jsonl_queries(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield str(json.loads(line).get("query") or "")


def _persistbench(root: Path) -> Iterator[str]:
    return _jsonl_queries(sorted((root / "persistbench/benchmark_samples").glob("*.jsonl")))


def _writingbench(root: Path) -> Iterator[str]:
    return _jsonl_queries([root / "writingbench/benchmark_all.jsonl"])


def _chatterbot(root: Path) -> Iterator[str]:
    for path in sorted((root / "data/english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            if conversation and isinstance(conversation[0], str):
                yield conversation[0]


# name -> (package, reader)
SOURCES: dict[str, tuple[str, Callable[[Path], Iterator[str]]]] = {
    "freshqa": ("inspect_evals", _freshqa),
    "persistbench": ("inspect_evals", _persistbench),
    "writingbench": ("inspect_evals", _writingbench),
    "chatterbot": ("chatterbot_corpus", _chatterbot),
}


def _is_english(text: str) -> bool:
    # writingbench mixes Chinese and English tasks; the demo model speaks English.
    return sum(ch.isascii() for ch in text) >= 0.95 * len(text)


@dataclass(frozen=True, slots=True)
class PromptCorpus:
    """Deduplicated English prompts per source, in file order (sampling is the caller's)."""

    by_source: dict[str, tuple[str, ...]]
    missing: tuple[str, ...]  # sources whose wheel is not installed

    @property
    def sources(self) -> dict[str, int]:
        return {name: len(texts) for name, texts in self.by_source.items()}

    def all(self) -> tuple[str, ...]:
        return tuple(text for texts in self.by_source.values() for text in texts)


@cache  # parsing the YAML and JSONL files takes seconds; the corpus is immutable
def load_prompts(max_chars: int = 600) -> PromptCorpus:
    """Read every available source; raise if none is installed (benign traffic needs one).

    Prompts longer than ``max_chars`` are dropped: the demo model's context is short and
    a benign user pasting a whole document is modelled separately (batch summarisers).
    """
    by_source: dict[str, tuple[str, ...]] = {}
    missing: list[str] = []
    for name, (package, reader) in SOURCES.items():
        root = package_dir(package)
        if root is None:
            missing.append(name)
            continue
        seen: dict[str, None] = {}
        for text in reader(root):
            text = " ".join(text.split())
            if 8 <= len(text) <= max_chars and _is_english(text):
                seen.setdefault(text)
        by_source[name] = tuple(seen)
    if not any(by_source.values()):
        raise RuntimeError(f"no prompt corpus is installed; {INSTALL_HINT}")
    return PromptCorpus(by_source, tuple(missing))
