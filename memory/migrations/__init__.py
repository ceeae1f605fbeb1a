"""Alembic migrations of the memory schema (run by `memory.database.upgrade`; no alembic.ini needed)."""
