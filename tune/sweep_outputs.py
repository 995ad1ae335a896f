"""What a finished sweep leaves behind in OUT/sweeps/NAME/: trials.parquet (one row per trial:
its sampled values, best metric, epochs, status), the best trial's config as best.yaml (load it
with `jobs/run_pipeline.py --config`) and as --set options (best_set.txt), and figures/*.png."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.data import checkpoints, storage
from tune.trials import FINISHED, TARGETS

COMPLETED, STOPPED, FAILED, UNFINISHED = "completed", "stopped early (ASHA)", "failed", "unfinished"
TABLE, BEST_YAML, BEST_SET = "trials.parquet", "best.yaml", "best_set.txt"
DPI = 110


@dataclass
class SweepOutcome:
    table: pd.DataFrame  # one row per trial; `best` marks the chosen one
    best_params: dict  # the best trial's sampled values
    best_set: str  # the config of the best trial as command-line options
    folder: str  # OUT/sweeps/NAME


def _status(trial) -> str:
    if trial.status == "ERROR":
        return FAILED
    if trial.status == "TERMINATED":
        return COMPLETED if (trial.last_result or {}).get(FINISHED) else STOPPED
    return UNFINISHED


def _checkpoint(result, storage_path: str) -> str | None:
    """The trial's last checkpoint as a path or URI that round-trips."""
    if result.checkpoint is None:
        return None
    return checkpoints.location(result.checkpoint, storage_path)


def trial_table(grid, spec, storage_path: str) -> pd.DataFrame:
    """One row per trial of a ResultGrid: trial_id, status, the metric (its best report, as a
    run keeps its best checkpoint), epochs, wall_s, checkpoint_path, error, the sampled values."""
    time_attr = TARGETS[spec.target].time_attr
    best = np.nanmax if spec.mode == "max" else np.nanmin
    rows = []
    # ResultGrid lists its results in the order of its trials; only the trial knows its status
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        history = result.metrics_dataframe if result.metrics_dataframe is not None \
            else pd.DataFrame()
        values = history[spec.metric].dropna().to_numpy(float) if spec.metric in history else []
        rows.append({
            "trial_id": trial.trial_id, "status": _status(trial),
            spec.metric: float(best(values)) if len(values) else math.nan,
            "epochs": int(history[time_attr].max()) if time_attr in history else 0,
            "wall_s": float(history["time_total_s"].max()) if "time_total_s" in history
            else math.nan,
            "checkpoint_path": _checkpoint(result, storage_path),
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
            **{key: trial.config.get(key) for key in spec.space}})
    table = pd.DataFrame(rows)
    usable = table[table["status"].isin([COMPLETED, STOPPED]) & table[spec.metric].notna()]
    table["best"] = False
    if len(usable):
        pick = usable[spec.metric].idxmax() if spec.mode == "max" else usable[spec.metric].idxmin()
        table.loc[pick, "best"] = True
    return table


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def best_config(table: pd.DataFrame, spec) -> dict:
    """The sweep's own --set overrides plus the best trial's values, as section.field: value."""
    if not table["best"].any():
        raise ValueError("no sweep trial reported the metric: there is no best config")
    row = table[table["best"]].iloc[0]
    fixed = dict(item.split("=", 1) for item in spec.overrides)
    return {**fixed, **{key: _plain(row[key]) for key in spec.space}}


def set_line(preset: str, config: dict) -> str:
    from pipeline.config import override

    return " ".join([f"--preset {preset}", *(f"--set {override(k, v)}" for k, v in config.items())])


def write(table: pd.DataFrame, grid, spec, folder: str) -> SweepOutcome:
    import yaml

    storage.write_table(table, storage.join(folder, TABLE))
    config = best_config(table, spec)
    row = table[table["best"]].iloc[0]
    header = (f"# best trial {row.trial_id} of this sweep: {spec.metric} {row[spec.metric]:.4f} "
              f"after {row.epochs} epochs ({row.status}); preset {spec.preset}\n"
              f"# jobs/run_pipeline.py --preset {spec.preset} --config best.yaml\n")
    storage.write_bytes(storage.join(folder, BEST_YAML),
                        (header + yaml.safe_dump(config, sort_keys=False)).encode())
    line = set_line(spec.preset, config)
    storage.write_bytes(storage.join(folder, BEST_SET), (line + "\n").encode())
    _figures(table, grid, spec, folder)
    return SweepOutcome(table, {k: config[k] for k in spec.space}, line, folder)


def printable(table: pd.DataFrame, spec) -> str:
    columns = ["trial_id", *spec.space, spec.metric, "epochs", "status", "best"]
    return table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _figures(table: pd.DataFrame, grid, spec, folder: str) -> None:
    """metric_vs_<field>.png per swept field (by status) and trial_curves.png (metric per
    epoch of every trial), in `folder`/figures/."""
    from matplotlib.figure import Figure

    colors = {COMPLETED: "tab:blue", STOPPED: "tab:orange", FAILED: "tab:red"}
    for key, param in spec.space.items():
        figure = Figure(figsize=(4.5, 3.2))
        axes = figure.subplots()
        shown = table[table[spec.metric].notna()]
        x = shown[key] if param.numeric else shown[key].astype(str)
        for status, color in colors.items():
            mask = (shown["status"] == status).to_numpy()
            if mask.any():
                axes.scatter(np.asarray(x)[mask], shown[spec.metric][mask], c=color, label=status)
        if param.log_scale:
            axes.set_xscale("log")
        axes.set(xlabel=key, ylabel=spec.metric, title=f"{spec.metric} by {key}")
        axes.legend(fontsize=7)
        storage.write_png(figure, storage.join(folder, "figures", f"metric_vs_{key}.png"), DPI)
    time_attr = TARGETS[spec.target].time_attr
    figure = Figure(figsize=(5, 3.4))
    axes = figure.subplots()
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        history = result.metrics_dataframe
        if history is None or spec.metric not in history or time_attr not in history:
            continue
        curve = history[[time_attr, spec.metric]].dropna().drop_duplicates(time_attr, keep="first")
        axes.plot(curve[time_attr], curve[spec.metric], marker="o", label=trial.trial_id)
    axes.set(xlabel=time_attr, ylabel=spec.metric, title="trials")
    axes.legend(fontsize=6)
    storage.write_png(figure, storage.join(folder, "figures", "trial_curves.png"), DPI)
