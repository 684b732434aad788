import os
import runpy
import shutil
import sys
import warnings

import pytest
import torch
from conftest import ROOT, TINY_DIGITS, tiny_train_args

import train
from udtimm import config, runs
from udtimm.config import ConfigError
from udtimm.data.digits import ensure_digits
from udtimm.engine import optimizer_steps
from udtimm.model import create_model


def test_result_fields_name_the_experiment() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--eval-difficult-negative", "--seed", "3"])
    fields = runs.result_fields(config.training_settings(args), "cal", "")
    assert fields["dataset"] == "voc2007" and fields["seed"] == 3 and fields["eval_difficult"] == "negative"
    assert fields["img_size"] == 448 and fields["method"] == "cal"


def test_self_distillation_schedule_restarts_the_cosine() -> None:
    args = train.parse_args(["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1"])
    optimizer, scheduler = runs.build_optimization(config.training_settings(args).optim, torch.nn.Linear(2, 2),
                                                   batches_per_epoch=10, cycles=2)
    rates = []
    for update in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(update + 1)
    assert rates[0] == rates[20] == 0.1 and rates[19] < 0.01


def corrupt_digits(tmp_path) -> tuple[str, str]:
    """A tiny digits copy with one unreadable training image; returns (data dir, that image's path)."""
    data_dir = str(tmp_path / "digits")
    shutil.copytree(ensure_digits(str(tmp_path / "source"), **TINY_DIGITS), data_dir)
    image_dir = os.path.join(data_dir, "VOC2007", "JPEGImages")
    bad = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    with open(bad, "wb") as handle:
        handle.write(b"not a jpeg")
    return data_dir, bad


def run_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What `python <script> <argv>` prints on exit (the `error:` line): the script's own run_script line runs."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return str(exit_info.value.code)


def test_a_corrupt_image_read_by_a_worker_is_one_error_line_and_leaves_no_run(tmp_path, monkeypatch, capsys) -> None:
    data_dir, bad = corrupt_digits(tmp_path)
    argv = tiny_train_args(data_dir, str(tmp_path / "out"), "--experiment", "run", "--workers", "1")
    message = run_script("train.py", argv, monkeypatch)
    assert message.startswith("error: ") and "\n" not in message and bad in message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()  # refused before an epoch was saved: nothing left behind
    run_script("train.py", [*argv, "--debug"], monkeypatch)
    assert "Traceback" in capsys.readouterr().err
    # --debug from a -c YAML, as from the command line.
    (tmp_path / "debug.yaml").write_text("debug: true\n")
    assert run_script("train.py", ["-c", str(tmp_path / "debug.yaml"), *argv], monkeypatch) == message
    assert "Traceback" in capsys.readouterr().err


def test_a_run_refused_after_its_directory_was_made_removes_it(tiny_digits: str, tmp_path) -> None:
    (tmp_path / "out" / "kept").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--gpu-decode"):  # refused by build_loaders on a CPU
        train.main(tiny_train_args(tiny_digits, str(tmp_path / "out"), "--experiment", "run", "--gpu-decode"))
    assert not (tmp_path / "out" / "run").exists()
    with pytest.raises(ConfigError, match="--gpu-decode"):  # a folder that was there before stays
        train.main(tiny_train_args(tiny_digits, str(tmp_path / "out"), "--experiment", "kept", "--gpu-decode"))
    assert (tmp_path / "out" / "kept").is_dir()


def test_workers_has_the_short_flag_j() -> None:
    assert train.parse_args(["-j", "5"]).workers == 5
def rates_per_epoch(argv: list[str], batches_per_epoch: int = 10) -> list[float]:
    args = train.parse_args(argv)
    optimizer, scheduler = runs.build_optimization(config.training_settings(args).optim, torch.nn.Linear(2, 2),
                                                   batches_per_epoch=batches_per_epoch)
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
    optimizer, scheduler = runs.build_optimization(config.training_settings(args).optim, torch.nn.Linear(2, 2),
                                                   batches_per_epoch=10)
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
        runs.make_training_accelerator(config.training_settings(train.parse_args(["--grad-accum-steps", "0"])),
                                       "unused")
