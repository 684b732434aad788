"""Training objectives: what one batch costs, as a dict of named loss terms with the total under "loss"."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from udtimm import losses
from udtimm.attention import DEFAULT_FORM, AttentionForm, uncertainty_attention
from udtimm.checkpoint import check_classes
from udtimm.class_counts import ClassCounts
from udtimm.errors import ConfigError
from udtimm.mixing import Mix
from udtimm.model import CalibratedModel, ModelOutput

LossFunction = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, target, mask) -> scalar


@dataclass(frozen=True)
class LossOptions:
    """The classification losses' own settings (train.py's flags)."""

    temperature: float = 3.0  # --temperature
    asl_gamma_neg: float = 4.0  # --asl-gamma-neg
    asl_gamma_pos: float = 0.0  # --asl-gamma-pos
    asl_clip: float = 0.05  # --asl-clip
    # Distribution-Balanced loss (Wu et al. 2020; the official COCO-LT config's values): the re-balancing map
    # alpha + sigmoid(beta (r - mu)), the negatives' logit scale lambda and the bias factor kappa.
    db_map_alpha: float = 0.1  # --db-map-alpha
    db_map_beta: float = 10.0  # --db-map-beta
    db_map_mu: float = 0.2  # --db-map-mu
    db_neg_scale: float = 2.0  # --db-neg-scale
    db_bias_factor: float = 0.05  # --db-bias-factor
    cb_beta: float = 0.9999  # --cb-beta: class-balanced weights (1 - beta) / (1 - beta^n) (Cui et al. 2019)
    focal_gamma: float = 2.0  # --focal-gamma: db-focal and cb-focal
    two_way_tp: float = 4.0  # --two-way-tp: temperature of the positives (Kobayashi 2023)
    two_way_tn: float = 1.0  # --two-way-tn: temperature of the negatives
    class_counts: ClassCounts | None = None  # the training split's (no flag): what db and cb weigh by


@dataclass(frozen=True)
class DistillOptions:
    """The weights of Eq. 18 and its optional ground-truth term (distill.py's flags)."""

    temperature: float = 3.0  # --temperature: T of Eq. 13-14
    dist_weight: float = 0.5  # --dist-weight: alpha, the weight of Eq. 14
    att_weight: float = 0.0  # --att-weight: beta, the weight of Eq. 17 (0: UD without attention, distill.py's default)
    att_distance: str = "norm"  # --att-distance: Eq. 17's norm as written, or its square
    gt_weight: float = 0.0  # --gt-weight: the weight of a ground-truth L_b + lambda L_ps
    cal_weight: float = 0.1  # --cal-weight: lambda of that ground-truth term


# Adding a classification loss: its function in losses.py, and one line here (name -> the loss, given the options).
CLASSIFICATION_LOSSES: dict[str, Callable[[LossOptions], LossFunction]] = {
    "bce": lambda options: losses.bce_loss,
    "temperature": lambda options: partial(losses.temperature_bce_loss, temperature=options.temperature),
    "label-smoothing": lambda options: losses.label_smoothing_loss,
    "one-over-k": lambda options: losses.one_over_k_loss,
    "asl": lambda options: partial(losses.asymmetric_loss, gamma_neg=options.asl_gamma_neg,
                                   gamma_pos=options.asl_gamma_pos, clip=options.asl_clip),
    "db": lambda options: distribution_balanced(options, "db", focal_gamma=0.0, focal_scale=1.0),
    # The official DB-focal config's focal term: (1 - p_t)^gamma, times 2.
    "db-focal": lambda options: distribution_balanced(options, "db-focal", focal_gamma=options.focal_gamma,
                                                      focal_scale=2.0),
    "cb-bce": lambda options: partial(losses.class_balanced_loss, positives=loss_counts(options, "cb-bce")[0],
                                      beta=options.cb_beta, focal_gamma=0.0),
    "cb-focal": lambda options: partial(losses.class_balanced_loss, positives=loss_counts(options, "cb-focal")[0],
                                        beta=options.cb_beta, focal_gamma=options.focal_gamma),
    "two-way": lambda options: partial(losses.two_way_loss, positive_temperature=options.two_way_tp,
                                       negative_temperature=options.two_way_tn),
}
_DB, _CB = ("db", "db-focal"), ("cb-bce", "cb-focal")
# Each loss setting (LossOptions' flags) and the losses that read it: any other --loss leaves it unused.
LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",), "asl_gamma_neg": ("asl",), "asl_gamma_pos": ("asl",), "asl_clip": ("asl",),
    "db_map_alpha": _DB, "db_map_beta": _DB, "db_map_mu": _DB, "db_neg_scale": _DB, "db_bias_factor": _DB,
    "cb_beta": _CB, "focal_gamma": ("db-focal", "cb-focal"), "two_way_tp": ("two-way",), "two_way_tn": ("two-way",),
}


def unused_loss_settings(loss: str, changed: list[str]) -> list[str]:
    """The settings among `changed` (LossOptions' names) that --loss `loss` does not read."""
    return [name for name in changed if loss not in LOSS_SETTINGS[name]]


