"""Fixtures shared by several test modules."""

import pytest
from studies import DIVERGING, HEALTHY, run_studies, stopping_study


@pytest.fixture(scope="session")
def stopping_studies(tmp_path_factory) -> dict:
    """Two real studies, run once for the modules that only read their results (test_stopping, test_report):
    ``enforce``, a grid of a healthy and a diverging learning rate x batch sizes 32 and 64 with stopping
    enforced; ``observe``, the diverging rate alone with stopping in observe mode."""
    root = tmp_path_factory.mktemp("stopping")
    specs = {"enforce": stopping_study(root, "enforce", {"base_lr": [HEALTHY, DIVERGING], "batch_size": [32, 64]},
                                       "enforce"),
             "observe": stopping_study(root, "observe", {"base_lr": [DIVERGING]}, "observe")}
    run_studies(*specs.values())
    return specs
