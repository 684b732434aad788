"""Setting up a run for train.py and distill.py: run directory, data, optimizer and scheduler, accelerator."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset

from udtimm.checkpoint import CheckpointError, find_training_state
from udtimm.config import ConfigError, experiment_name, save_args
from udtimm.data.base import DatasetError, MultiLabelDataset
from udtimm.data.feed import BatchTransform
from udtimm.data.gpu import DeviceTransform
from udtimm.data.loader import make_loader
from udtimm.data.transforms import NormalizeBatch, TrainPixels, eval_pixels
from udtimm.ema import create_ema
from udtimm.engine import NonFiniteLossError, bare_model, optimizer_steps
from udtimm.io import check_writable
from udtimm.metrics import METRIC_COLUMNS
from udtimm.model import CalibratedModel, ModelConfigError, create_model
from udtimm.settings import DataSettings, ModelSettings, OptimSettings, RuntimeSettings, TrainingSettings
from udtimm.trackers import start_trackers, tracker_names
from udtimm.trainer import RunSetup, fit
from udtimm.weights import WeightsError, load_initial_checkpoint

# Errors caused by the user's input: the scripts print their message alone, without a traceback.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ModelConfigError, WeightsError, NonFiniteLossError,
               OSError)


def make_accelerator(mixed_precision: str = "no", torchcompile: bool = False, **options: object) -> Accelerator:
    """The accelerator of --mixed-precision and --torchcompile; `options` go to Accelerator as they are."""
    # Fixed input shapes: cuDNN times its convolution algorithms once and keeps the fastest.
    torch.backends.cudnn.benchmark = True
    # non_blocking: moving a (pinned) batch to the GPU does not make the host wait for the step before it, so the
    # host prepares the next batch while the GPU computes (docs/throughput.md).
    return Accelerator(mixed_precision=mixed_precision, dynamo_backend="inductor" if torchcompile else "no",
                       dataloader_config=DataLoaderConfiguration(non_blocking=True), **options)


def make_training_accelerator(settings: TrainingSettings, run_dir: str) -> Accelerator:
    """make_accelerator with what training adds: --grad-accum-steps, and --log-with's trackers writing into
    `run_dir`. A tracker that is not installed is refused here, before any work."""
    runtime, steps = settings.runtime, settings.optim.grad_accum_steps
    if steps < 1:
        raise ConfigError(f"--grad-accum-steps must be at least 1, got {steps}")
    trackers = tracker_names(runtime.log_with)
    return make_accelerator(runtime.mixed_precision, runtime.torchcompile, gradient_accumulation_steps=steps,
                            log_with=trackers or None, project_dir=run_dir if trackers else None)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """On the device, in NHWC memory layout with --channels-last (faster convolutions on tensor cores)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def run_dir_path(runtime: RuntimeSettings, model: str, method: str) -> str:
    """Where the run goes: the resumed run's directory, or --output/--experiment (default: date-time-model-method).
    Named once, at the start, so the trackers and the run directory agree."""
    return runtime.resume or os.path.join(runtime.output, runtime.experiment or experiment_name(model, method))


