import json

import pytest
import torch

from udtimm import losses
from udtimm.config import ConfigError
from udtimm.model import create_model
from udtimm.objectives import DistillationObjective, SupervisedObjective, check_teacher


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    target = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    difficult = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False]])
    return torch.randn(3, 3, 32, 32), target, difficult


def test_supervised_objective_is_eq12_with_the_difficult_policy() -> None:
    model = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective("bce", cal_weight=0.1, difficult="ignore")(model, images, target, difficult)
    out = model(images)
    mask = ~difficult
    torch.testing.assert_close(terms["bce"], losses.bce_loss(out.logits, target, mask))
    torch.testing.assert_close(terms["partial_softmax"], losses.partial_softmax_loss(out.cal_logits, target, mask))
    torch.testing.assert_close(terms["loss"], terms["bce"] + 0.1 * terms["partial_softmax"])


@pytest.mark.parametrize("loss", ["temperature", "label-smoothing", "one-over-k"])
def test_table5_losses_are_selected_by_name(loss: str) -> None:
    model = create_model("test_resnet", num_classes=4).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective(loss)(model, images, target, difficult)
    assert set(terms) == {loss, "loss"} and torch.isfinite(terms["loss"])


def test_distillation_terms_follow_eq18_weights() -> None:
    teacher = create_model("test_resnet", num_classes=4, cal=True)
    student = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    objective = DistillationObjective(teacher, "ud", dist_weight=0.5, att_weight=0.25)
    terms = objective(student, images, target, difficult)
    assert objective.term_names == ("kd", "kd_cal", "attention")
    torch.testing.assert_close(terms["loss"], terms["kd"] + 0.5 * terms["kd_cal"] + 0.25 * terms["attention"])
    kd = DistillationObjective(teacher, "kd", gt_weight=1.0)
    assert kd.term_names == ("kd", "gt") and set(kd(student, images, target, difficult)) == {"kd", "gt", "loss"}


def test_check_teacher_names_the_difference() -> None:
    metadata = {"class_names": json.dumps(["a", "b", "c"]), "cal": "false"}
    with pytest.raises(ConfigError, match="only in the checkpoint: \\['c'\\]"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "d"], "kd")
    with pytest.raises(ConfigError, match="calibration branch"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "ud")
    check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "kd")
