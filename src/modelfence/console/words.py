"""What detection's codes mean, in words an analyst in an incident can act on.

The detector's own ``text`` says what it measured for this client; these say what the
signal is and why it matters. A code missing here (a newer detector) is shown as is.
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    "prada_distance": "Queries spaced the way synthetic probes are, not the way real inputs "
    "are (PRADA: distances to earlier queries fail a normality test).",
    "mmd_shift": "The client's recent queries are distributed unlike honest traffic "
    "(maximum mean discrepancy against the honest reference).",
    "coverage_growth": "Queries keep reaching new regions of the input space, as a sweep "
    "meant to map the model does.",
    "perturbation_sweep": "Many queries are small variations of earlier ones: probing how "
    "answers change near a point.",
    "machine_timing": "Requests arrive at machine-regular intervals.",
    "around_the_clock": "Active in almost every hour of the day.",
    "volume_vs_tier": "Far more queries than the typical client of its tier.",
    "llm_harvesting": "Requests shaped to collect training data for a copy: single turns, "
    "greedy decoding, log-probabilities, saturated output lengths, elicited reasoning.",
    "boundary_probing": "Classifier inputs close to decision boundaries, where a copy "
    "learns the most.",
    "out_of_distribution": "Classifier inputs far from anything honest clients send.",
    "manual_override": "Set by an operator.",
    "cut_link": "An operator cut a link between two clients.",
    "restore_link": "An operator restored a cut link.",
}

LINKS: dict[str, str] = {
    "account": "the keys belong to one account",
    "payment": "their accounts share a payment instrument",
    "organisation": "their accounts share a verified organisation",
    "fingerprint": "requests come from one client fingerprint (network, user agent, headers)",
    "lockstep": "busy in the same moments on the same queries",
    "ip_prefix": "requests come from one network prefix",
    "frame": "new accounts sending one prompt frame",
    "signup_network": "their accounts signed up from one network",
    "email_domain": "their accounts share an e-mail domain",
}

LEVELS: dict[str, str] = {
    "normal": "served as usual",
    "alert": "served; operators alerted",
    "tighten": "limits cut to a share of the tier's",
    "degrade": "answers hardened (less information per answer), limits cut",
    "block": "every request refused",
}

ACTIONS: dict[str, str] = {
    "block": "refuse every request",
    "degrade": "harden answers and cut limits",
    "tighten": "cut limits to a share of the tier's",
    "alert": "keep serving, raise alerts",
    "allow": "never act on this client (pins it to normal)",
    "shadow": "keep scoring, recording and alerting, apply nothing (the level stays visible)",
    "probation": "hold it to the probation allowance whatever its account; detection still "
    "decides the level",
    "clear": "remove the pin; detection decides again",
}

REFUSALS: dict[int, str] = {
    400: "invalid request",
    401: "unknown or revoked key",
    403: "refused by detection (blocked)",
    404: "unknown model, or not allowed for the tier",
    413: "request too large",
    429: "limits, budgets or probation allowance",
    502: "upstream error",
    503: "a required service is down",
    504: "upstream timeout",
}
