"""The accelerator of a run, and the model on its device: --mixed-precision, --torchcompile, --grad-accum-steps,
--log-with, --channels-last, --sync-bn, and the model the flags ask for."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn

from udtimm.errors import ConfigError
from udtimm.model import CalibratedModel, create_model
from udtimm.settings import ModelSettings, TrainingSettings
from udtimm.trackers import tracker_names
from udtimm.weights import load_initial_checkpoint


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


def build_model(settings: ModelSettings, img_size: int, class_names: list[str], cal: bool,
                accelerator: Accelerator) -> CalibratedModel:
    """The model the flags ask for: timm's, pretrained or not, then --initial-checkpoint (which says what it loaded)."""
    model = create_model(settings, len(class_names), cal=cal, img_size=img_size)
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
