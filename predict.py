#!/usr/bin/env python3
"""Label your own images with a trained model: for each image, the predicted labels and every class's probability
(above 100 classes, the predicted classes' probabilities only: --scores).

    python predict.py --checkpoint output/<run>/best.safetensors photos/ --out predictions.csv
    python predict.py --checkpoint best.safetensors 'photos/**/*.jpg' one.png --out predictions.json --topk 3
    python predict.py --checkpoint export_dir/ photos/ --out predictions.csv     # an export in the timm format
    python predict.py --checkpoint openimages.safetensors photos/ --topk 20 --scores predicted   # 10,000 classes

INPUT is an image file, a folder (its files of every image format PIL reads, recursively: .jpg, .png, .webp, .bmp,
.tif, ...; the others are left out with a warning naming them) or a glob pattern (quoted, ** recurses).
The probabilities are calibrated, sigmoid(logit / T + b), by the temperatures (and, for `--calibrate platt`, biases)
stored beside the checkpoint by `validate.py --calibrate` when there are some. A class is predicted when its
probability reaches its threshold: --threshold for all classes when given, else the per-class thresholds stored
beside the checkpoint by `validate.py --tune-thresholds`, else 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence

import pandas as pd
import torch

from udtimm import cli
from udtimm.config import ConfigError
from udtimm.flags import warn
from udtimm.io import atomic_write_text, check_writable
from udtimm.predictions import MANY_CLASSES, format_table
from udtimm.predictor import IMAGE_COLUMN, LABELS_COLUMN, SCORES, SCORES_COLUMN, Predictor

PREVIEW_ROWS = 20
PREVIEW_LABELS = 10  # per image in the printed preview: a badly calibrated model of 10,000 classes predicts thousands
OUTPUT_FORMATS = (".csv", ".json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="FILE_OR_DIR",
                        help="a .safetensors file written by udtimm, or a folder of `udtimm.export --format timm`")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", default="predictions.csv", metavar="FILE",
                        help="predictions.csv (image, labels, one probability column per class) or predictions.json "
                             "(a list of {image, labels, scores}); default: predictions.csv")
    parser.add_argument("--scores", default="auto", choices=("auto", *SCORES),
                        help="all: every class's probability; predicted: the predicted classes' only (a `scores` "
                             "column, ';'-joined in the order of `labels`; in JSON, scores by predicted class), kept "
                             f"batch by batch; auto: all up to {MANY_CLASSES} classes, else predicted (default: auto)")
    parser.add_argument("--topk", type=int, default=None,
                        help="at most the k most probable classes per image (default: every class over its threshold)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one threshold for all classes (default: the stored per-class thresholds, else 0.5)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode the images (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if os.path.splitext(args.out)[1].lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {args.out}: the file name must end in {' or '.join(OUTPUT_FORMATS)}")
    if args.topk is not None and args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must lie in [0, 1], got {args.threshold}")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    return args


def write_predictions(path: str, table: pd.DataFrame, class_names: Sequence[str], scores: str = "all") -> None:
    """CSV (the DataFrame as it is) or JSON (labels as a list, scores by class), by the extension; atomically.
    `scores`: the table's (Predictor.predict)."""
    if path.lower().endswith(".json"):
        if scores == "predicted":
            by_image = [dict(zip(labels.split(";"), map(float, values.split(";")), strict=True)) if labels else {}
                        for labels, values in zip(table[LABELS_COLUMN], table[SCORES_COLUMN], strict=True)]
        else:
            # str() of a float32 is the shortest text that reads back as that float32, as in the CSV
            by_image = [{name: float(str(value)) for name, value in zip(class_names, row, strict=True)}
                        for row in table[list(class_names)].to_numpy()]
        records = [{"image": image, "labels": [name for name in labels.split(";") if name], "scores": by_class}
                   for image, labels, by_class in zip(table[IMAGE_COLUMN], table[LABELS_COLUMN], by_image, strict=True)]
        atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    else:
        # pandas writes each float32 probability with the digits that read back as that same float32
        atomic_write_text(path, table.to_csv(index=False))


def preview_labels(labels: str) -> str:
    """An image's labels as the preview prints them: at most PREVIEW_LABELS, then how many more."""
    names = labels.split(";")
    if len(names) <= PREVIEW_LABELS:
        return labels
    return f"{';'.join(names[:PREVIEW_LABELS])} ... {len(names) - PREVIEW_LABELS:,} more"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """The predictions, as written to --out."""
    args = parse_args(argv)
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    scores = args.scores
    if scores == "auto":
        scores = "all" if len(predictor.class_names) <= MANY_CLASSES else "predicted"
    line = predictor.default_threshold_warning(args.threshold)
    if line:
        warn(line)
    with warnings.catch_warnings():  # said once, above, as a line
        warnings.filterwarnings("ignore", message=".*whose scores are not probabilities")
        table = predictor.predict(args.inputs, batch_size=args.batch_size, topk=args.topk, threshold=args.threshold,
                                  workers=args.workers, progress=not args.no_progress, scores=scores)
    write_predictions(args.out, table, predictor.class_names, scores)
    rule = "per-class thresholds" if args.threshold is None and predictor.thresholds is not None else \
        f"threshold {predictor.decision_thresholds(args.threshold)}"
    print(format_table((IMAGE_COLUMN, LABELS_COLUMN), [(image, preview_labels(labels)) for image, labels in
                                                       table[[IMAGE_COLUMN, LABELS_COLUMN]].head(PREVIEW_ROWS)
                                                       .itertuples(index=False)]))
    more = f" ({len(table) - PREVIEW_ROWS} more rows there)" if len(table) > PREVIEW_ROWS else ""
    calibrated = ""
    if predictor.calibration is not None:
        stored = "temperatures and biases" if predictor.calibration.biases.any() else "temperatures"
        calibrated = f", probabilities calibrated by the stored {stored} (validate.py --calibrate)"
    predicted_only = ", with the probabilities of the predicted classes only" if scores == "predicted" else ""
    print(f"{len(table)} image(s) labelled with {rule}{' and --topk ' + str(args.topk) if args.topk else ''}"
          f"{calibrated}{predicted_only}: {args.out}{more}")
    return table


if __name__ == "__main__":
    cli.run_script(main)
