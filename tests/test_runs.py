import os
import shutil
import sys

import pytest
import torch
from conftest import TINY_DIGITS, tiny_train_args

import train
from udtimm import config, runs
from udtimm.data.digits import ensure_digits


def test_result_fields_name_the_experiment() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--eval-difficult-negative", "--seed", "3"])
    fields = runs.result_fields(config.training_settings(args), "cal", "")
    assert fields["dataset"] == "voc2007" and fields["seed"] == 3 and fields["eval_difficult"] == "negative"
    assert fields["img_size"] == 448 and fields["method"] == "cal"


def test_self_distillation_schedule_restarts_the_cosine() -> None:
    args = train.parse_args(["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1"])
    optimizer, scheduler = runs.build_optimization(config.training_settings(args).optim, torch.nn.Linear(2, 2),
                                                   updates_per_epoch=10, cycles=2)
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


def run_main(main, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What runs.run_script prints on exit (the `error:` line), with `argv` as the command line."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runs.run_script(lambda: main(argv))
    return str(exit_info.value.code)


def test_a_corrupt_image_read_by_a_worker_is_one_error_line_and_leaves_no_run(tmp_path, monkeypatch, capsys) -> None:
    data_dir, bad = corrupt_digits(tmp_path)
    argv = tiny_train_args(data_dir, str(tmp_path / "out"), "--experiment", "run", "--workers", "1")
    message = run_main(train.main, argv, monkeypatch)
    assert message.startswith("error: ") and "\n" not in message and bad in message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()  # refused before an epoch was saved: nothing left behind
    run_main(train.main, [*argv, "--debug"], monkeypatch)
    assert "Traceback" in capsys.readouterr().err


def test_a_run_refused_after_its_directory_was_made_removes_it(tiny_digits: str, tmp_path) -> None:
    (tmp_path / "out" / "kept").mkdir(parents=True)
    with pytest.raises(config.ConfigError, match="--gpu-decode"):  # refused by build_loaders on a CPU
        train.main(tiny_train_args(tiny_digits, str(tmp_path / "out"), "--experiment", "run", "--gpu-decode"))
    assert not (tmp_path / "out" / "run").exists()
    with pytest.raises(config.ConfigError, match="--gpu-decode"):  # a folder that was there before stays
        train.main(tiny_train_args(tiny_digits, str(tmp_path / "out"), "--experiment", "kept", "--gpu-decode"))
    assert (tmp_path / "out" / "kept").is_dir()


def test_workers_has_the_short_flag_j() -> None:
    assert train.parse_args(["-j", "5"]).workers == 5