def loss_counts(options: LossOptions, loss: str) -> tuple[Tensor, Tensor]:
    """(positives, annotated) per class for a re-balanced loss, with ClassCounts' fallback for empty classes."""
    if options.class_counts is None:
        raise ConfigError(f"--loss {loss} weighs by the training split's class counts, and none were given")
    return options.class_counts.loss_tensors()


def distribution_balanced(options: LossOptions, loss: str, focal_gamma: float, focal_scale: float) -> LossFunction:
    """--loss db or db-focal with the run's settings and counts."""
    positives, annotated = loss_counts(options, loss)
    return partial(losses.distribution_balanced_loss, positives=positives, annotated=annotated,
                   map_alpha=options.db_map_alpha, map_beta=options.db_map_beta, map_mu=options.db_map_mu,
                   neg_scale=options.db_neg_scale, bias_factor=options.db_bias_factor, focal_gamma=focal_gamma,
                   focal_scale=focal_scale)


class Objective(Protocol):
    """What one batch costs: named loss terms, the total under "loss"; `term_names` are the train_* columns of
    summary.csv, fixed for the whole run; `start_epoch` lets an objective change over the epochs. With `mix`
    (--mixup, --cutmix) the images are mixed already, and the labels are to be mixed with it."""

    term_names: tuple[str, ...]

    def start_epoch(self, epoch: int) -> None: ...

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor,
                 mix: Mix | None = None) -> dict[str, Tensor]: ...


class SupervisedObjective:
    """Eq. 12 (L_b + lambda * L_ps) with `cal`, else the chosen classification loss alone (Table 5 baselines).

    Another loss (ASL) takes L_b's place in Eq. 12: L_asl + lambda * L_ps.
    """

    def __init__(self, loss: str = "bce", cal: bool = False, cal_weight: float = 0.1, difficult: str = "positive",
                 options: LossOptions = LossOptions(), unknown: str = "ignore") -> None:
        if loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"--loss {loss!r} is not one of {tuple(CLASSIFICATION_LOSSES)}")
        self.loss, self.cal_weight, self.difficult, self.unknown = loss, cal_weight, difficult, unknown
        self.classification_loss = CLASSIFICATION_LOSSES[loss](options)
        self.term_names = (loss, "partial_softmax") if cal else (loss,)

    def start_epoch(self, epoch: int) -> None:
        pass

    def terms(self, out: ModelOutput, target: Tensor, mask: Tensor,
              cal_target: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """The loss terms on (target, mask); PAL-N reads `cal_target` (its own target and mask) when given."""
        terms = {self.loss: self.classification_loss(out.logits, target, mask)}
        total = terms[self.loss]
        if out.cal_logits is not None:
            terms["partial_softmax"] = losses.partial_softmax_loss(out.cal_logits, *(cal_target or (target, mask)))
            total = total + self.cal_weight * terms["partial_softmax"]
        terms["loss"] = total
        return terms

    def labels(self, target: Tensor, difficult: Tensor, mix: Mix | None = None) -> tuple[Tensor, Tensor]:
        """(target, mask) of a batch under --difficult and --unknown, image by image, then mixed as the images were
        (docs/method.md#mixup-and-cutmix)."""
        target, mask = losses.apply_label_policies(target, difficult, self.difficult, self.unknown)
        return (target, mask) if mix is None else mix.labels(target, mask)

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor,
                 mix: Mix | None = None) -> dict[str, Tensor]:
        return self.terms(model(images), *self.labels(target, difficult, mix))


def ud_method(variant: str) -> str:
    """The method column of UD runs with this --att-variant: ud for Eq. 16 as written, else ud-<variant>."""
    return "ud" if variant == "paper" else f"ud-{variant}"


def check_teacher(teacher_metadata: dict[str, str], teacher_path: str, class_names: list[str], method: str) -> None:
    """Refuse, before any training step, a teacher that cannot teach this student (names what differs)."""
    check_classes(f"teacher {teacher_path}", json.loads(teacher_metadata["class_names"]), class_names,
                  "this dataset")
    if DISTILL_METHODS[method].uses_calibration and teacher_metadata.get("cal") != "true":
        raise ConfigError(
            f"--method {method} needs a teacher with the calibration branch, but {teacher_path} has none: "
            "train the teacher with train.py --cal, or use --method kd"
        )


