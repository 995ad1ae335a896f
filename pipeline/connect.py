"""Join the Ray cluster a command runs on, or start an embedded one, quietly: every entry point
(the job, the sweeps) connects the same way and prints the same one line."""

from __future__ import annotations

import os


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address`, else start an embedded Ray (never a stale local cluster
    found by accident); once per process."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune banner: the sweep prints its own lines
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Train's controllers poll their workers every 2 s by default, and a fold's trainer
        # learns that late of each epoch's checkpoint and of its end: 0.5 s took the demo's
        # cross-fitted segmentation training from 165 s to 155 s (a cluster keeps its own)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(address="local", log_to_driver=False, configure_logging=False)
    quiet_ray_data_console()
    total = ray.cluster_resources()
    print(f"ray: {'joined ' + address if address else 'embedded local Ray'}; "
          f"{total.get('CPU', 0):.0f} CPUs, {total.get('GPU', 0):.0f} GPUs, "
          f"{len(ray.nodes())} node(s)", flush=True)


def quiet_ray_data_console() -> None:
    """Ray Data logs every dataset execution at INFO on the console; those lines stay in the
    session's ray-data.log, and the console shows its warnings only, so the stage lines read."""
    import logging

    import ray.data  # noqa: F401  configures the "ray.data" logger

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
