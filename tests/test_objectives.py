import dataclasses
import json

import pytest
import torch
from test_losses import _edge_batch, ref_bce, ref_partial_softmax

import distill
import train
from udtimm import config, losses
from udtimm.checkpoint import CheckpointError
from udtimm.class_counts import ClassCounts
from udtimm.config import ConfigError
from udtimm.data.transforms import NormalizeImage, Renormalize
from udtimm.model import ModelOutput, create_model
from udtimm.objectives import (
    CLASSIFICATION_LOSSES,
    DISTILL_METHODS,
    LOSS_SETTINGS,
    DistillationObjective,
    DistillOptions,
    KnowledgeDistillationObjective,
    LossOptions,
    SelfDistillationObjective,
    SupervisedObjective,
    check_teacher,
    unused_loss_settings,
)
from udtimm.settings import ModelSettings


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    target = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    difficult = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False]])
    return torch.randn(3, 3, 32, 32), target, difficult


def test_supervised_objective_is_eq12_with_the_difficult_policy() -> None:
    model = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective("bce", cal=True, cal_weight=0.1, difficult="ignore")(model, images, target, difficult)
    out = model(images)
    mask = ~difficult
    torch.testing.assert_close(terms["bce"], losses.bce_loss(out.logits, target, mask))
    torch.testing.assert_close(terms["partial_softmax"], losses.partial_softmax_loss(out.cal_logits, target, mask))
    torch.testing.assert_close(terms["loss"], terms["bce"] + 0.1 * terms["partial_softmax"])


def test_supervised_terms_match_the_float64_references_of_eq3_eq11_and_eq12() -> None:
    """Eq. 12 = L_b (Eq. 3) + lambda L_ps (Eq. 11), values and gradients, on the edge rows of test_losses.py
    (a sample without positives, one with every pair masked), computed in float32."""
    z, y, m = _edge_batch(seed=2)
    c = torch.randn_like(z)
    zs, cs = z.float().requires_grad_(True), c.float().requires_grad_(True)
    out = ModelOutput(features=torch.zeros(0), logits=zs, cal_logits=cs)
    terms = SupervisedObjective("bce", cal=True, cal_weight=0.25).terms(out, y.float(), m)
    assert set(terms) == {"bce", "partial_softmax", "loss"}
    torch.testing.assert_close(terms["bce"].double(), ref_bce(z, y, m), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["partial_softmax"].double(), ref_partial_softmax(c, y, m), rtol=1e-5, atol=1e-6)
    zr, cr = z.clone().requires_grad_(True), c.clone().requires_grad_(True)
    ref_grads = torch.autograd.grad(ref_bce(zr, y, m) + 0.25 * ref_partial_softmax(cr, y, m), (zr, cr))
    for grad, ref_grad in zip(torch.autograd.grad(terms["loss"], (zs, cs)), ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_an_ignored_pair_changes_neither_term_of_eq12() -> None:
    target = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]])
    difficult = torch.zeros(3, 6, dtype=torch.bool)
    difficult[0, 2] = difficult[1, 3] = True  # one difficult positive, one difficult (stored) negative
    target, mask = losses.apply_label_policies(target, difficult, "ignore")
    objective = SupervisedObjective("bce", cal=True)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return objective.terms(ModelOutput(torch.zeros(0), logits, logits * 2), target, mask)["loss"]

    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    base = loss_of(z)
    (grad,) = torch.autograd.grad(base, z)
    moved = z.detach().clone()
    moved[0, 2] += 7.0
    moved[1, 3] -= 5.0
    assert loss_of(moved).item() == pytest.approx(base.item(), rel=1e-6)
    assert grad[0, 2] == 0 and grad[1, 3] == 0


def test_asl_with_cal_is_asl_plus_lambda_partial_softmax() -> None:
    model = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
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
    model = create_model(ModelSettings("test_resnet"), 4).eval()
    images, target, difficult = batch()
    counts = ClassCounts((30, 3, 0, 60), (60, 60, 60, 60), 60)  # a class never positive: the fallback's case
    objective = SupervisedObjective(loss, options=LossOptions(temperature=2.0, class_counts=counts))
    terms = objective(model, images, target, difficult)
    assert set(terms) == {loss, "loss"} and objective.term_names == (loss,)
    assert torch.equal(terms["loss"], terms[loss]) and terms["loss"].item() > 0  # one term: the loss itself
    assert train.parse_args(["--loss", loss]).loss == loss


