"""Declarative search spaces: a mapping of training option -> distribution, turned into an Optuna
define-by-run function.

In a study file::

    space:
      base_lr: {log: [1.0e-4, 3.0e-3]}   # log-uniform float
      warmup_epochs: {uniform: [0, 2]}   # uniform float
      epochs: {int: [2, 4]}              # integer, inclusive
      batch_size: {choice: [64, 128]}    # categorical
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

KINDS = ("log", "uniform", "int", "choice")


class SpaceError(ValueError):
    """A search space entry that cannot be sampled."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    args: tuple  # (low, high) for ranges, the options for "choice"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.args))
        low, high = self.args
        if self.kind == "int":
            return trial.suggest_int(self.name, low, high)
        return trial.suggest_float(self.name, low, high, log=self.kind == "log")


def _parse_one(name: str, entry: Any, where: str) -> Param:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SpaceError(f"{where}.{name}: expected one of {{{': [...], '.join(KINDS)}: [...]}}, got {entry!r}")
    (kind, args), = entry.items()
    if kind not in KINDS:
        raise SpaceError(f"{where}.{name}: unknown distribution '{kind}'; accepted: {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}.{name}.{kind}: expected a non-empty list, got {args!r}")
    if kind == "choice":
        return Param(name, kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SpaceError(f"{where}.{name}.{kind}: expected [low, high] numbers, got {args!r}")
    low, high = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}.{name}.int: expected integer bounds, got {args!r}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{where}.{name}.{kind}: empty or inverted range [{low}, {high}]; need low < high")
    if kind == "log" and low <= 0:
        raise SpaceError(f"{where}.{name}.log: bounds must be > 0, got [{low}, {high}]")
    return Param(name, kind, (low, high))


def parse_space(space: dict, where: str = "space") -> list[Param]:
    """Validate a declarative space; raises :class:`SpaceError` naming the entry at fault."""
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{where}: expected a non-empty mapping of option -> distribution, got {space!r}")
    return [_parse_one(str(name), entry, where) for name, entry in space.items()]


def sample(trial: optuna.Trial, params: tuple[Param, ...]) -> None:
    for param in params:
        param.suggest(trial)


def define_by_run(params: list[Param]) -> Callable[[optuna.Trial], None]:
    """An Optuna define-by-run function sampling ``params`` (for ray.tune.search.optuna.OptunaSearch).

    A partial of a module-level function rather than a closure: Tune pickles its searcher to checkpoint it.
    """
    return functools.partial(sample, params=tuple(params))
