"""Geometry accuracy on the synthetic cohort: measure_disc and measure_bulge on the reference
masks against synthetic_truth.csv. Prints the error table and writes it as JSON.

    python bench/geometry_accuracy.py [--patients 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from pipeline.data import tables  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402
from pipeline.data.volumes import read_volume  # noqa: E402
from pipeline.discs.geometry import measure_bulge, measure_disc  # noqa: E402
from pipeline.discs.isolate import reference_discs  # noqa: E402


def measure_cohort(root: Path) -> pd.DataFrame:
    rows = []
    for mask_path in sorted((root / "masks").glob("*_t1.mha")):
        volume = read_volume(str(mask_path))
        for disc in reference_discs(volume.array):
            row = {"patient_id": mask_path.name.split("_")[0], "ivd_label": disc.ivd_label}
            row.update(measure_disc(disc.mask, volume.spacing))
            row.update(measure_bulge(volume.array, volume.spacing, disc.ivd_label))
            rows.append(row)
    return pd.DataFrame(rows)


def error_table(measured: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    truth = truth.assign(patient_id=truth.patient_id.astype(str))
    joined = measured.merge(truth, on=["patient_id", "ivd_label"], suffixes=("", "_true"))
    rows = []
    for column in tables.GEOMETRY + tables.BULGE:
        error = joined[column] - joined[f"{column}_true"]
        rows.append({
            "quantity": column,
            "n": int(error.notna().sum()),
            "bias": float(error.mean()),
            "mean_abs_error": float(error.abs().mean()),
            "p95_abs_error": float(error.abs().quantile(0.95)),
            "mean_abs_pct_error": float((error / joined[f"{column}_true"]).abs().mean() * 100)
            if not column.endswith("_deg") and column != "bulge_fraction" else np.nan,
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        common.progress(f"synthetic cohort of {args.patients} patients")
        truth = synthesize(tmp, patients=args.patients, seed=args.seed, sequences=("t1",))
        common.progress("measuring every reference disc")
        table = error_table(measure_cohort(Path(tmp)), truth)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    common.write_result("geometry_accuracy",
                        {"patients": args.patients, "rows": table.to_dict("records")},
                        load_before, args)


if __name__ == "__main__":
    main()