@pytest.mark.parametrize("loss", ["db", "db-focal", "cb-bce", "cb-focal"])
def test_a_loss_that_weighs_by_class_counts_refuses_to_start_without_them(loss: str) -> None:
    with pytest.raises(ConfigError, match=f"--loss {loss} weighs by the training split's class counts"):
        SupervisedObjective(loss)


def test_loss_settings_a_loss_does_not_read_are_named() -> None:
    assert set(LOSS_SETTINGS) == {field.name for field in dataclasses.fields(LossOptions)} - {"class_counts"}
    assert unused_loss_settings("db-focal", ["focal_gamma", "db_map_mu", "cb_beta", "asl_clip"]) == ["cb_beta",
                                                                                                    "asl_clip"]
    assert unused_loss_settings("two-way", ["two_way_tp", "focal_gamma"]) == ["focal_gamma"]


def test_loss_options_reach_the_loss() -> None:
    model = create_model(ModelSettings("test_resnet"), 4).eval()
    images, target, difficult = batch()
    terms = SupervisedObjective("temperature", options=LossOptions(temperature=2.0))(model, images, target, difficult)
    target, mask = losses.apply_label_policies(target, difficult, "positive")
    expected = losses.temperature_bce_loss(model(images).logits, target, mask, temperature=2.0)
    torch.testing.assert_close(terms["temperature"], expected)


def test_every_distillation_method_is_a_flag_and_says_what_it_needs() -> None:
    for name, method in DISTILL_METHODS.items():
        assert distill.parse_args(["--teacher-ckpt", "t.safetensors", "--method", name]).method == name
        assert isinstance(method.uses_calibration, bool)


def test_self_distillation_switches_to_its_teacher_once() -> None:
    teacher = create_model(ModelSettings("test_resnet"), 4, cal=True)
    student = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    images, target, difficult = batch()
    built = []
    with_attention = DistillOptions(att_weight=0.5)
    objective = SelfDistillationObjective(SupervisedObjective("bce", cal=True), 2,
                                          lambda: built.append(DistillationObjective(teacher, with_attention))
                                          or built[-1])
    assert objective.term_names == ("bce", "partial_softmax", "kd", "kd_cal", "attention")
    for epoch in range(4):
        objective.start_epoch(epoch)
        terms = objective(student, images, target, difficult)
        assert set(terms) - {"loss"} == ({"bce", "partial_softmax"} if epoch < 2 else {"kd", "kd_cal", "attention"})
    assert len(built) == 1


def test_distillation_terms_follow_eq18_weights() -> None:
    teacher = create_model(ModelSettings("test_resnet"), 4, cal=True)
    student = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    images, target, difficult = batch()
    objective = DistillationObjective(teacher, DistillOptions(dist_weight=0.5, att_weight=0.25))
    terms = objective(student, images, target, difficult)
    assert objective.term_names == ("kd", "kd_cal", "attention")
    torch.testing.assert_close(terms["loss"], terms["kd"] + 0.5 * terms["kd_cal"] + 0.25 * terms["attention"])
    kd = KnowledgeDistillationObjective(teacher, DistillOptions(gt_weight=1.0))
    assert kd.term_names == ("kd", "gt") and set(kd(student, images, target, difficult)) == {"kd", "gt", "loss"}


def test_distill_options_default_to_the_flags_and_reach_the_objective() -> None:
    options = config.settings_from(DistillOptions, distill.parse_args(["--teacher-ckpt", "unused"]))
    assert options == DistillOptions()  # one set of defaults: the flags' and the Python API's agree
    args = distill.parse_args(["--teacher-ckpt", "unused", "--temperature", "2", "--dist-weight", "0.3",
                               "--att-weight", "0", "--gt-weight", "1", "--cal-weight", "0.2"])
    objective = DistillationObjective(create_model(ModelSettings("test_resnet"), 4, cal=True),
                                      config.settings_from(DistillOptions, args))
    assert (objective.temperature, objective.dist_weight, objective.att_weight, objective.gt_weight) == (2, 0.3, 0, 1)
    assert objective.supervised.cal_weight == 0.2 and objective.term_names == ("kd", "kd_cal", "gt")

