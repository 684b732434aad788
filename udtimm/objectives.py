"""Training objectives: what one batch costs, as a dict of named loss terms with the total under "loss"."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from udtimm import losses
from udtimm.model import CalibratedModel

LOSSES = ("bce", "temperature", "label-smoothing", "one-over-k")
Objective = Callable[[CalibratedModel, Tensor, Tensor, Tensor], dict[str, Tensor]]


class SupervisedObjective:
    """Eq. 12 (L_b + lambda * L_ps) with --cal, else the chosen classification loss alone (Table 5 baselines)."""

    def __init__(self, loss: str = "bce", cal_weight: float = 0.1, difficult: str = "positive",
                 temperature: float = 3.0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"--loss {loss!r} is not one of {LOSSES}")
        self.loss, self.cal_weight, self.difficult, self.temperature = loss, cal_weight, difficult, temperature

    def classification_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        if self.loss == "temperature":
            return losses.temperature_bce_loss(logits, target, mask, temperature=self.temperature)
        if self.loss == "label-smoothing":
            return losses.label_smoothing_loss(logits, target, mask)
        if self.loss == "one-over-k":
            return losses.one_over_k_loss(logits, target, mask)
        return losses.bce_loss(logits, target, mask)

    def __call__(self, model: CalibratedModel, images: Tensor, target: Tensor, difficult: Tensor) -> dict[str, Tensor]:
        out = model(images)
        target, mask = losses.apply_difficult_policy(target, difficult, self.difficult)
        terms = {self.loss: self.classification_loss(out.logits, target, mask)}
        total = terms[self.loss]
        if out.cal_logits is not None:
            terms["partial_softmax"] = losses.partial_softmax_loss(out.cal_logits, target, mask)
            total = total + self.cal_weight * terms["partial_softmax"]
        terms["loss"] = total
        return terms
