"""Tables of the state database: one :data:`metadata`, one schema for SQLite and PostgreSQL.

Every layer adds its tables to :data:`metadata`;
:func:`modelfence.store.database.create_tables` creates whatever is missing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, DateTime, Dialect, Index, MetaData, String, Table
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
    Index(None, "key_hash", unique=True),
    Index(None, "updated_at"),
)
