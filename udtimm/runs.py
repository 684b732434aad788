"""A training run's frame: its directory (new or resumed), what train.py and distill.py set up alike, and its
results at the end."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from udtimm import loaders
from udtimm.checkpoint import find_training_state, model_metadata
from udtimm.class_counts import (
    CLASS_GROUPS,
    ClassCounts,
    check_same_counts,
    class_groups,
    counts_table,
    group_thresholds,
)
from udtimm.config import ConfigError, experiment_name, save_args
from udtimm.data.base import MultiLabelDataset
from udtimm.devices import place_model
from udtimm.ema import make_ema
from udtimm.engine import bare_model
from udtimm.io import atomic_write_text, check_writable, read_text
from udtimm.metric_statistics import binned_evaluation
from udtimm.metrics import METRIC_COLUMNS
from udtimm.model import CalibratedModel
from udtimm.objectives import Objective
from udtimm.optimization import build_optimization
from udtimm.provenance import provenance_record, source_state
from udtimm.settings import DataSettings, MixingSettings, RuntimeSettings, TrainingSettings
from udtimm.trackers import start_trackers
from udtimm.trainer import RunSetup, fit


def run_dir_path(runtime: RuntimeSettings, model: str, method: str) -> str:
    """Where the run goes: the resumed run's directory, or --output/--experiment (default: date-time-model-method).
    Named once, at the start, so the trackers and the run directory agree."""
    return runtime.resume or os.path.join(runtime.output, runtime.experiment or experiment_name(model, method))


@contextmanager
def run_directory(run_dir: str, resume: str | None, saved_args: dict, accelerator: Accelerator) -> Iterator[None]:
    """The run directory (new, or the one being resumed), checked writable, with args.yaml written: a resumed
    run's flags (--epochs to train longer, a new --lr, ...) become the run's, so a later --resume keeps them.

    A directory made here that an error leaves without any saved epoch (the run was refused before its first
    epoch ended) is removed again, so a refused run leaves nothing behind; a resumed run refused before it trains
    (ConfigError) gets its args.yaml back as it was.
    """
    if resume:
        if not os.path.isfile(os.path.join(run_dir, "args.yaml")):
            raise ConfigError(f"--resume {run_dir}: no args.yaml there, it is not a udtimm run directory")
    elif os.path.exists(os.path.join(run_dir, "summary.csv")):
        raise ConfigError(f"{run_dir} already holds a run: use --resume {run_dir} or another --experiment")
    made_here = not os.path.exists(run_dir)
    args_path = os.path.join(run_dir, "args.yaml")
    previous_args = read_text(args_path) if resume else None
    if accelerator.is_main_process:
        check_writable(run_dir)
        save_args(saved_args, args_path)
    accelerator.wait_for_everyone()
    try:
        yield
    except Exception as err:
        if made_here and accelerator.is_main_process and find_training_state(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if previous_args is not None and isinstance(err, ConfigError) and accelerator.is_main_process:
            atomic_write_text(args_path, previous_args)
        raise


def data_suffix(data: DataSettings, mixing: MixingSettings) -> str:
    """What the label and mixing settings add to the method column of results.csv (+unknown-negative, +drop50,
    +mixup, +cutmix), so that the report never pools runs trained on other labels or batches."""
    parts = [f"unknown-{data.unknown}" if data.unknown != "ignore" else "",
             f"drop{round(100 * data.drop_labels)}" if data.drop_labels > 0 else "",
             "mixup" if mixing.mixup > 0 else "", "cutmix" if mixing.cutmix > 0 else ""]
    return "".join(f"+{part}" for part in parts if part)


def result_fields(settings: TrainingSettings, method: str, teacher: str) -> dict[str, object]:
    """The columns of results.csv that say which experiment a row is (the report groups by them): `split` reports,
    `selection_split` chose best.safetensors (the test split itself with --select-on-test); `commit` and `dirty`
    say which code ran (read when the run starts or resumes)."""
    data = settings.data
    return {"dataset": data.source.name, "split": data.test_split, "selection_split": data.val_split,
            "model": settings.model.model, "method": method,
            "teacher": teacher, "seed": settings.runtime.seed, "epochs": settings.optim.epochs,
            "img_size": data.img_size, "difficult": data.difficult,
            "eval_difficult": "negative" if data.eval_difficult_negative else "ignore", **source_state()}


def train_model(settings: TrainingSettings, run_dir: str, method: str, teacher: str, model: CalibratedModel,
                datasets: tuple[MultiLabelDataset, MultiLabelDataset, MultiLabelDataset], accelerator: Accelerator,
                make_objective: Callable[[tuple[list[float], list[float]]], Objective],
                cycles: int = 1, counts: ClassCounts | None = None) -> dict[str, object]:
    """What train.py and distill.py share once the model and the data are checked: the run directory, the loaders
    and the optimisation on the device, the checkpoint's metadata, then every epoch (fit_and_report). `teacher`
    names the teacher ("" for none); `make_objective` gets the model's normalisation (mean, std); `cycles` of the
    cosine schedule (2 for self-distillation); `counts`, the training split's class counts when the script has
    counted them already (train.py's loss weighs by them)."""
    data, runtime, model_settings = settings.data, settings.runtime, settings.model
    train_set, eval_set, test_set = datasets
    with run_directory(run_dir, runtime.resume, settings.saved_args, accelerator):
        mean, std = normalisation = loaders.normalisation(model.backbone)
        train_loader, eval_loader, train_transform, eval_transform = loaders.build_loaders(
            data, train_set, eval_set, mean, std, accelerator.device)
        test_loader, test_transform = loaders.build_eval_loader(data, test_set, mean, std, accelerator.device)
        binned = {split: binned_evaluation(data.eval_memory, len(dataset), len(dataset.classes))
                  for split, dataset in (("eval", eval_set), ("test", test_set))}
        optimizer, scheduler = build_optimization(settings.optim, model, len(train_loader), cycles=cycles)
        model, optimizer, train_loader, eval_loader, test_loader = accelerator.prepare(
            place_model(model, accelerator.device, runtime.channels_last), optimizer, train_loader, eval_loader,
            test_loader)
        accelerator.print(f"{run_dir}: {model_settings.model} ({method}){f' from {teacher}' if teacher else ''} on "
                          f"{data.source.name}, {loaders.describe_splits(data, train_set, eval_set, test_set)}, "
                          f"{len(train_set.classes)} classes, {accelerator.num_processes} process(es) on "
                          f"{accelerator.device}"
                          + "".join(f"; {split}: metrics from binned statistics (--eval-memory)"
                                    for split, on in ((data.val_split, binned["eval"]),
                                                      (data.test_split, binned["test"])) if on))
        counts, thresholds, groups = training_counts(data, train_set, run_dir, accelerator, counts)
        metadata = model_metadata(model_settings.model, bare_model(accelerator, model), train_set.classes,
                                  model_settings.global_pool, data.img_size, mean, std, dataset=data.source.name,
                                  method=method, teacher=teacher, model_kwargs=model_settings.model_kwargs,
                                  provenance=provenance_record(data), class_counts=counts.to_json(),
                                  class_groups=json.dumps(thresholds), head_lr_mult=str(settings.optim.head_lr_mult))
        setup = RunSetup(
            run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
            eval_loader=eval_loader, objective=make_objective(normalisation), metadata=metadata,
            num_classes=len(train_set.classes),
            eval_binned=binned["eval"], test_binned=binned["test"],
            train_transform=train_transform, eval_transform=eval_transform, prefetch=data.prefetch,
            test_loader=test_loader, test_transform=test_transform,
            result_fields=result_fields(settings, method, teacher),
            ema=make_ema(settings.optim, bare_model(accelerator, model)), class_groups=groups,
        )
        return fit_and_report(settings, setup, accelerator)


def training_counts(data: DataSettings, train_set: MultiLabelDataset, run_dir: str, accelerator: Accelerator,
                    counts: ClassCounts | None = None) -> tuple[ClassCounts, tuple[float, float], torch.Tensor]:
    """The training split's class counts (`counts`, or counted here), the group thresholds and each class's group
    (udtimm.class_counts), written to class_counts.csv when the run starts and checked against it when it resumes."""
    counts = counts or ClassCounts.of(train_set, data.difficult)
    thresholds = group_thresholds(counts, data.class_groups)
    groups = class_groups(counts, thresholds)
    path = os.path.join(run_dir, "class_counts.csv")
    if os.path.isfile(path):
        check_same_counts(path, train_set.classes, counts)
    elif accelerator.is_main_process:
        atomic_write_text(path, counts_table(train_set.classes, counts, groups))
    sizes = torch.bincount(groups, minlength=len(CLASS_GROUPS)).tolist()
    accelerator.print(f"classes by training positives (class_counts.csv): {sizes[0]} head (> {thresholds[0]:.1f}), "
                      f"{sizes[1]} medium, {sizes[2]} tail (< {thresholds[1]:.1f})")
    return counts, thresholds, groups


def fit_and_report(settings: TrainingSettings, setup: RunSetup, accelerator: Accelerator) -> dict[str, object]:
    """Train the remaining epochs, print the metrics of best.safetensors, return its results.csv row."""
    start_trackers(accelerator, settings.saved_args, setup.run_dir)
    row = fit(settings, setup, accelerator)
    print_results(accelerator, row)
    accelerator.end_training()
    return row


def print_results(accelerator: Accelerator, row: dict[str, object]) -> None:
    accelerator.print(f"final metrics on {row.get('split')} (percent) of best.safetensors, chosen on "
                      f"{row.get('selection_split')}, and of the last epoch:")
    for name in (column.name for column in METRIC_COLUMNS if column.percent):
        value, last = row.get(name), row.get(f"last_{name}")
        if isinstance(value, float) and isinstance(last, float):
            accelerator.print(f"  {name:<14} {value:8.2f} {last:8.2f}")
    accelerator.print(f"  epoch          {row.get('best_epoch'):>8} {row.get('last_epoch'):>8}  "
                      f"(best: {row.get('best_weights')} weights)\n"
                      f"  checkpoint     {row.get('checkpoint')}")
