"""The database layer: the pool and statement runner (pool), statements and their results
(statement), opening connections (connect), and migrations (migrate, imported only by the CLI: it
loads SQLAlchemy)."""

from common.platform.db.connect import Opened, connect_function
from common.platform.db.errors import named_errors
from common.platform.db.pool import (
    PING_AFTER_IDLE_SECONDS,
    Connection,
    Pool,
    connection,
    dispose_pool,
    get_pool,
    transaction,
)
from common.platform.db.statement import QueryError, Result, Statement, jsonb

__all__ = [
    "PING_AFTER_IDLE_SECONDS",
    "Connection",
    "Opened",
    "Pool",
    "QueryError",
    "Result",
    "Statement",
    "connect_function",
    "connection",
    "dispose_pool",
    "get_pool",
    "jsonb",
    "named_errors",
    "transaction",
]
