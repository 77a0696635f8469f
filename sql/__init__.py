"""SQL: ordered schema migrations (``sql/migrations/NNN_name.sql``, :mod:`sql.migrate`), one
query module per table (:mod:`sql.bars_1m`, :mod:`sql.gaps`, :mod:`sql.backfill_jobs`;
bind parameters only) and the TimescaleDB pool service (:mod:`sql.pool`).

May import: :mod:`core`. Layer 1 of ``docs/architecture.md``.
"""
