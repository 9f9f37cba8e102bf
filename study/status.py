"""A trial's status, from its last reported result: one vocabulary for the results tables, Optuna and the CLI."""

from __future__ import annotations

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
