"""The harness's own stack: the demo upstream and a limits-only gateway, as child processes.

The gateway trusts loopback as a proxy, so each simulated client can name its own
address in ``X-Forwarded-For`` and land in its own /24 prefix.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from modelfence.redteam.metrics import Price
from modelfence.redteam.overrides import config_with
from modelfence.testing.processes import (
    GatewayProcess,
    ServiceProcess,
    free_port,
    modelfence_command,
)

# What the baseline charges (USD); also assumed for an external gateway.
DEFAULT_PRICES = {
    "smollm2-135m-instruct": Price(input_per_1k_tokens=0.0005, output_per_1k_tokens=0.0015),
    "minilm-l6-v2": Price(input_per_1k_tokens=0.0001),
    "digits": Price(per_request=0.001),
}
# Issue-1-level defences only: per-key limits generous enough for honest heavy users.
BASELINE_TIER = {"requests_per_minute": 600, "tokens_per_minute": 200_000,
                 "concurrent_requests": 8, "usd_per_day": 10}
# The baseline is the undefended gateway: the request rules that later layers add
# (caps on top_logprobs, no logit_bias with logprobs) are switched off, and so is the
# detector, so each defence can be measured later against these numbers.
# The demo upstream serves this many logprobs per position (vLLM's --max-logprobs); the
# wide logit probe needs a full row of a thousand, OpenAI's 20 gives only the slow probe.
MAX_LOGPROBS = 1024
OPEN_REQUEST_RULES = {"logit_bias_with_logprobs": "allow", "max_top_logprobs": None,
                      "max_logit_bias_entries": None, "max_logit_bias_magnitude": None}


def baseline_config(
    upstream_url: str, workdir: Path, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The baseline gateway's config, deep-merged with ``overrides`` (one defence on, say)."""
    config = {
        "server": {"trusted_proxies": ["127.0.0.0/8"]},
        "upstreams": [
            {"name": "demo", "url": upstream_url, "kind": "openai",
             "models": ["smollm2-135m-instruct", "minilm-l6-v2"]},
            {"name": "demo-oip", "url": upstream_url, "kind": "oip", "models": ["digits"]},
        ],
        "store": f"sqlite:///{workdir / 'redteam.db'}",
        "secret": secrets.token_hex(16),
        "admin_token": secrets.token_hex(16),
        "limits": {"backend": "memory", "tiers": {"default": BASELINE_TIER}},
        "policy": {"tiers": {"default": {"request": OPEN_REQUEST_RULES}}},
        "detection": {"enabled": False},
        "prices": {
            name: {"input_per_1k_tokens": p.input_per_1k_tokens,
                   "output_per_1k_tokens": p.output_per_1k_tokens, "per_request": p.per_request}
            for name, p in DEFAULT_PRICES.items()
        },
        "log_level": "warning",
    }
    return config_with(config, overrides or {})


@contextlib.contextmanager
def own_stack(
    workdir: Path, upstream_url: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Iterator[GatewayProcess]:
    """Start the demo upstream (unless ``upstream_url`` names a running one) and a gateway
    whose config is the baseline deep-merged with ``overrides``."""
    with contextlib.ExitStack() as stack:
        if upstream_url is None:
            port = free_port()
            upstream = ServiceProcess(
                modelfence_command("demo-upstream", "--port", str(port), "--max-logprobs", str(MAX_LOGPROBS)),
                port=port,
                ready_path="/healthz?ready=all", log_file=workdir / "demo-upstream.log", ready_timeout=600,
            )
            stack.enter_context(upstream)
            upstream_url = upstream.url
        config = baseline_config(upstream_url, workdir, overrides)
        gateway = GatewayProcess(config, workdir, name="gateway")
        yield stack.enter_context(gateway)
