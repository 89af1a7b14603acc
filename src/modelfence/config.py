"""Configuration: one frozen pydantic tree, parsed in one place, never mutated.

Where the file comes from: ``--config PATH``, else ``$MODELFENCE_CONFIG``, else
``./modelfence.yaml`` if present, else the embedded defaults (SQLite, in-process limits,
the demo upstream on 127.0.0.1:9000). Secrets and the deployment-specific URLs may be
overridden from the environment (see ``ENV_OVERRIDES``). Every error names the key path,
the bad value and what is allowed, and raises :class:`ConfigError` instead of exiting.
"""

from __future__ import annotations

import ipaddress
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modelfence.confidential.config import ConfidentialConfig
from modelfence.errors import ConfigError
from modelfence.forensics.config import ForensicsConfig
from modelfence.policy.config import PolicyConfig
from modelfence.redisurl import ALLOWED_URLS, check_url, is_cluster_url, is_redis_url
from modelfence.watermark.config import WatermarkConfig

DEFAULT_CONFIG_FILE = "modelfence.yaml"

# env var -> config key path. Only these: secrets and the URLs that differ per deployment.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "MODELFENCE_ADMIN_TOKEN": ("admin_token",),
    "MODELFENCE_SECRET": ("secret",),
    "MODELFENCE_STORE": ("store",),
    "MODELFENCE_LIMITS_BACKEND": ("limits", "backend"),
    "MODELFENCE_BROKER_TOKEN": ("confidential", "token"),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, gt=0, description="larger request bodies get 413")
    max_header_bytes: int = Field(16_384, ge=1024, description="larger request heads get 431")
    trusted_proxies: tuple[str, ...] = Field(
        (), description="CIDRs whose X-Forwarded-For is trusted to name the client address"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="a request head not complete by then: 408, connection closed"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="a request body not complete by then: connection closed"
    )
    limit_concurrency: int = Field(
        2048, ge=1, le=1_000_000, description="open connections and requests past this get 503"
    )
    backlog: int = Field(2048, ge=1, le=65_535, description="connections queued by the kernel")
    auth_failures_per_minute: int = Field(
        30, ge=1, le=100_000,
        description="failed API key or admin token checks allowed per client address; then 429",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IP network such as 10.0.0.0/8") from exc
        return value


class UpstreamConfig(_Frozen):
    name: str = Field(min_length=1)
    url: str
    kind: Literal["openai", "oip"] = "openai"
    models: tuple[str, ...] = ("*",)
    api_key: str | None = Field(None, description="sent upstream as a bearer token")
    timeout_seconds: float = Field(120.0, gt=0, description="whole-request limit, 504 after")
    connect_timeout_seconds: float = Field(5.0, gt=0)
    think_opened_in_prompt: bool = Field(
        False, description="the models' chat template opens <think> in the prompt, so an "
        "answer's content starts inside its reasoning, up to </think> (Qwen3 Thinking-2507, "
        "recent DeepSeek-R1 and QwQ templates served without a reasoning parser)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


# The largest limit each dimension accepts (null means unlimited). GCRA keeps its state as
# epoch seconds with ~2.4e-7 s resolution: a request at 1e7 per minute still occupies 25
# of those steps, a token at 1e9 per minute a quarter of one (requests cost hundreds).
# Micro-dollars up to 1e15 stay exact in a double, in Python and in Redis Lua alike.
MAX_REQUESTS_PER_MINUTE = 10_000_000
MAX_TOKENS_PER_MINUTE = 1_000_000_000
MAX_CONCURRENT_REQUESTS = 1_000_000
MAX_USD_PER_DAY = 1_000_000_000


def _bounded(maximum: int, unit: str) -> BeforeValidator:
    """Accept a number in (0, maximum]; refuse text, true/false, NaN and infinities."""

    def check(value: object) -> object:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            # ValueError, not TypeError: pydantic reports only the former as a bad value.
            raise ValueError(f"must be a number of {unit}, not {type(value).__name__}")  # noqa: TRY004
        if not 0 < value <= maximum:
            raise ValueError(
                f"must be greater than 0 and at most {maximum:,} {unit}; leave it out or null "
                "for unlimited"
            )
        return value

    return BeforeValidator(check)


# Whole units: a fraction of a request or a token is refused (1.5), a whole float (60.0)
# is taken as the integer it is. ``strict=False`` so the strict admin API takes 60.0 too.
RequestsPerMinute = Annotated[
    int, _bounded(MAX_REQUESTS_PER_MINUTE, "requests per minute"), Field(strict=False)
]
TokensPerMinute = Annotated[
    int, _bounded(MAX_TOKENS_PER_MINUTE, "tokens per minute"), Field(strict=False)
]
ConcurrentRequests = Annotated[
    int, _bounded(MAX_CONCURRENT_REQUESTS, "concurrent requests"), Field(strict=False)
]
UsdPerDay = Annotated[float, _bounded(MAX_USD_PER_DAY, "dollars per day"), Field(strict=False)]


class TierConfig(_Frozen):
    requests_per_minute: RequestsPerMinute | None = 60
    tokens_per_minute: TokensPerMinute | None = 100_000
    concurrent_requests: ConcurrentRequests | None = 8
    usd_per_day: UsdPerDay | None = 10.0
    models: tuple[str, ...] = Field(("*",), description="model names or fnmatch patterns")


class PerSourceLimit(_Frozen):
    requests_per_minute: RequestsPerMinute | None = None


class LimitsConfig(_Frozen):
    backend: str = Field(
        "memory", description="memory, redis://host:port/db, or redis+cluster://host:port[,...]"
    )
    on_backend_error: Literal["open", "closed", "degraded"] = "degraded"
    degraded_share: float = Field(
        0.25, gt=0, le=1, description="share of each limit one replica may admit alone"
    )
    redis_timeout_seconds: float = Field(0.25, gt=0)
    default_max_tokens: int = Field(
        1024, gt=0, description="tokens reserved for output when a request names no max_tokens"
    )
    lease_ttl_seconds: float = Field(
        900, gt=0, description="a concurrency lease of a crashed replica expires after this"
    )
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {"default": TierConfig()})
    per_ip_prefix: PerSourceLimit = PerSourceLimit()
    per_fingerprint: PerSourceLimit = PerSourceLimit()

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value != "memory" and not is_redis_url(value):
            raise ValueError(f"allowed: memory, {ALLOWED_URLS}")
        return value if value == "memory" else check_url(value)

    @model_validator(mode="after")
    def _cluster_keeps_slots(self) -> LimitsConfig:
        # An IP prefix or fingerprint bucket is shared by many keys, so no hash tag can put
        # it in the slot of every key whose admission script checks it.
        if is_cluster_url(self.backend):
            for name in ("per_ip_prefix", "per_fingerprint"):
                if getattr(self, name).requests_per_minute is not None:
                    raise ValueError(
                        f"{name}.requests_per_minute needs a single Redis or memory; "
                        "with a redis+cluster:// backend, leave it unset"
                    )
        return self

    @field_validator("tiers")
    @classmethod
    def _has_default(cls, value: dict[str, TierConfig]) -> dict[str, TierConfig]:
        if "default" not in value:
            raise ValueError("a tier named 'default' is required")
        return value


MAX_ALLOWANCE = 10**15  # rows or tokens over a day or 30 days; beyond it, leave the field unset

AllowanceUnits = Annotated[int, Field(ge=0, le=MAX_ALLOWANCE, strict=True)]  # 0: none until the level changes


class AllowanceConfig(_Frozen):
    """An account's budget over UTC days, across all its keys; a field left unset is unlimited.

    Rows are inputs: classifier rows, embedding texts, completion prompts.
    """

    rows_per_day: AllowanceUnits | None = None
    rows_per_30_days: AllowanceUnits | None = None
    tokens_per_day: AllowanceUnits | None = None
    tokens_per_30_days: AllowanceUnits | None = None


TrustLevelName = Literal["probation", "standard", "trusted"]
DemoteAt = Literal["alert", "tighten", "degrade", "block"]


def _default_allowances() -> dict[TrustLevelName, AllowanceConfig]:
    return {
        "probation": AllowanceConfig(
            rows_per_day=300, rows_per_30_days=3_000, tokens_per_day=300_000
        ),
        "standard": AllowanceConfig(),
        "trusted": AllowanceConfig(),
    }


def _held() -> AllowanceConfig:
    return AllowanceConfig(rows_per_day=0, tokens_per_day=0)


class SurgeConfig(_Frozen):
    """Sign-up surges (``identity/signups.py``): unverified, unpaid accounts created while
    sign-ups run far above their baseline are held on probation with ``allowance``
    (default: nothing until they verify, pay or age out of probation).

    ``windows`` maps a window in hours to the least ratio of sign-ups to the baseline's
    expectation that counts as a surge in it; ``p_value`` is the one-sided Poisson test's
    level per test and ``min_excess`` the fewest extra accounts a surge needs.
    """

    enabled: bool = True
    baseline_days: float = Field(7.0, gt=0, le=90)
    min_history_hours: float = Field(24.0, gt=0, le=24 * 90)
    windows: dict[Annotated[float, Field(ge=1 / 60, le=24 * 7)], Annotated[float, Field(ge=1.0, le=1_000)]] = Field(
        default_factory=lambda: {0.25: 4.0, 1.0: 3.0, 6.0: 2.0, 24.0: 1.5}
    )
    min_excess: int = Field(20, ge=1, le=1_000_000, strict=True)
    p_value: float = Field(1e-6, gt=0, lt=1)
    allowance: AllowanceConfig = Field(default_factory=_held)

    @model_validator(mode="after")
    def _windows_fit(self) -> SurgeConfig:
        if not self.windows:
            raise ValueError("accounts.surge.windows needs at least one window (hours: ratio)")
        if max(self.windows) > self.baseline_days * 24:
            raise ValueError("accounts.surge.windows: a window longer than baseline_days has no baseline")
        if self.min_history_hours > self.baseline_days * 24:
            raise ValueError("accounts.surge.min_history_hours: more than baseline_days holds; no surge could be found")
        return self


class AccountsConfig(_Frozen):
    """Trust per account (organisation), and the allowance each trust level gets.

    An account is on ``probation`` while it is younger than ``probation_days``, unless the
    operator verified its organisation or it has paid ``probation_paid_usd``; it becomes
    ``trusted`` once older than ``trusted_days`` and verified or paid ``trusted_paid_usd``;
    in between it is ``standard``. Risk lowers trust: a detection level of ``alert`` or
    above caps an account at ``standard``, ``demote_at`` or above (``degrade``: a level
    only extraction evidence reaches, never timing or volume alone) puts it on probation.
    Keys without an account are the operator's own issue and are ``standard``.
    """

    probation_days: float = Field(7.0, ge=0, le=3650)
    probation_paid_usd: float = Field(20.0, ge=0)
    trusted_days: float = Field(90.0, ge=0, le=3650)
    trusted_paid_usd: float = Field(500.0, ge=0)
    demote_at: DemoteAt = "degrade"
    probation_answers: Literal["normal", "elevated", "high"] = Field(
        "elevated", description="the hardening profile (policy.tiers) probation gets at least"
    )
    allowances: dict[TrustLevelName, AllowanceConfig] = Field(default_factory=_default_allowances)
    surge: SurgeConfig = Field(default_factory=SurgeConfig)

    @field_validator("allowances")
    @classmethod
    def _levels_left_out_keep_defaults(
        cls, value: dict[TrustLevelName, AllowanceConfig]
    ) -> dict[TrustLevelName, AllowanceConfig]:
        # A level given replaces that level's allowance whole; the others keep theirs.
        return {**_default_allowances(), **value}

    @model_validator(mode="after")
    def _ordered(self) -> AccountsConfig:
        if self.trusted_days < self.probation_days:
            raise ValueError("trusted_days must be at least probation_days")
        return self

    def allowance(self, level: TrustLevelName) -> AllowanceConfig:
        return self.allowances.get(level) or AllowanceConfig()


class PriceConfig(_Frozen):
    input_per_1k_tokens: float = Field(0.0, ge=0)
    output_per_1k_tokens: float = Field(0.0, ge=0)
    per_request: float = Field(0.0, ge=0, description="flat price, e.g. for classifiers")


class FingerprintConfig(_Frozen):
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)


