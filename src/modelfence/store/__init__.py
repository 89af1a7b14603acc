"""The state database shared by every layer that keeps durable state."""

from modelfence.store.database import (
    async_url,
    create_tables,
    open_engine,
    rejects_values,
    transaction,
)
from modelfence.store.schema import metadata

__all__ = ["async_url", "create_tables", "metadata", "open_engine", "rejects_values", "transaction"]
