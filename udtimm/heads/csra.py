"""CSRA, class-specific residual attention (Zhu and Wu, "Residual Attention: A Simple but Effective Method for
Multi-Label Recognition", ICCV 2021, arXiv 2108.02456), as its official code computes it
(github.com/Kevinz-code/CSRA, pipeline/csra.py):

- class scores s_c(l) at every location l of the feature map by a 1x1 convolution without bias, each class's
  scores divided by the norm of its weight vector; here the same map as a Linear layer over the tokens [B, L, C],
  which reads CNN feature maps, NHWC maps and ViT patch tokens alike;
- logit_c = mean_l s_c(l) + lam * sum_l softmax_l(T s_c(l)) s_c(l): the average-pooled score plus lam times the
  score pooled by a class-specific softmax attention of temperature T; T = inf is max pooling (the official code
  writes it 99);
- H heads, each with its own classifier and temperature, add up; the official code's temperatures for H = 1, 2, 4,
  6, 8 are in TEMPERATURES.

Defaults: one head, T = 1, lam = 0.1, the official command for VOC2007 (ResNet-101). For COCO (ResNet-101) its
README gives 4 heads and lam = 0.5 (`--head-kwargs num_heads=4 lam=0.5`; the command beside it says 6 heads), and
its ViTs use lam = 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TEMPERATURES = {1: (1.0,), 2: (1.0, math.inf), 4: (1.0, 2.0, 4.0, math.inf), 6: (1.0, 2.0, 3.0, 4.0, 5.0, math.inf),
                8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf)}


class CSRAHead(nn.Module):
    """CSRA: average-pooled class scores plus lam times their class-specific attention pooling, per head."""

    name = "csra"

    def __init__(self, in_features: int, num_classes: int, lam: float = 0.1, num_heads: int = 1,
                 temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        if temperatures is None:
            if num_heads not in TEMPERATURES:
                raise ValueError(f"CSRA's code sets the temperatures of {', '.join(map(str, TEMPERATURES))} heads, "
                                 f"not {num_heads}: give temperatures=[T1, ...] (.inf: max pooling)")
            temperatures = TEMPERATURES[num_heads]
        if len(temperatures) != num_heads or not all(float(value) > 0 for value in temperatures):
            raise ValueError(f"temperatures {list(temperatures)} must be {num_heads} (num_heads) positive numbers")
        self.lam = float(lam)
        self.temperatures = tuple(float(value) for value in temperatures)
        self.classifiers = nn.ModuleList(nn.Linear(in_features, num_classes, bias=False) for _ in self.temperatures)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, num_classes] of the tokens [B, L, in_features]: the sum of the heads'."""
        return sum(self.lam * attention_pooled(scores, temperature) + scores.mean(dim=1)
                   for scores, temperature in zip(self.class_scores(tokens), self.temperatures, strict=True))

    def class_scores(self, tokens: Tensor) -> list[Tensor]:
        """Each head's class scores [B, L, classes], divided by the norm of the class's weight vector."""
        return [F.linear(tokens, head.weight / head.weight.norm(dim=1, keepdim=True)) for head in self.classifiers]


def attention_pooled(scores: Tensor, temperature: float) -> Tensor:
    """sum_l softmax_l(T s(l)) s(l) over the locations (dim 1) of scores [B, L, classes]; T = inf: max_l s(l)."""
    if math.isinf(temperature):
        return scores.amax(dim=1)
    return (torch.softmax(scores * temperature, dim=1) * scores).sum(dim=1)
