import warnings

import pytest
import torch

import train
from udtimm import runs
from udtimm.config import ConfigError
from udtimm.engine import optimizer_steps
from udtimm.model import create_model


def test_result_fields_name_the_experiment() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--eval-difficult-negative", "--seed", "3"])
    fields = runs.result_fields(args, "cal", "")
    assert fields["dataset"] == "voc2007" and fields["seed"] == 3 and fields["eval_difficult"] == "negative"
    assert fields["img_size"] == 448 and fields["method"] == "cal"


def test_self_distillation_schedule_restarts_the_cosine() -> None:
    args = train.parse_args(["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1"])
    optimizer, scheduler = runs.build_optimization(args, torch.nn.Linear(2, 2), batches_per_epoch=10, cycles=2)
    rates = []
    for update in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(update + 1)
    assert rates[0] == rates[20] == 0.1 and rates[19] < 0.01


def rates_per_epoch(argv: list[str], batches_per_epoch: int = 10) -> list[float]:
    args = train.parse_args(argv)
    optimizer, scheduler = runs.build_optimization(args, torch.nn.Linear(2, 2), batches_per_epoch=batches_per_epoch)
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
    optimizer, scheduler = runs.build_optimization(args, torch.nn.Linear(2, 2), batches_per_epoch=10)
    scheduler.step_update(3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(args.lr / 2)  # half-way after 3 of 6 steps


class FakeAccelerator:
    def __init__(self, processes: int, device: str) -> None:
        self.num_processes, self.device = processes, torch.device(device)


def test_sync_bn_converts_batchnorm_only_with_several_gpu_processes() -> None:
    model = create_model("test_resnet", num_classes=3, cal=True)
    assert runs.sync_batchnorm(model, True, FakeAccelerator(1, "cpu")) is model  # one process: the whole batch
    assert runs.sync_batchnorm(model, False, FakeAccelerator(2, "cuda")) is model
    converted = runs.sync_batchnorm(model, True, FakeAccelerator(2, "cuda"))
    kinds = {type(module) for module in converted.modules()}
    assert torch.nn.SyncBatchNorm in kinds and not kinds & {torch.nn.BatchNorm1d, torch.nn.BatchNorm2d}
    assert converted.state_dict().keys() == create_model("test_resnet", num_classes=3, cal=True).state_dict().keys()
    with pytest.raises(ConfigError, match="--sync-bn .* 2 processes on cpu"):
        runs.sync_batchnorm(create_model("test_resnet", num_classes=3), True, FakeAccelerator(2, "cpu"))


def test_gradient_accumulation_needs_a_positive_count() -> None:
    with pytest.raises(ConfigError, match="--grad-accum-steps"):
        runs.make_training_accelerator(train.parse_args(["--grad-accum-steps", "0"]), "unused")