class DistillationObjective:
    """Eq. 18: L'_b (Eq. 13) + alpha L'_ps (Eq. 14) + beta L_att (Eq. 17), plus an optional ground-truth term.

    This is `--method ud`; with beta = 0 it is "w/o uncertainty attention" (Table 5). The teacher is frozen and in
    eval mode; `autocast` is the student's mixed-precision context; `teacher_input` turns the student's input into
    the teacher's (Renormalize, when the two were trained with other mean and std).
    """

    uses_calibration = True  # teacher and student need the calibration branch (Eq. 14, 17)

    def __init__(self, teacher: CalibratedModel, options: DistillOptions = DistillOptions(),
                 difficult: str = "positive", autocast: Callable[[], AbstractContextManager] = nullcontext,
                 teacher_input: Callable[[Tensor], Tensor] | None = None,
                 attention_form: AttentionForm = DEFAULT_FORM, warmup_epochs: int = 0,
                 first_epoch: int = 0, unknown: str = "ignore") -> None:
        # unknown="teacher": the ground-truth term's unknown pairs take the teacher's probability as their target.
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = options.temperature
        self.dist_weight, self.att_weight, self.gt_weight = options.dist_weight, options.att_weight, options.gt_weight
        self.att_distance = options.att_distance
        self.unknown = unknown
        labels_unknown = "ignore" if unknown == "teacher" else unknown  # the labels' part of the ground-truth term
        self.supervised = SupervisedObjective("bce", cal=self.uses_calibration, cal_weight=options.cal_weight,
                                              difficult=difficult, unknown=labels_unknown)
        self.autocast = autocast
        self.teacher_input = teacher_input
        self.attention_form = attention_form
        self.warmup_epochs, self.first_epoch = warmup_epochs, first_epoch
        self.ramp = 1.0 if warmup_epochs == 0 else 0.0
        self.uses_attention = self.uses_calibration and self.att_weight > 0
        names = ("kd", "kd_cal", "attention") if self.uses_attention else ("kd", "kd_cal") \
            if self.uses_calibration else ("kd",)
        self.term_names = (*names, "gt") if self.gt_weight > 0 else names

    def start_epoch(self, epoch: int) -> None:
        """--distill-warmup-epochs: alpha and beta grow linearly from 0 (at `first_epoch`) to their full value."""
        if self.warmup_epochs > 0:
            self.ramp = min(1.0, max(0, epoch - self.first_epoch) / self.warmup_epochs)

    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        with torch.no_grad(), self.autocast():
            if self.teacher_input is not None:
                images = self.teacher_input(images)
            features = self.teacher.forward_features(images)
            logits, cal_logits = self.teacher.forward_head(features)
            # Head-only gradient, no graph: the teacher map costs one small backward through the head.
            maps = uncertainty_attention(self.teacher, features, create_graph=False, form=self.attention_form) \
                if self.uses_attention else None
        return logits, cal_logits, maps

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor,
                 mix: Mix | None = None) -> dict[str, Tensor]:
        teacher_logits, teacher_cal, teacher_maps = self.teacher_outputs(images)
        out = model(images, with_attention=self.uses_attention, attention_form=self.attention_form)
        terms = {"kd": losses.binary_kd_loss(out.logits, teacher_logits, self.temperature)}
        total = terms["kd"]
        if self.uses_calibration:
            terms["kd_cal"] = losses.softmax_kd_loss(out.cal_logits, teacher_cal, self.temperature)
            total = total + self.ramp * self.dist_weight * terms["kd_cal"]
            if self.uses_attention:
                terms["attention"] = losses.attention_distillation_loss(out.attention, teacher_maps, self.att_distance)
                total = total + self.ramp * self.att_weight * terms["attention"]
        if self.gt_weight > 0:
            hard, mask = self.supervised.labels(target, difficult, mix)
            if self.unknown == "teacher":
                # Known pairs keep their labels; an unknown pair's target is the teacher's probability. PAL-N reads
                # the known positives only (docs/method.md#unknown-labels-and-the-teacher). Mixed, a pair unknown in
                # either image is unknown.
                not_annotated = target < 0 if mix is None else mix.in_either(target < 0)
                soft = torch.where(not_annotated, torch.sigmoid(teacher_logits.detach().float()), hard)
                terms["gt"] = self.supervised.terms(out, soft, mask | not_annotated, cal_target=(hard, mask))["loss"]
            else:
                terms["gt"] = self.supervised.terms(out, hard, mask)["loss"]
            total = total + self.gt_weight * terms["gt"]
        terms["loss"] = total
        return terms


class KnowledgeDistillationObjective(DistillationObjective):
    """Eq. 13 alone (the paper's "Ours-KD"): the classification branch learns the teacher's; no calibration branch."""

    uses_calibration = False


# Adding a distillation method: its objective class here (DistillationObjective's constructor), and one line.
DISTILL_METHODS: dict[str, type[DistillationObjective]] = {
    "kd": KnowledgeDistillationObjective,
    "ud": DistillationObjective,
}


class SelfDistillationObjective:
    """Self-distillation (Table 4): the labels teach the first epochs; from `switch_epoch` on, the network's best
    checkpoint so far teaches it by Eq. 18 (`make_distillation` builds that objective when the time comes)."""

    def __init__(self, supervised: SupervisedObjective, switch_epoch: int,
                 make_distillation: Callable[[], DistillationObjective]) -> None:
        self.supervised, self.switch_epoch, self.make_distillation = supervised, switch_epoch, make_distillation
        self.current: Objective = supervised
        self.term_names = (*supervised.term_names, "kd", "kd_cal", "attention")

    def start_epoch(self, epoch: int) -> None:
        if epoch >= self.switch_epoch and self.current is self.supervised:
            self.current = self.make_distillation()
        self.current.start_epoch(epoch)

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor,
                 mix: Mix | None = None) -> dict[str, Tensor]:
        return self.current(model, images, target, difficult, mix)
