"""Request policy and output hardening: what a client may ask, and how exact the answer is.

>>> from modelfence.operations import Operation
>>> rules = PolicyConfig().for_tier("default").request
>>> apply_rules(rules, Operation.CHAT, {"logprobs": True, "top_logprobs": 3})  # passes as is
{}
>>> harden_row([0.7, 0.2, 0.1], RowHardening(mode="labels_only"))
[1.0, 0.0, 0.0]
"""

from modelfence.policy.config import DPConfig, Hardening, PolicyConfig, RequestRules, TierPolicy
from modelfence.policy.dp import BudgetAccountant, RedisAccountant, SqlAccountant, build_accountant
from modelfence.policy.llm_hardening import LogprobHardening
from modelfence.policy.probs_hardening import RowHardening, harden_oip, harden_row, harden_rows
from modelfence.policy.request_policy import apply_rules
from modelfence.policy.risk import (
    NormalRisk,
    RiskLevel,
    RiskOverrides,
    RiskSource,
    level_for_action,
)

__all__ = [
    "BudgetAccountant",
    "DPConfig",
    "Hardening",
    "LogprobHardening",
    "NormalRisk",
    "PolicyConfig",
    "RedisAccountant",
    "RequestRules",
    "RiskLevel",
    "RiskOverrides",
    "RiskSource",
    "RowHardening",
    "SqlAccountant",
    "TierPolicy",
    "apply_rules",
    "build_accountant",
    "harden_oip",
    "harden_row",
    "harden_rows",
    "level_for_action",
]
