"""GPU intent: "auto" runs on what the cluster has, "require" asks for GPUs and says clearly when
none ever comes. (The autoscaler launching a GPU node is tests/test_autoscaling.py.)"""

import pytest

from pipeline import config, resources


def test_presets_and_override_set_the_gpu_intent():
    assert config.paper().resources.gpu == "require"
    assert config.demo().resources.gpu == "auto"
    assert config.load("demo", ["resources.gpu=require"]).resources.gpu == "require"
    with pytest.raises(ValueError, match="resources.gpu must be one of auto, require"):
        config.load("demo", ["resources.gpu=always"])


def test_auto_on_a_cluster_without_gpus_runs_every_stage_on_cpus(ray_session):
    res = config.demo().resources
    cpus = ray_session.cluster_resources()["CPU"]
    layouts = [resources.training(res, 1), resources.segmenter_pool(res),
               resources.encoder_pool(res, n_batches=10)]
    assert not any(layout.gpu for layout in layouts)
    assert all("GPU" not in layout.resources() for layout in layouts)
    assert resources.segmenter_pool(res).count == max(1, int(cpus) // 2)
    assert resources.encoder_pool(res, n_batches=1).count == 1  # never more actors than batches
    plan = resources.sweep(res, n_trials=3, nested=False)
    assert "gpu" not in plan.trial_resources


def test_require_fails_clearly_when_no_gpu_node_joins(ray_session):
    res = config.load("demo", ["resources.gpu=require", "resources.gpu_wait_s=1"]).resources
    for size in (lambda: resources.training(res, 1), lambda: resources.segmenter_pool(res)):
        with pytest.raises(RuntimeError, match="no GPU node joined the Ray cluster within 1 s"):
            size()


def test_cross_fitted_folds_share_the_cpus_side_by_side(ray_session):
    """On CPUs the folds train at once, one trainer per CPU at most, each on its share: they are
    independent, so side by side beats one fold on every core (197 s -> 154 s for the demo's
    two folds on 2 CPUs)."""
    from pipeline.segmentation.train import fold_concurrency

    cfg = config.demo()
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert fold_concurrency(cfg, 1) == 1
    assert fold_concurrency(cfg, 2) == min(2, cpus)
    assert fold_concurrency(cfg, 5) == cpus
    alone, shared = resources.training(cfg.resources, 0), resources.training(cfg.resources, 0, 2)
    assert (alone.count, alone.cpus, alone.threads) == (1, cpus, cpus)
    assert (shared.count, shared.cpus, shared.threads) == (1, max(1, cpus // 2), max(1, cpus // 2))
    two_workers = config.load("demo", ["segmentation.num_workers=2"])
    assert fold_concurrency(two_workers, 2) == 1  # each trainer's 2 workers already fill 2 CPUs
