"""The epoch loop shared by train.py and distill.py: train, evaluate, write the run directory, resume."""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from udtimm import checkpoint, metrics
from udtimm.data.feed import BatchTransform, DeviceFeeder
from udtimm.data.loader import seed_loader
from udtimm.ema import EMA, EMA_COLUMNS, RAW
from udtimm.engine import (
    bare_model,
    broadcast_buffers,
    evaluate_streaming,
    optimizer_steps,
    predict,
    train_one_epoch,
)
from udtimm.errors import ConfigError
from udtimm.io import append_csv_row, atomic_write_text, csv_line
from udtimm.metric_statistics import MetricStatistics
from udtimm.mixing import Mixer
from udtimm.objectives import Objective
from udtimm.plots import binned_reliability_diagram, reliability_diagram
from udtimm.predictions import Predictions
from udtimm.settings import DataSettings, TrainingSettings
from udtimm.trackers import log_epoch

BEST_METRIC = "map"


@dataclass
class RunSetup:
    """Everything the loop needs besides the settings; built by the script."""

    run_dir: str
    model: nn.Module  # prepared by accelerate
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    scheduler: object  # timm scheduler (step_update per optimizer step)
    train_loader: object  # prepared by accelerate
    eval_loader: object  # the selection split's: evaluated every epoch, chooses best.safetensors
    test_loader: object  # the test split's: evaluated once, at the end, for results.csv
    objective: Objective  # its term_names are the train_* columns of summary.csv
    num_classes: int  # the dataset's: the size of the binned statistics (--eval-memory)
    metadata: dict[str, str]  # checkpoint metadata (model_metadata + dataset, method, teacher)
    result_fields: dict[str, object]  # the columns of results.csv that name the experiment (runs.result_fields)
    # What finishes the loaders' batches on the device (loaders.build_loaders); None: they are model input already.
    train_transform: BatchTransform | None = None
    eval_transform: BatchTransform | None = None
    test_transform: BatchTransform | None = None
    prefetch: int | None = None  # --prefetch: batches prepared ahead (None: DeviceFeeder's default for the device)
    ema: ModelEmaV3 | None = None  # --model-ema
    # --eval-memory: whether the selection and the test split are evaluated from binned statistics
    # (metric_statistics.binned_evaluation), not from every score.
    eval_binned: bool = False
    test_binned: bool = False
    class_groups: torch.Tensor | None = None  # [C] head/medium/tail by training positives (udtimm.class_counts)

    def train_batches(self, device: torch.device) -> DeviceFeeder:
        return DeviceFeeder(self.train_loader, self.train_transform, device, self.prefetch)

    def eval_batches(self, device: torch.device) -> DeviceFeeder:
        return DeviceFeeder(self.eval_loader, self.eval_transform, device, self.prefetch)

    def test_batches(self, device: torch.device) -> DeviceFeeder:
        return DeviceFeeder(self.test_loader, self.test_transform, device, self.prefetch)


# A split evaluated: every image's predictions (exact), or the statistics of them (binned).
Evaluated = Predictions | MetricStatistics


def evaluate(model: nn.Module, setup: RunSetup, accelerator: Accelerator, data: DataSettings, show_progress: bool,
             test: bool = False) -> Evaluated:
    """The selection split (or with `test`, the test split) evaluated as --eval-memory chose for it."""
    device = accelerator.device
    batches = setup.test_batches(device) if test else setup.eval_batches(device)
    if not (setup.test_binned if test else setup.eval_binned):
        return predict(model, batches, accelerator, show_progress)
    statistics = MetricStatistics(setup.num_classes, difficult_as_negative=data.eval_difficult_negative,
                                  min_positives=data.min_positives, ap_bins=data.eval_bins, device=device,
                                  class_groups=setup.class_groups)
    return evaluate_streaming(model, batches, accelerator, statistics, show_progress)


def evaluate_metrics(evaluated: Evaluated, data: DataSettings, class_groups: torch.Tensor | None) -> dict[str, float]:
    """compute_metrics' dict of a split, with the evaluation flags (--eval-difficult-negative, --min-positives) and
    the run's class groups."""
    if isinstance(evaluated, MetricStatistics):
        return evaluated.compute()
    return metrics.compute_metrics(evaluated.scores, evaluated.target, evaluated.difficult,
                                   difficult_as_negative=data.eval_difficult_negative, min_positives=data.min_positives,
                                   class_groups=class_groups)


def truncate_summary(path: str, last_epoch: int) -> None:
    """Keep the header and the rows of epochs <= last_epoch, so a resumed run lists each epoch once."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    # A row cut short (disk full mid-append) has fewer cells than the header and is dropped with the later epochs.
    kept = [rows[0]] + [row for row in rows[1:] if len(row) == len(rows[0]) and int(row[0]) <= last_epoch]
    atomic_write_text(path, "".join(csv_line(row) for row in kept))


def check_summary_columns(path: str, term_names: tuple[str, ...]) -> None:
    """Before a resumed run trains: its objective writes the loss-term columns that summary.csv already has (a
    resume that adds or drops a term would otherwise fail after a whole epoch, at the first row)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    written = [name for name in header if name.startswith("train_") and name != "train_loss"]
    expected = [f"train_{name}" for name in term_names]
    if written and written != expected:
        raise ConfigError(f"{path} has the loss terms {written}, this run's objective writes {expected}: the "
                          "resume changed which terms exist (a distillation or calibration weight to or from 0?); "
                          "resume with the run's own flags, or start a new run")


