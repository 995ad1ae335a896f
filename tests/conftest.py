"""Shared fixtures: one Ray instance per test session, and the real SPIDER fixture mask."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import faults, resources

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# as every Ray worker of a job has it (pipeline.resources.WORKER_ENV), for the torch that tests
# run in this process; read when torch loads, so set before any test imports it
os.environ.setdefault("OMP_WAIT_POLICY", resources.WORKER_ENV["OMP_WAIT_POLICY"])

# Inside the repository (see its README): a test never reads outside the checkout.
SPIDER_MASK = Path(__file__).resolve().parent / "data" / "spider" / "masks" / "1_t1.mha"


@pytest.fixture(scope="session")
def spider_mask_path() -> Path:
    if not SPIDER_MASK.exists():
        pytest.fail(f"the real SPIDER fixture is missing: {SPIDER_MASK}")
    return SPIDER_MASK


@pytest.fixture(scope="session")
def fault_marker(tmp_path_factory) -> Path:
    """Where a fault test writes the point at which a process must signal itself
    (pipeline.faults). Named in the environment before Ray starts, so every Ray worker and
    every job a test starts inherits it; absent, it injects nothing."""
    marker = tmp_path_factory.mktemp("faults") / "marker"
    os.environ[faults.MARKER_ENV] = str(marker)
    return marker


@pytest.fixture(scope="session")
def ray_session(fault_marker):
    """One local Ray for the whole session (start-up costs about 4 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=False,
                 configure_logging=False, runtime_env=resources.runtime_env())
    yield ray
    ray.shutdown()