class TelemetryConfig(_Frozen):
    """The event pipeline: one event per request, written off the request path."""

    enabled: bool = True
    queue_size: int = Field(10_000, gt=0, description="events waiting; more are counted and dropped")
    queue_bytes: int = Field(
        64 * 2**20, gt=0, le=2**40,
        description="bytes the waiting events may hold (prompts, inputs); more are counted and dropped",
    )
    batch_size: int = Field(500, gt=0, description="most events per sink write")
    buffer_events: int = Field(
        100_000, gt=0, description="events held for a sink while it is down, then dropped"
    )
    buffer_bytes: int = Field(
        256 * 2**20, gt=0, le=2**40,
        description="bytes held for a sink while it is down, then events are dropped",
    )
    retry_max_seconds: float = Field(30.0, gt=0, description="longest wait between sink retries")
    retention_days: float | None = Field(30, gt=0, description="older events are deleted")
    store_prompt_text: bool = Field(False, description="privacy: off keeps only hashes")
    otel_spans: bool = Field(False, description="emit OpenTelemetry GenAI spans (gen_ai.*)")


class DetectionTierConfig(_Frozen):
    """Risk thresholds in [0, 1] at which each action starts, for one tier."""

    alert: float = Field(0.3, ge=0, le=1)
    tighten: float = Field(0.5, ge=0, le=1)
    degrade: float = Field(0.7, ge=0, le=1)
    block: float = Field(0.9, ge=0, le=1)
    tighten_share: float = Field(0.25, gt=0, le=1, description="share of limits left when tight")

    @model_validator(mode="after")
    def _ordered(self) -> DetectionTierConfig:
        if not self.alert <= self.tighten <= self.degrade <= self.block:
            raise ValueError("thresholds must satisfy alert <= tighten <= degrade <= block")
        return self


