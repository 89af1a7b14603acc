"""What the evaluated deployment is and what it charges: the published example
configuration, and a request's tokens and dollars as the gateway reserves them.

The gateway charges a request before it runs (prompt estimate plus ``max_tokens``; images
for a classifier) with its own request parsers; the contest's limits and every thief's
pacing use the very same numbers, so neither can drift from the gateway.

    tariff = Tariff(example_config())
    tokens, usd = tariff.charge(plan)
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import modelfence
from modelfence.config import Config, load_config
from modelfence.gateway.admission import cost
from modelfence.gateway.apis import OIPApi, OpenAIApi, ParsedRequest
from modelfence.operations import Operation
from modelfence.redteam.traffic import DIGITS_INFER, PlannedRequest

EXAMPLE_CONFIG = Path(modelfence.__file__).resolve().parents[2] / "modelfence.example.yaml"


@cache
def example_config(path: Path | None = None) -> Config:
    """The published configuration (``modelfence.example.yaml`` of the source tree): the
    tiers' limits, the prices and the detection ladder a new operator starts from."""
    path = path or EXAMPLE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the evaluation runs the example configuration "
                                "of a source checkout (or pass its path)")
    return load_config(path, environ={})


class Tariff:
    """A request's reservation: (tokens, dollars) by the gateway's parsers and prices."""

    def __init__(self, config: Config) -> None:
        self._openai = OpenAIApi(config.limits.default_max_tokens)
        self._oip = OIPApi()
        self._prices = config.prices

    def parse(self, plan: PlannedRequest) -> ParsedRequest:
        if plan.route == DIGITS_INFER:
            return self._oip.parse(Operation.OIP_INFER, plan.model, plan.body)
        operation = Operation.for_route(plan.route)
        if operation is None:
            raise ValueError(f"no operation serves {plan.route!r}")
        return self._openai.parse(operation, None, plan.body)

    def charge(self, plan: PlannedRequest) -> tuple[int, float]:
        parsed = self.parse(plan)
        tokens = parsed.prompt_tokens + parsed.max_output_tokens
        return tokens, cost(self._prices.get(parsed.model), parsed.prompt_tokens, parsed.max_output_tokens)
