"""optimization.py: timm's optimizer and schedule as the flags set them, counted in optimizer steps."""

import warnings
from collections import Counter

import pytest
import torch
from timm.optim import create_optimizer_v2

import distill
import train
from udtimm import config, optimization
from udtimm.engine import optimizer_steps
from udtimm.errors import ConfigError
from udtimm.model import CalibratedModel, create_model
from udtimm.settings import ModelSettings, OptimSettings


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


# --head-lr-mult: the classifier (timm's or the spatial head, and the calibration branch) at M x the backbone's rate.
TINY_HEADS = {"linear": {}, "csra": {"num_heads": 2},
              "ml-decoder": {"embed_dim": 8, "num_heads": 2, "ff_dim": 8, "num_groups": 2}}
CLASSIFIER_PREFIXES = {"linear": ("backbone.fc.",), "csra": ("head.",), "ml-decoder": ("head.",)}


def optim_settings(*flags: str) -> OptimSettings:
    return config.training_settings(train.parse_args(list(flags))).optim


def tiny_model(head: str = "linear", cal: bool = False) -> CalibratedModel:
    return create_model(ModelSettings("test_resnet", head=head, head_kwargs=TINY_HEADS[head]), 3, cal=cal)


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """Each parameter's group, by the parameter's id."""
    return {id(param): group for group in optimizer.param_groups for param in group["params"]}


def test_the_flag_reaches_the_optimisation_settings_of_both_scripts() -> None:
    assert optim_settings().head_lr_mult == 1.0
    assert optim_settings("--head-lr-mult", "10").head_lr_mult == 10.0
    args = distill.parse_args(["--self-distill", "--head-lr-mult", "2.5"])
    assert config.training_settings(args).optim.head_lr_mult == 2.5


@pytest.mark.parametrize("cal", [False, True], ids=["plain", "cal"])
@pytest.mark.parametrize("head", list(TINY_HEADS))
def test_the_classifier_trains_at_m_times_the_rate_and_every_parameter_is_in_one_group(head: str, cal: bool) -> None:
    model = tiny_model(head, cal)
    optimizer, _ = optimization.build_optimization(
        optim_settings("--head-lr-mult", "10", "--lr", "0.1", "--warmup-epochs", "0"), model, batches_per_epoch=4)
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    assert Counter(id(param) for group in optimizer.param_groups for param in group["params"]) \
        == Counter(id(param) for _, param in trainable)  # each trainable parameter exactly once
    groups = group_of(optimizer)
    prefixes = CLASSIFIER_PREFIXES[head] + (("cal_head.",) if cal else ())
    for name, param in trainable:
        rate = 1.0 if name.startswith(prefixes) else 0.1
        assert groups[id(param)]["lr"] == pytest.approx(rate), name
        assert groups[id(param)]["weight_decay"] == (0.0 if param.ndim <= 1 or name.endswith(".bias") else 0.05), name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # group 0, summary.csv's lr: the backbone's
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    assert scales == sorted(scales) and set(scales) == {1.0, 10.0}  # the backbone's groups first, then the classifier's


def test_m_1_builds_the_optimizer_of_before() -> None:
    model = tiny_model("csra", cal=True)
    settings = optim_settings("--lr", "0.1")
    optimizer, _ = optimization.build_optimization(settings, model, batches_per_epoch=4)
    before = create_optimizer_v2(model, opt=settings.opt, lr=settings.lr, weight_decay=settings.weight_decay,
                                 momentum=settings.momentum)
    assert [[id(param) for param in group["params"]] for group in optimizer.param_groups] \
        == [[id(param) for param in group["params"]] for group in before.param_groups]
    def settings_of(groups: list[dict]) -> list[dict]:
        return [{key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}
                for group in groups]

    assert settings_of(optimizer.param_groups) == settings_of(before.param_groups)
    assert [group["initial_lr"] for group in optimizer.param_groups] == [0.1, 0.1]  # timm's two groups, no lr_scale


def test_the_split_keeps_timms_weight_decay_rule_no_weight_decay_included() -> None:
    model = tiny_model("linear", cal=True)
    model.no_weight_decay = lambda: {"backbone.conv1.*", "cal_head.0.weight"}  # timm reads it from the model
    decays = [{param: group["weight_decay"] for param, group in group_of(optimization.build_optimization(
        optim_settings("--head-lr-mult", mult), model, batches_per_epoch=4)[0]).items()} for mult in ("1", "10")]
    assert decays[0] == decays[1]
    assert decays[1][id(model.backbone.conv1[0].weight)] == decays[1][id(model.cal_head[0].weight)] == 0.0
    assert decays[1][id(model.cal_head[3].weight)] == 0.05


@pytest.mark.parametrize("sched", ["cosine", "step"])
def test_the_ratio_holds_at_every_step_of_warm_up_decay_and_floor(sched: str) -> None:
    """The classifier's rate is M x the backbone's from the first warm-up step to the --min-lr floor (where the
    classifier's floor is M x --min-lr), and the backbone keeps the schedule of M = 1."""
    flags = ["--epochs", "4", "--warmup-epochs", "1", "--lr", "0.1", "--warmup-lr", "0.001", "--min-lr", "0.002",
             "--sched", sched, "--decay-epochs", "1", "--decay-rate", "0.5"]
    runs = []
    for mult in ("1", "10"):
        optimizer, scheduler = optimization.build_optimization(optim_settings(*flags, "--head-lr-mult", mult),
                                                               tiny_model(cal=True), batches_per_epoch=5)
        rates = []
        for update in range(25):  # 20 updates, then past the end: the floor
            rates.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step_update(update + 1)
        runs.append(rates)
    for plain, split in zip(*runs, strict=True):
        backbone, classifier = split[:2], split[2:]
        assert backbone == pytest.approx(plain)
        assert classifier == pytest.approx([10 * rate for rate in backbone])
    assert runs[1][0] == pytest.approx([0.001, 0.001, 0.01, 0.01])  # the warm-up starts at M x --warmup-lr
    if sched == "cosine":
        assert runs[1][-1] == pytest.approx([0.002, 0.002, 0.02, 0.02])  # the floor: M x --min-lr


def test_a_multiplier_that_cannot_do_what_it_says_is_refused() -> None:
    def build(model: torch.nn.Module, mult: str = "10") -> None:
        optimization.build_optimization(optim_settings("--head-lr-mult", mult), model, batches_per_epoch=4)

    for mult in ("0", "-1"):
        with pytest.raises(ConfigError, match=f"--head-lr-mult {mult}: .* must be positive"):
            build(tiny_model(), mult)
    no_classifier = tiny_model()
    no_classifier.backbone.reset_classifier(0)  # an Identity: nothing to train at another rate
    with pytest.raises(ConfigError, match=r"--head-lr-mult 10: the classifier \(--head linear\) has no trainable"):
        build(no_classifier)
    frozen_head = tiny_model("csra", cal=True)
    frozen_head.head.requires_grad_(False)
    frozen_head.cal_head.requires_grad_(False)
    with pytest.raises(ConfigError, match="--head csra and the calibration branch"):
        build(frozen_head)
    frozen_backbone = tiny_model()
    for name, param in frozen_backbone.named_parameters():
        param.requires_grad_(name.startswith("backbone.fc."))
    with pytest.raises(ConfigError, match="--head-lr-mult 10: the backbone has no trainable parameters"):
        build(frozen_backbone)
    with pytest.raises(ConfigError, match="--head-lr-mult needs udtimm's CalibratedModel"):
        build(torch.nn.Linear(2, 2))
