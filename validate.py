#!/usr/bin/env python3
"""Evaluate a checkpoint on a dataset split; fit temperatures (and Platt's biases) and choose per-class thresholds
on a held-out split.

    python validate.py --checkpoint output/<run>/best.safetensors     # its dataset's test split
    python validate.py --checkpoint best.safetensors --subset difficult --results-file results.csv
    python validate.py --checkpoint best.safetensors --per-class      # AP, P, R, F1, ECE of every class
    python validate.py --checkpoint best.safetensors --per-class --per-class-rows all   # printed: 10,000 rows too
    python validate.py --checkpoint best.safetensors --tune-thresholds f1 --tune-split val
    python validate.py --checkpoint best.safetensors --calibrate per-class --tune-split val
    python validate.py --checkpoint best.safetensors --calibrate platt       # sigmoid(logit / T + b) per class
    python validate.py --checkpoint best.safetensors --eval-memory binned    # any split size, in bounded memory
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 validate.py --checkpoint best.safetensors

The model, its classes, input size and normalisation come from the checkpoint's metadata (udtimm.Predictor loads
them). Labelling your own images, without annotations, is predict.py's job.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from accelerate import Accelerator
from torch import Tensor, nn

from udtimm import (
    calibration,
    checkpoint,
    cli,
    config,
    data_flags,
    devices,
    flags,
    loaders,
    metrics,
    thresholds,
    tuning,
)
from udtimm.class_counts import CLASS_GROUPS, ClassCounts, checkpoint_counts
from udtimm.config import ConfigError
from udtimm.data import DATASETS
from udtimm.data.base import MultiLabelDataset
from udtimm.data.feed import DeviceFeeder
from udtimm.data.loader import make_loader
from udtimm.engine import evaluate_streaming, predict
from udtimm.flags import HelpFormatter
from udtimm.io import append_csv_row, atomic_write_text
from udtimm.metric_statistics import MetricStatistics, binned_evaluation, exact_size
from udtimm.plots import reliability_diagram
from udtimm.predictions import (
    MANY_CLASSES,
    SUMMARY_ROWS,
    Predictions,
    class_table,
    metrics_table,
    select,
    summary_rows,
    write_scores_csv,
)
from udtimm.predictor import Predictor
from udtimm.provenance import data_variant_mismatch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="a .safetensors file written by udtimm")
    data = parser.add_argument_group("data")
    data_flags.add_dataset_args(data, None, "default: the checkpoint's dataset")
    data.add_argument("-b", "--batch-size", type=int, default=64, help="images per process and step")
    data_flags.add_workers_arg(data)
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--subset", default="all", choices=("all", "difficult"),
                            help="difficult: only images with a difficult class (Table 2), with per-class AP")
    evaluation.add_argument("--threshold", type=float, default=0.5,
                            help="a class is predicted from this probability (the metrics' CP..OF1)")
    evaluation.add_argument("--topk", type=int, default=metrics.TOPK, metavar="K",
                            help="the top-k metrics take each image's K most probable classes: columns cp_topK .. "
                                 "of1_topK (train.py and distill.py: the paper's 3)")
    evaluation.add_argument("--eval-difficult-negative", action="store_true",
                            help="CP..OF1 count difficult pairs as negatives (ML-GCN's code), not left out")
    data_flags.add_evaluation_args(evaluation)
    evaluation.add_argument("--results-file", default=None, metavar="CSV", help="append one row of metrics")
    evaluation.add_argument("--save-preds", default=None, metavar="CSV", help="write every image's probabilities")
    evaluation.add_argument("--plots", default=None, metavar="DIR", help="write DIR/reliability.png")
    evaluation.add_argument("--per-class", nargs="?", const="", default=None, metavar="CSV",
                            help="print each class's AP, precision, recall, F1, ECE, positives and difficult labels "
                                 f"(above {MANY_CLASSES} classes a summary: --per-class-rows), and write every "
                                 "class's to CSV (default: <checkpoint stem>-per-class-<split>.csv beside the "
                                 "checkpoint)")
    evaluation.add_argument("--per-class-rows", type=summary_rows, default=SUMMARY_ROWS, metavar="N|all",
                            help="the per-class tables printed (--per-class, --subset difficult, --tune-thresholds, "
                                 f"--calibrate) of more than {MANY_CLASSES} classes show the N worst and N best "
                                 "classes, quantiles and bands of positives; all: every row")
    tuning = parser.add_argument_group("post-hoc calibration and per-class thresholds")
    tuning.add_argument("--calibrate", default=None, choices=calibration.METHODS,
                        help="fit one temperature for all classes, one per class, or per class a temperature and "
                             "a bias (platt: Platt scaling) on --tune-split (the BCE of sigmoid(logit / T + b) "
                             "minimised; b = 0 but for platt), store them in <checkpoint stem>.thresholds.json and "
                             "print ECE, pooled ECE and Brier of --split before and after; with --tune-thresholds "
                             "the thresholds are chosen on the calibrated scores")
    tuning.add_argument("--tune-thresholds", default=None, metavar="OBJECTIVE",
                        help=f"choose one threshold per class on --tune-split ({thresholds.OBJECTIVES}), store them "
                             "in <checkpoint stem>.thresholds.json beside the checkpoint (read by predict.py, "
                             "Predictor and udtimm.export) and compare the metrics of --split with them and with "
                             "--threshold")
    tuning.add_argument("--tune-split", default=None,
                        help="held-out split to fit the calibration and choose the thresholds on, never the test "
                             "split, --split nor an image the checkpoint trained on; holdout: the part of the "
                             "training split its run held out (default: the split that chose the checkpoint, as its "
                             "provenance record says, else val)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="autocast dtype")
    runtime.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster on tensor cores)")
    runtime.add_argument("--torchcompile", action="store_true", help="torch.compile the model (through accelerate)")
    runtime.add_argument("--gpu-decode", action="store_true",
                         help="the workers only read the files; the GPU decodes (nvJPEG) and resizes them")
    data_flags.add_prefetch_arg(runtime)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_debug_arg(runtime)
    args = parser.parse_args(argv)
    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    if not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must lie in [0, 1], got {args.threshold}")
    data_flags.check_evaluation(args)
    if args.tune_split is not None and not (args.calibrate or args.tune_thresholds):
        flags.warn(f"--tune-split {args.tune_split} does nothing without --calibrate or --tune-thresholds")
    args.objective = thresholds.parse_objective(args.tune_thresholds) if args.tune_thresholds else None
    return args


def dataset_name(args: argparse.Namespace, metadata: dict[str, str]) -> str:
    """--dataset, else the checkpoint's."""
    name = args.dataset or metadata.get("dataset")
    if not name:
        raise ConfigError(f"{args.checkpoint} does not name its dataset: give --dataset")
    return name