def restore(setup: RunSetup, accelerator: Accelerator) -> tuple[int, int, float]:
    """Load the newest complete state of the run: (next epoch, optimizer updates so far, best metric).

    summary.csv keeps the rows of the epochs that state saw complete: a run killed between writing an epoch's row
    and its state redoes that epoch, and lists it once.
    """
    summary_path = os.path.join(setup.run_dir, "summary.csv")
    if accelerator.is_main_process:
        checkpoint.recover_training_state(setup.run_dir)
    accelerator.wait_for_everyone()
    state_dir = checkpoint.find_training_state(setup.run_dir)
    if state_dir is None:
        if accelerator.is_main_process:
            truncate_summary(summary_path, -1)
        return 0, 0, -math.inf
    check_summary_columns(summary_path, setup.objective.term_names)
    tensors, optimizer_state, progress = checkpoint.load_training_state(state_dir)
    checkpoint.load_weights(bare_model(accelerator, setup.model), tensors, state_dir)
    if setup.ema is not None:
        checkpoint.load_ema_state(state_dir, setup.ema.module)
    setup.optimizer.load_state_dict(optimizer_state["optimizer"])
    if accelerator.scaler is not None and optimizer_state.get("scaler"):
        accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    epoch, num_updates = int(progress["epoch"]), int(progress["num_updates"])
    # The schedule is the one the flags describe now (--epochs to train longer, a new --lr, --min-lr, --warmup-*):
    # only its position comes from the state. The optimizer's rates are set from it as the saved epoch's last
    # step_update and step left them, replacing the saved rates of the old schedule.
    setup.scheduler.step_update(num_updates=num_updates)
    setup.scheduler.step(epoch + 1)
    if accelerator.is_main_process:
        truncate_summary(summary_path, epoch)
    accelerator.print(f"resumed {setup.run_dir} after epoch {epoch} (state: {state_dir})")
    return epoch + 1, num_updates, float(progress["best"])


def print_row(accelerator: Accelerator, row: dict[str, object], header: bool) -> None:
    columns = ["epoch", "lr", "train_loss"]
    for column in metrics.METRIC_COLUMNS:
        if column.epoch_table:
            columns.append(column.name)
            if column.name == "map" and "map_ema" in row:  # --model-ema: the EMA weights' mAP beside the raw one
                columns.append("map_ema")
    columns.append("epoch_time")
    if header:
        accelerator.print(" ".join(f"{name:>13}" for name in columns))
    cells = []
    for name in columns:
        value = row.get(name, "")
        cells.append(f"{value:>13.4g}" if isinstance(value, float) else f"{value!s:>13}")
    accelerator.print(" ".join(cells))


def seed_epoch(seed: int, train_loader: DataLoader) -> None:
    """Shuffling, augmentation and dropout of an epoch depend on (seed, epoch) only, so resume is exact."""
    set_seed(seed)
    seed_loader(train_loader, seed)


