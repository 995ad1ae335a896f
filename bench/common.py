"""What every benchmark shares: quiet Ray settings, progress lines, synthetic disc cubes, the
demo's segmenter checkpoint, a printed table and a JSON result that says which machine measured
it and how busy that machine was.

Import this module before `ray`: it sets Ray's environment defaults, which Ray reads at import.
Each script writes `bench/results/<name>.json` (or under $BENCH_RESULTS, so a smoke run leaves
the measured results alone); a timing is only comparable with another taken on the same machine
at a similar load average, so both travel with the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO_MANIFEST = ROOT / "demo" / "out" / "manifest.json"
_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One progress line, stamped with the seconds since the script started."""
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {message}", flush=True)


def load_average() -> float:
    """The 1-minute load average: above the core count, every timing here is inflated."""
    return round(os.getloadavg()[0], 2)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {"cpu": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    if "ray" in sys.modules:
        info["ray"] = sys.modules["ray"].__version__
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def init_ray(address: str | None = None) -> None:
    """A local Ray (every CPU of this machine) or the cluster at `address`, quietly."""
    import ray

    ray.init(address=address, log_to_driver=False, include_dashboard=False,
             configure_logging=False)


def _status_mib(field: str, process: Path = Path("/proc/self")) -> float:
    for line in (process / "status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"{process}/status has no {field}")


def rss_mib() -> float:
    """This process's resident memory now."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS counter (VmHWM), so the next peak belongs to the next
    run alone. False where the kernel does not allow it: the peak is then since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident memory (since reset_peak_rss, where it worked)."""
    try:
        return _status_mib("VmHWM")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerPeakRss:
    """The largest resident memory of any one busy Ray worker process of this machine while
    the block runs, sampled every `every_s`, and what that worker was running (Ray names its
    workers' processes "ray::<task or actor>"). Idle workers ("ray::IDLE") are left out: one
    kept from an earlier run holds that run's memory, not this one's. A worker that maps
    object-store pages counts them: an upper bound on its own memory."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak_mib, self.peak_name = every_s, 0.0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode() \
                        if proc.name.isdigit() else ""
                    if name.startswith("ray::") and not name.startswith("ray::IDLE"):
                        rss = _status_mib("VmRSS", proc)
                        if rss > self.peak_mib:
                            self.peak_mib, self.peak_name = rss, name
                except (OSError, ValueError):  # gone meanwhile, or a kernel thread
                    continue
            self._stop.wait(self.every_s)

    def __enter__(self) -> WorkerPeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def demo_checkpoint(manifest: Path = DEMO_MANIFEST) -> str:
    """A segmenter checkpoint recorded by a finished `make demo` (its first fold's)."""
    try:
        stages = json.loads(manifest.read_text())["stages"]
        return stages["segtrain"]["results"]["folds"][0]["checkpoint"]
    except (OSError, KeyError, ValueError) as err:
        raise SystemExit(f"no segmenter checkpoint in {manifest} ({err!r}): run `make demo` "
                         "first or pass --checkpoint") from err


def synthetic_disc_cubes(patients: int, cube_size: int, cube_spacing_mm: float,
                         seed: int = 0) -> np.ndarray:
    """(N, S, S, S) uint8 reference-mask cubes of a fresh synthetic cohort (six discs a
    patient), cut by the pipeline's own disc isolation: the discs the autoencoder trains on."""
    from pipeline.data.synthetic import synthesize
    from pipeline.data.volumes import read_volume
    from pipeline.discs.isolate import disc_cube, reference_discs

    cubes = []
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, patients=patients, seed=seed, sequences=("t1",))
        for mask_path in sorted((Path(tmp) / "masks").glob("*_t1.mha")):
            volume = read_volume(str(mask_path))
            for disc in reference_discs(volume.array):
                cubes.append(disc_cube(disc, volume.spacing, cube_size, cube_spacing_mm)[0])
    return np.stack(cubes)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as an aligned text table (floats to 4 significant digits)."""
    frame = pd.DataFrame(rows, columns=columns)
    return frame.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def write_result(name: str, result: dict, load_before: float, args=None) -> Path:
    """<results>/<name>.json: the result, the arguments, the machine and its load."""
    payload = {"benchmark": name, **result,
               "args": vars(args) if args is not None else {},
               "machine": machine_info(),
               "load_average_before": load_before, "load_average_after": load_average(),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    folder = Path(os.environ.get("BENCH_RESULTS", RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    progress(f"wrote {path} (load average {load_before} before, "
             f"{payload['load_average_after']} after, {os.cpu_count()} CPUs)")
    return path


def _plain(value):
    """JSON for numpy scalars and arrays, tuples and paths inside a result."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
