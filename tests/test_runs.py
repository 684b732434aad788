"""runs.py: the run directory and the results.csv fields."""

import pytest
from accelerate import Accelerator
from conftest import tiny_train_args

import train
from udtimm import config, runs
from udtimm.config import ConfigError


def test_result_fields_name_the_experiment() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--eval-difficult-negative", "--seed", "3"])
    fields = runs.result_fields(config.training_settings(args), "cal", "")
    assert fields["dataset"] == "voc2007" and fields["seed"] == 3 and fields["eval_difficult"] == "negative"
    assert fields["img_size"] == 448 and fields["method"] == "cal"
    assert set(fields) >= {"commit", "dirty"}  # which code ran (udtimm.provenance)


@pytest.mark.parametrize(("flags", "suffix"), [
    ([], ""), (["--unknown", "negative"], "+unknown-negative"), (["--drop-labels", "0.5"], "+drop50"),
    (["--mixup", "0.8", "--cutmix", "1.0"], "+mixup+cutmix"),
    (["--drop-labels", "0.8", "--mixup", "0.2"], "+drop80+mixup"),
])
def test_the_method_names_the_labels_and_batches_trained_on(flags, suffix) -> None:
    settings = config.training_settings(train.parse_args(flags))
    assert runs.data_suffix(settings.data, settings.mixing) == suffix


def test_a_resume_refused_before_training_leaves_args_yaml_as_it_was(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text("epochs: 4\nlr: 0.002\n")
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ConfigError, match="loss terms"):
        with runs.run_directory(str(run), str(run), {"epochs": 8, "lr": 0.001}, accelerator):
            assert "epochs: 8" in (run / "args.yaml").read_text()  # the new flags, while the run goes on
            raise ConfigError("loss terms differ")
    assert (run / "args.yaml").read_text() == "epochs: 4\nlr: 0.002\n"
    with pytest.raises(RuntimeError):  # a failure while training keeps the flags it trained with
        with runs.run_directory(str(run), str(run), {"epochs": 8}, accelerator):
            raise RuntimeError("step failed")
    assert (run / "args.yaml").read_text() == "epochs: 8\n"


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
