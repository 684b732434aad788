"""Figures as PNG files: reliability diagrams (paper Fig. 3) and attention maps over an image (Fig. 4)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from udtimm.io import atomic_write  # noqa: E402
from udtimm.metrics import expected_calibration_error, reliability_bins  # noqa: E402

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
DPI = 100  # with figsize in inches, this fixes a PNG's size in pixels
MAP_INCHES = 3.0  # width of the image and of each attention map
BAR_INCHES = 2.2  # width of each bar chart of the label panel
ROW_INCHES = 3.2


def draw_reliability(axis: plt.Axes, bins: dict[str, Tensor], ece: float, label: str, colour: str,
                     width_share: float = 1.0, offset: float = 0.0) -> None:
    """Accuracy per confidence bin (metrics.reliability_bins) as bars, the gap up to the bin's mean confidence
    hatched; `ece`, the pooled ECE, goes in the legend.

    Red shows above the bars (over-confidence) and through them (under-confidence); with several models the
    gap stays in its model's slot of the bin.
    """
    lower, upper = bins["lower"].numpy(), bins["upper"].numpy()
    width = (upper - lower) * width_share
    accuracy = torch.nan_to_num(bins["accuracy"]).numpy()
    confidence = torch.nan_to_num(bins["confidence"]).numpy()
    left = lower + offset * (upper - lower)
    axis.bar(left, accuracy, width=width, align="edge", color=colour, alpha=0.8, edgecolor="black",
             linewidth=0.5, label=f"{label} (pooled ECE {ece:.2f}%)")
    filled = bins["count"].numpy() > 0
    axis.bar(left[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width[filled],
             align="edge", color="red", alpha=0.25, hatch="//", edgecolor="red", linewidth=0.5)


def save_figure(figure: plt.Figure, path: str) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    plt.close(figure)


def reliability_figure(curves: list[tuple[str, Tensor, Tensor, Tensor | None]], title: str) -> plt.Figure:
    """One axes: a bar series per (label, probs, target, difficult) side by side in each bin, the diagonal."""
    return binned_reliability_figure([(label, reliability_bins(probs, target, difficult),
                                       expected_calibration_error(probs, target, difficult, classwise=False))
                                      for label, probs, target, difficult in curves], title)


def binned_reliability_figure(curves: list[tuple[str, dict[str, Tensor], float]], title: str) -> plt.Figure:
    """reliability_figure of curves given as (label, pooled bins, pooled ECE)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    share = 1.0 / len(curves)
    for number, (label, bins, ece) in enumerate(curves):
        draw_reliability(axis, bins, ece, label, COLOURS[number % len(COLOURS)], share, number * share)
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axis.fill_between([], [], color="red", alpha=0.25, hatch="//", label="gap: mean confidence - accuracy")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (predicted probability)",
             ylabel="accuracy (fraction of positives)", title=title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def reliability_diagram(probs: Tensor, target: Tensor, difficult: Tensor | None, path: str, title: str = "",
                        calibrated: Tensor | None = None) -> None:
    """Write the reliability diagram of one model's (image, class) probabilities to `path`; with the `calibrated`
    probabilities of the same pairs (validate.py --calibrate), both side by side in each bin."""
    curves = [("model", probs, target, difficult)]
    ece = f"{expected_calibration_error(probs, target, difficult, classwise=True):.2f}%"
    if calibrated is not None:
        curves = [("uncalibrated", probs, target, difficult), ("calibrated", calibrated, target, difficult)]
        ece += f" -> {expected_calibration_error(calibrated, target, difficult, classwise=True):.2f}%"
    save_figure(reliability_figure(curves, reliability_title(title, ece)), path)


def binned_reliability_diagram(bins: dict[str, Tensor], pooled_ece: float, classwise_ece: float, path: str,
                               title: str = "") -> None:
    """reliability_diagram of one model from its pooled bins and ECEs (MetricStatistics, --eval-memory binned)."""
    figure = binned_reliability_figure([("model", bins, pooled_ece)], reliability_title(title, f"{classwise_ece:.2f}%"))
    save_figure(figure, path)


