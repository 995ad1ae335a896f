"""The pipeline's stages as the runner sees them: thin glue between the library modules.

Each stage reads its inputs from `<out>/tables/`, calls one library module, and says what it
produced. Library modules are imported inside the stages so that `--stages catalog` needs no
torch start-up.
"""

from __future__ import annotations

from pipeline.data import storage, tables
from pipeline.run.runner import Context, Stage, StageError, StageOutcome


def _synthesize(ctx: Context) -> StageOutcome:
    from pipeline.data.synthetic import synthesize
    from pipeline.progress import counter

    s = ctx.cfg.synthetic
    truth = synthesize(ctx.data, patients=s.patients, seed=s.seed, label_noise=s.label_noise,
                       sequences=s.sequences, progress=counter(ctx.progress, "synthetic patients"))
    return StageOutcome(counts={"patients": s.patients, "discs": len(truth)})


def _catalog(ctx: Context) -> StageOutcome:
    from pipeline.data.cohort import catalog

    cat = catalog(ctx.data, sequence=ctx.cfg.sequence,
                  val_fraction=ctx.cfg.segmentation.val_fraction, seed=ctx.cfg.seed,
                  folds=ctx.cfg.segmentation.folds)
    if ctx.strict and cat.problems:
        first = cat.problems[0]
        raise StageError(f"{first['file']}: {first['reason']} (--strict stops at the first bad input)")
    if cat.series.empty:
        raise StageError(f"no usable {ctx.cfg.sequence} series under {ctx.data}")
    storage.write_table(cat.series, ctx.table(tables.SERIES))
    storage.write_table(cat.gradings, ctx.table(tables.GRADINGS))
    counts = {
        "series": len(cat.series),
        "patients": cat.series.patient_id.nunique(),
        "gradings": len(cat.gradings),
    }
    return StageOutcome(counts=counts, errors=cat.problems)


def _segtrain(ctx: Context) -> StageOutcome:
    from pipeline.segmentation.train import train_folds

    series = storage.read_table(ctx.table(tables.SERIES))
    results = train_folds(series, ctx.cfg, storage_path=ctx.work("train"), name=ctx.run_name,
                          progress=ctx.progress)
    segments = series.groupby("fold").patient_id.agg(lambda p: sorted(set(p.astype(str))))
    folds = [{"fold": r.fold, "checkpoint": r.checkpoint_path,
              "training_patients": r.training_patients,
              "selection_patients": r.selection_patients,
              "segmented_patients": segments.get(r.fold, []),
              "val_dice": r.best_val_dice, "val_iou": r.best_val_iou, "epochs": r.epochs_run}
             for r in results]
    skipped = {(bad["series_id"], bad["reason"]): bad for r in results for bad in r.skipped}
    return StageOutcome(
        # val_dice/val_iou: in-sample, on the selection patients that chose each checkpoint
        results={"folds": folds, "in_sample": ctx.cfg.segmentation.folds == 1},
        counts={"folds": len(folds), "epochs": "/".join(str(f["epochs"]) for f in folds),
                "best val Dice (selection, in-sample)":
                    "/".join(f"{f['val_dice']:.3f}" for f in folds)},
        errors=[{"stage": "segtrain", **bad} for bad in skipped.values()],
    )


def segmenters(segtrain: dict) -> dict[int, str]:
    """{fold: checkpoint} from the segtrain stage's results."""
    return {int(f["fold"]): f["checkpoint"] for f in segtrain["folds"]}


def _extract(ctx: Context) -> StageOutcome:
    from pipeline.segmentation.stream import run_extraction

    series = storage.read_table(ctx.table(tables.SERIES))
    segtrain = ctx.results["segtrain"]
    result = run_extraction(series, ctx.cfg, segmenters(segtrain), ctx.out, strict=ctx.strict,
                            progress=ctx.progress,
                            segmenter_records=segtrain["folds"])
    return StageOutcome(results={"summary": result.summary},
                        counts={"series": len(result.metrics), "discs": result.n_discs},
                        errors=result.errors)


def _sweep(ctx: Context) -> StageOutcome:
    from tune.bottleneck_sweep import run_sweep

    result = run_sweep(ctx.table(tables.DISCS), ctx.cfg, storage_path=ctx.work("tune"),
                       out=ctx.out, progress=ctx.progress, name=ctx.run_name)
    return StageOutcome(
        results={"chosen_bottleneck": result.chosen_bottleneck,
                 "checkpoint": result.chosen_checkpoint, "any_converged": result.any_converged},
        counts={"trials": len(result.table), "chosen bottleneck": result.chosen_bottleneck},
    )


