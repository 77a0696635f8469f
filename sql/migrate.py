"""Applies ``sql/migrations/*.sql`` in file-name order, each once, under an advisory lock
(several workers may start together)."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

__all__ = ["MIGRATIONS_LOCK_ID", "apply_migrations", "migration_files"]

log = logging.getLogger(__name__)

#: pg_advisory_lock key serialising migration runs ("mf-migr" as an integer).
MIGRATIONS_LOCK_ID = 0x6D662D6D696772


def migration_files() -> list[tuple[str, str]]:
    """``(name, sql)`` for every migration, sorted by name (``001_...`` first)."""
    root = resources.files("sql") / "migrations"
    out = [(p.name, p.read_text(encoding="utf-8")) for p in root.iterdir()
           if p.name.endswith(".sql")]
    return sorted(out)


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations in order, each in its own transaction.

    Returns:
        list[str]: names of the migrations applied now (empty when up to date).

    Raises:
        asyncpg.PostgresError: a migration failed (it is rolled back; later ones skip).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for name, text in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("applied migration %s", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_ID)