EmbedderKind = Literal["auto", "minilm", "minilm-int8", "hashing"]


# How the detector child of serve shares the CPU with the gateway (detect/process.py).
ProcessPriority = Literal["low", "idle", "normal"]


class DetectionConfig(_Frozen):
    """The detector process and how its verdicts reach the gateways."""

    enabled: bool = True
    feed: Literal["process", "redis"] = Field(
        "process", description="process: a child of serve; redis: `modelfence detect` workers"
    )
    redis_url: str | None = Field(
        None, description="streams and shared state when feed=redis (redis:// or redis+cluster://)"
    )
    partitions: int = Field(8, ge=1, le=1024, description="Redis Streams, split by client")
    process_priority: ProcessPriority = Field(
        "low",
        description="feed=process: the detector child's CPU priority against the gateway's "
        "on shared cores. low: nice 10, the gateway first, the detector keeps a small share "
        "under load; idle: only time no one else wants (a saturated gateway all but stops "
        "detection); normal: an equal share",
    )
    shadow: bool = Field(False, description="decide and record, never act")
    embedder: EmbedderKind = Field(
        "auto",
        description="auto: minilm when installed, else hashing; minilm-int8: MiniLM multiplying "
        "in int8, about twice as fast (calibrate the reference with the same embedder)",
    )
    reference_file: str | None = Field(
        None, description="benign reference (.npz from `modelfence calibrate`)"
    )
    target_fpr: float = Field(0.001, gt=0, lt=0.5)
    window: int = Field(200, ge=20, description="recent queries kept per client")
    evaluate_every: int = Field(10, ge=1, description="new queries between evaluations")
    half_life_hours: float = Field(24.0, gt=0, description="risk of a quiet client halves")
    idle_evict_hours: float = Field(
        6.0, gt=0, description="forget an idle client's recent queries (its risk is kept)"
    )
    link_half_life_hours: float = Field(
        24.0, gt=0, description="links by fingerprint, network or lockstep halve in weight"
    )
    state_poll_seconds: float = Field(1.0, gt=0)
    metrics_port: int | None = Field(
        None, ge=1, le=65535,
        description="`modelfence detect` serves its /metrics here (off when unset); in-gateway "
        "detection reports on the gateway's /metrics instead",
    )
    metrics_host: str = Field(
        "0.0.0.0", min_length=1, max_length=253, description="address metrics_port listens on"
    )
    history_retention_days: float = Field(
        14.0, gt=0, le=3650,
        description="risk history and query maps (the console's pictures) kept this long",
    )
    webhook_url: str | None = Field(None, description="Slack-compatible incoming webhook")
    public_url: str = Field("http://127.0.0.1:8080", description="base of admin links in alerts")
    alert_dedup_seconds: float = Field(3600, ge=0)
    allow_list: tuple[str, ...] = Field((), description="clients never acted on")
    tiers: dict[str, DetectionTierConfig] = Field(
        default_factory=lambda: {"default": DetectionTierConfig()}
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    def tier(self, name: str) -> DetectionTierConfig:
        return self.tiers.get(name) or self.tiers.get("default") or DetectionTierConfig()


class ConsoleConfig(_Frozen):
    """Sessions of the operator console under ``/console/`` (on only with an admin token)."""

    idle_minutes: float = Field(30, gt=0, le=1440, description="a session unused this long ends")
    session_hours: float = Field(8, gt=0, le=168, description="a session ends this long after login")
    max_sessions: int = Field(
        100, ge=1, le=100_000, description="sessions at once; a new login ends the oldest past it"
    )
    secure_cookie: Literal["https", "always"] = Field(
        "https", description="always: mark the session cookie Secure even when the gateway "
                             "itself speaks plain http (TLS ended by a proxy in front)"
    )


class Config(_Frozen):
    server: ServerConfig = ServerConfig()
    upstreams: tuple[UpstreamConfig, ...] = (
        UpstreamConfig(name="demo", url="http://127.0.0.1:9000", kind="openai", models=("*",)),
    )
    store: str = "sqlite:///modelfence.db"
    secret: str | None = Field(None, min_length=16, repr=False)
    secret_file: str = Field(
        "modelfence.secret", description="where a generated secret is kept when none is given"
    )
    admin_token: str | None = Field(None, min_length=16, repr=False)
    limits: LimitsConfig = LimitsConfig()
    accounts: AccountsConfig = AccountsConfig()
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    fingerprint: FingerprintConfig = FingerprintConfig()
    policy: PolicyConfig = PolicyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    detection: DetectionConfig = DetectionConfig()
    watermark: WatermarkConfig = WatermarkConfig()
    forensics: ForensicsConfig = ForensicsConfig()
    console: ConsoleConfig = ConsoleConfig()
    confidential: ConfidentialConfig = ConfidentialConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("allowed: sqlite:///PATH or postgresql://USER@HOST/DB")
        return value

    @model_validator(mode="after")
    def _upstream_names_unique(self) -> Config:
        names = [u.name for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError(f"upstream names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _policy_tiers_exist(self) -> Config:
        for name in self.policy.tiers:
            if name not in self.limits.tiers:
                allowed = ", ".join(sorted(self.limits.tiers))
                raise ValueError(f"policy.tiers.{name}: no such tier in limits.tiers ({allowed})")
        return self

    @model_validator(mode="after")
    def _lexical_upstreams_exist(self) -> Config:
        names = [u.name for u in self.upstreams]
        for pattern in self.watermark.lexical.upstreams:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"watermark.lexical.upstreams: {pattern!r} names no upstream "
                    f"(upstreams: {', '.join(names)})"
                )
        return self


_SECRET_KEYS = frozenset({"admin_token", "secret", "api_key", "token"})


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"not allowed; allowed values: {allowed}"
        value = err.get("input")
        secret = bool(err["loc"]) and err["loc"][-1] in _SECRET_KEYS
        shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def parse_config(
    data: Any, *, source: str = "config", environ: dict[str, str] | None = None
) -> Config:
    """Validate a mapping (YAML already parsed) plus env overrides into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = dict(data)
    env = os.environ if environ is None else environ
    for var, path in ENV_OVERRIDES.items():
        if env.get(var):
            _set_path(data, path, env[var])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from exc


def resolve_config_path(path: str | Path | None, environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    if path:
        return Path(path)
    if env.get("MODELFENCE_CONFIG"):
        return Path(env["MODELFENCE_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load the config file (see module docstring for the search order)."""
    resolved = resolve_config_path(path, environ)
    if resolved is None:
        return parse_config({}, source="embedded defaults", environ=environ)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{resolved}: not valid YAML: {exc}") from exc
    return parse_config(data, source=str(resolved), environ=environ)