@contextmanager
def run_directory(run_dir: str, resume: str | None, saved_args: dict, accelerator: Accelerator) -> Iterator[None]:
    """The run directory (new, or the one being resumed), checked writable, with args.yaml written: a resumed
    run's flags (--epochs to train longer, a new --lr, ...) become the run's, so a later --resume keeps them.

    A directory made here that an error leaves without any saved epoch (the run was refused before its first
    epoch ended) is removed again, so a refused run leaves nothing behind.
    """
    if resume:
        if not os.path.isfile(os.path.join(run_dir, "args.yaml")):
            raise ConfigError(f"--resume {run_dir}: no args.yaml there, it is not a udtimm run directory")
    elif os.path.exists(os.path.join(run_dir, "summary.csv")):
        raise ConfigError(f"{run_dir} already holds a run: use --resume {run_dir} or another --experiment")
    made_here = not os.path.exists(run_dir)
    if accelerator.is_main_process:
        check_writable(run_dir)
        save_args(saved_args, os.path.join(run_dir, "args.yaml"))
    accelerator.wait_for_everyone()
    try:
        yield
    except Exception:
        if made_here and accelerator.is_main_process and find_training_state(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def load_datasets(data: DataSettings, accelerator: Accelerator) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    # The main process generates the digits set (if needed) before the others read it.
    with accelerator.main_process_first():
        train_set = data.source.load(data.train_split)
        eval_set = data.source.load(data.val_split)
    if train_set.classes != eval_set.classes:
        raise ConfigError(f"splits {data.train_split} and {data.val_split} have different class lists")
    return train_set, eval_set


def build_model(settings: ModelSettings, img_size: int, class_names: list[str], cal: bool,
                accelerator: Accelerator) -> CalibratedModel:
    """The model the flags ask for: timm's, pretrained or not, then --initial-checkpoint (which says what it loaded)."""
    model = create_model(settings.model, len(class_names), cal=cal, global_pool=settings.global_pool,
                         pretrained=settings.pretrained, pretrained_path=settings.pretrained_path, img_size=img_size,
                         drop_rate=settings.drop, model_kwargs=settings.model_kwargs)
    if settings.initial_checkpoint:
        accelerator.print(load_initial_checkpoint(model, settings.initial_checkpoint, class_names))
    return sync_batchnorm(model, settings.sync_bn, accelerator)


def sync_batchnorm(model: nn.Module, sync_bn: bool, accelerator: Accelerator) -> nn.Module:
    """--sync-bn: with several processes, every BatchNorm layer normalises with the statistics of the global batch
    (SyncBatchNorm, which runs on GPUs only). One process already sees the whole batch: the model is unchanged."""
    if not sync_bn or accelerator.num_processes == 1:
        return model
    if accelerator.device.type not in ("cuda", "xpu"):
        raise ConfigError(f"--sync-bn synchronises BatchNorm statistics between GPUs (SyncBatchNorm), but this run "
                          f"has {accelerator.num_processes} processes on {accelerator.device}: drop --sync-bn")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def normalisation(backbone: nn.Module) -> tuple[list[float], list[float]]:
    config = timm.data.resolve_data_config({}, model=backbone)
    return list(config["mean"]), list(config["std"])


def check_gpu_decode(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"--gpu-decode decodes on a CUDA GPU (nvJPEG), but this run is on {device}: "
                          "drop --gpu-decode to decode with the loader workers")


def build_loaders(
    data: DataSettings, train_set: MultiLabelDataset, eval_set: MultiLabelDataset, mean: list[float],
    std: list[float], device: torch.device,
) -> tuple[DataLoader, DataLoader, BatchTransform, BatchTransform]:
    """Train and eval loaders, and the transforms that finish their batches on `device` (DeviceFeeder applies them).

    The workers decode and augment each image and hand over uint8 batches, normalised and erased on the device
    (NormalizeBatch). With --gpu-decode the workers only read the files; the device decodes and augments them too.
    """
    if data.gpu_decode:
        check_gpu_decode(device)
        train_set.encoded = True
        train_transform: BatchTransform = DeviceTransform(
            data.img_size, mean, std, device, train=True, reprob=data.reprob, hflip=data.hflip,
            crop_scales=data.crop_scales, skip_corrupt=data.skip_corrupt)
    else:
        train_set.transform = TrainPixels(data.img_size, reprob=data.reprob, hflip=data.hflip,
                                          crop_scales=data.crop_scales, mean=mean, aa=data.aa, cutout=data.cutout)
        train_transform = NormalizeBatch(mean, std, device)
    eval_transform = eval_pipeline(eval_set, data.img_size, mean, std, device, data.gpu_decode, data.skip_corrupt)
    train_loader = make_loader(train_set, data.batch_size, True, data.workers, data.skip_corrupt)
    eval_loader = make_loader(eval_set, data.batch_size, False, data.workers, data.skip_corrupt)
    return train_loader, eval_loader, train_transform, eval_transform


def eval_pipeline(dataset: Dataset, img_size: int, mean: list[float], std: list[float], device: torch.device,
                  gpu_decode: bool, skip_corrupt: bool = False) -> BatchTransform:
    """Set what the workers do with `dataset`'s images for evaluation; return what finishes its batches on `device`
    (train.py's and distill.py's eval split, validate.py's split or image folder)."""
    if gpu_decode:
        check_gpu_decode(device)
        dataset.encoded = True
        return DeviceTransform(img_size, mean, std, device, train=False, skip_corrupt=skip_corrupt)
    dataset.transform = eval_pixels(img_size)
    return NormalizeBatch(mean, std, device)


def build_optimization(optim: OptimSettings, model: nn.Module, batches_per_epoch: int, cycles: int = 1) -> tuple:
    """timm's optimizer and scheduler factories; the scheduler steps every update (cosine with warmup).

    `cycles` > 1 splits the epochs into that many cosine cycles (warm restarts, used by self-distillation).
    The scheduler counts optimizer steps: --grad-accum-steps N makes an epoch of B batches ceil(B / N) of them.
    """
    updates_per_epoch = optimizer_steps(batches_per_epoch, optim.grad_accum_steps)
    optimizer = create_optimizer_v2(model, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                                    momentum=optim.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=optim.sched, num_epochs=optim.epochs // cycles, warmup_epochs=optim.warmup_epochs,
        warmup_lr=optim.warmup_lr, min_lr=optim.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
        cycle_limit=cycles, cycle_decay=1.0, decay_epochs=optim.decay_epochs, decay_rate=optim.decay_rate,
    )
    warning = constant_rate_warning(scheduler, optimizer, optim, updates_per_epoch)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return optimizer, scheduler


def constant_rate_warning(scheduler: object, optimizer: torch.optim.Optimizer, optim: OptimSettings,
                          updates_per_epoch: int) -> str | None:
    """A warning when the schedule leaves the learning rate unchanged from the end of the warm-up to the last
    optimizer step of --epochs (timm's step schedule decays first at epoch 90, after most short runs end).

    Read from the scheduler at the start of every epoch after the warm-up and at the last step; the optimizer's
    rates are put back as they were.
    """
    first, last = optim.warmup_epochs * updates_per_epoch, optim.epochs * updates_per_epoch - 1
    if last <= first or optim.sched == "constant":  # a constant rate asked for is no surprise
        return None
    start_rates = [group["lr"] for group in optimizer.param_groups]
    rates = set()
    for update in [*range(first, last, updates_per_epoch), last]:
        scheduler.step_update(num_updates=update)
        rates.add(optimizer.param_groups[0]["lr"])
    for group, rate in zip(optimizer.param_groups, start_rates, strict=True):
        group["lr"] = rate
    if len(rates) > 1:
        return None
    hint = f" (--decay-epochs {optim.decay_epochs:g} >= --epochs {optim.epochs})" if optim.sched == "step" else ""
    return (f"--sched {optim.sched} keeps the learning rate at {rates.pop():g} from epoch "
            f"{optim.warmup_epochs} to the end of the run{hint}: the schedule never changes it")


def make_ema(optim: OptimSettings, model: nn.Module, accelerator: Accelerator) -> ModelEmaV3 | None:
    """--model-ema: the EMA of the prepared model's weights (None without the flag)."""
    return create_ema(bare_model(accelerator, model), optim.model_ema_decay) if optim.model_ema else None


def result_fields(settings: TrainingSettings, method: str, teacher: str) -> dict[str, object]:
    """The columns of results.csv that say which experiment a row is (the report groups by them)."""
    data = settings.data
    return {"dataset": data.source.name, "split": data.val_split, "model": settings.model.model, "method": method,
            "teacher": teacher, "seed": settings.runtime.seed, "epochs": settings.optim.epochs,
            "img_size": data.img_size, "difficult": data.difficult,
            "eval_difficult": "negative" if data.eval_difficult_negative else "ignore"}


def fit_and_report(settings: TrainingSettings, setup: RunSetup, accelerator: Accelerator) -> dict[str, object]:
    """Train the remaining epochs, print the metrics of best.safetensors, return its results.csv row."""
    start_trackers(accelerator, settings.saved_args, setup.run_dir)
    row = fit(settings, setup, accelerator)
    print_results(accelerator, row)
    accelerator.end_training()
    return row


def run_script(main: Callable[[], object], debug: Callable[[], bool] | None = None) -> None:
    """Run a script's main; errors caused by the user's input end it with one `error:` line. `debug`, for the
    scripts with --debug: reads it from the parsed flags (command line or -c YAML); true adds the traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if debug is not None and debug_requested(debug):
            traceback.print_exception(err)
        sys.exit(f"error: {user_message(err)}")


def debug_requested(debug: Callable[[], bool]) -> bool:
    """--debug as parsed, a -c YAML's `debug: true` included. The flags are parsed again only on this error path,
    so that main(argv) stays each script's one entry point; flags that do not parse show no traceback."""
    try:
        return debug()
    except USER_ERRORS:
        return False


def user_message(err: BaseException) -> str:
    """The error's own message; an error raised in a loader worker reaches the main process with the worker's
    traceback around it (torch's ExceptionWrapper), of which only the last line is the message."""
    message = str(err)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]  # "package.module.ErrorClass: the message"
    name = f"{type(err).__name__}: "
    return last[last.index(name) + len(name):] if name in last else last


def print_results(accelerator: Accelerator, row: dict[str, object]) -> None:
    accelerator.print("final metrics of best.safetensors (percent):")
    for name in (column.name for column in METRIC_COLUMNS if column.percent):
        value = row.get(name)
        if isinstance(value, float):
            accelerator.print(f"  {name:<14} {value:8.2f}")
    accelerator.print(f"  best epoch     {row.get('best_epoch')} ({row.get('best_weights')} weights)\n"
                      f"  checkpoint     {row.get('checkpoint')}")
