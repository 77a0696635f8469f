"""SQL: ordered schema migrations (``sql/migrations/NNN_name.sql``) and one query module
per table (:mod:`sql.bars_1m`). Queries use bind parameters only."""
