"""Write a synthetic SPIDER-layout cohort with its true disc geometry.

    python jobs/synthesize.py --out data/synthetic --patients 24 --seed 0 [--label-noise 0.1]

The folder gets images/, masks/, overview.csv and radiological_gradings.csv as SPIDER has them,
plus synthetic_truth.csv (one row per disc: exact geometry, true findings, what was graded).
The same seed writes the same bytes. With --address (or RAY_ADDRESS) it joins that Ray cluster
and writes a cohort of RAY_FROM_PATIENTS or more as one Ray task per patient; otherwise one
process writes about a patient a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import SyntheticConfig  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402
from pipeline.progress import counter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder or URI")
    parser.add_argument("--patients", type=int, default=defaults.patients)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--label-noise", type=float, default=defaults.label_noise,
                        help="probability that a grading disagrees with the truth")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to write the patients on (default: RAY_ADDRESS; "
                             "none: this process)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.address:
        import ray

        ray.init(address=args.address, log_to_driver=False)
    try:
        truth = synthesize(args.out, patients=args.patients, seed=args.seed,
                           label_noise=args.label_noise,
                           progress=counter(lambda line: print(line, flush=True),
                                            "patients written"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    by_level = truth.groupby("level", sort=False)["bulging"].mean()
    print(f"wrote {args.patients} patients ({len(truth)} discs) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s; true bulging {truth.bulging.mean():.0%} "
          f"({by_level.iloc[0]:.0%} at {by_level.index[0]}, {by_level.iloc[-1]:.0%} at "
          f"{by_level.index[-1]}), narrowing {truth.narrowing.mean():.0%}, herniation "
          f"{truth.herniation.mean():.0%}; gradings disagree with the truth on "
          f"{(truth.bulging != truth.graded_bulging).mean():.0%} of bulging labels", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
