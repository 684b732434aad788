"""optimization.py: timm's optimizer and schedule as the flags set them, counted in optimizer steps."""

import warnings

import pytest
import torch

import train
from udtimm import config, optimization
from udtimm.engine import optimizer_steps


def test_self_distillation_schedule_restarts_the_cosine() -> None:
    args = train.parse_args(["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1"])
    optimizer, scheduler = optimization.build_optimization(config.training_settings(args).optim,
                                                           torch.nn.Linear(2, 2), batches_per_epoch=10, cycles=2)
    rates = []
    for update in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(update + 1)
    assert rates[0] == rates[20] == 0.1 and rates[19] < 0.01


def rates_per_epoch(argv: list[str], batches_per_epoch: int = 10) -> list[float]:
    args = train.parse_args(argv)
    optimizer, scheduler = optimization.build_optimization(config.training_settings(args).optim,
                                                           torch.nn.Linear(2, 2), batches_per_epoch=batches_per_epoch)
    rates = []
    for update in range(args.epochs * optimizer_steps(batches_per_epoch, args.grad_accum_steps)):
        if update % optimizer_steps(batches_per_epoch, args.grad_accum_steps) == 0:
            rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(update + 1)
    return rates


def test_step_schedule_decays_every_decay_epochs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a schedule that changes the rate is not warned about
        rates = rates_per_epoch(["--sched", "step", "--decay-epochs", "2", "--decay-rate", "0.5", "--epochs", "5",
                                 "--warmup-epochs", "0", "--lr", "0.4"])
    assert rates == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


def test_a_schedule_that_never_changes_the_rate_is_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"--sched step keeps the learning rate at 0.002 .*--decay-epochs 90 >= "
                                         r"--epochs 15"):
        rates = rates_per_epoch(["--sched", "step"])
    assert rates[1:] == [0.002] * 14  # after the warm-up epoch: timm's first decay would come at epoch 90
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(rates_per_epoch(["--sched", "constant", "--warmup-epochs", "0"])) == {0.002}  # as asked: no warning


def test_the_schedule_counts_optimizer_steps_with_gradient_accumulation() -> None:
    """10 batches in groups of 4: 3 optimizer steps per epoch, so the cosine reaches its end after 3 x epochs."""
    args = train.parse_args(["--epochs", "2", "--warmup-epochs", "0", "--grad-accum-steps", "4", "--min-lr", "0"])
    optimizer, scheduler = optimization.build_optimization(config.training_settings(args).optim,
                                                           torch.nn.Linear(2, 2), batches_per_epoch=10)
    scheduler.step_update(3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(args.lr / 2)  # half-way after 3 of 6 steps
