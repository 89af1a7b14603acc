"""Tables of the state database: one :data:`metadata`, one schema for SQLite and PostgreSQL.

Every layer adds its tables to :data:`metadata`;
:func:`modelfence.store.database.create_tables` creates whatever is missing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

# Deterministic constraint and index names, identical on both databases.
metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases.

    SQLite keeps the wall-clock digits and drops the offset, so values are converted to
    UTC before they are stored and marked UTC when read back; comparisons then work on
    either database.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("client", String(200), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("prefix", String(16), nullable=False),
    # HMAC-SHA256 hex of the key; the key itself is never stored.
    Column("key_hash", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # Set on every change, so replicas can poll for what changed (see KeyRegistry).
    Column("updated_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    # LimitOverrides fields that are set; absent means "use the tier's value".
    Column("overrides", JSON, nullable=False),
    # The account (organisation) the key belongs to; added after the first release, so
    # nullable: create_tables adds it to databases made before.
    Column("account", String(200), nullable=True),
    Index(None, "key_hash", unique=True),
    Index(None, "updated_at"),
    Index(None, "account"),
)

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(200), primary_key=True),
    # Sign-up time as the operator's systems report it; trust grows with age from here.
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("verified", Boolean, nullable=False),
    Column("paid_usd", Float, nullable=False),
    # Trait name -> keyed hash (organisation, payment, signup_network, email_domain).
    Column("traits", JSON, nullable=False),
    Index(None, "updated_at"),
)

account_traits = Table(
    "account_traits",
    metadata,
    # accounts.traits again, one row per trait, so accounts sharing a trait are found by
    # this key rather than by a scan of accounts' JSON. Written with the account
    # (identity/sql_store.py); filled from accounts by create_tables when first created.
    Column("trait", String(32), primary_key=True),
    Column("hash", String(128), primary_key=True),  # the trait's keyed hash
    Column("account_id", String(200), primary_key=True),
    Index(None, "account_id"),
)


# --- telemetry: one row per request (see modelfence.telemetry) ---
request_events = Table(
    "request_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("ts", UtcDateTime, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("client", String(200), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("route", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", Integer, nullable=False),
    Column("ip_prefix", String(64), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("prompt_hash", String(64), nullable=False),
    Column("prompt_len", Integer, nullable=False),
    Column("tokens_in", Integer, nullable=False),
    Column("tokens_out", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("limit_decision", String(64), nullable=False),
    Column("risk_level", String(16), nullable=False),
    # Request parameters, conversation shape and the rest of the event; the prompt text
    # appears here only when telemetry.store_prompt_text is on.
    Column("detail", JSON, nullable=False),
    Index(None, "ts"),
    Index(None, "client", "ts"),
)

# --- detection: published verdicts, manual overrides, audit log, alerts ---
client_risk = Table(
    "client_risk",
    metadata,
    Column("client", String(200), primary_key=True),
    Column("tier", String(64), nullable=False),
    Column("entity", String(64), nullable=True),
    Column("risk", Float, nullable=False),
    Column("level", String(16), nullable=False),  # normal | alert | tighten | degrade | block
    Column("quota_share", Float, nullable=False),  # limits are multiplied by this
    # [{"code", "text", "score", "value", "threshold", "since"}], strongest first; the last
    # three (statistic, threshold, first crossing in event time) only in newer rows
    Column("reasons", JSON, nullable=False),
    Column("queries", Integer, nullable=False),
    Column("shadow", Boolean, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # [{"other", "kinds", "weight", "joins", "cut"}]: the client's strongest links, for operators.
    # Added after the first release: nullable, so create_tables adds it in place.
    Column("links", JSON, nullable=True),
    # An operator put the client on probation (its gateways hold it to that allowance);
    # added after the first release (NULL: no).
    Column("probation", Boolean, nullable=True),
    Index(None, "updated_at"),
    Index(None, "entity"),  # the campaign page and the client list's entity filter
)

detection_overrides = Table(
    "detection_overrides",
    metadata,
    Column("client", String(200), primary_key=True),
    Column("action", String(16), nullable=False),  # allow | normal | alert | tighten | ... | block
    Column("note", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

detection_link_cuts = Table(
    "detection_link_cuts",
    metadata,
    # An operator's word that two clients are not one actor: never one entity again.
    Column("client", String(200), primary_key=True),  # the smaller name of the pair
    Column("other", String(200), primary_key=True),
    Column("note", Text, nullable=False),
    Column("at", UtcDateTime, nullable=False),
)

detection_audit = Table(
    "detection_audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("client", String(200), nullable=False),
    Column("entity", String(64), nullable=True),
    Column("previous", String(16), nullable=False),
    Column("action", String(16), nullable=False),
    Column("risk", Float, nullable=False),
    Column("source", String(16), nullable=False),  # detector | admin
    Column("shadow", Boolean, nullable=False),
    Column("reasons", JSON, nullable=False),
    Index(None, "client", "at"),
)

detection_alerts = Table(
    "detection_alerts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("client", String(200), nullable=False),
    Column("entity", String(64), nullable=True),
    Column("level", String(16), nullable=False),
    Column("risk", Float, nullable=False),
    Column("reasons", JSON, nullable=False),
    Column("delivered", Boolean, nullable=False),
    # When an operator acknowledged it in the console; added after the first release.
    Column("acknowledged_at", UtcDateTime, nullable=True),
    # The level was recorded, not applied (shadow mode or the client's shadow pin); added
    # after the first release (NULL on older alerts).
    Column("shadow", Boolean, nullable=True),
    Index(None, "at"),
)

# --- detection, for operators: how risk moved, and where a client's queries fall ---
client_risk_history = Table(
    "client_risk_history",
    metadata,
    # One row per published change of a client's record (the detector's, or an operator's
    # pin); rows older than detection.history_retention_days are deleted by the detector.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("client", String(200), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("risk", Float, nullable=False),
    Column("level", String(16), nullable=False),
    Index(None, "client", "at"),
    Index(None, "at"),
)

reference_maps = Table(
    "reference_maps",
    metadata,
    # The benign reference of one input space seen in two dimensions, once per reference:
    # its projected sample and each k-means cell's share of benign queries.
    Column("reference", String(32), primary_key=True),  # digest of the space's reference
    Column("space", String(64), nullable=False),
    Column("cells", Integer, nullable=False),  # K
    Column("points", JSON, nullable=False),  # [[x, y], ...], at most 400
    Column("shares", JSON, nullable=False),  # [share of benign queries in cell k], K of them
    # Benign clients' median distinct cells / queries over their last 100 (null: unknown).
    Column("coverage_median", Float, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
)

client_query_maps = Table(
    "client_query_maps",
    metadata,
    # A client's latest queries projected like its reference (one row, overwritten).
    Column("client", String(200), primary_key=True),
    Column("reference", String(32), nullable=False),
    Column("space", String(64), nullable=False),
    Column("points", JSON, nullable=False),  # [[x, y], ...], oldest first, at most 200
    Column("cells", JSON, nullable=False),  # the reference cell of each point
    Column("queries", Integer, nullable=False),  # the client's queries seen by the detector
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "updated_at"),
)


# --- watermark: marked classifier inputs, what `verify model --kind classifier` replays ---
watermark_ledger = Table(
    "watermark_ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("client", String(200), nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("digest", String(64), nullable=False),  # HMAC of the quantised input (hex)
    Column("features", JSON, nullable=False),  # the input row as the client sent it
    Column("label", Integer, nullable=False),  # the watermark label the client received
    Column("n_classes", Integer, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index(None, "client", "digest", unique=True),
)


# --- operator console: logged-in sessions, shared by every replica on this database ---
console_sessions = Table(
    "console_sessions",
    metadata,
    # HMAC-SHA256 hex of the session id, keyed by the admin token's SHA-256 (so another
    # token finds no session); the id itself (the cookie) is never stored, and the
    # CSRF token is derived from the id (console/sessions.py), so it is not stored either.
    Column("id_hash", String(64), primary_key=True),
    Column("created_at", UtcDateTime, nullable=False),
    # Restarted by a page view at most every 30 s per session, not at every view.
    Column("last_seen", UtcDateTime, nullable=False),
    Index(None, "created_at"),
)
