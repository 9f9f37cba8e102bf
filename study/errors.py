"""The errors a study command turns into one line and exit code 2 (a light module: the CLI imports it first)."""

from __future__ import annotations


class SpecError(ValueError):
    """A study file is missing, malformed or asks for something that does not exist."""


class QueryError(ValueError):
    """A --where expression that is not in the grammar or names an unknown column."""
