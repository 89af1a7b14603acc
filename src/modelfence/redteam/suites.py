"""Suite sizes: ``ci`` for every change, ``full`` for the baseline in docs/EVALUATION.md.

Measured wall times of ``modelfence redteam`` on two shared CPU cores, demo models loaded
by the run: ``ci`` about 4 minutes (8 under heavy load), ``full`` about 19 minutes. The
LLM scenarios dominate: the demo LLM generates every token on the CPU.

Every budget lives here so a run's size is one named, reviewable thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelfence.redteam.evaluation import Size
from modelfence.redteam.populations.benign import BenignPopulation
from modelfence.redteam.populations.week import FULL_COUNTS
from modelfence.redteam.thieves import Scale


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    population: BenignPopulation
    horizon: float  # virtual seconds of benign traffic
    compression: float  # virtual seconds per wall second in live runs
    classifier_budgets: tuple[int, ...]
    adaptive_budget: int
    thief_epochs: int
    harvest_prompts: int
    harvest_max_tokens: int
    carlini_prompts: int  # wide-probe requests: each gives ``carlini_positions`` rows
    carlini_columns: int
    carlini_positions: int
    carlini_bias_prompts: int  # the bias probe's small measured sample
    carlini_bias_columns: int
    embedding_texts: tuple[int, ...]  # checkpoints: texts sent before each student
    sybil_keys: int
    replay_clients: int  # benign clients in the replay-scale check
    replay_attackers: int  # attackers of each replayable kind among them (replay-detection)
    calibration_clients: int  # the honest population detection is calibrated on
    v2: Size  # the honest week and thief library of the ``adaptive`` and ``hydra`` scenarios


SUITES = {
    "ci": Suite(
        name="ci",
        population=BenignPopulation(chat_users=6, embedding_users=2, classifier_users=2,
                                    batch_summarisers=1, image_streams=1, max_tokens=4,
                                    heavy_rate=0.01),
        horizon=3_600.0, compression=240.0,
        classifier_budgets=(100, 300), adaptive_budget=60, thief_epochs=15,
        harvest_prompts=4, harvest_max_tokens=8,
        carlini_prompts=40, carlini_columns=1000, carlini_positions=16,
        carlini_bias_prompts=2, carlini_bias_columns=38,
        embedding_texts=(64, 256), sybil_keys=4, replay_clients=1_000,
        replay_attackers=3, calibration_clients=500,
        # Two days, so that day-two effects (around-the-clock activity) show; no nightly
        # 50,000-document embedder (its queries alone would take the CI budget).
        # Eleven pro customers: the engine needs ten of a tier for its live volume median.
        v2=Size(counts={"light": 60, "agent": 10, "student": 10, "embed": 6, "classify": 6, "university": 12,
                        "nat": 8, "launch": 4, "heavy": 4, "bulk-score": 1, "stream": 1, "summariser": 1},
                sample={}, days=2.0, calibration_clients=200,
                scale=Scale(classifier_images=1000, embedding_texts=512, chat_prompts=120, days=2.0,
                            one_batch_accounts=(4,), rotation_accounts=(4,), hydra_accounts=(20,),
                            hydra_paced_accounts=(20,),
                            hydra_chat_prompts=120, hydra_embedding_texts=128, hydra_classifier_images=256)),
    ),
    "full": Suite(
        name="full",
        population=BenignPopulation(chat_users=30, embedding_users=6, classifier_users=6,
                                    batch_summarisers=2, image_streams=2, max_tokens=8,
                                    heavy_rate=0.005),
        horizon=21_600.0, compression=240.0,
        classifier_budgets=(100, 250, 500, 1000, 2000), adaptive_budget=300, thief_epochs=25,
        harvest_prompts=12, harvest_max_tokens=24,
        carlini_prompts=48, carlini_columns=1000, carlini_positions=16,
        carlini_bias_prompts=4, carlini_bias_columns=95,
        embedding_texts=(64, 256, 512, 1024, 1536), sybil_keys=12, replay_clients=10_000,
        replay_attackers=100, calibration_clients=2_000,
        # 10,020 honest customers over 7 days, replayed as a stratified sample (weights in
        # docs/EVALUATION.md): every pro segment at one tenth, so that the pro tier's live
        # volume median (the reference has none for pro) comes from a faithful mix; NAT and
        # university whole. The thieves' budgets are Scale's defaults.
        v2=Size(counts=FULL_COUNTS,
                sample={"light": 600, "agent": 100, "student": 100, "embed": 60, "classify": 60, "launch": 5,
                        "heavy": 10, "bulk-embed": 2, "bulk-score": 4, "stream": 4, "summariser": 2},
                days=7.0, calibration_clients=2_000, scale=Scale()),
    ),
}
