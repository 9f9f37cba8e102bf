"""Declarative search spaces: a mapping of training option -> distribution, turned into an Optuna
define-by-run function.

In a study file::

    space:
      base_lr: {log: [1.0e-4, 3.0e-3]}   # log-uniform float
      warmup_epochs: {uniform: [0, 2]}   # uniform float
      epochs: {int: [2, 4]}              # integer, inclusive
      batch_size: {choice: [64, 128]}    # categorical
      moco_m: {log1m: [0.9, 0.999]}      # m with 1 - m log-uniform in [0.001, 0.1] (momentum, as the paper's
                                         # ablation spaces it)
      optimizer:                         # conditional parameters (Optuna define-by-run): a branch per value
        choice: [adamw, lamb]
        when:
          adamw: {base_lr: {log: [1.0e-4, 1.0e-3]}}
          lamb: {base_lr: {log: [3.0e-4, 3.0e-3]}, weight_decay: {log: [1.0e-3, 1.0e-1]}}

Optuna models ``log1m`` parameters as ``1-<name>`` (what it searches); the trial config gets ``<name>``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

KINDS = ("log", "uniform", "int", "choice", "log1m")


class SpaceError(ValueError):
    """A search space entry that cannot be sampled."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    args: tuple  # (low, high) for ranges, the options for "choice"
    when: tuple[tuple[Any, tuple[Param, ...]], ...] = ()  # choice only: (value, parameters sampled if chosen)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample this parameter (and the branch its value opens): ``{training option: value}``."""
        if self.kind == "choice":
            value = trial.suggest_categorical(self.name, list(self.args))
            branch = dict(self.when).get(value, ())
            return {self.name: value, **{k: v for p in branch for k, v in p.suggest(trial).items()}}
        low, high = self.args
        if self.kind == "int":
            return {self.name: trial.suggest_int(self.name, low, high)}
        if self.kind == "log1m":
            return {self.name: 1.0 - trial.suggest_float(f"1-{self.name}", 1.0 - high, 1.0 - low, log=True)}
        return {self.name: trial.suggest_float(self.name, low, high, log=self.kind == "log")}

    def count(self) -> int | None:
        """How many values this parameter (with the branches its values open) can take; None if continuous."""
        if self.kind == "choice":
            branches = dict(self.when)
            counts = [size(branches.get(v, ())) for v in self.args]
            return None if None in counts else sum(counts)
        return self.args[1] - self.args[0] + 1 if self.kind == "int" else None

    def flat(self) -> list[Param]:
        """This parameter and those of its branches."""
        return [self, *(q for _, branch in self.when for p in branch for q in p.flat())]


def _parse_one(name: str, entry: Any, where: str) -> Param:
    when = entry.pop("when", None) if isinstance(entry, dict) and "choice" in entry else None
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SpaceError(f"{where}.{name}: expected one of {{{': [...], '.join(KINDS)}: [...]}}, got {entry!r}")
    (kind, args), = entry.items()
    if kind not in KINDS:
        raise SpaceError(f"{where}.{name}: unknown distribution '{kind}'; accepted: {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}.{name}.{kind}: expected a non-empty list, got {args!r}")
    if kind == "choice":
        return Param(name, kind, tuple(args), _parse_when(name, args, when, where) if when is not None else ())
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SpaceError(f"{where}.{name}.{kind}: expected [low, high] numbers, got {args!r}")
    low, high = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}.{name}.int: expected integer bounds, got {args!r}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{where}.{name}.{kind}: empty or inverted range [{low}, {high}]; need low < high")
    if kind == "log" and low <= 0:
        raise SpaceError(f"{where}.{name}.log: bounds must be > 0, got [{low}, {high}]")
    if kind == "log1m" and not 0 <= low < high < 1:
        raise SpaceError(f"{where}.{name}.log1m: bounds must satisfy 0 <= low < high < 1, got [{low}, {high}]")
    return Param(name, kind, (low, high))


def _parse_when(name: str, options: list, when: Any, where: str) -> tuple:
    if not isinstance(when, dict):
        raise SpaceError(f"{where}.{name}.when: expected a mapping of choice value -> space, got {when!r}")
    branches = []
    for value, space in when.items():
        if value not in options:
            raise SpaceError(f"{where}.{name}.when: {value!r} is not one of the choices {options}")
        branch = parse_space(space, f"{where}.{name}.when.{value}")
        if any(p.name == name for p in branch):
            raise SpaceError(f"{where}.{name}.when.{value}: a branch cannot set '{name}' again")
        branches.append((value, tuple(branch)))
    return tuple(branches)


def parse_space(space: dict, where: str = "space") -> list[Param]:
    """Validate a declarative space; raises :class:`SpaceError` naming the entry at fault."""
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{where}: expected a non-empty mapping of option -> distribution, got {space!r}")
    # a copy: parsing pops "when" from the entries
    return [_parse_one(str(name), dict(e) if isinstance(e, dict) else e, where) for name, e in space.items()]


def size(params: Sequence[Param]) -> int | None:
    """How many distinct configurations ``params`` span (the product of their counts); None if any is
    continuous."""
    n = 1
    for p in params:
        if (k := p.count()) is None:
            return None
        n *= k
    return n


def flatten(params: list[Param]) -> list[Param]:
    """Every parameter, conditional ones included, once per name (the first definition)."""
    out: dict[str, Param] = {}
    for p in params:
        for q in p.flat():
            out.setdefault(q.name, q)
    return list(out.values())


def sample(trial: optuna.Trial, params: tuple[Param, ...]) -> dict[str, Any]:
    """Suggest every parameter; the returned options reach Tune's config (log1m ones under their own name)."""
    return {k: v for param in params for k, v in param.suggest(trial).items()}


def define_by_run(params: list[Param]) -> Callable[[optuna.Trial], None]:
    """An Optuna define-by-run function sampling ``params`` (for ray.tune.search.optuna.OptunaSearch).

    A partial of a module-level function rather than a closure: Tune pickles its searcher to checkpoint it.
    """
    return functools.partial(sample, params=tuple(params))
