import json

import pytest
import torch

import distill
import train
from udtimm import losses
from udtimm.checkpoint import CheckpointError
from udtimm.config import ConfigError
from udtimm.data.transforms import NormalizeImage, Renormalize
from udtimm.model import create_model
from udtimm.objectives import (
    CLASSIFICATION_LOSSES,
    DISTILL_METHODS,
    DistillationObjective,
    KnowledgeDistillationObjective,
    LossOptions,
    SelfDistillationObjective,
    SupervisedObjective,
    check_teacher,
)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    target = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    difficult = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False]])
    return torch.randn(3, 3, 32, 32), target, difficult


def test_supervised_objective_is_eq12_with_the_difficult_policy() -> None:
    model = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective("bce", cal=True, cal_weight=0.1, difficult="ignore")(model, images, target, difficult)
    out = model(images)
    mask = ~difficult
    torch.testing.assert_close(terms["bce"], losses.bce_loss(out.logits, target, mask))
    torch.testing.assert_close(terms["partial_softmax"], losses.partial_softmax_loss(out.cal_logits, target, mask))
    torch.testing.assert_close(terms["loss"], terms["bce"] + 0.1 * terms["partial_softmax"])


def test_asl_with_cal_is_asl_plus_lambda_partial_softmax() -> None:
    model = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    objective = SupervisedObjective("asl", cal=True, cal_weight=0.2, difficult="ignore",
                                    options=LossOptions(asl_gamma_neg=3.0, asl_gamma_pos=1.0, asl_clip=0.1))
    terms = objective(model, images, target, difficult)
    out, mask = model(images), ~difficult
    assert objective.term_names == ("asl", "partial_softmax")
    torch.testing.assert_close(terms["asl"], losses.asymmetric_loss(out.logits, target, mask, gamma_neg=3.0,
                                                                    gamma_pos=1.0, clip=0.1))
    torch.testing.assert_close(terms["loss"], terms["asl"] + 0.2 * terms["partial_softmax"])


@pytest.mark.parametrize("loss", list(CLASSIFICATION_LOSSES))
def test_every_registered_loss_is_selected_by_name_and_is_a_flag(loss: str) -> None:
    model = create_model("test_resnet", num_classes=4).eval()
    images, target, difficult = batch()
    objective = SupervisedObjective(loss, options=LossOptions(temperature=2.0))
    terms = objective(model, images, target, difficult)
    assert set(terms) == {loss, "loss"} and torch.isfinite(terms["loss"]) and objective.term_names == (loss,)
    assert train.parse_args(["--loss", loss]).loss == loss


def test_loss_options_reach_the_loss() -> None:
    model = create_model("test_resnet", num_classes=4).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective("temperature", options=LossOptions(temperature=2.0))(model, images, target, difficult)
    target, mask = losses.apply_difficult_policy(target, difficult, "positive")
    expected = losses.temperature_bce_loss(model(images).logits, target, mask, temperature=2.0)
    torch.testing.assert_close(terms["temperature"], expected)


def test_every_distillation_method_is_a_flag_and_says_what_it_needs() -> None:
    for name, method in DISTILL_METHODS.items():
        assert distill.parse_args(["--teacher-ckpt", "t.safetensors", "--method", name]).method == name
        assert isinstance(method.uses_calibration, bool)


def test_self_distillation_switches_to_its_teacher_once() -> None:
    teacher = create_model("test_resnet", num_classes=4, cal=True)
    student = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    built = []
    objective = SelfDistillationObjective(SupervisedObjective("bce", cal=True), 2,
                                          lambda: built.append(DistillationObjective(teacher)) or built[-1])
    assert objective.term_names == ("bce", "partial_softmax", "kd", "kd_cal", "attention")
    for epoch in range(4):
        objective.start_epoch(epoch)
        terms = objective(student, images, target, difficult)
        assert set(terms) - {"loss"} == ({"bce", "partial_softmax"} if epoch < 2 else {"kd", "kd_cal", "attention"})
    assert len(built) == 1


def test_distillation_terms_follow_eq18_weights() -> None:
    teacher = create_model("test_resnet", num_classes=4, cal=True)
    student = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    objective = DistillationObjective(teacher, dist_weight=0.5, att_weight=0.25)
    terms = objective(student, images, target, difficult)
    assert objective.term_names == ("kd", "kd_cal", "attention")
    torch.testing.assert_close(terms["loss"], terms["kd"] + 0.5 * terms["kd_cal"] + 0.25 * terms["attention"])
    kd = KnowledgeDistillationObjective(teacher, gt_weight=1.0)
    assert kd.term_names == ("kd", "gt") and set(kd(student, images, target, difficult)) == {"kd", "gt", "loss"}


def test_check_teacher_names_the_difference() -> None:
    metadata = {"class_names": json.dumps(["a", "b", "c"]), "cal": "false"}
    with pytest.raises(CheckpointError, match=r"teacher t\.safetensors .*only in the checkpoint: \['c'\]"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "d"], "kd")
    with pytest.raises(ConfigError, match="calibration branch"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "ud")
    check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "kd")


def test_the_teacher_sees_the_batch_in_its_own_normalisation() -> None:
    torch.manual_seed(0)
    teacher = create_model("test_resnet", num_classes=4, cal=True).eval()
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    student_norm, teacher_norm = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    images = NormalizeImage(*student_norm)(pixels)
    objective = DistillationObjective(teacher, teacher_input=Renormalize(*student_norm, *teacher_norm))
    logits, cal_logits, maps = objective.teacher_outputs(images)
    expected = teacher(NormalizeImage(*teacher_norm)(pixels), with_attention=True)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cal_logits, expected.cal_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps, expected.attention, rtol=1e-4, atol=1e-5)
    # Without it the teacher would read the student's numbers as its own: other logits.
    unadapted = KnowledgeDistillationObjective(teacher).teacher_outputs(images)[0]
    assert (unadapted - expected.logits).abs().max() > 1e-2


def test_warmup_ramps_alpha_and_beta_from_zero_over_the_distilled_epochs() -> None:
    teacher = create_model("test_resnet", num_classes=4, cal=True)
    student = create_model("test_resnet", num_classes=4, cal=True).eval()
    images, target, difficult = batch()
    objective = DistillationObjective(teacher, dist_weight=0.5, att_weight=0.25, warmup_epochs=4, first_epoch=2)
    ramps = []
    for epoch in range(2, 8):
        objective.start_epoch(epoch)
        terms = objective(student, images, target, difficult)
        ramps.append(objective.ramp)
        expected = terms["kd"] + objective.ramp * (0.5 * terms["kd_cal"] + 0.25 * terms["attention"])
        torch.testing.assert_close(terms["loss"], expected)
    assert ramps == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    plain = DistillationObjective(teacher)
    plain.start_epoch(0)
    assert plain.ramp == 1.0  # no warm-up: Eq. 18 from the first step