def load_dataset(args: argparse.Namespace, metadata: dict[str, str], accelerator: Accelerator,
                 split: str) -> MultiLabelDataset:
    """A split of the checkpoint's dataset (or --dataset), refused when its classes differ."""
    with accelerator.main_process_first():  # the main process generates digits before the others read it
        dataset = data_flags.data_source(args, dataset_name(args, metadata)).load(split)
    checkpoint.check_classes(args.checkpoint, checkpoint.class_names(metadata), dataset.classes, dataset.name)
    return dataset


def evaluate(args: argparse.Namespace, dataset: MultiLabelDataset, predictions: Predictions,
             predictor: Predictor, accelerator: Accelerator, calibrated_by: str = "") -> dict[str, float]:
    """Metrics of the split (or its difficult subset), printed and written by the main process, on the calibrated
    scores when the predictor has a calibration (`calibrated_by` names it; ECE, pooled ECE and Brier before are
    the `_uncalibrated` entries); with per-class thresholds, CP..OF1 with them too (the `_tuned` entries)."""
    metadata = predictor.metadata
    if args.subset == "difficult":
        predictions = select(predictions, metrics.difficult_subset(predictions.difficult))
        if len(predictions.indices) == 0:
            raise ConfigError(f"--subset difficult: no image of {dataset.name} has a difficult label")
    raw, uncalibrated = predictions, {}
    if predictor.calibration is not None:
        predictions = calibration.calibrate_predictions(raw, predictor.calibration)
        before_after, uncalibrated = calibration.compare(raw, predictions)
    trained = checkpoint_counts(metadata, args.class_groups)
    values = metrics.compute_metrics(predictions.scores, predictions.target, predictions.difficult, args.threshold,
                                     args.topk, difficult_as_negative=args.eval_difficult_negative,
                                     min_positives=args.min_positives, class_groups=trained and trained[1])
    tuned = {}
    if predictor.thresholds is not None:
        comparison, tuned = thresholds.compare(predictions, args.threshold, predictor.thresholds,
                                               args.eval_difficult_negative)
    if not accelerator.is_main_process:
        return {**values, **tuned, **uncalibrated}
    print(heading(args, dataset, metadata, len(predictions.indices), accelerator))
    if args.subset == "difficult" or args.per_class is not None:
        write_per_class(args, predictions, dataset, predictor, trained)
    print(metrics_table(values))
    if uncalibrated:
        print(f"calibration ({calibrated_by}), on {dataset.name}; the metrics above are calibrated:\n{before_after}")
    if tuned:
        print(f"per-class thresholds ({tuning.tuning_path(args.checkpoint)}) against --threshold "
              f"{args.threshold:g}, on {dataset.name}:\n{comparison}")
    if args.results_file:
        append_results(args, metadata, {**values, **({"calibration": calibrated_by, **uncalibrated}
                                                     if uncalibrated else {})})
    if args.save_preds:
        image_ids = [dataset.samples[index].image_id for index in predictions.indices.tolist()]
        write_scores_csv(args.save_preds, image_ids, dataset.classes, predictions.scores, predictions.target)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        reliability_diagram(raw.scores, raw.target, raw.difficult, os.path.join(args.plots, "reliability.png"),
                            title=metadata["model"], calibrated=predictions.scores if uncalibrated else None)
    return {**values, **tuned, **uncalibrated}


