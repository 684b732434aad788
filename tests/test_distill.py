"""distill.py end to end on tiny digits: ud / kd / ud-noatt students, self-distillation, refusals."""

import inspect
import json
import math
import os

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import read_rows, tiny_train_args

import distill
import train
from udtimm.attention import ATTENTION_VARIANTS, uncertainty_attention
from udtimm.checkpoint import CheckpointError, model_metadata, read_metadata, save_checkpoint
from udtimm.config import ConfigError, settings_from
from udtimm.data.digits import DIGIT_CLASSES as DIGITS
from udtimm.data.transforms import Renormalize
from udtimm.model import CalibratedModel, create_model
from udtimm.objectives import DistillationObjective, DistillOptions
from udtimm.settings import ModelSettings
from udtimm.weights import WeightsError


@pytest.fixture(scope="module")
def teachers(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    output = str(tmp_path_factory.mktemp("teachers"))
    train.main(tiny_train_args(tiny_digits, output, "--cal", "--experiment", "cal"))
    train.main(tiny_train_args(tiny_digits, output, "--experiment", "plain", "--epochs", "1"))
    return {name: os.path.join(output, name, "best.safetensors") for name in ("cal", "plain")}


@pytest.mark.parametrize(("flags", "method", "terms"), [
    (["--method", "ud", "--att-weight", "0.5"], "ud-gradcam", ("train_kd", "train_kd_cal", "train_attention")),
    (["--method", "ud", "--att-variant", "paper", "--att-weight", "0.5"], "ud",
     ("train_kd", "train_kd_cal", "train_attention")),
    (["--method", "ud", "--att-variant", "paper", "--att-distance", "squared", "--att-weight", "0.5"], "ud-squared",
     ("train_kd", "train_kd_cal", "train_attention")),
    (["--method", "ud"], "ud-noatt", ("train_kd", "train_kd_cal")),  # the default: no attention
    (["--method", "kd"], "kd", ("train_kd",)),
])
@pytest.mark.slow
def test_students_learn_from_a_calibrated_teacher(tiny_digits, teachers, tmp_path, flags, method, terms) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", teachers["cal"], "--experiment", "s",
                           "--model", "test_efficientnet", "--epochs", "3", "--lr", "3e-3", *flags)
    row = distill.main(args)
    summary = read_rows(str(tmp_path / "s" / "summary.csv"))
    for term in terms:
        assert float(summary[0][term]) >= 0
    assert float(summary[-1]["train_loss"]) < float(summary[0]["train_loss"])
    (result,) = read_rows(str(tmp_path / "s" / "results.csv"))
    assert result["method"] == method and result["teacher"] == teachers["cal"] and row["method"] == method
    assert read_metadata(str(tmp_path / "s" / "best.safetensors"))["cal"] == ("true" if method != "kd" else "false")


@pytest.mark.slow
def test_ud_with_spatial_heads_on_both_sides(tiny_digits, tmp_path) -> None:
    """A CSRA teacher teaches an ML-Decoder student by Eq. 18 with the attention term, at 64 px (2 x 2 maps): both
    maps come from the last feature map through the heads, and the student's result names its head."""
    teacher = create_model(ModelSettings("test_resnet", head="csra", head_kwargs={"num_heads": 2}), 10, cal=True)
    path = str(tmp_path / "csra.safetensors")
    save_checkpoint(path, teacher, model_metadata("test_resnet", teacher, list(DIGITS), None, 64, [0.5] * 3,
                                                  [0.5] * 3))
    row = distill.main(tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", path, "--experiment", "s",
                                       "--img-size", "64", "--method", "ud", "--att-weight", "0.5", "--head",
                                       "ml-decoder", "--head-kwargs", "embed_dim=16", "num_heads=2", "ff_dim=32"))
    summary = read_rows(str(tmp_path / "s" / "summary.csv"))
    assert all(0 < float(epoch["train_attention"]) < math.inf for epoch in summary)
    assert row["method"] == "ud-gradcam+ml-decoder"
    assert read_metadata(str(tmp_path / "s" / "best.safetensors"))["head"] == "ml-decoder"


@pytest.mark.slow
def test_a_student_with_model_ema(tiny_digits, teachers, tmp_path) -> None:
    row = distill.main(tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", teachers["cal"], "--experiment",
                                       "s", "--method", "kd", "--epochs", "1", "--model-ema"))
    summary = read_rows(str(tmp_path / "s" / "summary.csv"))
    assert row["method"] == "kd+ema" and row["best_weights"] in ("raw", "ema") and "map_ema" in summary[0]
    assert os.path.isfile(tmp_path / "s" / "state" / "ema.safetensors")