def test_check_teacher_names_the_difference() -> None:
    metadata = {"class_names": json.dumps(["a", "b", "c"]), "cal": "false"}
    with pytest.raises(CheckpointError, match=r"teacher t\.safetensors .*only in the checkpoint: \['c'\]"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "d"], "kd")
    with pytest.raises(ConfigError, match="calibration branch"):
        check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "ud")
    check_teacher(metadata, "t.safetensors", ["a", "b", "c"], "kd")


def test_the_teacher_sees_the_batch_in_its_own_normalisation() -> None:
    torch.manual_seed(0)
    teacher = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    student_norm, teacher_norm = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    images = NormalizeImage(*student_norm)(pixels)
    objective = DistillationObjective(teacher, DistillOptions(att_weight=0.5),
                                      teacher_input=Renormalize(*student_norm, *teacher_norm))
    logits, cal_logits, maps = objective.teacher_outputs(images)
    expected = teacher(NormalizeImage(*teacher_norm)(pixels), with_attention=True)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cal_logits, expected.cal_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps, expected.attention, rtol=1e-4, atol=1e-5)
    # Without it the teacher would read the student's numbers as its own: other logits.
    unadapted = KnowledgeDistillationObjective(teacher).teacher_outputs(images)[0]
    assert (unadapted - expected.logits).abs().max() > 1e-2


def test_warmup_ramps_alpha_and_beta_from_zero_over_the_distilled_epochs() -> None:
    teacher = create_model(ModelSettings("test_resnet"), 4, cal=True)
    student = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    images, target, difficult = batch()
    objective = DistillationObjective(teacher, DistillOptions(dist_weight=0.5, att_weight=0.25), warmup_epochs=4,
                                      first_epoch=2)
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


def test_unknown_teacher_fills_the_ground_truth_terms_unknown_pairs_with_the_teachers_probability() -> None:
    teacher = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    student = create_model(ModelSettings("test_resnet"), 4, cal=True).eval()
    images, target, difficult = batch()
    target[0, 1] = target[2, 3] = target[1, 0] = -1.0  # two would-be negatives and a positive nobody annotated
    options = DistillOptions(gt_weight=1.0, cal_weight=0.1)
    terms = DistillationObjective(teacher, options, difficult="ignore", unknown="teacher")(student, images, target,
                                                                                           difficult)
    out, teacher_probs = student(images), torch.sigmoid(teacher(images).logits)
    unknown = target < 0
    soft = torch.where(unknown, teacher_probs, target.clamp_min(0))
    known_mask = ~difficult & ~unknown
    expected = losses.bce_loss(out.logits, soft, ~difficult) + 0.1 * losses.partial_softmax_loss(
        out.cal_logits, target.clamp_min(0), known_mask)
    torch.testing.assert_close(terms["gt"], expected)
    # ignore: the unknown pairs leave both terms; the teacher's probability is not used.
    ignored = DistillationObjective(teacher, options, difficult="ignore", unknown="ignore")(student, images, target,
                                                                                            difficult)
    torch.testing.assert_close(ignored["gt"], losses.bce_loss(out.logits, target.clamp_min(0), known_mask) + 0.1 *
                               losses.partial_softmax_loss(out.cal_logits, target.clamp_min(0), known_mask))
    assert not torch.allclose(ignored["gt"], terms["gt"])


def test_unknown_teacher_is_a_distill_flag_that_needs_the_ground_truth_term(capsys) -> None:
    assert distill.parse_args(["--teacher-ckpt", "t.safetensors", "--unknown", "teacher", "--gt-weight", "0.5"])
    with pytest.raises(ConfigError, match="--unknown teacher .* needs --gt-weight > 0"):
        distill.parse_args(["--teacher-ckpt", "t.safetensors", "--unknown", "teacher"])
    with pytest.raises(ConfigError, match="not --self-distill"):
        distill.parse_args(["--self-distill", "--unknown", "teacher", "--gt-weight", "1"])
    with pytest.raises(SystemExit):  # train.py does not offer it: no teacher to fill the labels
        train.parse_args(["--unknown", "teacher"])
    assert "invalid choice: 'teacher'" in capsys.readouterr().err
