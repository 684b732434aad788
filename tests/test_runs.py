"""runs.py: the run directory and the results.csv fields."""

import pytest
from conftest import tiny_train_args

import train
from udtimm import config, runs
from udtimm.config import ConfigError


def test_result_fields_name_the_experiment() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--eval-difficult-negative", "--seed", "3"])
    fields = runs.result_fields(config.training_settings(args), "cal", "")
    assert fields["dataset"] == "voc2007" and fields["seed"] == 3 and fields["eval_difficult"] == "negative"
    assert fields["img_size"] == 448 and fields["method"] == "cal"


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
