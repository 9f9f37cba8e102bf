"""``importance.png``: parameter importance from the study's Optuna storage (PED-ANOVA), or why there is none."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from study.report.data import StudyData
from study.report.style import save
from study.spec import StudySpec

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _not_sqlite(db: Path) -> str | None:
    """Why ``db`` is not an SQLite database to open, or None when it is one. Checked before connecting: SQLite
    would turn a missing or empty file into a new database with Optuna's empty schema in it."""
    try:
        with db.open("rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return f"no Optuna storage found ({db} does not exist)"
    except OSError as e:
        return f"the Optuna storage {db} could not be read ({e.strerror})"
    if magic != SQLITE_MAGIC:
        return f"{db} is not an SQLite database ({'an empty file' if not magic else 'unknown content'})"
    return None


def param_importance(spec: StudySpec, study_dir: Path) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances of the study, or None and why not; the second value says how they were got.

    Optuna 5's default evaluator is PED-ANOVA (no scikit-learn; fANOVA and mean-decrease-impurity need it, and
    it is not installed here): it is named explicitly so that a change of default does not bring that need back.
    Only COMPLETE trials count: trials ASHA or the instability policy stopped are PRUNED in the storage.
    """
    if spec.remote:  # its Optuna file is on this machine (study/mirror.py pulled it)
        study_dir = spec.local_dir
    if spec.search.storage == "journal":  # the study's own journal file where the directory is now
        journal = study_dir / "optuna.journal"
        if not journal.is_file():  # opening it would create it
            return None, f"no Optuna storage found ({journal} does not exist)"
        url = f"journal://{journal.resolve()}"
    elif spec.search.storage:
        url = spec.optuna_url
    else:  # the study's own SQLite file where the directory is now (it may have moved since it ran)
        db = study_dir / "optuna.db"
        if why_not := _not_sqlite(db):
            return None, why_not
        url = f"sqlite:///{db}"
    import optuna
    from optuna.trial import TrialState

    from study.optuna_storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    except Exception as e:  # a missing study or an unreachable database: say so, do not crash
        first_line = str(e).partition("\n")[0]  # SQLAlchemy adds the SQL statement and a link below
        return None, f"the Optuna study {spec.name!r} could not be loaded ({type(e).__name__}: {first_line})"
    states = Counter(t.state.name for t in study.trials)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    found = ", ".join(f"{n} {s}" for s, n in states.most_common()) or "no trials"
    if len(complete) < 2:
        return None, (f"Optuna computes importance from COMPLETE trials only and needs at least 2; the storage "
                      f"holds {found} (pruned: stopped by ASHA or by the instability policy)")
    varying = [p for p in {k for t in complete for k in t.params}
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if not varying:
        return None, f"no parameter varies across the {len(complete)} COMPLETE trials ({found})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as e:  # an evaluator that cannot cope with these trials
            return None, f"Optuna's importance evaluator failed ({type(e).__name__}: {e})"
    equal = [str(w.message) for w in caught if "will be equal" in str(w.message)]
    if equal:
        return None, (f"too few COMPLETE trials ({len(complete)}; {found}) for PED-ANOVA to tell parameters "
                      f"apart: {equal[0]}")
    return scores, f"PED-ANOVA over {len(complete)} COMPLETE trials ({found})"


def plot_importance(data: StudyData, scores: dict[str, float], how: str, path: Path) -> Path:
    names = sorted(scores, key=lambda n: scores[n])
    fig = Figure(figsize=(7, 0.55 * len(names) + 1.8))
    ax = fig.subplots()
    ax.barh(range(len(names)), [scores[n] for n in names], color="#4c72b0", edgecolor="black")
    for i, n in enumerate(names):
        ax.text(scores[n], i, f" {scores[n]:.2f}", va="center", fontsize=10)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_xlim(0, max(max(scores.values()), 1e-9) * 1.2)
    ax.set_xlabel(f"importance for {data.metric} ({data.spec.search.mode}), normalised to sum 1")
    ax.set_title(f"{data.spec.name}: parameter importance\n{how}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)
