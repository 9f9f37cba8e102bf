"""Fixtures shared by several test modules."""

import os

import pytest
from servers import RUN_MARK
from studies import DIVERGING, HEALTHY, lr_study, run_studies, stopping_study

os.environ.setdefault(RUN_MARK, str(os.getpid()))  # before any Ray starts: servers.pids_naming


@pytest.fixture(scope="session")
def tiny_studies(tmp_path_factory) -> dict:
    """Three real studies, run once on one local Ray for the modules that only read their results:
    ``enforce``, a grid of a healthy and a diverging learning rate x batch sizes 32 and 64 with stopping
    enforced; ``observe``, the diverging rate alone with stopping in observe mode; ``lr``, base_lr on a log range
    as the bundled study searches it (``studies.lr_study``), its Optuna study in a journal."""
    root = tmp_path_factory.mktemp("stopping")
    specs = {"enforce": stopping_study(root, "enforce", {"base_lr": [HEALTHY, DIVERGING], "batch_size": [32, 64]},
                                       "enforce"),
             "observe": stopping_study(root, "observe", {"base_lr": [DIVERGING]}, "observe"),
             "lr": lr_study(tmp_path_factory.mktemp("lr"))}  # a root of its own: test_stopping reads the other two's
    run_studies(*specs.values())
    return specs


@pytest.fixture(scope="session")
def stopping_studies(tiny_studies) -> dict:
    """``enforce`` and ``observe`` (test_stopping, test_report, test_report_browser, test_optuna_dashboard)."""
    return {name: tiny_studies[name] for name in ("enforce", "observe")}


@pytest.fixture(scope="session")
def lr_range_study(tiny_studies):
    """``lr`` (test_report_heatmap, test_report_browser, test_optuna_dashboard)."""
    return tiny_studies["lr"]
