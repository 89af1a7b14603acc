"""The draw that the text-mark benchmarks share: real prompts, many clients, random owners.

Attribution numbers are comparable across benchmarks only when answers are drawn the same
way: prompts picked from the harness's real-prompt corpora, each answer owned by a random
one of ``clients`` clients whose keys come from a keyring of a benchmark's own secret.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelfence.identity.secret import ServerSecret
from modelfence.redteam.marked_text import Job
from modelfence.redteam.prompts import load_prompts
from modelfence.watermark.config import TextConfig
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import GreenListProcessor

if TYPE_CHECKING:
    from modelfence.demo.llm import SmolLM


def add_draw_arguments(parser: argparse.ArgumentParser, *, batch: int) -> None:
    """The options every text-mark benchmark shares: who owns the answers, how they are
    sampled and marked, and when a client counts as named."""
    defaults = TextConfig.model_validate({})
    parser.add_argument("--clients", type=int, default=10_000, help="clients whose keys are scored")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--gamma", type=float, default=defaults.gamma)
    parser.add_argument("--delta", type=float, default=defaults.delta)
    parser.add_argument("--alpha", type=float, default=1e-6, help="false-attribution target")
    parser.add_argument("--batch", type=int, default=batch, help="answers sampled together")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: fastest on busy cores)")
    parser.add_argument("--seed", type=int, default=0)


def parse_draw_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` for a script that also defines ``--answers`` and ``--unmarked``:
    unmarked answers reuse the first prompts, so no more of them than marked answers."""
    args = parser.parse_args(argv)
    if args.unmarked > args.answers:
        parser.error("--unmarked must not exceed --answers (they reuse the same prompts)")
    return args


@dataclass(frozen=True, slots=True)
class Draw:
    picked: list[str]  # prompt texts
    prompts: list[list[int]]  # their chat-template token ids
    ring: WatermarkKeyring
    clients: list[str]
    owners: list[int]  # index into clients, one per prompt

    def jobs(self, *, gamma: float, delta: float, unmarked: int) -> list[Job]:
        """Each prompt marked for its owner, then the first ``unmarked`` prompts unmarked."""
        marked = [
            Job(p, GreenListProcessor.for_key(self.ring.key(self.clients[c]), gamma=gamma, delta=delta), c)
            for p, c in zip(self.prompts, self.owners, strict=True)
        ]
        return marked + [Job(p, None, None) for p in self.prompts[:unmarked]]


def load_and_draw(*, seed: int, threads: int, answers: int, clients: int,
                  secret: bytes) -> tuple[SmolLM, Draw]:
    """The demo LLM on ``threads`` torch threads, and the draw of a run seeded ``seed``."""
    import torch

    from modelfence.demo.llm import SmolLM

    torch.set_num_threads(threads)
    llm = SmolLM.load(threads=threads)
    return llm, draw(llm, np.random.default_rng(seed), answers=answers, clients=clients,
                     secret=secret + str(seed).encode())


def draw(llm: SmolLM, rng: np.random.Generator, *, answers: int, clients: int,
         secret: bytes) -> Draw:
    """``answers`` distinct prompts and their owners among ``clients`` (in this rng order)."""
    corpus = list(load_prompts().all())
    picked = [corpus[int(i)] for i in rng.choice(len(corpus), answers, replace=False)]
    prompts = [llm.encode_chat([{"role": "user", "content": p}]) for p in picked]
    names = [f"client-{i:05d}" for i in range(clients)]
    owners = [int(c) for c in rng.integers(0, clients, answers)]
    return Draw(picked, prompts, WatermarkKeyring(ServerSecret(secret)), names, owners)
