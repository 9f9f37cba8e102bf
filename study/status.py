"""A trial's status, from its last reported result: one vocabulary for the results tables, Optuna and the CLI."""

from __future__ import annotations

from pathlib import Path

# completed: every epoch ran; pruned: ASHA stopped it on accuracy; diverged / collapsed / unstable: the
# instability policy stopped it (trainers/policy.py); failed: it raised; running / pending: not ended yet.
STATUSES = ("completed", "pruned", "diverged", "collapsed", "unstable", "failed", "running", "pending")
ENDED = STATUSES[:6]


def trial_status(result: dict | None, error: bool, epochs: int) -> str:
    """The status of a trial that has ended, given its last result (None if it reported nothing)."""
    if error:
        return "failed"
    result = result or {}
    if result.get("stopped") and result.get("verdict"):
        return result["verdict"]
    return "completed" if result.get("epoch", 0) >= epochs else "pruned"


def failure(trial, logs: Path | None) -> str:
    """What a failed trial's row and the console say: the error's last line ("Type: message") and the path of its
    full log (``run_trial`` writes ``logs/<trial_id>.log`` when the trial raises; a trial whose process died has
    Ray's log only). The error comes from Tune's error file on this machine: ``trial.get_error()`` reads the copy
    in storage, which lags."""
    error = Path(trial.error_file).read_text().strip() if trial.error_file else ""
    log = next((p for p in (logs / f"{trial.trial_id}.log", logs / "ray.log") if p.is_file()), None) if logs else None
    return (error.splitlines()[-1] if error else "no error message") + (f" (full log: {log})" if log else "")
