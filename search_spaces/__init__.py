"""Declarative search spaces over training options, and presets of the paper's studies."""

from search_spaces.space import KINDS, Param, SpaceError, define_by_run, flatten, parse_space, size

__all__ = ["KINDS", "Param", "SpaceError", "define_by_run", "flatten", "parse_space", "size"]
