"""evaluations package."""
