"""Training objectives: what one batch costs, as a dict of named loss terms with the total under "loss"."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from udtimm import losses
from udtimm.attention import ATTENTION_VARIANTS, AttentionForm, uncertainty_attention
from udtimm.checkpoint import class_difference
from udtimm.config import ConfigError
from udtimm.model import CalibratedModel, ModelOutput

LOSSES = ("bce", "temperature", "label-smoothing", "one-over-k", "asl")
Objective = Callable[[CalibratedModel, Tensor, Tensor, Tensor], dict[str, Tensor]]


class SupervisedObjective:
    """Eq. 12 (L_b + lambda * L_ps) with --cal, else the chosen classification loss alone (Table 5 baselines).

    Another loss (ASL) takes L_b's place in Eq. 12: L_asl + lambda * L_ps.
    """

    def __init__(self, loss: str = "bce", cal_weight: float = 0.1, difficult: str = "positive",
                 temperature: float = 3.0, asl: tuple[float, float, float] = (4.0, 0.0, 0.05)) -> None:
        if loss not in LOSSES:
            raise ValueError(f"--loss {loss!r} is not one of {LOSSES}")
        self.loss, self.cal_weight, self.difficult, self.temperature = loss, cal_weight, difficult, temperature
        self.asl = asl  # --loss asl: (gamma_neg, gamma_pos, clip)

    def term_names(self, cal: bool) -> tuple[str, ...]:
        return (self.loss, "partial_softmax") if cal else (self.loss,)

    def classification_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        if self.loss == "temperature":
            return losses.temperature_bce_loss(logits, target, mask, temperature=self.temperature)
        if self.loss == "label-smoothing":
            return losses.label_smoothing_loss(logits, target, mask)
        if self.loss == "one-over-k":
            return losses.one_over_k_loss(logits, target, mask)
        if self.loss == "asl":
            gamma_neg, gamma_pos, clip = self.asl
            return losses.asymmetric_loss(logits, target, mask, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
        return losses.bce_loss(logits, target, mask)

    def terms(self, out: ModelOutput, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        terms = {self.loss: self.classification_loss(out.logits, target, mask)}
        total = terms[self.loss]
        if out.cal_logits is not None:
            terms["partial_softmax"] = losses.partial_softmax_loss(out.cal_logits, target, mask)
            total = total + self.cal_weight * terms["partial_softmax"]
        terms["loss"] = total
        return terms

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor) -> dict[str, Tensor]:
        target, mask = losses.apply_difficult_policy(target, difficult, self.difficult)
        return self.terms(model(images), target, mask)


DISTILL_METHODS = ("kd", "ud")


def ud_method(variant: str) -> str:
    """The method column of UD runs with this --att-variant: ud for Eq. 16 as written, else ud-<variant>."""
    return "ud" if variant == "paper" else f"ud-{variant}"


def check_teacher(teacher_metadata: dict[str, str], teacher_path: str, class_names: list[str], method: str) -> None:
    """Refuse, before any training step, a teacher that cannot teach this student (names what differs)."""
    difference = class_difference(json.loads(teacher_metadata["class_names"]), class_names)
    if difference:
        raise ConfigError(f"teacher {teacher_path} was trained on other classes than this dataset ({difference})")
    if method == "ud" and teacher_metadata.get("cal") != "true":
        raise ConfigError(
            f"--method ud needs a teacher with the calibration branch, but {teacher_path} has none: "
            "train the teacher with train.py --cal, or use --method kd"
        )


class DistillationObjective:
    """Eq. 18: L'_b (Eq. 13) + alpha L'_ps (Eq. 14) + beta L_att (Eq. 17), plus an optional ground-truth term.

    `kd` is Eq. 13 alone (the paper's "Ours-KD"); `ud` with beta = 0 is "w/o uncertainty attention" (Table 5).
    The teacher is frozen and in eval mode; `autocast` is the student's mixed-precision context; `teacher_input`
    turns the student's input into the teacher's (Renormalize, when the two were trained with other mean and std).
    """

    def __init__(self, teacher: CalibratedModel, method: str = "ud", temperature: float = 3.0,
                 dist_weight: float = 0.5, att_weight: float = 0.5, gt_weight: float = 0.0,
                 cal_weight: float = 0.1, difficult: str = "positive",
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 teacher_input: Callable[[Tensor], Tensor] | None = None,
                 attention_form: AttentionForm = ATTENTION_VARIANTS["paper"], warmup_epochs: int = 0,
                 first_epoch: int = 0) -> None:
        if method not in DISTILL_METHODS:
            raise ValueError(f"--method {method!r} is not one of {DISTILL_METHODS}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.method, self.temperature = method, temperature
        self.dist_weight, self.att_weight, self.gt_weight = dist_weight, att_weight, gt_weight
        self.supervised = SupervisedObjective("bce", cal_weight, difficult)
        self.autocast = autocast
        self.teacher_input = teacher_input
        self.attention_form = attention_form
        self.warmup_epochs, self.first_epoch = warmup_epochs, first_epoch
        self.ramp = 1.0 if warmup_epochs == 0 else 0.0

    def start_epoch(self, epoch: int) -> None:
        """--distill-warmup-epochs: alpha and beta grow linearly from 0 (at `first_epoch`) to their full value."""
        if self.warmup_epochs > 0:
            self.ramp = min(1.0, max(0, epoch - self.first_epoch) / self.warmup_epochs)

    @property
    def uses_attention(self) -> bool:
        return self.method == "ud" and self.att_weight > 0

    @property
    def term_names(self) -> tuple[str, ...]:
        names = ("kd", "kd_cal", "attention") if self.uses_attention else ("kd", "kd_cal") if self.method == "ud" \
            else ("kd",)
        return (*names, "gt") if self.gt_weight > 0 else names

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

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor) -> dict[str, Tensor]:
        teacher_logits, teacher_cal, teacher_maps = self.teacher_outputs(images)
        out = model(images, with_attention=self.uses_attention, attention_form=self.attention_form)
        terms = {"kd": losses.binary_kd_loss(out.logits, teacher_logits, self.temperature)}
        total = terms["kd"]
        if self.method == "ud":
            terms["kd_cal"] = losses.softmax_kd_loss(out.cal_logits, teacher_cal, self.temperature)
            total = total + self.ramp * self.dist_weight * terms["kd_cal"]
            if self.uses_attention:
                terms["attention"] = losses.attention_distillation_loss(out.attention, teacher_maps)
                total = total + self.ramp * self.att_weight * terms["attention"]
        if self.gt_weight > 0:
            target, mask = losses.apply_difficult_policy(target, difficult, self.supervised.difficult)
            terms["gt"] = self.supervised.terms(out, target, mask)["loss"]
            total = total + self.gt_weight * terms["gt"]
        terms["loss"] = total
        return terms
