"""The state database: one async SQLAlchemy engine on SQLite or PostgreSQL.

Start-up, as ``app.py`` or the CLI does it::

    engine = open_engine(config.store)      # "sqlite:///modelfence.db" or "postgresql://..."
    await create_tables(engine)
    ...
    await engine.dispose()

Stores run their statements inside :func:`transaction`, which is where driver errors
become :class:`~modelfence.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Connection, Engine, event, inspect, select, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from modelfence.errors import ConfigError, StoreError
from modelfence.store.schema import account_traits, accounts, metadata

# URL scheme in the config -> SQLAlchemy async driver.
DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Any constant works; it only has to be the same in every process creating the schema.
_SCHEMA_LOCK_ID = 0x6D66_7363  # "mfsc"
_WRITE_OPTION = "modelfence_write"
# SQLSTATE classes of errors caused by the values themselves: 22 data exception (too long,
# NUL byte, bad encoding), 23 integrity constraint violation.
_VALUE_ERROR_CLASSES = frozenset({"22", "23"})


def async_url(url: str) -> str:
    """The SQLAlchemy URL for a config store URL: ``sqlite:///x.db`` -> ``sqlite+aiosqlite:///x.db``."""
    scheme, sep, rest = url.partition("://")
    driver = DRIVERS.get(scheme)
    if not sep or driver is None:
        raise ConfigError(f"store: {url!r} is not sqlite:///PATH or postgresql://USER@HOST/DB")
    return f"{driver}://{rest}"


def open_engine(url: str) -> AsyncEngine:
    """An engine for the store URL; SQLite files are put in WAL mode with a busy timeout."""
    engine = create_async_engine(async_url(url))
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine.sync_engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below): the sqlite3 driver skips it before SELECT
        # and DDL, which would leave reads and CREATE TABLE outside any transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # busy_timeout: a writer waits for the lock instead of failing. WAL: readers never
        # block the writer, so the gateway, the CLI and the detector can share one file.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enter_wal(dbapi_connection, cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that has read cannot take the write lock once another
        # process has committed (SQLITE_BUSY at once, busy_timeout does not help), so
        # writers take the lock up front and wait their turn.
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _enter_wal(dbapi_connection: Any, cursor: Any) -> None:
    """Switch the file to WAL, waiting as long as ``busy_timeout`` for other connections.

    The switch reads the file, then needs the write lock; while another connection
    writes, SQLite answers "database is locked" at once, without its busy handler (a
    reader waiting on a writer could deadlock). Processes opening a new file together
    (the gateway, its detector workers) would otherwise fail at start-up.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # any SQLITE_BUSY_*
            if not busy or time.monotonic() >= deadline:
                raise
        # The connect event runs in SQLAlchemy's greenlet: this waits on the event loop.
        dbapi_connection.run_async(lambda _driver, pause=delay: asyncio.sleep(pause))
        delay = min(delay * 2, 0.1)


@asynccontextmanager
async def transaction(
    engine: AsyncEngine, *, write: bool = False
) -> AsyncIterator[AsyncConnection]:
    """One transaction, committed on success; database errors raise :class:`StoreError`.

    ``write=True`` for transactions that modify rows: on SQLite it takes the write lock
    at ``BEGIN`` (see ``_configure_sqlite``); PostgreSQL ignores it::

        async with transaction(engine, write=True) as conn:
            await conn.execute(api_keys.update().values(...))
    """
    try:
        async with engine.connect() as conn:
            if write:
                await conn.execution_options(**{_WRITE_OPTION: True})
            async with conn.begin():
                yield conn
    except (SQLAlchemyError, OSError) as exc:  # OSError: asyncpg cannot connect
        raise StoreError(f"state database failed: {_reason(exc)}") from exc


def rejects_values(exc: BaseException) -> bool:
    """Whether a failed statement failed because of the values it carried, not the database.

    Such a statement fails the same way every time, so retrying it is pointless (and a
    retry loop would stall on it forever); a connection or lock error is worth a retry.
    Accepts the :class:`StoreError` raised by :func:`transaction` or the driver's error.
    """
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    # Raised by the driver while converting a value (sqlite3: an int past 64 bits, a lone
    # surrogate), before any SQL ran.
    if isinstance(cause, (ValueError, TypeError, OverflowError)):
        return True
    if isinstance(cause, (DataError, IntegrityError)):
        return True
    if isinstance(cause, DBAPIError):
        code = getattr(cause.orig, "sqlstate", None) or getattr(cause.orig, "pgcode", None)
        return isinstance(code, str) and code[:2] in _VALUE_ERROR_CLASSES
    # A StatementError that is not a DBAPIError: a value could not even be bound (a
    # naive datetime, something JSON cannot encode).
    return isinstance(cause, StatementError)


def _reason(exc: BaseException) -> str:
    # The driver's own message, without the SQL statement and parameters SQLAlchemy adds.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return f"{type(cause).__name__}: {cause}"


async def create_tables(engine: AsyncEngine) -> None:
    """Create the tables, columns and indexes of :data:`metadata` that are missing.

    Columns added to a table after its first release are nullable, so a database made by
    an earlier version is brought up to date in place (``ALTER TABLE ... ADD COLUMN``), and
    so are indexes added later (found missing by name, on both databases).
    Safe when several processes start at once: creations are serialised (SQLite's write
    lock, a PostgreSQL advisory lock held until commit) and DDL is transactional on both,
    so each process after the first finds the tables in place.
    """
    async with transaction(engine, write=True) as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        existing = await conn.run_sync(_add_missing_columns)
        await conn.run_sync(metadata.create_all)
        if account_traits.name not in existing:
            await conn.run_sync(_fill_account_traits)


def _add_missing_columns(conn: Connection) -> set[str]:
    """Add the missing columns and indexes of existing tables; the tables that existed."""
    inspector = inspect(conn)
    # The schema the connection maps the tables to (its schema_translate_map), which the
    # inspector does not apply by itself.
    schema = conn.schema_for_object(metadata.sorted_tables[0])
    existing_tables = set(inspector.get_table_names(schema=schema))
    for table in metadata.sorted_tables:
        if table.name not in existing_tables:
            continue  # create_all makes it whole
        present = {column["name"] for column in inspector.get_columns(table.name, schema=schema)}
        added = [column for column in table.columns if column.name not in present]
        for column in added:
            if not column.nullable:
                raise StoreError(
                    f"table {table.name} lacks column {column.name}, which cannot be added "
                    "in place (not nullable)"
                )
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
        indexed = {index["name"] for index in inspector.get_indexes(table.name, schema=schema)}
        for index in table.indexes:
            if index.name not in indexed:
                index.create(conn)
    return existing_tables


def _fill_account_traits(conn: Connection) -> None:
    """A new ``account_traits`` gets the traits of the accounts already registered, read
    1,000 accounts at a time (once: afterwards the key store writes both)."""
    after = ""
    while True:
        page = conn.execute(
            select(accounts.c.account_id, accounts.c.traits)
            .where(accounts.c.account_id > after)
            .order_by(accounts.c.account_id)
            .limit(1000)
        ).all()
        rows = [
            {"trait": name, "hash": value, "account_id": account_id}
            for account_id, traits in page
            for name, value in (traits or {}).items()
        ]
        if rows:
            conn.execute(account_traits.insert(), rows)
        if len(page) < 1000:
            return
        after = page[-1].account_id
