"""Study orchestration (Ray Tune + Optuna over Ray Train trials), the CLI and results tables."""

from pathlib import Path

DEFAULT_STUDY = Path(__file__).with_name("default.yaml")  # the bundled study: `make study`, `ssl-study launch`
