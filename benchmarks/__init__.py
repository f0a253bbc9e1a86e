"""Measured scenarios. Each benchmark prints its figures beside its anchor (see README.md)."""
