"""The optimizer and the learning-rate schedule of a run (timm's factories)."""

from __future__ import annotations

import warnings

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from udtimm.engine import optimizer_steps
from udtimm.settings import OptimSettings


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
