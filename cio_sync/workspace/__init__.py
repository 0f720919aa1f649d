"""The workspace (Standard mode): people, attributes and definitions, and the outbox of rows their changes
produce, in one transaction of its database (SQLite, or PostgreSQL: :mod:`cio_sync.workspace.postgres`). Knows no
storage."""

from __future__ import annotations

import os

from cio_sync._errors import ConfigError
from cio_sync.workspace.state import WorkspaceState

#: How a ``state`` argument names a PostgreSQL state (any other string or path is a SQLite file).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(state: object) -> bool:
    return isinstance(state, str) and state.startswith(POSTGRES_SCHEMES)


def open_state(state: str | os.PathLike[str] | None, *, workspace_id: int, new_workspace: bool = False,
               schema: str | None = None) -> WorkspaceState:
    """The workspace state that ``state`` names: a PostgreSQL URL (tables in ``schema``, see
    :class:`~cio_sync.workspace.postgres.PostgresState`), a SQLite file, or ``None`` (SQLite in memory)."""
    if is_postgres(state):
        from cio_sync.workspace.postgres import PostgresState

        assert isinstance(state, str)
        return PostgresState(state, workspace_id=workspace_id, schema=schema, new_workspace=new_workspace)
    if schema is not None:
        raise ConfigError("state_schema is for a PostgreSQL state (state='postgresql://...'), not a SQLite one")
    return WorkspaceState(state, workspace_id=workspace_id, new_workspace=new_workspace)
