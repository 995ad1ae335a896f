"""Deterministic faults for the end-to-end job (tests/test_end_to_end.py), installed in every Ray
worker of the job by runtime_env's `worker_process_setup_hook`; markers go to the folder or URI
in $FAULT_MARKERS.

`segtrain_dies_once_after_epoch_2`: segmentation training's workers raise right after epoch 2's
checkpoint is reported (once per job: the marker `injected` says it happened), and the workers
Ray Train restarts write the checkpoint they were handed to `resumed.json`.
"""

from __future__ import annotations

import json
import os

FAULT_EPOCH = 2


def segtrain_dies_once_after_epoch_2() -> None:
    import ray.train

    from pipeline.data import storage

    markers = os.environ["FAULT_MARKERS"]
    injected, resumed = storage.join(markers, "injected"), storage.join(markers, "resumed.json")
    report, get_checkpoint = ray.train.report, ray.train.get_checkpoint

    def recording_get_checkpoint():
        checkpoint = get_checkpoint()
        if checkpoint is not None and storage.exists(injected):
            storage.write_bytes(resumed, json.dumps({"path": checkpoint.path}).encode())
        return checkpoint

    def failing_report(metrics, *args, **kwargs):
        report(metrics, *args, **kwargs)
        if ("val_iou" in metrics and metrics.get("epoch") == FAULT_EPOCH
                and not storage.exists(injected)):
            storage.write_bytes(injected, b"")
            raise RuntimeError(f"injected fault after segmentation epoch {FAULT_EPOCH}")

    ray.train.get_checkpoint = recording_get_checkpoint
    ray.train.report = failing_report