def test_ud_refuses_a_teacher_without_calibration_branch_before_any_work(tiny_digits, teachers, tmp_path) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", teachers["plain"], "--experiment", "x")
    with pytest.raises(ConfigError, match="calibration branch"):
        distill.main(args)
    assert not (tmp_path / "x").exists()


def test_a_teacher_with_another_class_list_is_refused_naming_the_classes(tiny_digits, tmp_path) -> None:
    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "cat"]
    model = create_model(ModelSettings("test_resnet"), 10, cal=True)
    path = str(tmp_path / "other.safetensors")
    save_checkpoint(path, model, model_metadata("test_resnet", model, classes, None, 32, [0.5] * 3, [0.5] * 3))
    args = tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", path, "--experiment", "x")
    message = r"teacher .*other\.safetensors was trained on other classes .*\['cat'\].*\['nine'\]"
    with pytest.raises(CheckpointError, match=message):
        distill.main(args)
    assert not (tmp_path / "x").exists()


def test_token_pooled_vit_student_is_refused_for_attention(tiny_digits, teachers, tmp_path) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", teachers["cal"], "--experiment", "x",
                           "--model", "test_vit", "--global-pool", "token", "--att-weight", "0.5")
    with pytest.raises(ValueError, match="global-pool avg"):
        distill.main(args)


@pytest.mark.slow
def test_self_distillation_switches_teacher_at_the_half(tiny_digits, tmp_path) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--self-distill", "--epochs", "4", "--experiment", "self",
                           "--att-weight", "0.5")
    distill.main(args)
    run_dir = tmp_path / "self"
    summary = read_rows(str(run_dir / "summary.csv"))
    assert [row["train_bce"] != "nan" for row in summary] == [True, True, False, False]
    assert [row["train_attention"] != "nan" for row in summary] == [False, False, True, True]
    teacher_epoch = int(read_metadata(str(run_dir / "teacher.safetensors"))["epoch"])
    assert teacher_epoch == int(max(summary[:2], key=lambda row: float(row["map"]))["epoch"])
    # Cosine restart: the learning rate climbs back up after the switch.
    assert float(summary[2]["lr"]) > float(summary[1]["lr"])
    (result,) = read_rows(str(run_dir / "results.csv"))
    assert result["method"] == "self-ud-gradcam" and result["teacher"] == "self"


def test_torchcompile_with_uncertainty_attention_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="--torchcompile"):
        distill.parse_args(["--teacher-ckpt", "t.safetensors", "--torchcompile", "--att-weight", "0.5"])
    assert distill.parse_args(["--teacher-ckpt", "t.safetensors", "--torchcompile", "--method", "kd"]).torchcompile
    assert distill.parse_args(["--teacher-ckpt", "t.safetensors", "--torchcompile"]).torchcompile  # no attention


def test_self_distill_refuses_another_method_naming_both_flags() -> None:
    with pytest.raises(ConfigError, match="--self-distill.*--method kd"):
        distill.parse_args(["--self-distill", "--method", "kd"])
    assert distill.parse_args(["--self-distill", "--method", "ud"]).self_distill


def test_the_python_api_builds_attention_maps_as_distill_py_does_by_default() -> None:
    form = ATTENTION_VARIANTS[distill.parse_args(["--teacher-ckpt", "t.safetensors"]).att_variant]
    defaults = {
        "uncertainty_attention": inspect.signature(uncertainty_attention).parameters["form"].default,
        "CalibratedModel.forward": inspect.signature(CalibratedModel.forward).parameters["attention_form"].default,
        "DistillationObjective": inspect.signature(DistillationObjective).parameters["attention_form"].default,
    }
    assert defaults == dict.fromkeys(defaults, form)


@pytest.mark.parametrize(("flags", "method"), [
    ([], "ud-noatt"), (["--att-weight", "0.5"], "ud-gradcam"), (["--att-distance", "squared", "--att-weight", "1"],
                                                                 "ud-gradcam-squared"),
    (["--self-distill"], "self-ud-noatt"),
    (["--self-distill", "--att-variant", "paper", "--att-weight", "0.5"], "self-ud"),
])
def test_the_method_column_names_the_attention_distance(flags, method) -> None:
    teacher = [] if "--self-distill" in flags else ["--teacher-ckpt", "t.safetensors"]
    assert distill.method_name(distill.parse_args([*teacher, *flags])) == method


def test_eq17_defaults_to_the_norm_the_paper_writes() -> None:
    args = distill.parse_args(["--teacher-ckpt", "t.safetensors", "--att-weight", "0.5"])
    assert args.att_distance == "norm" == DistillOptions().att_distance
    assert settings_from(DistillOptions, args).att_distance == "norm"


