"""Figures that let a person check what the numbers mean, written as PNG under `<out>/figures/`.

- latent traversal (the paper's Figure 2): each latent swept over its observed range with the
  others at their mean, decoded, and shown as mid-sagittal and axial views of the disc;
- latent codes by spinal level, L5/S1 at the bottom as in the spine;
- correlations of the latents with the geometric measurements;
- ROC curves per feature set with bootstrap bands over patients;
- segmentation examples: reference and predicted disc outlines on mid-sagittal slices.

Figures are matplotlib `Figure` objects rendered by Agg (no pyplot, no global backend), saved to
bytes and written through `storage`, so `out` may be a local folder or a URI. Every image is
drawn from canonical RAS arrays with extents in mm: sagittal views put anterior to the right and
superior up; axial views put the patient's right to the right and anterior up.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline import stats
from pipeline.config import Config
from pipeline.data import labels, storage, tables

Decoder = Callable[[np.ndarray], np.ndarray]  # (n, k) codes -> (n, S, S, S) voxel probabilities
SWEEP = (("min", 0.0), ("1/3", 1 / 3), ("2/3", 2 / 3), ("max", 1.0))
REFERENCE_COLOUR, PREDICTED_COLOUR = "#00c853", "#ff00ff"
DPI = 120


def decoder_from_model(model, batch_size: int = 16) -> Decoder:
    """Wrap an autoencoder (`model.decode(z) -> logits (B, 1, S, S, S)`, e.g. from
    `pipeline.shape.model.load_model`) as a numpy decoder returning probabilities."""
    import torch

    def decode(codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.float32)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(codes), batch_size):
                logits = model.decode(torch.from_numpy(codes[start:start + batch_size]))
                parts.append(torch.sigmoid(logits)[:, 0].cpu().numpy())
        return np.concatenate(parts)

    return decode


def traversal_codes(latents: np.ndarray) -> np.ndarray:
    """(k, 4, k) codes: for latent i, the others at their mean and latent i at the min, 1/3,
    2/3 and max of its observed range."""
    latents = np.asarray(latents, dtype=float)
    if latents.ndim != 2 or len(latents) == 0 or not np.isfinite(latents).all():
        raise ValueError(f"latents must be a finite (n, k) array with n >= 1, got shape "
                         f"{latents.shape}")
    k = latents.shape[1]
    low, high = latents.min(axis=0), latents.max(axis=0)
    codes = np.tile(latents.mean(axis=0), (k, len(SWEEP), 1))
    for i in range(k):
        for j, (_, fraction) in enumerate(SWEEP):
            codes[i, j, i] = low[i] + fraction * (high[i] - low[i])
    return codes


def latent_traversal(decode: Decoder, latents: np.ndarray, out: str, voxel_mm: float) -> str:
    """The paper's Figure 2: one row per latent, its sweep points as pairs of mid-sagittal and
    axial views of the decoded disc (probability thresholded at 0.5)."""
    codes = traversal_codes(latents)
    k = codes.shape[0]
    cubes = np.asarray(decode(codes.reshape(-1, k)))
    if cubes.ndim != 4 or cubes.shape[0] != k * len(SWEEP) or len(set(cubes.shape[1:])) != 1:
        raise ValueError(f"the decoder returned shape {cubes.shape}; expected "
                         f"({k * len(SWEEP)}, S, S, S) probabilities")
    discs = (cubes >= 0.5).reshape(k, len(SWEEP), *cubes.shape[1:])
    size = cubes.shape[1]
    edge_mm = size * voxel_mm
    extent = (0, edge_mm, 0, edge_mm)
    fig = Figure(figsize=(1.55 * 2 * len(SWEEP) + 0.6, 1.75 * k + 1.0))
    axes = fig.subplots(k, 2 * len(SWEEP), squeeze=False)
    for i in range(k):
        for j, (name, _) in enumerate(SWEEP):
            disc = discs[i, j]
            volume_ml = disc.sum() * voxel_mm**3 / 1000
            sagittal = disc[size // 2, :, :].T  # rows superior, columns anterior
            axial = disc[:, :, size // 2].T  # rows anterior, columns right
            for view, (image, label) in enumerate(((sagittal, "sagittal"), (axial, "axial"))):
                ax = axes[i, 2 * j + view]
                ax.imshow(image, origin="lower", extent=extent, cmap="Greys", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.tick_params(labelsize=6, length=2)
                ax.set_xticks([0, edge_mm])
                ax.set_yticks([0, edge_mm])
                if i == 0:
                    ax.set_title(f"{name} · {label}", fontsize=8)
                if view == 0:
                    ax.text(0.03, 0.97, f"z{i}={codes[i, j, i]:.2f}\n{volume_ml:.1f} ml",
                            transform=ax.transAxes, va="top", fontsize=6, color="tab:blue",
                            bbox={"facecolor": "white", "alpha": 0.8, "pad": 1,
                                  "edgecolor": "none"})
                if i == k - 1:
                    ax.set_xlabel("anterior → (mm)" if view == 0 else "right → (mm)",
                                  fontsize=7)
                if j == 0 and view == 0:
                    ax.set_ylabel(f"z{i}\nsuperior ↑ (mm)", fontsize=8)
    fig.suptitle(f"Latent traversal: each latent swept over its observed range (others at their "
                 f"mean), decoded and thresholded at 0.5\nmid-sagittal (anterior right, "
                 f"superior up) and axial (patient's right to the right, anterior up) slices "
                 f"of a {size}³ cube, {voxel_mm:g} mm voxels ({edge_mm:g} mm edge)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "latent_traversal.png")


def latents_by_level(latents: pd.DataFrame, out: str) -> str:
    """Box and strip plot of each latent per spinal level (reference masks), L5/S1 at the bottom."""
    latents = _reference_rows(latents)
    columns = _latent_columns(latents)
    levels = sorted(latents.ivd_label.astype(int).unique())  # 201 = L5/S1 first: the bottom row
    names = [labels.level_name(label) for label in levels]
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(2.6 * len(columns) + 0.8, 0.45 * len(levels) + 1.6))
    axes = fig.subplots(1, len(columns), sharey=True, squeeze=False)[0]
    for ax, column in zip(axes, columns, strict=True):
        values = [latents.loc[latents.ivd_label == label, column].dropna().to_numpy()
                  for label in levels]
        positions = np.arange(1, len(levels) + 1)
        ax.boxplot(values, positions=positions, orientation="horizontal", widths=0.6,
                   showfliers=False, medianprops={"color": "tab:red"})
        for position, v in zip(positions, values, strict=True):
            ax.scatter(v, position + rng.uniform(-0.18, 0.18, len(v)), s=6, alpha=0.5,
                       color="tab:blue", linewidths=0)
        ax.set_xlabel(f"{column} (latent units)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(np.arange(1, len(levels) + 1), names)
    axes[0].set_ylabel("spinal level")
    fig.suptitle(f"Latent codes by spinal level (reference masks, {len(latents)} discs)",
                 fontsize=11)
    fig.tight_layout()
    return _save(fig, out, "latents_by_level.png")


def latent_geometry_correlation(latents: pd.DataFrame, discs: pd.DataFrame, out: str) -> str:
    """Pearson r of every latent with every geometric measurement and with the other latents,
    on reference-mask discs, with r written in each cell."""
    latents, discs = _reference_rows(latents), _reference_rows(discs)
    columns = _latent_columns(latents)
    keys = ["patient_id", "series_id", "ivd_label"]
    geometry = [c for c in tables.GEOMETRY + tables.BULGE
                if c in discs.columns and discs[c].notna().sum() > 2]
    merged = latents[keys + columns].merge(discs[keys + geometry], on=keys, how="inner")
    if merged.empty:
        raise ValueError("no reference-mask disc has both a latent code and geometry")
    r = merged[columns + geometry].corr(method="pearson").loc[columns, geometry + columns]
    fig = Figure(figsize=(0.62 * r.shape[1] + 2.2, 0.55 * r.shape[0] + 2.4))
    ax = fig.subplots()
    image = ax.imshow(r.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(r.to_numpy()):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(r.shape[1]), r.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(r.shape[0]), r.index, fontsize=8)
    ax.axvline(len(geometry) - 0.5, color="black", linewidth=1)
    fig.colorbar(image, ax=ax, label="Pearson r", shrink=0.8)
    ax.set_title(f"Latents vs geometric measurements and each other\n(reference masks, "
                 f"{len(merged)} discs; units in the column names)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "latent_geometry_correlation.png")


def roc_curves(predictions: pd.DataFrame, out: str, n_boot: int = 1000, seed: int = 0,
               model: str = "lightgbm") -> list[str]:
    """One figure per target, a panel per mask source, a curve per feature set with its 95%
    bootstrap band over patients (the same resamples as the table's CIs)."""
    paths = []
    predictions = predictions[predictions.model == model]
    for target, by_target in predictions.groupby("target", sort=False):
        sources = list(dict.fromkeys(by_target.mask_source))
        fig = Figure(figsize=(5.2 * len(sources), 5.0))
        axes = fig.subplots(1, len(sources), squeeze=False)[0]
        grid = np.linspace(0, 1, 101)
        for ax, source in zip(axes, sources, strict=True):
            panel = by_target[by_target.mask_source == source]
            for i, (feature_set, rows) in enumerate(panel.groupby("feature_set", sort=False)):
                colour = _COLOURS[i % len(_COLOURS)]
                y, score = rows.y_true.to_numpy().astype(int), rows.probability.to_numpy()
                resamples = stats.GroupResamples.of(rows.patient_id.to_numpy(), n_boot, seed)
                auc = stats.bootstrap_ci(y, score, rows.patient_id, stats.roc_auc,
                                         resamples=resamples)
                fpr, tpr = stats.roc_curve(y, score, np.ones((1, len(y))))
                bands = stats.roc_band(y, score, resamples, grid)
                ax.plot(fpr[0], tpr[0], color=colour, linewidth=1.8,
                        label=f"{feature_set}: AUC {auc.value:.2f} "
                              f"({auc.ci_low:.2f}–{auc.ci_high:.2f})")
                if len(bands):
                    low, high = np.quantile(bands, [0.025, 0.975], axis=0)
                    ax.fill_between(grid, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1,
                    label="chance (AUC 0.50)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_aspect("equal")
            ax.set_xlabel("false positive rate (1 − specificity)")
            ax.set_ylabel("true positive rate (sensitivity)")
            n_patients = panel.patient_id.nunique()
            n_discs = len(panel) // max(panel.feature_set.nunique(), 1)
            ax.set_title(f"{source} masks ({n_discs} discs, {n_patients} patients)", fontsize=10)
            ax.legend(loc="lower right", fontsize=7)
        fig.suptitle(f"{target.replace('_', ' ').capitalize()}: out-of-fold ROC ({model}), "
                     "shaded: 95% bootstrap band over patients", fontsize=11)
        fig.tight_layout()
        paths.append(_save(fig, out, f"roc_{target}.png"))
    return paths


def segmentation_examples(series: pd.DataFrame, out: str, n_examples: int = 3,
                          metrics: pd.DataFrame | None = None) -> str | None:
    """Mid-sagittal slices of a few (validation first) series with the reference disc outline
    and the predicted one (`<out>/predictions/<series_id>.mha`); None when no series has a
    prediction."""
    chosen = []
    order = series.assign(_val=series.get("split", pd.Series(index=series.index)).ne("val"))
    for row in order.sort_values(["_val", "series_id"]).itertuples():
        prediction = storage.join(out, "predictions", f"{row.series_id}.mha")
        if storage.exists(prediction):
            chosen.append((row, prediction))
        if len(chosen) == n_examples:
            break
    if not chosen:
        return None
    dice = {}
    if metrics is not None and "dice" in metrics.columns:
        dice = dict(zip(metrics.series_id.astype(str), metrics.dice, strict=True))
    fig = Figure(figsize=(max(4.2 * len(chosen), 7.5), 5.6))
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (row, prediction_path) in zip(axes, chosen, strict=True):
        _draw_example(ax, row, prediction_path, dice.get(str(row.series_id)))
    handles = [Line2D([], [], color=REFERENCE_COLOUR, label="reference discs"),
               Line2D([], [], color=PREDICTED_COLOUR, label="predicted discs")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9)
    fig.suptitle("Segmentation examples: mid-sagittal slices (anterior right, superior up)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out, "segmentation_examples.png")


def make_figures(out: str, cfg: Config, checkpoint: str | None = None,
                 decode: Decoder | None = None) -> list[str]:
    """Every figure whose inputs exist under `<out>/tables/` (and `<out>/predictions/`); the
    traversal needs the autoencoder: a checkpoint folder or a `decode` function."""
    from pipeline.analysis import classify

    paths: list[str] = []
    latents = tables.read_if_present(out, tables.LATENTS)
    discs = tables.read_if_present(out, tables.DISCS,
                            columns=tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE)
    if latents is not None and len(latents):
        if decode is None and checkpoint is not None:
            from pipeline.shape.model import load_model

            decode = decoder_from_model(load_model(checkpoint)[0])
        if decode is not None:
            codes = _reference_rows(latents)[_latent_columns(latents)].to_numpy(dtype=float)
            paths.append(latent_traversal(decode, codes, out, cfg.discs.cube_spacing_mm))
        paths.append(latents_by_level(latents, out))
        if discs is not None:
            paths.append(latent_geometry_correlation(latents, discs, out))
    predictions = tables.read_if_present(out, classify.PREDICTIONS)
    if predictions is not None and len(predictions):
        paths += roc_curves(predictions, out, n_boot=cfg.classify.bootstrap, seed=cfg.seed)
    series = tables.read_if_present(out, tables.SERIES)
    if series is not None:
        example = segmentation_examples(series, out,
                                        metrics=tables.read_if_present(out, tables.SEGMENTATION_METRICS))
        if example:
            paths.append(example)
    return paths


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _draw_example(ax, row, prediction_path: str, dice: float | None) -> None:
    from pipeline.data.volumes import read_volume

    image = read_volume(row.image_uri)
    reference = read_volume(row.mask_uri)
    predicted = read_volume(prediction_path)
    for name, volume in (("reference mask", reference), ("prediction", predicted)):
        if volume.array.shape != image.array.shape:
            raise ValueError(f"{row.series_id}: {name} shape {volume.array.shape} differs from "
                             f"the image's {image.array.shape}")
    reference_discs = (reference.array >= labels.DISC_MIN) & (reference.array <= labels.DISC_MAX)
    predicted_discs = predicted.array > 0
    either = reference_discs | predicted_discs
    centre_of = reference_discs if reference_discs.any() else either  # the spine's midline
    x = int(np.median(np.nonzero(centre_of)[0])) if centre_of.any() else image.array.shape[0] // 2
    _, spacing_a, spacing_s = image.spacing
    window = _crop(either[x], (spacing_a, spacing_s), margin_mm=25.0)
    plane = image.array[x][window].astype(float)
    a0, s0 = window[0].start, window[1].start
    extent = (a0 * spacing_a, (a0 + plane.shape[0]) * spacing_a,
              s0 * spacing_s, (s0 + plane.shape[1]) * spacing_s)
    low, high = np.percentile(plane, [1, 99])
    ax.imshow(plane.T, origin="lower", extent=extent, cmap="gray", vmin=low, vmax=high,
              interpolation="nearest")
    a_mm = (np.arange(plane.shape[0]) + a0 + 0.5) * spacing_a
    s_mm = (np.arange(plane.shape[1]) + s0 + 0.5) * spacing_s
    for mask, colour in ((reference_discs, REFERENCE_COLOUR), (predicted_discs, PREDICTED_COLOUR)):
        section = mask[x][window].T.astype(float)
        if section.any():
            ax.contour(a_mm, s_mm, section, levels=[0.5], colors=colour, linewidths=1.2)
    title = str(row.series_id) + (f" (Dice {dice:.2f})" if dice is not None and
                                  np.isfinite(dice) else "")
    ax.set_title(f"{title}\nsagittal slice {x + 1} of {image.array.shape[0]}", fontsize=9)
    ax.set_xlabel("posterior → anterior (mm)")
    ax.set_ylabel("inferior → superior (mm)")


def _crop(mask2d: np.ndarray, spacing: tuple[float, float], margin_mm: float):
    """Index window around a 2-D mask plus a margin in mm (the whole slice when empty)."""
    if not mask2d.any():
        return (slice(0, mask2d.shape[0]), slice(0, mask2d.shape[1]))
    window = []
    for axis, step in enumerate(spacing):
        where = np.nonzero(mask2d.any(axis=1 - axis))[0]
        pad = int(np.ceil(margin_mm / step))
        window.append(slice(max(where[0] - pad, 0), min(where[-1] + pad + 1, mask2d.shape[axis])))
    return tuple(window)


def _reference_rows(frame: pd.DataFrame) -> pd.DataFrame:
    if "mask_source" in frame.columns:
        frame = frame[frame.mask_source == "reference"]
    if frame.empty:
        raise ValueError("no reference-mask rows to plot")
    return frame


def _latent_columns(latents: pd.DataFrame) -> list[str]:
    columns = sorted((c for c in latents.columns if c[:1] == "z" and c[1:].isdigit()),
                     key=lambda c: int(c[1:]))
    if not columns:
        raise ValueError("latents: no z0..z{k-1} columns")
    return columns


def _save(fig: Figure, out: str, name: str) -> str:
    location = storage.join(out, "figures", name)
    storage.write_png(fig, location, DPI)
    return location