def heading(args: argparse.Namespace, dataset: MultiLabelDataset, metadata: dict[str, str], images: int,
            accelerator: Accelerator) -> str:
    """The line printed above the metrics: what was evaluated, on how many images and processes."""
    return (f"{args.checkpoint} ({metadata['model']}) on {dataset.name}, subset {args.subset}: {images} images, "
            f"{accelerator.num_processes} process(es)")


def append_results(args: argparse.Namespace, metadata: dict[str, str], values: dict[str, object]) -> None:
    """--results-file: one row, the columns that say what was evaluated, then `values`."""
    append_csv_row(args.results_file, {
        "dataset": dataset_name(args, metadata), "split": args.split, "subset": args.subset,
        "model": metadata["model"],
        "method": metadata.get("method", ""), "teacher": metadata.get("teacher", ""),
        "checkpoint": args.checkpoint, "eval_difficult": "negative" if args.eval_difficult_negative else "ignore",
        **values,
    })


# validate.py's outputs that need every image's scores, which --eval-memory binned does not keep.
NEEDS_SCORES = (("save_preds", "--save-preds"), ("plots", "--plots"), ("per_class", "--per-class"),
                ("calibrate", "--calibrate"), ("tune_thresholds", "--tune-thresholds"))


def check_binned(args: argparse.Namespace, dataset: MultiLabelDataset, stored: dict | None) -> None:
    """Before any work, when the split is evaluated from binned statistics: refuse the flags that need every score,
    and a stored calibration or per-class thresholds, which apply to every score (its metrics would not be the ones
    the exact path gives)."""
    size = f"{dataset.name}: {exact_size(len(dataset), len(dataset.classes))}"
    flags = [flag for name, flag in NEEDS_SCORES if getattr(args, name) is not None]
    if flags:
        named = " and ".join(flags)
        raise ConfigError(f"{named} need{'s' if len(flags) == 1 else ''} every image's scores, which --eval-memory "
                          f"{args.eval_memory} does not keep here ({size}): give --eval-memory exact where that "
                          f"fits, or drop {named}")
    if stored:
        raise ConfigError(f"{tuning.tuning_path(args.checkpoint)} holds a calibration or per-class "
                          f"thresholds, which --eval-memory {args.eval_memory} cannot apply ({size}, no score kept): "
                          "give --eval-memory exact where that fits, or move that file away")


