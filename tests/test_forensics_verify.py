"""Forensics: bad inputs give clear errors; a clone on recorded marks is attributed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.forensics.errors import SuspectUnreachable, VerifyError
from modelfence.forensics.model import Suspect, verify_classifier
from modelfence.forensics.radioactivity import verify_chat
from modelfence.forensics.text import verify_text
from modelfence.identity.secret import ServerSecret
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.ledger import MarkedInput

RING = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"))


def test_empty_text_and_no_clients_are_clear_errors() -> None:
    with pytest.raises(VerifyError, match="empty"):
        verify_text("  \n", ["acme"], RING, tokenize=lambda t: [1, 2])
    with pytest.raises(VerifyError, match="no clients"):
        verify_text("hello", [], RING, tokenize=lambda t: [1, 2])
    with pytest.raises(VerifyError, match="too short"):
        verify_text("hi", ["acme"], RING, tokenize=lambda t: [1])


def test_chat_verification_rejects_bad_probes_before_asking() -> None:
    suspect = Suspect("http://127.0.0.1:9", timeout=2)
    with pytest.raises(VerifyError, match="unknown client 'bob'"):
        verify_chat(suspect, "m", ["acme"], RING, tokenize=list_tokens, client="bob")
    with pytest.raises(VerifyError, match="non-empty prompts"):
        verify_chat(suspect, "m", ["acme"], RING, tokenize=list_tokens, prompts=["ok", " "])
    with pytest.raises(VerifyError, match="no clients"):
        verify_chat(suspect, "m", [], RING, tokenize=list_tokens)
    with pytest.raises(SuspectUnreachable, match="unreachable"):
        verify_chat(suspect, "m", ["acme"], RING, tokenize=list_tokens, prompts=["hi"])


def list_tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_unreachable_suspect_is_a_clear_error() -> None:
    suspect = Suspect("http://127.0.0.1:9", timeout=2)
    ledgers = {"acme": [MarkedInput("acme", 1, "00", [0.0, 1.0], 3, 10)]}
    with pytest.raises(SuspectUnreachable, match="unreachable"):
        verify_classifier(suspect, "digits", ledgers)
    with pytest.raises(VerifyError, match="nothing to test"):
        verify_classifier(suspect, "digits", {})


class _Clone(Suspect):
    """A suspect that learnt one client's watermark labels."""

    def __init__(self, learnt: dict[tuple[float, ...], int]) -> None:
        self.url, self._learnt = "memory://clone", learnt

    def labels(self, model: str, rows: list[list[float]]) -> list[int]:  # type: ignore[override]
        return [self._learnt.get(tuple(r), 0) for r in rows]


def test_classifier_clone_is_attributed_and_an_innocent_model_is_not() -> None:
    acme = [MarkedInput("acme", 1, f"{i}", [float(i), 1.0], (i % 9) + 1, 10) for i in range(40)]
    bob = [MarkedInput("bob", 1, f"b{i}", [float(i), 2.0], (i % 9) + 1, 10) for i in range(40)]
    learnt = {tuple(m.features): m.label for m in acme[:36]}  # 90% of the marks survived
    verdict = verify_classifier(_Clone(learnt), "digits", {"acme": acme, "bob": bob})
    assert verdict.ours and verdict.client == "acme" and verdict.p_value < 1e-9
    innocent = verify_classifier(_Clone({}), "digits", {"acme": acme, "bob": bob})
    assert not innocent.ours and innocent.client is None


def test_cli_verify_reports_errors(tmp_path: Path) -> None:
    config = tmp_path / "modelfence.yaml"
    config.write_text(f"store: sqlite:///{tmp_path / 's.db'}\nsecret: test-secret-0123456789abcdef\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    runner = CliRunner()
    result = runner.invoke(app, ["--config", str(config), "verify", "text", str(empty)])
    assert result.exit_code == 1 and "empty" in result.output
    result = runner.invoke(app, ["--config", str(config), "verify", "model", "--url",
                                 "http://127.0.0.1:9", "--kind", "vision"])
    assert result.exit_code == 1 and "unknown kind" in result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about tides.\n")
    result = runner.invoke(app, ["--config", str(config), "verify", "model", "--url",
                                 "http://127.0.0.1:9", "--kind", "chat", "--prompts", str(prompts),
                                 "--client", "nobody"])
    assert result.exit_code == 1 and "unknown client 'nobody'" in result.output
    result = runner.invoke(app, ["--config", str(config), "verify", "model", "--url",
                                 "http://127.0.0.1:9", "--kind", "chat", "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.output
