"""Figures as PNG files: reliability diagrams (paper Fig. 3)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from udtimm.io import atomic_write  # noqa: E402
from udtimm.metrics import expected_calibration_error, reliability_bins  # noqa: E402

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def draw_reliability(axis: plt.Axes, probs: Tensor, target: Tensor, difficult: Tensor | None, label: str,
                     colour: str, width_share: float = 1.0, offset: float = 0.0) -> float:
    """Accuracy per confidence bin as bars, the gap to the diagonal shaded; returns the pooled ECE."""
    bins = reliability_bins(probs, target, difficult)
    lower, upper = bins["lower"].numpy(), bins["upper"].numpy()
    width = (upper - lower) * width_share
    accuracy = torch.nan_to_num(bins["accuracy"]).numpy()
    confidence = torch.nan_to_num(bins["confidence"]).numpy()
    ece = expected_calibration_error(probs, target, difficult, classwise=False)
    left = lower + offset * (upper - lower)
    axis.bar(left, accuracy, width=width, align="edge", color=colour, alpha=0.8, edgecolor="black",
             linewidth=0.5, label=f"{label} (ECE {ece:.2f}%)")
    filled = bins["count"].numpy() > 0
    axis.bar(left[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width[filled],
             align="edge", color="red", alpha=0.25, hatch="//", edgecolor="red", linewidth=0.0)
    return ece


def save_figure(figure: plt.Figure, path: str) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def reliability_figure(curves: list[tuple[str, Tensor, Tensor, Tensor | None]], title: str) -> plt.Figure:
    """One axes: a bar series per (label, probs, target, difficult), the diagonal, the gap shaded in red."""
    figure, axis = plt.subplots(figsize=(5, 5))
    share = 1.0 / len(curves)
    for number, (label, probs, target, difficult) in enumerate(curves):
        draw_reliability(axis, probs, target, difficult, label, COLOURS[number % len(COLOURS)], share, number * share)
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axis.fill_between([], [], color="red", alpha=0.25, hatch="//", label="gap to confidence")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (predicted probability)",
             ylabel="accuracy (fraction of positives)", title=title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def reliability_diagram(probs: Tensor, target: Tensor, difficult: Tensor | None, path: str, title: str = "") -> None:
    """Write the reliability diagram of one model's (image, class) probabilities to `path`."""
    ece = expected_calibration_error(probs, target, difficult, classwise=True)
    heading = f"{title} — classwise ECE {ece:.2f}%" if title else f"classwise ECE {ece:.2f}%"
    save_figure(reliability_figure([("model", probs, target, difficult)], heading), path)