def test_distill_needs_a_teacher_or_self_distill() -> None:
    with pytest.raises(ConfigError, match="--teacher-ckpt"):
        distill.parse_args(["--model", "test_resnet"])


@pytest.mark.slow
def test_initial_checkpoint_starts_train_and_distill_and_a_misfit_is_refused_first(tiny_digits, teachers, tmp_path,
                                                                                     capsys) -> None:
    row = train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "warm", "--epochs", "1",
                                     "--initial-checkpoint", teachers["cal"]))
    assert "loaded the backbone" in capsys.readouterr().out and row["method"] == "baseline"
    distill.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "warm-ud", "--epochs", "1",
                                 "--teacher-ckpt", teachers["cal"], "--initial-checkpoint", teachers["cal"]))
    out = capsys.readouterr().out
    assert "loaded the backbone" in out and "the calibration branch" in out.split("left at random")[0]
    other = create_model(ModelSettings("test_efficientnet"), 10)
    path = str(tmp_path / "other.safetensors")
    save_checkpoint(path, other, model_metadata("test_efficientnet", other, [str(i) for i in range(10)], None, 32,
                                                [0.5] * 3, [0.5] * 3))
    for script in (train, distill):
        flags = ("--teacher-ckpt", teachers["cal"]) if script is distill else ()
        with pytest.raises(WeightsError, match="other.safetensors does not fit"):
            script.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "refused",
                                        "--initial-checkpoint", path, *flags))
        assert not (tmp_path / "refused").exists()


def test_a_teacher_with_its_own_normalisation_gets_its_input_renormalised(tiny_digits, teachers) -> None:
    args = distill.parse_args(tiny_train_args(tiny_digits, "unused", "--teacher-ckpt", teachers["cal"]))
    teacher, metadata = distill.load_teacher(teachers["cal"], [str(i) for i in DIGITS], "ud", Accelerator(), False)
    student_norm = (json.loads(metadata["mean"]), json.loads(metadata["std"]))
    same = distill.make_objective(args, teacher, metadata, student_norm, Accelerator(), "ud")
    assert same.teacher_input is None
    other = distill.make_objective(args, teacher, metadata, ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                                   Accelerator(), "ud")
    assert isinstance(other.teacher_input, Renormalize)
    images = torch.zeros(1, 3, 4, 4)  # the student's mean colour is the teacher's (mean_s - mean_t) / std_t
    expected = (torch.tensor([0.485, 0.456, 0.406]) - torch.tensor(student_norm[0])) / torch.tensor(student_norm[1])
    torch.testing.assert_close(other.teacher_input(images)[0, :, 0, 0], expected)


@pytest.mark.slow
def test_a_student_fills_dropped_labels_from_its_teacher(tiny_digits, teachers, tmp_path) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", teachers["cal"], "--experiment", "s",
                           "--drop-labels", "0.5", "--unknown", "teacher", "--gt-weight", "0.5", "--epochs", "1")
    distill.main(args)
    (summary,) = read_rows(str(tmp_path / "s" / "summary.csv"))
    assert float(summary["train_gt"]) > 0 and math.isfinite(float(summary["train_loss"]))
    saved = yaml.safe_load((tmp_path / "s" / "args.yaml").read_text())
    assert (saved["drop_labels"], saved["unknown"], saved["gt_weight"]) == (0.5, "teacher", 0.5)


@pytest.mark.parametrize(("flags", "said"), [
    (["--method", "kd", "--att-variant", "paper", "--dist-weight", "0.2"], "--dist-weight, --att-variant do(es) "
                                                                           "nothing with --method kd"),
    (["--att-distance", "squared"], "--att-distance do(es) nothing with --att-weight 0"),
    (["--unknown", "negative"], "--unknown negative does nothing without --gt-weight"),
])
def test_a_distillation_flag_that_would_do_nothing_says_so(flags, said, capsys) -> None:
    distill.parse_args(["--teacher-ckpt", "t.safetensors", *flags])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {said}") and err.count("\n") == 1  # one line


def test_flags_that_are_read_say_nothing(capsys) -> None:
    distill.parse_args(["--teacher-ckpt", "t.safetensors", "--att-weight", "0.5", "--att-distance", "squared",
                        "--unknown", "negative", "--gt-weight", "0.5"])
    distill.parse_args(["--teacher-ckpt", "t.safetensors", "--method", "kd", "--temperature", "2"])
    assert capsys.readouterr().err == ""