def fit(settings: TrainingSettings, setup: RunSetup, accelerator: Accelerator) -> dict[str, object]:
    """Run the remaining epochs, choosing best.safetensors on the selection split; returns the results.csv row
    (test metrics of best.safetensors and of the last epoch)."""
    start_epoch, num_updates, best = restore(setup, accelerator)
    model, run_dir, objective = setup.model, setup.run_dir, setup.objective
    epochs, runtime, data = settings.optim.epochs, settings.runtime, settings.data
    show_progress = not runtime.no_progress
    summary_path = os.path.join(run_dir, "summary.csv")
    mixer = Mixer(settings.mixing, runtime.seed)
    for epoch in range(start_epoch, epochs):
        seed_epoch(runtime.seed + epoch, setup.train_loader)
        objective.start_epoch(epoch)
        epoch_start = time.perf_counter()
        lr = setup.optimizer.param_groups[0]["lr"]  # the rate the epoch starts with (cosine restarts show)
        stats = train_one_epoch(
            model, setup.train_batches(accelerator.device), setup.optimizer, setup.scheduler, accelerator,
            objective, epoch, num_updates, settings.optim, runtime, ema=setup.ema, mixer=mixer,
        )
        num_updates += optimizer_steps(len(setup.train_loader), accelerator.gradient_accumulation_steps)
        row: dict[str, object] = {"epoch": epoch, "lr": lr,
                                  "train_loss": stats.pop("loss", math.nan)}
        # Fixed columns, whatever terms this epoch's objective produced (self-distillation changes objective).
        row.update({f"train_{name}": stats.get(name, math.nan) for name in objective.term_names})
        row.update(skipped_steps=stats["skipped_steps"], skipped_images=stats["skipped_images"],
                   images_per_s=stats["images_per_s"])
        evaluated = (epoch + 1) % runtime.eval_interval == 0 or epoch + 1 == epochs
        if evaluated:  # the weights the checkpoints get: the main process's BatchNorm statistics on every process
            broadcast_buffers(bare_model(accelerator, model), accelerator)
        scores = evaluate_metrics(evaluate(model, setup, accelerator, data, show_progress), data, setup.class_groups) \
            if evaluated else dict.fromkeys(metrics.METRIC_NAMES, math.nan)
        row.update(scores)
        weights_scores = {RAW: scores}
        if setup.ema is not None:
            weights_scores[EMA] = evaluate_ema(setup, accelerator, data, show_progress) if evaluated else scores
            row.update({f"{name}_ema": weights_scores[EMA][name] for name in EMA_COLUMNS})
        row["epoch_time"] = time.perf_counter() - epoch_start
        # The better of the raw and the EMA weights (the raw ones on a tie) competes for best.safetensors.
        better = max(weights_scores, key=lambda name: weights_scores[name][BEST_METRIC])
        improved = evaluated and weights_scores[better][BEST_METRIC] > best
        best = weights_scores[better][BEST_METRIC] if improved else best
        if accelerator.is_main_process:
            append_csv_row(summary_path, row)
            log_epoch(accelerator, row)
            unwrapped = bare_model(accelerator, model)
            meta = {**setup.metadata, "epoch": str(epoch), "metric": BEST_METRIC,
                    "metric_value": str(scores[BEST_METRIC]), "weights": RAW}
            optimizer_state = {
                "optimizer": setup.optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            }
            progress = {"epoch": epoch, "num_updates": num_updates, "best": best}
            # The weights leave the device and reach the disk once; last and best are links to state's file.
            also_at = [os.path.join(run_dir, "last.safetensors")]
            best_at = [os.path.join(run_dir, "best.safetensors")] if improved else []
            ema = None if setup.ema is None else (setup.ema.module, {
                **meta, "metric_value": str(weights_scores[EMA][BEST_METRIC]), "weights": EMA})
            checkpoint.save_training_state(run_dir, unwrapped, meta, optimizer_state, progress,
                                           also_at + (best_at if better == RAW else []), ema=ema,
                                           ema_also_at=best_at if better == EMA else [])
        accelerator.wait_for_everyone()
        print_row(accelerator, row, header=epoch == start_epoch)
    return final_results(setup, accelerator, data, show_progress)


def evaluate_ema(setup: RunSetup, accelerator: Accelerator, data: DataSettings,
                 show_progress: bool) -> dict[str, float]:
    """The metrics of the EMA weights, the main process's on every process (those best.safetensors would hold)."""
    broadcast_buffers(setup.ema.module, accelerator)
    return evaluate_metrics(evaluate(setup.ema.module, setup, accelerator, data, show_progress), data,
                            setup.class_groups)


def final_results(setup: RunSetup, accelerator: Accelerator, data: DataSettings,
                  show_progress: bool) -> dict[str, object]:
    """Evaluate the last epoch's weights and best.safetensors on the test split, write results.csv and
    reliability.png (of best.safetensors), return the row."""
    last_epoch = int(checkpoint.read_metadata(os.path.join(setup.run_dir, "last.safetensors"))["epoch"])
    last = evaluate(setup.model, setup, accelerator, data, show_progress, test=True)
    best_path = os.path.join(setup.run_dir, "best.safetensors")
    tensors, metadata = checkpoint.load_checkpoint(best_path)
    best_is_last = metadata.get("weights", RAW) == RAW and int(metadata["epoch"]) == last_epoch
    if not best_is_last:  # the same weights need not be evaluated twice
        checkpoint.load_weights(bare_model(accelerator, setup.model), tensors, best_path)
    best = last if best_is_last else evaluate(setup.model, setup, accelerator, data, show_progress, test=True)
    last_scores = evaluate_metrics(last, data, setup.class_groups)
    best_scores = last_scores if best_is_last else evaluate_metrics(best, data, setup.class_groups)
    row = {**setup.result_fields, **best_scores,
           "best_epoch": int(metadata["epoch"]), "best_weights": metadata.get("weights", RAW),
           f"selection_{BEST_METRIC}": float(metadata["metric_value"]), "checkpoint": best_path,
           "last_epoch": last_epoch, **{f"last_{name}": value for name, value in last_scores.items()}}
    if accelerator.is_main_process:
        path = os.path.join(setup.run_dir, "reliability.png")
        if isinstance(best, MetricStatistics):
            binned_reliability_diagram(best.reliability_bins(), best_scores["ece_pooled"], best_scores["ece"], path,
                                       title=metadata["model"])
        else:
            reliability_diagram(best.scores, best.target, best.difficult, path, title=metadata["model"])
        # Written last, the row marks a finished run: one killed before it gets a single row when resumed.
        append_csv_row(os.path.join(setup.run_dir, "results.csv"), row)
    accelerator.wait_for_everyone()
    return row
