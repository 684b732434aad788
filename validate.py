#!/usr/bin/env python3
"""Evaluate a checkpoint on a dataset split, or label your own images with it.

    python validate.py --checkpoint output/<run>/best.safetensors     # its dataset's test split
    python validate.py --checkpoint best.safetensors --subset difficult --results-file results.csv
    python validate.py --checkpoint best.safetensors --images photos/ --out-csv predictions.csv
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 validate.py --checkpoint best.safetensors

The model, its classes, input size and normalisation come from the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from accelerate import Accelerator

from udtimm import checkpoint, config, metrics, runs
from udtimm.config import DATASETS, ConfigError, HelpFormatter
from udtimm.data.base import MultiLabelDataset
from udtimm.data.feed import DeviceFeeder
from udtimm.data.images import ImageFolderDataset, list_images
from udtimm.data.loader import load_split, make_loader
from udtimm.engine import Predictions, predict
from udtimm.io import append_csv_row
from udtimm.plots import reliability_diagram
from udtimm.predictions import (
    format_table,
    joined_names,
    metrics_table,
    per_class_table,
    select,
    write_image_predictions,
    write_scores_csv,
)

TOPK = 3  # the paper's top-3 metrics
PREVIEW_ROWS = 20
# Options that need annotations, refused with --images: (attribute, its value when not given).
ANNOTATED_ONLY = (("subset", "all"), ("results_file", None), ("save_preds", None), ("plots", None),
                  ("eval_difficult_negative", False))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="a .safetensors file written by udtimm")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None, choices=DATASETS, help="default: the checkpoint's dataset")
    data.add_argument("--data-dir", default=None, help="dataset root (digits: the default cache folder)")
    data.add_argument("--split", default="test", help="split to evaluate (test = VOC test, COCO val2014)")
    data.add_argument("--digits-trainval", type=int, default=3000, help="digits: number of trainval images")
    data.add_argument("--digits-test", type=int, default=1000, help="digits: number of test images")
    data.add_argument("--digits-seed", type=int, default=0, help="digits: scene seed (0: the default set)")
    data.add_argument("-b", "--batch-size", type=int, default=64, help="images per process and step")
    data.add_argument("--workers", type=int, default=2, help="data loader worker processes per device")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--subset", default="all", choices=("all", "difficult"),
                            help="difficult: only images with a difficult class (Table 2), with per-class AP")
    evaluation.add_argument("--threshold", type=float, default=0.5, help="a class is predicted from this probability")
    evaluation.add_argument("--topk", type=int, default=None,
                            help=f"top-k metrics (default {TOPK}); --images: at most the k most probable labels")
    evaluation.add_argument("--eval-difficult-negative", action="store_true",
                            help="CP..OF1 count difficult pairs as negatives (ML-GCN's code), not left out")
    evaluation.add_argument("--results-file", default=None, metavar="CSV", help="append one row of metrics")
    evaluation.add_argument("--save-preds", default=None, metavar="CSV", help="write every image's probabilities")
    evaluation.add_argument("--plots", default=None, metavar="DIR", help="write DIR/reliability.png")
    images = parser.add_argument_group("your own images (no annotations)")
    images.add_argument("--images", nargs="+", default=None, metavar="DIR_OR_FILE",
                        help="folders (.jpg/.jpeg/.png, recursive) or image files to label")
    images.add_argument("--out-csv", default="predictions.csv", help="where --images writes its predictions")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="autocast dtype")
    runtime.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster on tensor cores)")
    runtime.add_argument("--torchcompile", action="store_true", help="torch.compile the model (through accelerate)")
    runtime.add_argument("--gpu-decode", action="store_true",
                         help="the workers only read the files; the GPU decodes (nvJPEG) and resizes them")
    config.add_prefetch_arg(runtime)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.images:
        given = [name for name, unset in ANNOTATED_ONLY if getattr(args, name) != unset]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"{flags} need(s) annotations, which --images does not have")
    return args


def load_dataset(args: argparse.Namespace, metadata: dict[str, str], accelerator: Accelerator) -> MultiLabelDataset:
    """The split to evaluate (the checkpoint's dataset by default), refused when its classes differ."""
    args.dataset = args.dataset or metadata.get("dataset")
    if not args.dataset:
        raise ConfigError(f"{args.checkpoint} does not name its dataset: give --dataset")
    with accelerator.main_process_first():  # the main process generates digits before the others read it
        dataset = load_split(args, args.split)
    difference = checkpoint.class_difference(checkpoint.class_names(metadata), dataset.classes)
    if difference:
        raise checkpoint.CheckpointError(
            f"{args.checkpoint} was trained on other classes than {dataset.name} ({difference})")
    return dataset


def evaluate(args: argparse.Namespace, dataset: MultiLabelDataset, predictions: Predictions,
             metadata: dict[str, str], accelerator: Accelerator) -> dict[str, float]:
    """Metrics of the split (or its difficult subset), printed and written by the main process."""
    if args.subset == "difficult":
        predictions = select(predictions, metrics.difficult_subset(predictions.difficult))
        if len(predictions.indices) == 0:
            raise ConfigError(f"--subset difficult: no image of {dataset.name} has a difficult label")
    values = metrics.compute_metrics(predictions.scores, predictions.target, predictions.difficult, args.threshold,
                                     TOPK if args.topk is None else args.topk,
                                     difficult_as_negative=args.eval_difficult_negative)
    if not accelerator.is_main_process:
        return values
    print(f"{args.checkpoint} ({metadata['model']}) on {dataset.name}, subset {args.subset}: "
          f"{len(predictions.indices)} images, {accelerator.num_processes} process(es)")
    if args.subset == "difficult":
        print(per_class_table(predictions, dataset.classes))
    print(metrics_table(values))
    if args.results_file:
        append_csv_row(args.results_file, {
            "dataset": args.dataset, "split": args.split, "subset": args.subset, "model": metadata["model"],
            "method": metadata.get("method", ""), "teacher": metadata.get("teacher", ""),
            "checkpoint": args.checkpoint, "eval_difficult": "negative" if args.eval_difficult_negative else "ignore",
            **values,
        })
    if args.save_preds:
        image_ids = [dataset.samples[index].image_id for index in predictions.indices.tolist()]
        write_scores_csv(args.save_preds, image_ids, dataset.classes, predictions.scores, predictions.target)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        reliability_diagram(predictions.scores, predictions.target, predictions.difficult,
                            os.path.join(args.plots, "reliability.png"), title=metadata["model"])
    return values


def label_images(args: argparse.Namespace, dataset: ImageFolderDataset, predictions: Predictions,
                 class_names: list[str], accelerator: Accelerator) -> dict[str, float]:
    """--images: the labels above --threshold (at most --topk of them), written to --out-csv and previewed."""
    predicted = metrics.predicted_labels(predictions.scores, args.threshold, args.topk)
    paths = [dataset.paths[index] for index in predictions.indices.tolist()]
    if accelerator.is_main_process:
        write_image_predictions(args.out_csv, paths, class_names, predictions.scores, predicted)
        preview = [(path, joined_names(mask, class_names))
                   for path, mask in zip(paths[:PREVIEW_ROWS], predicted[:PREVIEW_ROWS], strict=True)]
        print(format_table(("image", "labels"), preview))
        more = f" ({len(paths) - PREVIEW_ROWS} more rows there)" if len(paths) > PREVIEW_ROWS else ""
        print(f"{len(paths)} image(s) labelled: {args.out_csv}{more}")
    return {"num_images": float(len(paths))}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics dict (METRIC_NAMES), or {"num_images": n} with --images."""
    args = parse_args(argv)
    accelerator = runs.make_accelerator(args)
    model, metadata = checkpoint.model_from_checkpoint(args.checkpoint)
    class_names = checkpoint.class_names(metadata)
    img_size, mean, std = int(metadata["img_size"]), json.loads(metadata["mean"]), json.loads(metadata["std"])
    if args.images:
        dataset = ImageFolderDataset(list_images(args.images), num_classes=len(class_names))
    else:
        dataset = load_dataset(args, metadata, accelerator)
    transform = runs.eval_pipeline(dataset, img_size, mean, std, accelerator.device, args.gpu_decode)
    # The model gets no distributed wrapper (evaluation_mode): only mixed precision and --torchcompile.
    loader = accelerator.prepare(make_loader(dataset, args.batch_size, False, args.workers))
    model = accelerator.prepare_model(runs.place_model(model, accelerator.device, args.channels_last),
                                      evaluation_mode=True)
    predictions = predict(model, DeviceFeeder(loader, transform, accelerator.device, args.prefetch), accelerator,
                          not args.no_progress)
    # Dataset order whatever the number of processes, so tied scores rank (and files list) the same way.
    predictions = select(predictions, predictions.indices.argsort())
    if args.images:
        result = label_images(args, dataset, predictions, class_names, accelerator)
    else:
        result = evaluate(args, dataset, predictions, metadata, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    runs.run_script(main)
