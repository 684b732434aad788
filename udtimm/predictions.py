"""validate.py's outputs besides the metrics: per-image prediction CSVs and the tables it prints."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from udtimm import metrics
from udtimm.engine import Predictions
from udtimm.io import atomic_write_text, csv_line


def select(predictions: Predictions, keep: Tensor) -> Predictions:
    """The predictions of the images where the bool [N] mask `keep` is True."""
    return Predictions(predictions.scores[keep], predictions.target[keep], predictions.difficult[keep],
                       predictions.indices[keep])


def joined_names(mask: Tensor, class_names: Sequence[str]) -> str:
    """The class names where the bool [C] mask is True, ';'-joined (the labels column)."""
    return ";".join(name for name, on in zip(class_names, mask.tolist(), strict=True) if on)


def _probability_cells(scores: Tensor) -> list[list[str]]:
    # numpy prints a float32 with the fewest digits that read back as the same float32: exact and short.
    return [[str(value) for value in row] for row in scores.float().numpy()]


def write_scores_csv(path: str, image_ids: Sequence[str], class_names: Sequence[str], scores: Tensor,
                     target: Tensor) -> None:
    """--save-preds: image_id, one probability column per class, labels (ground-truth names); written atomically."""
    lines = [csv_line(["image_id", *class_names, "labels"])]
    for image_id, cells, labels in zip(image_ids, _probability_cells(scores), target > 0.5, strict=True):
        lines.append(csv_line([image_id, *cells, joined_names(labels, class_names)]))
    atomic_write_text(path, "".join(lines))


def write_image_predictions(path: str, images: Sequence[str], class_names: Sequence[str], scores: Tensor,
                            predicted: Tensor) -> None:
    """--images: image, labels (the predicted names), one probability column per class; written atomically."""
    lines = [csv_line(["image", "labels", *class_names])]
    for image, labels, cells in zip(images, predicted, _probability_cells(scores), strict=True):
        lines.append(csv_line([image, joined_names(labels, class_names), *cells]))
    atomic_write_text(path, "".join(lines))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns as wide as their longest cell, numbers right-aligned."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(text.rjust(width) if right else text.ljust(width)
                         for text, width, right in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in cells)])


def metrics_table(values: dict[str, float]) -> str:
    """The metrics in percent, the image and class counts as integers."""
    percent = {column.name: column.percent for column in metrics.METRIC_COLUMNS}
    rows = [(name, f"{value:.2f}" if percent.get(name, True) else f"{value:.0f}") for name, value in values.items()]
    return format_table(("metric", "value (%)"), rows)


def per_class_table(predictions: Predictions, class_names: Sequence[str]) -> str:
    """Per-class AP (percent) and the number of positives it ranks (difficult ones left out, docs/method.md#metrics)."""
    ap = metrics.per_class_average_precision(predictions.scores, predictions.target, predictions.difficult)
    positives = ((predictions.target > 0.5) & ~predictions.difficult).sum(0).tolist()
    rows = [(name, "n/a" if math.isnan(value) else f"{100 * value:.2f}", count)
            for name, value, count in zip(class_names, ap.tolist(), positives, strict=True)]
    return format_table(("class", "AP (%)", "positives"), rows)