def evaluate_binned(args: argparse.Namespace, dataset: MultiLabelDataset, model: nn.Module, predictor: Predictor,
                    accelerator: Accelerator) -> dict[str, float]:
    """Metrics of the split (or its difficult subset) from binned statistics (--eval-memory binned: AP from score
    bins, the rest exact), printed and written by the main process."""
    trained = checkpoint_counts(predictor.metadata, args.class_groups)
    statistics = MetricStatistics(len(dataset.classes), args.threshold, args.topk,
                                  difficult_as_negative=args.eval_difficult_negative,
                                  min_positives=args.min_positives, ap_bins=args.eval_bins, device=accelerator.device,
                                  class_groups=trained and trained[1])
    statistics = evaluate_streaming(model, eval_batches(args, dataset, predictor, accelerator), accelerator,
                                    statistics, not args.no_progress, difficult_subset_only=args.subset == "difficult")
    values = statistics.compute()
    if values["num_images"] == 0:
        raise ConfigError(f"--subset difficult: no image of {dataset.name} has a difficult label")
    if accelerator.is_main_process:
        print(f"{heading(args, dataset, predictor.metadata, int(values['num_images']), accelerator)}; from binned "
              f"statistics (--eval-memory {args.eval_memory}, {args.eval_bins} AP bins per class)")
        print(metrics_table(values))
        if args.results_file:
            append_results(args, predictor.metadata, values)
    return values


def write_per_class(args: argparse.Namespace, predictions: Predictions, dataset: MultiLabelDataset,
                    predictor: Predictor, trained: tuple[ClassCounts, Tensor] | None) -> None:
    """The per-class table, printed; with --per-class also written to its CSV. With the checkpoint's class counts
    (`trained`), each class's training positives and group."""
    table = thresholds.per_class_table(predictions, dataset.classes, args.threshold, predictor.thresholds,
                                       args.eval_difficult_negative)
    if trained is not None:
        counts, groups = trained
        table["train_positives"] = counts.positives
        table["group"] = [CLASS_GROUPS[group] for group in groups.tolist()]
    print(class_table(table, "ap", args.per_class_rows))
    if args.per_class is not None:
        subset = "-difficult" if args.subset == "difficult" else ""
        path = args.per_class or f"{os.path.splitext(args.checkpoint)[0]}-per-class-{args.split}{subset}.csv"
        atomic_write_text(path, table.to_csv(index=False))
        print(f"per-class table: {path}")


def tune(args: argparse.Namespace, tune_set: MultiLabelDataset, predictions: Predictions, stored: dict | None,
         accelerator: Accelerator) -> dict:
    """--calibrate, then --tune-thresholds on the calibrated scores, on the held-out split; returns the record
    stored beside the checkpoint: what this run tuned, and the stored calibration when it did not calibrate."""
    thresholds_entries = stored and tuning.stored_thresholds_entries(stored)
    calibration_entry = stored and stored.get("calibration")
    names, count, main_process = tune_set.classes, len(predictions.indices), accelerator.is_main_process
    if args.calibrate:
        fitted = calibration.fit_calibration(predictions.logits, predictions.target, predictions.difficult,
                                             args.calibrate, tune_set.name)
        calibration_entry = tuning.calibration_entry(names, fitted, args.calibrate, tune_set.name, count)
        if main_process:
            print(f"{calibration.fitted_name(args.calibrate)} fitted on {tune_set.name} ({count} images):\n"
                  f"{calibration.summary_table(predictions, names, fitted, args.calibrate, args.per_class_rows)}")
            if thresholds_entries and not args.objective:
                print("the per-class thresholds stored before were chosen on other scores and are dropped: give "
                      "--tune-thresholds with --calibrate to choose them on the calibrated scores")
        thresholds_entries = None
    if calibration_entry:
        predictions = calibration.calibrate_predictions(
            predictions, tuning.stored_calibration(calibration_entry, names, tuning.tuning_path(args.checkpoint)))
    if args.objective:
        result = thresholds.tune_thresholds(predictions.scores, predictions.target, predictions.difficult,
                                            args.objective, default=args.threshold)
        thresholds_entries = tuning.thresholds_entries(names, result, args.objective, tune_set.name, count)
        if main_process:
            scores = "calibrated scores" if calibration_entry else "scores"
            print(f"thresholds for {args.objective} on {tune_set.name} ({count} images, {scores}):\n"
                  f"{thresholds.summary_table(predictions, names, result, args.objective, args.per_class_rows)}")
    record = tuning.tuning_record(args.checkpoint, thresholds_entries, calibration_entry)
    if main_process:
        print(f"stored: {tuning.save_tuning(args.checkpoint, record)}")
    return record


