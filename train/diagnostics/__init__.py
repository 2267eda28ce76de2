"""Diagnostics and one-off measurement scripts (not pipeline stages)."""
