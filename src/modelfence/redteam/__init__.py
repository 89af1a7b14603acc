"""Red-team and evaluation harness: honest and hostile traffic through a real gateway,
with measured outcomes.

    from modelfence.redteam import run_redteam
    report = run_redteam("ci", output=Path("out"))      # starts its own demo stack
"""

from modelfence.redteam.context import CurvePoint, ScenarioResult
from modelfence.redteam.harness import run_redteam, scenario_names
from modelfence.redteam.metrics import (
    BenignOutcome,
    DefenderOutcome,
    Price,
    agreement,
    cosine_agreement,
    dollar_cost,
    recover_rank,
)
from modelfence.redteam.populations.benign import BenignPopulation
from modelfence.redteam.prompts import PromptCorpus, load_prompts
from modelfence.redteam.replay import Consumer, EventCounter, LimitsBaseline, replay, replay_events
from modelfence.redteam.runner import LiveGateway, run_plan
from modelfence.redteam.scenarios import SCENARIOS
from modelfence.redteam.suites import SUITES, Suite
from modelfence.redteam.timing import HumanTiming, SteadyTiming, VirtualClock
from modelfence.redteam.traffic import ClientProfile, Exchange, PlannedRequest

__all__ = [
    "SCENARIOS",
    "SUITES",
    "BenignOutcome",
    "BenignPopulation",
    "ClientProfile",
    "Consumer",
    "CurvePoint",
    "DefenderOutcome",
    "EventCounter",
    "Exchange",
    "HumanTiming",
    "LimitsBaseline",
    "LiveGateway",
    "PlannedRequest",
    "Price",
    "PromptCorpus",
    "ScenarioResult",
    "SteadyTiming",
    "Suite",
    "VirtualClock",
    "agreement",
    "cosine_agreement",
    "dollar_cost",
    "load_prompts",
    "recover_rank",
    "replay",
    "replay_events",
    "run_plan",
    "run_redteam",
    "scenario_names",
]
