"""The optimizer and the learning-rate schedule of a run (timm's factories)."""

from __future__ import annotations

import warnings

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

from udtimm.engine import optimizer_steps
from udtimm.errors import ConfigError
from udtimm.model import CalibratedModel
from udtimm.settings import OptimSettings


def build_optimization(optim: OptimSettings, model: nn.Module, batches_per_epoch: int, cycles: int = 1) -> tuple:
    """timm's optimizer and scheduler factories; the scheduler steps every update (cosine with warmup).

    `cycles` > 1 splits the epochs into that many cosine cycles (warm restarts, used by self-distillation).
    The scheduler counts optimizer steps: --grad-accum-steps N makes an epoch of B batches ceil(B / N) of them.
    --head-lr-mult M scales the classifier's rate by M at every step (parameter_groups).
    """
    updates_per_epoch = optimizer_steps(batches_per_epoch, optim.grad_accum_steps)
    params = parameter_groups(model, optim.weight_decay, optim.head_lr_mult)
    optimizer = create_optimizer_v2(params, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
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


def parameter_groups(model: nn.Module, weight_decay: float, head_lr_mult: float) -> nn.Module | list[dict]:
    """What create_optimizer_v2 gets: the model itself at --head-lr-mult 1 (timm's groups, as without the flag), else
    timm's weight-decay groups each split into a backbone and a classifier part, the classifier's at M x the rate."""
    if head_lr_mult <= 0:
        raise ConfigError(f"--head-lr-mult {head_lr_mult:g}: the classifier's learning rate is M x the backbone's, "
                          "M must be positive")
    if head_lr_mult == 1:
        return model  # the optimizer of runs before the flag existed: their saved state loads, their results stay
    classifier = classifier_parameters(model)
    # A list of groups goes to the optimizer as it is: timm's layer_decay and param_group_fn, which would regroup a
    # model and drop the split, apply to a module only (and build_optimization uses neither).
    no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()  # as create_optimizer_v2 reads it
    groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay)
    backbone_groups, classifier_groups = (
        [{**group, "params": params} for group in groups
         if (params := [param for param in group["params"] if (id(param) in classifier) == in_classifier])]
        for in_classifier in (False, True))
    if not classifier_groups:
        raise ConfigError(f"--head-lr-mult {head_lr_mult:g}: the classifier (--head {model.head_name}"
                          f"{' and the calibration branch' if model.has_cal else ''}) has no trainable parameters "
                          "to train at another rate: drop the flag")
    if not backbone_groups:
        raise ConfigError(f"--head-lr-mult {head_lr_mult:g}: the backbone has no trainable parameters, so no rate "
                          "to multiply: scale --lr instead")
    # 'lr_scale' (the groups' 'lr' stays --lr) is what timm's schedulers multiply into every rate they set
    # (Scheduler.update_groups): the warm-up from --warmup-lr, the decay and the --min-lr floor, so the ratio is M at
    # every step, as with CSRA's torch schedulers. An 'lr' of M x --lr would not keep it: timm starts every group's
    # warm-up at the shared --warmup-lr and decays every group towards the shared --min-lr.
    for group in classifier_groups:
        group["lr_scale"] = head_lr_mult
    return backbone_groups + classifier_groups  # group 0, the rate summary.csv logs, stays the backbone's


def classifier_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters --head-lr-mult speeds up: timm's classifier (--head linear) or the spatial head, and
    the calibration branch."""
    if not isinstance(model, CalibratedModel):
        raise ConfigError(f"--head-lr-mult needs udtimm's CalibratedModel, whose classifier it can find, not a "
                          f"{type(model).__name__}")
    head = model.backbone.get_classifier() if model.head is None else model.head
    modules = [head] if model.cal_head is None else [head, model.cal_head]
    return {id(param) for module in modules for param in module.parameters()}


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
