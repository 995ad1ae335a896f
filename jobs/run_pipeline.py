"""The main job: every stage from catalog to report, on a laptop or as a Ray Job on a cluster.

    python jobs/run_pipeline.py                       # demo: synthetic cohort, embedded Ray
    python jobs/run_pipeline.py --data /data/spider --out /results/spider --preset paper
    python jobs/run_pipeline.py --config OUT/sweeps/NAME/best.yaml   # a sweep's best config
    ray job submit --working-dir . -- python jobs/run_pipeline.py --data s3://b/spider --out s3://b/run

Exit codes: 0 success, 3 partial success (inputs quarantined, see errors.parquet), 1 failure,
2 bad arguments, 130 interrupted (Ctrl-C; the same command resumes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as configuration  # noqa: E402
from pipeline import connect  # noqa: E402
from pipeline.analysis.report import package_versions  # noqa: E402
from pipeline.data import storage  # noqa: E402
from pipeline.run import stages as pipeline_stages  # noqa: E402
from pipeline.run.runner import EXIT_FAILED, EXIT_INTERRUPTED, Context, run_stages  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="SPIDER-layout root, path or URI (default: synthesise "
                        "the demo cohort into <out>/../data)")
    parser.add_argument("--out", default="demo/out", help="output folder or URI")
    parser.add_argument("--preset", default="demo", choices=sorted(configuration.PRESETS))
    parser.add_argument("--config", metavar="YAML", help="a YAML of section.field: value "
                        "overrides, path or URI (a sweep's best.yaml); --set wins over it")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override any config field")
    parser.add_argument("--stages", help="comma-separated subset of stages to run")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run a stage even if it is current")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    return parser.parse_args(argv)


def git_revision() -> str | None:
    """The code's revision, or None when run from a copy without git (a Ray Job working dir)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_config(args: argparse.Namespace) -> configuration.Config:
    """The preset, then the --config YAML's overrides, then --set: one path for every source."""
    loaded = (configuration.overrides_from_yaml(storage.read_bytes(args.config).decode())
              if args.config else [])
    return configuration.load(args.preset, loaded + args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = storage.absolute(args.out)
    synthesize = args.data is None
    data = storage.absolute(args.data) if args.data else storage.join(out, "..", "data")
    if synthesize:
        data = storage.absolute(data) if not storage.is_uri(data) else data
    ctx = Context(cfg=cfg, data=data, out=out, strict=args.strict,
                  progress=lambda line: print(line, flush=True))
    selected = [s.strip() for s in args.stages.split(",")] if args.stages else None
    print(f"spine-discs: preset {cfg.preset}, data {data}"
          f"{' (synthetic)' if synthesize else ''}, out {out}", flush=True)
    started = time.time()
    try:
        connect.connect_ray(args.address)
        run_info = {"versions": package_versions(), "git_revision": git_revision(),
                    "command": sys.argv}
        code = run_stages(pipeline_stages.build(synthesize), ctx, selected, tuple(args.force),
                          run_info=run_info)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # report any failure with a clear last line, keep the exit code
        print(f"FAILED: {err}", file=sys.stderr)
        return EXIT_FAILED
    word = {0: "finished", 3: "finished with quarantined inputs (see errors.parquet)"}
    print(f"{word.get(code, 'FAILED')} in {time.time() - started:.0f} s", flush=True)
    report = storage.join(out, "report.md")
    if storage.exists(report):
        print(f"report: {report}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
