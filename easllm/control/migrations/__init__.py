"""Alembic migrations of the console's database; `registry.upgrade_schema` runs them at start."""