def reliability_title(title: str, ece: str) -> str:
    return f"{title} — classwise ECE {ece}" if title else f"classwise ECE {ece}"


def draw_attention(axis: plt.Axes, image: Tensor, attention: Tensor, title: str) -> None:
    """A signed map over the image in grey: 'coolwarm' with limits symmetric about 0, so white means 0."""
    limit = attention.abs().max().item() or 1.0  # an all-zero map still needs a non-empty colour range
    axis.imshow(image.float().mean(dim=0).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    shown = axis.imshow(attention.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.6, interpolation="nearest")
    axis.figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.03)
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def draw_label_bars(prob_axis: plt.Axes, uncertainty_axis: plt.Axes | None, labels: Sequence[str], probs: Tensor,
                    uncertainty: Tensor | None, title: str) -> None:
    """Top labels, best first: probability bars on [0, 1]; uncertainty bars about 0 (red: above 0)."""
    rows = range(len(labels))
    prob_axis.barh(rows, probs.tolist(), color="tab:blue")
    for row, value in zip(rows, probs.tolist(), strict=True):
        prob_axis.text(min(value, 0.72) + 0.02, row, f"{value:.2f}", va="center", fontsize=8)
    prob_axis.set(xlim=(0, 1), yticks=list(rows))
    prob_axis.set_xlabel("probability", fontsize=9)
    prob_axis.set_yticklabels(labels, fontsize=9)
    prob_axis.invert_yaxis()
    prob_axis.set_title(title, fontsize=9)
    if uncertainty_axis is None or uncertainty is None:
        return
    values = uncertainty.tolist()
    uncertainty_axis.barh(rows, values, color=["tab:red" if value > 0 else "tab:blue" for value in values])
    limit = max(abs(value) for value in values) * 1.15 or 1.0
    uncertainty_axis.axvline(0, color="black", linewidth=0.6)
    uncertainty_axis.set_xlim(-limit, limit)
    uncertainty_axis.set_xlabel("KL term of Eq. 15", fontsize=9)
    uncertainty_axis.tick_params(axis="y", left=False, labelleft=False)
    uncertainty_axis.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    uncertainty_axis.tick_params(axis="x", labelsize=7)
    uncertainty_axis.set_title("per-label uncertainty", fontsize=9)


def attention_figure(image: Tensor, maps: Sequence[tuple[str, Tensor]], labels: Sequence[str], probs: Tensor,
                     uncertainty: Tensor | None, panel_title: str, title: str = "") -> plt.Figure:
    """The image (uint8 [3, H, W]), each (title, signed [H, W] map) over it, then the top labels' panel.

    `uncertainty` None (a model without the calibration branch) leaves the uncertainty chart out. The size is
    MAP_INCHES per image or map plus BAR_INCHES per chart, by ROW_INCHES.
    """
    charts = 1 if uncertainty is None else 2
    columns = [MAP_INCHES] * (1 + len(maps)) + [BAR_INCHES] * charts
    figure = plt.figure(figsize=(sum(columns), ROW_INCHES), layout="constrained")
    grid = figure.add_gridspec(1, len(columns), width_ratios=columns)
    axis = figure.add_subplot(grid[0])
    # Nearest: the pixels as they are, not smoothed (smoothing also triples the PNG's size).
    axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    axis.set_title("image", fontsize=9)
    axis.axis("off")
    for column, (map_title, attention) in enumerate(maps, start=1):
        draw_attention(figure.add_subplot(grid[column]), image, attention, map_title)
    prob_axis = figure.add_subplot(grid[1 + len(maps)])
    uncertainty_axis = figure.add_subplot(grid[2 + len(maps)], sharey=prob_axis) if charts == 2 else None
    draw_label_bars(prob_axis, uncertainty_axis, labels, probs, uncertainty, panel_title)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