def _encode(ctx: Context) -> StageOutcome:
    from pipeline.shape.encode import encode_discs

    path = encode_discs(ctx.table(tables.DISCS), ctx.results["sweep"]["checkpoint"], ctx.out,
                        progress=ctx.progress, res=ctx.cfg.resources)
    return StageOutcome(counts={"discs": len(storage.read_table(path, columns=["series_id"]))})


def _classify(ctx: Context) -> StageOutcome:
    from pipeline.analysis.classify import run_classification

    discs = storage.read_table(ctx.table(tables.DISCS),
                               columns=tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE
                               + ["disc_status"])
    latents = storage.read_table(ctx.table(tables.LATENTS))
    gradings = storage.read_table(ctx.table(tables.GRADINGS))
    result = run_classification(discs, latents, gradings, ctx.cfg, ctx.out, progress=ctx.progress)
    return StageOutcome(counts={"models": len(result.table)})


def _interpret(ctx: Context) -> StageOutcome:
    from pipeline.analysis.figures import make_figures

    figures = make_figures(ctx.out, ctx.cfg, ctx.results["sweep"]["checkpoint"])
    return StageOutcome(results={"figures": figures}, counts={"figures": len(figures)})


def _report(ctx: Context) -> StageOutcome:
    from pipeline.analysis.report import write_report

    path = write_report(ctx.out, ctx.cfg, segtrain=ctx.results.get("segtrain"))
    return StageOutcome(results={"report": path}, counts={})


def _in_tables(*names: str):
    return lambda ctx: [ctx.table(n) for n in names]


def build(synthesize: bool) -> list[Stage]:
    """The stages in order; `synthesize` adds the synthetic cohort in front (no --data given)."""
    stages = []
    if synthesize:
        stages.append(Stage("synthesize", "synthesising a SPIDER-layout demo cohort",
                            _synthesize, inputs=lambda ctx: [],
                            outputs=lambda ctx: [storage.join(ctx.data, "overview.csv")],
                            config_sections=("synthetic",)))
    stages += [
        Stage("catalog", "cataloguing series and gradings", _catalog,
              inputs=lambda ctx: [ctx.data],
              outputs=_in_tables(tables.SERIES, tables.GRADINGS),
              config_sections=("sequence", "seed", "segmentation.val_fraction",
                               "segmentation.folds")),
        Stage("segtrain", "training the disc segmenter (Ray Train)", _segtrain,
              inputs=_in_tables(tables.SERIES), outputs=lambda ctx: [],
              config_sections=("inputs", "segmentation", "seed")),
        Stage("extract", "streaming inference and disc extraction (Ray Data)", _extract,
              inputs=_in_tables(tables.SERIES),
              outputs=_in_tables(tables.DISCS, tables.SEGMENTATION_METRICS),
              config_sections=("inputs", "segmentation", "discs"), depends_on=("segtrain",)),
        Stage("sweep", "autoencoder bottleneck sweep (Ray Tune)", _sweep,
              inputs=_in_tables(tables.DISCS), outputs=_in_tables(tables.SWEEP),
              config_sections=("autoencoder", "sweep", "seed")),
        Stage("encode", "encoding every disc with the chosen autoencoder (Ray Data)", _encode,
              inputs=_in_tables(tables.DISCS), outputs=_in_tables(tables.LATENTS),
              depends_on=("sweep",)),
        Stage("classify", "pathology classifiers with patient-grouped CV (LightGBM)", _classify,
              inputs=_in_tables(tables.DISCS, tables.LATENTS, tables.GRADINGS),
              outputs=_in_tables(tables.CLASSIFICATION), config_sections=("classify", "seed")),
        Stage("interpret", "figures: latent traversal, levels, correlations, ROC", _interpret,
              inputs=_in_tables(tables.DISCS, tables.LATENTS, tables.CLASSIFICATION),
              outputs=lambda ctx: [storage.join(ctx.out, "figures")],
              config_sections=("discs.cube_spacing_mm", "classify.bootstrap", "seed"),
              depends_on=("sweep",)),
        Stage("report", "writing the report", _report,
              inputs=_in_tables(tables.SEGMENTATION_METRICS, tables.SWEEP,
                                tables.CLASSIFICATION, tables.ERRORS),
              outputs=lambda ctx: [storage.join(ctx.out, "report.md")],
              config_sections=("classify.targets", "autoencoder.iou_target", "preset"),
              depends_on=("segtrain",)),
    ]
    return stages

