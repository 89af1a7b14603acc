"""Real human-written prompts, read from files that ship inside installed wheels.

Benign traffic must look like people, or a false-positive rate measured on it means
nothing; these corpora were written by people for other purposes (question answering,
assistant evaluation, chat bots). The wheels are installed with ``--no-deps`` and never
imported: files are found through ``importlib.util.find_spec`` and read by path.

Two disjoint corpora: ``load_prompts`` is what detection is calibrated on;
``load_evaluation_prompts`` (web and customer-service tasks, security questions, bug
reports, support tickets, shell tasks) is what the evaluated honest week sends, so a
false-positive rate is never measured on the texts the thresholds were fitted to. Its
long texts (bug reports, scenario write-ups, tickets) are ``load_evaluation_documents``,
for bulk embedders and summarisers.

    corpus = load_prompts()
    corpus.sources        # {"freshqa": 600, "persistbench": 500, ...}
    corpus.by_source["chatterbot"][:3]
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

INSTALL_HINT = "pip install --no-deps inspect-evals chatterbot-corpus"
PROMPT_MAX_CHARS = 600  # longer texts are documents, not prompts
Reader = Callable[[Path], Iterator[str]]


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
SOURCES: dict[str, tuple[str, Reader]] = {
    "freshqa": ("inspect_evals", _freshqa),
    "persistbench": ("inspect_evals", _persistbench),
    "writingbench": ("inspect_evals", _writingbench),
    "chatterbot": ("chatterbot_corpus", _chatterbot),
}


def _json(path: Path) -> list[dict[str, object]]:
    """The records of a JSON list file, gzipped (``.json.gz``) or not."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _field(path: Path, name: str) -> Iterator[str]:
    """One text field of each record of a JSON list."""
    for item in _json(path):
        yield str(item.get(name) or "")


def _mind2web(root: Path) -> Iterator[str]:
    return _field(root / "mind2web_sc/data/seeact/sample_labeled_all.json", "confirmed_task")


_TAU2_PARTS = ("reason_for_call", "known_info", "unknown_info", "task_instructions")


def _tau2(root: Path) -> Iterator[str]:
    """Each customer-service scenario as the customer was told it (a paragraph or several)."""
    for path in sorted((root / "tau2/data/domains").glob("*/tasks.json*")):
        for task in _json(path):
            scenario = task.get("user_scenario")
            text = scenario.get("instructions") if isinstance(scenario, dict) else None
            if isinstance(text, dict):
                yield " ".join(str(text.get(part) or "") for part in _TAU2_PARTS)
            elif isinstance(text, str):
                yield text


def _threat_intel(root: Path) -> Iterator[str]:
    return _field(root / "cyberseceval_4/threat_intel_reasoning/report_questions.json", "question_text")


def _malware_analysis(root: Path) -> Iterator[str]:
    return _field(root / "cyberseceval_4/malware_analysis/questions.json", "question")


_TITLE_TAGS = re.compile(r"^(\s*\[[^\]]*\])+")  # "[HOLD for payment 2023-04-20] [$1000] "
# The bounty programme's standard preamble and the issue template's markup.
_ISSUE_CHROME = re.compile(
    r"If you haven.t already, check out our \[contributing guidelines\].*?Slack channel!(\s*_{3,})?|<!--.*?-->|<[^>]+>",
    re.DOTALL,
)


def _swelancer(root: Path) -> Iterator[str]:
    """Bug titles (prompts) and bug reports (documents) of a public app's issue tracker."""
    path = root / "swe_lancer/data/all_swelancer_tasks.csv"
    for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
        yield _TITLE_TAGS.sub("", row.get("title") or "")
        yield _ISSUE_CHROME.sub(" ", (row.get("description") or "").replace("\\n", "\n"))


def _support_tickets(root: Path) -> Iterator[str]:
    return _field(root / "gdm_stealth/solver/strategic_rule_breaking/tickets.json", "description")


def _agentbench(root: Path) -> Iterator[str]:
    return _field(root / "agent_bench/data/agent_bench_os_test.json", "description")


EVALUATION_SOURCES: dict[str, tuple[str, Reader]] = {
    "mind2web": ("inspect_evals", _mind2web),
    "tau2": ("inspect_evals", _tau2),
    "threat_intel": ("inspect_evals", _threat_intel),
    "malware_analysis": ("inspect_evals", _malware_analysis),
    "swelancer": ("inspect_evals", _swelancer),
    "support_tickets": ("inspect_evals", _support_tickets),
    "agentbench": ("inspect_evals", _agentbench),
}


def _is_english(text: str) -> bool:
    # writingbench mixes Chinese and English tasks; the demo model speaks English.
    return sum(ch.isascii() for ch in text) >= 0.95 * len(text)


def _normalised(texts: Iterable[str]) -> Iterator[str]:
    """Whitespace-normalised English texts of at least 8 characters (duplicates kept)."""
    for text in texts:
        text = " ".join(text.split())
        if len(text) >= 8 and _is_english(text):
            yield text


def _installed(sources: Mapping[str, tuple[str, Reader]]) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """The normalised texts of every installed source, and the names of those not installed."""
    texts: dict[str, list[str]] = {}
    missing: list[str] = []
    for name, (package, reader) in sources.items():
        root = package_dir(package)
        if root is None:
            missing.append(name)
        else:
            texts[name] = list(_normalised(reader(root)))
    return texts, tuple(missing)


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
def load_prompts(max_chars: int = PROMPT_MAX_CHARS) -> PromptCorpus:
    """Read every available source; raise if none is installed (benign traffic needs one).

    Prompts longer than ``max_chars`` are dropped: the demo model's context is short and
    a benign user pasting a whole document is modelled separately (batch summarisers).
    """
    texts, missing = _installed(SOURCES)
    by_source = {name: tuple(dict.fromkeys(t for t in found if len(t) <= max_chars)) for name, found in texts.items()}
    if not any(by_source.values()):
        raise RuntimeError(f"no prompt corpus is installed; {INSTALL_HINT}")
    return PromptCorpus(by_source, missing)


@cache  # the files are read once for both halves
def _evaluation() -> tuple[PromptCorpus, tuple[str, ...]]:
    """Evaluation prompts per source and documents, each text once across all of them."""
    texts, missing = _installed(EVALUATION_SOURCES)
    seen: set[str] = set()
    by_source: dict[str, tuple[str, ...]] = {}
    documents: list[str] = []
    for name, found in texts.items():
        prompts: list[str] = []
        for text in found:
            if text not in seen:
                seen.add(text)
                (prompts if len(text) <= PROMPT_MAX_CHARS else documents).append(text)
        by_source[name] = tuple(prompts)
    if not any(by_source.values()) or not documents:
        raise RuntimeError(f"the evaluation corpus (inspect_evals) is not installed; {INSTALL_HINT}")
    return PromptCorpus(by_source, missing), tuple(documents)


def load_evaluation_prompts() -> PromptCorpus:
    """Prompts (up to 600 characters) no calibration text comes from; see the module docstring."""
    return _evaluation()[0]


def load_evaluation_documents() -> tuple[str, ...]:
    """The evaluation sources' longer texts (over 600 characters), in source order."""
    return _evaluation()[1]
