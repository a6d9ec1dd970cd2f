"""Transitional re-export: the one error type and exit-2 helper live in `data.cli`."""
from data.cli import UsageError, die  # noqa: F401