def eval_batches(args: argparse.Namespace, dataset: MultiLabelDataset, predictor: Predictor,
                 accelerator: Accelerator) -> DeviceFeeder:
    """The batches of `dataset`, this process's share, ready for the model."""
    transform = loaders.eval_pipeline(dataset, predictor.img_size, predictor.mean, predictor.std, accelerator.device,
                                      args.gpu_decode)
    loader = accelerator.prepare(make_loader(dataset, args.batch_size, False, args.workers))
    return DeviceFeeder(loader, transform, accelerator.device, args.prefetch)


def run_predictions(args: argparse.Namespace, model: nn.Module, dataset: MultiLabelDataset, predictor: Predictor,
                    accelerator: Accelerator) -> Predictions:
    """The model's probabilities for every image of `dataset`, in dataset order, over all processes."""
    return predict(model, eval_batches(args, dataset, predictor, accelerator), accelerator, not args.no_progress)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics dict (metrics.metric_names(--topk)), plus cp_tuned..of1_tuned when per-class thresholds were
    used."""
    args = parse_args(argv)
    accelerator = devices.make_accelerator(args.mixed_precision, args.torchcompile)
    retune = args.objective is not None or args.calibrate is not None
    predictor = Predictor.from_checkpoint(args.checkpoint, stored_tuning=False)
    # A file about to be rewritten may belong to an earlier checkpoint of that name: it is then not read.
    record = tuning.read_tuning(args.checkpoint, other_checkpoint_ok=retune)
    mismatch = data_variant_mismatch(args.checkpoint, predictor.metadata,
                                     data_flags.data_source(args, dataset_name(args, predictor.metadata)))
    if mismatch:
        accelerator.print(f"warning: {mismatch}")
    if args.class_groups and "class_counts" not in predictor.metadata:
        accelerator.print(f"warning: --class-groups does nothing: {args.checkpoint} records no training class "
                          "counts (saved before runs kept them), so map_head, map_medium and map_tail stay empty")
    dataset = load_dataset(args, predictor.metadata, accelerator, args.split)
    binned = binned_evaluation(args.eval_memory, len(dataset), len(dataset.classes))
    if binned:
        check_binned(args, dataset, record)
    tune_set = None
    if retune:
        trained = json.loads(predictor.metadata["provenance"]) if "provenance" in predictor.metadata else None
        tune_split = args.tune_split or (trained or {}).get("val_split", "val")
        with accelerator.main_process_first():
            tune_set = loaders.tuning_dataset(data_flags.data_source(args, dataset_name(args, predictor.metadata)),
                                              tune_split, trained)
        checkpoint.check_classes(args.checkpoint, predictor.class_names, tune_set.classes, tune_set.name)
        name = dataset_name(args, predictor.metadata)
        test_split = f"{name}:{DATASETS[name].own_split(args.data_dir or '', 'test')}"
        tuning.check_held_out(tune_set, dataset, test_split)
    # The model gets no distributed wrapper (evaluation_mode): only mixed precision and --torchcompile.
    model = accelerator.prepare_model(devices.place_model(predictor.model, accelerator.device, args.channels_last),
                                      evaluation_mode=True)
    if tune_set is not None:
        record = tune(args, tune_set, run_predictions(args, model, tune_set, predictor, accelerator), record,
                      accelerator)
    path = tuning.tuning_path(args.checkpoint)
    predictor.thresholds, predictor.calibration = tuning.tuning_tensors(record, predictor.class_names, path)
    entry = (record or {}).get("calibration")
    calibrated_by = f"{calibration.fitted_name(entry['method'])} fitted on {entry['split']}" if entry else ""
    if binned:
        result = evaluate_binned(args, dataset, model, predictor, accelerator)
    else:
        result = evaluate(args, dataset, run_predictions(args, model, dataset, predictor, accelerator), predictor,
                          accelerator, calibrated_by)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    cli.run_script(main, lambda: parse_args().debug)
