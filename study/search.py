"""The Optuna side of a study: the sampler and a Tune searcher that tells Optuna each trial's real outcome."""

from __future__ import annotations

import math
from collections import Counter
from contextlib import suppress

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from study.best import finite
from study.console import say
from study.optuna_storage import open_storage
from study.spec import StudySpec
from study.status import trial_status
from trainers.policy import VERDICTS


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` once the grid is exhausted.

    That call is legal only inside ``study.optimize``; under Tune it raises inside ``study.tell``, before the
    trial's state is stored, so the last trial of a grid would stay RUNNING. Tune's ``num_samples`` ends the study.
    """

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":  # ablations: every combination of the choice lists, in a seeded order
        return GridSampler({p.name: list(p.args) for p in spec.params}, seed=s.seed)
    # Optuna 5's defaults change with releases: say every setting that matters. group: conditional spaces are
    # modelled per branch (the joint model of multivariate TPE needs the same parameters in every trial).
    group = any(p.when for p in spec.params)
    tpe = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True, group=group,
                                     n_startup_trials=s.startup_trials)
    return SobolStart(tpe, s.startup_trials, s.seed) if s.startup == "sobol" else tpe


class SobolStart(optuna.samplers.BaseSampler):
    """``tpe`` whose first ``startup`` trials are the points of a scrambled Sobol sequence (seeded), not random
    draws: a few random draws can cluster (the bundled study's TPE start drew base lr 1.05e-3, 1.06e-3, 1.20e-3
    and 1.56e-3 from a decade), a Sobol design spreads them over every axis and every pair of axes.

    Point ``i`` of the design is trial ``i``; its coordinate ``d`` is the ``d``-th parameter the space suggests.
    A range maps it linearly (a log range in log space, an int range to its steps), a choice list to index
    ``floor(u * n)``: unlike Optuna's QMCSampler, which leaves choice lists (every axis of a recorded grid) to
    random draws. A parameter beyond :attr:`DIMS`, or a trial after the design, is ``tpe``'s.
    """

    DIMS = 32

    def __init__(self, tpe: optuna.samplers.TPESampler, startup: int, seed: int) -> None:
        from scipy.stats import qmc

        self.tpe, self.startup = tpe, startup
        m = max(1, (startup - 1).bit_length())  # 2**m points: a Sobol design is balanced at powers of two
        self.points = qmc.Sobol(self.DIMS, scramble=True, seed=seed).random_base2(m)
        self.dims: dict[str, int] = {}  # parameter -> coordinate, in the order the space suggests them

    def infer_relative_search_space(self, study, trial):
        return {} if trial.number < self.startup else self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return {} if trial.number < self.startup else self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        dim = self.dims.setdefault(name, len(self.dims))
        if trial.number >= self.startup or dim >= self.DIMS:
            return self.tpe.sample_independent(study, trial, name, distribution)
        return _from_unit(float(self.points[trial.number, dim]), distribution)

    def before_trial(self, study, trial) -> None:
        self.tpe.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


def _from_unit(u: float, d: optuna.distributions.BaseDistribution):
    """The value of distribution ``d`` at quantile ``u`` in [0, 1) of its (log-)uniform measure."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return d.choices[min(int(u * len(d.choices)), len(d.choices) - 1)]
    if isinstance(d, optuna.distributions.IntDistribution):
        if d.log:
            return min(d.high, int(math.exp(math.log(d.low) + u * (math.log(d.high + 1) - math.log(d.low)))))
        return d.low + d.step * min(int(u * ((d.high - d.low) // d.step + 1)), (d.high - d.low) // d.step)
    if d.log:
        return math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low)))
    value = d.low + u * (d.high - d.low)
    return d.low + round((value - d.low) / d.step) * d.step if d.step else value


MAX_REASKS = 50  # asks per Tune trial before a duplicate configuration is run after all (an exhausted space)


class StudySearch(OptunaSearch):
    """OptunaSearch that never tells Optuna a non-finite value and tells it why a trial ended.

    Ray's OptunaSearch tells every trial that ends with a result as COMPLETE with its last value: a trial
    ASHA pruned, one the instability policy stopped, even one that raised. Here:

    - ``completed`` with a finite value: COMPLETE with that value;
    - ``pruned``, ``unstable``, ``diverged``, ``collapsed`` (or completed without a finite value): PRUNED, which
      Optuna scores by the last finite intermediate value and TPE ranks below every completed trial, so the
      sampler learns to avoid the region instead of ignoring it;
    - ``failed``: FAIL.

    Intermediate values are reported per epoch, non-finite ones skipped.

    With ``constraints``, a trial the instability policy stopped or, in observe mode, flagged (any epoch with a
    verdict) also gets the constraint ``instability`` = 1 (0 for the others): TPE then puts it in its
    infeasible group, below every feasible trial, and learns where the stable region is. Every suggested config
    carries ``optuna_trial``, the Optuna trial number.

    A suggested configuration equal to one that already completed or was pruned is not run again (runs are
    seeded: it would train to the same result) unless ``rerun_duplicates``: Optuna is told the earlier outcome
    for it and asked again, up to :data:`MAX_REASKS` times. Once every configuration of a finite space
    (``space_size``: choices and integer ranges only) has completed or been pruned, each pruned one runs once more
    (:meth:`_second_chance`), then the search is over.
    """

    def __init__(self, *args, epochs: int, constraints: bool = False, rerun_duplicates: bool = False,
                 space_size: int | None = None, spec: StudySpec | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self.constraints = constraints
        self.rerun_duplicates = rerun_duplicates
        self.space_size = space_size
        self.spec = spec  # whose Optuna storage a restored searcher reopens (None: keep the pickled one)
        self._flagged: set[str] = set()
        self._announced: set[str] = set()

    def restore(self, checkpoint_path: str) -> None:
        """Tune's state of a resumed study, with the Optuna study reopened where this machine has it: the
        pickled one names the storage of the driver that saved it, and a study in object storage keeps its
        Optuna file in that machine's cache (study/mirror.py), which a new head node does not have."""
        super().restore(checkpoint_path)
        if self.spec is None:
            return
        self._ot_study = optuna.load_study(study_name=self._ot_study.study_name, storage=open_storage(self.spec),
                                           sampler=self._ot_study.sampler)
        for trial in self._ot_trials.values():  # asked before the save: their reports and tells go here too
            trial.study, trial.storage = self._ot_study, self._ot_study._storage

    def suggest(self, trial_id: str) -> dict | str | None:
        second = None
        if self._every_configuration_ran():
            if (second := self._second_chance()) is None:
                self._announce("every configuration has completed or had its second run; no new trial starts")
                return Searcher.FINISHED
            self._announce("every configuration has run; those pruned get a second run each, best last value first")
            self._ot_study.enqueue_trial(second.params, user_attrs={"second_run_of": second.number})
        for attempt in range(MAX_REASKS):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if (second is not None or self.rerun_duplicates or not isinstance(config, dict) or ot_trial is None
                    or attempt == MAX_REASKS - 1):
                break
            twin = self._finished_twin(ot_trial)
            if twin is None:
                break
            # Every run is seeded, so a configuration that already ran would train to the same result (TPE
            # re-suggests its best points of a discrete space often): tell Optuna that outcome again instead of
            # spending a trial on it, and ask again.
            ot_trial.set_user_attr("twin_of", twin.number)
            for key, value in twin.constraints.items():
                ot_trial.set_constraint(key, value)
            for step, value in twin.intermediate_values.items():
                ot_trial.report(value, step)
            self._ot_study.tell(ot_trial, twin.value if twin.state == TrialState.COMPLETE else None,
                                state=twin.state)
            del self._ot_trials[trial_id]
        if isinstance(config, dict) and trial_id in self._ot_trials:
            config = {**config, "optuna_trial": self._ot_trials[trial_id].number}
        return config

    def _ran(self) -> list[optuna.trial.FrozenTrial]:
        """The finished trials that trained (a twin told an earlier outcome did not)."""
        done = self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return [t for t in done if "twin_of" not in t.user_attrs]

    def _every_configuration_ran(self) -> bool:
        """A finite space whose every configuration has completed or been pruned: TPE would re-suggest them,
        up to MAX_REASKS times per trial, each ask costlier than the last (a replay of the first record with
        TPE+ASHA made 1,129 asks for 42 trials, 21 of its 49 s)."""
        if self.rerun_duplicates or not self.space_size:
            return False
        return len({_key(t) for t in self._ran()}) >= self.space_size

    def _second_chance(self) -> optuna.trial.FrozenTrial | None:
        """The pruned configuration to run again: never completed, run once, the best last reported value. A
        rerun trains to the same curve, but ASHA's rungs have filled since, so it may now go on (on the first
        record, reruns found the best cell in 75% of the replays against 55%: bench/search.py)."""
        ran = self._ran()
        completed = {_key(t) for t in ran if t.state == TrialState.COMPLETE}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        runs = Counter(_key(t) for t in ran + running)
        sign = 1.0 if self._mode == "max" else -1.0
        pruned = [t for t in ran if _key(t) not in completed and runs[_key(t)] == 1 and t.intermediate_values]
        return max(pruned, key=lambda t: (sign * t.intermediate_values[max(t.intermediate_values)], -t.number),
                   default=None)

    def _announce(self, line: str) -> None:
        if line not in self._announced:
            self._announced.add(line)
            say(f"search: {line}")

    def _finished_twin(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        params = trial.params
        done = self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return next((t for t in done if t.params == params and t.number != trial.number), None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("verdict"):
            self._flagged.add(trial_id)
        if finite(result.get(self.metric)):
            with suppress(UpdateFinishedTrialError):  # a resumed study may restart a trial Optuna saw end
                super().on_trial_result(trial_id, result)

    def on_pause(self, trial_id: str) -> None:
        """Hyperband paused the trial until its bracket is full (runner.build_scheduler): it goes on later."""

    def on_unpause(self, trial_id: str) -> None:
        """Hyperband resumed the trial."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        value = (result or {}).get(self.metric)
        status = trial_status(result, error, self.epochs)
        if self.constraints and status != "failed":
            violated = status in VERDICTS or trial_id in self._flagged or bool((result or {}).get("verdict"))
            with suppress(UpdateFinishedTrialError):
                self._ot_trials[trial_id].set_constraint("instability", float(violated))
        if status == "completed" and finite(value):
            self._ot_study.tell(self._ot_trials[trial_id], float(value), state=TrialState.COMPLETE,
                                skip_if_finished=True)
        else:
            state = TrialState.FAIL if status == "failed" else TrialState.PRUNED
            step = result.get("training_iteration") if result else None
            ot_trial = self._ot_trials[trial_id]
            if (state == TrialState.PRUNED and finite(value) and step
                    and step not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values):
                # Tune skips on_trial_result for the result that made the scheduler stop the trial: report it,
                # so that Optuna scores the pruned trial by its last value.
                with suppress(UpdateFinishedTrialError):
                    ot_trial.report(float(value), step)
            # skip_if_finished: a resumed study may end again a trial told before the driver died
            self._ot_study.tell(self._ot_trials[trial_id], state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)


def _key(trial: optuna.trial.FrozenTrial) -> str:
    return repr(sorted(trial.params.items()))


def close_orphans(storage: StudySpec | str, study_name: str) -> int:
    """Mark FAIL the Optuna trials left RUNNING once every Tune trial has ended: asked by a driver that was
    killed before its searcher state was saved, they belong to no Tune trial. Returns how many. ``storage``: a
    study (its Optuna storage) or a storage URL."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        study._storage.set_trial_user_attr(trial._trial_id, "ssl_study", "orphaned by an interrupted driver")
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(orphans)
