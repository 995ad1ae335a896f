"""Experiment tracking for sweeps: one MLflow run per trial (its sampled values as params, every
report's numbers as metrics per step, the final checkpoint's location as a tag) through Ray
Tune's MLflowLoggerCallback. MLflow is the optional `tracking` extra: without it and without a
--tracking-uri a sweep runs untracked; asking for a URI without it is an error."""

from __future__ import annotations

from collections.abc import Callable

from ray.air.integrations.mlflow import MLflowLoggerCallback

from pipeline.data import checkpoints, storage

INSTALL = "pip install 'pipeline[tracking]'"


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--tracking-uri needs MLflow, which is not installed: {INSTALL}") from err


def logger(tracking_uri: str | None, folder: str, experiment: str, storage_path: str,
           progress: Callable[[str], None]):
    """The Tune callback that logs every trial, or None (untracked). No URI: a local store in
    `folder`/mlflow.db (MLflow 3 refuses its old ./mlruns file store unless told to allow it,
    and recommends SQLite; SQLAlchemy comes with Optuna)."""
    if tracking_uri is None:
        try:
            require_mlflow()
        except ValueError:
            progress(f"trials not tracked: MLflow is not installed ({INSTALL})")
            return None
        if storage.is_uri(folder):
            progress("trials not tracked: give --tracking-uri (the default store is local)")
            return None
        storage.makedirs(folder)
        tracking_uri = "sqlite:///" + storage.join(folder, "mlflow.db")
    require_mlflow()
    progress(f"tracking trials in MLflow at {tracking_uri}, experiment {experiment}")
    return TrialRuns(storage_path, tracking_uri=tracking_uri, experiment_name=experiment)


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflow logger, plus the trial's final checkpoint location (a path or URI that
    round-trips) as the run's tag."""

    def __init__(self, storage_path: str, **kwargs):
        super().__init__(**kwargs)
        self.storage_path = storage_path  # the sweep's, to give a checkpoint on S3 its scheme

    def log_trial_end(self, trial, failed: bool = False) -> None:
        import mlflow

        if trial.checkpoint is not None:
            mlflow.MlflowClient(self.tracking_uri).set_tag(
                self._trial_runs[trial], "checkpoint_path",
                checkpoints.location(trial.checkpoint, self.storage_path))
        super().log_trial_end(trial, failed)
