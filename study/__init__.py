"""Study orchestration (Ray Tune + Optuna over Ray Train trials), the CLI and results tables."""
