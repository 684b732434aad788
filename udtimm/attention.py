"""Uncertainty attention (Eq. 15-16): Grad-CAM of the divergence between a network's two branches.

The gradient dD/dZ is taken through the head only (pooling + the two branches), never the backbone: Z is the
head's input, so the head-only gradient is exactly the one a full backward would deliver at Z, for a fraction
of the cost (docs/method.md, Cost). Eq. 16 as written (`--att-variant paper`) has no ReLU, and
the sign tells where the features raise the divergence and where they lower it; the default `gradcam` variant holds
the student's channel weights as constants and keeps the positive part, which the digits benchmark chose
(docs/distillation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # model.py imports this module to build the map inside forward
    from udtimm.model import CalibratedModel


@dataclass(frozen=True)
class AttentionForm:
    """How Eq. 16's map is built (--att-variant); teacher and student maps are built the same way."""

    weights_in_graph: bool = True  # the student's w_c keep their graph, so Eq. 17 also trains through dD/dZ
    relu: bool = False  # Grad-CAM's ReLU on the map: only where the features raise the divergence


# paper: Eq. 16 as written. const-weights: w_c held as constants (Grad-CAM practice), Eq. 17 trains through Z
# only, which drops the second-order terms. gradcam: constants and the ReLU of Grad-CAM.
ATTENTION_VARIANTS = {
    "paper": AttentionForm(),
    "const-weights": AttentionForm(weights_in_graph=False),
    "gradcam": AttentionForm(weights_in_graph=False, relu=True),
}
# Chosen by the digits benchmark (docs/distillation.md); hparams/ keeps "paper" for the paper's tables. The one
# default: distill.py's --att-variant and the Python API (uncertainty_attention, CalibratedModel, the objectives).
DEFAULT_VARIANT = "gradcam"
DEFAULT_FORM = ATTENTION_VARIANTS[DEFAULT_VARIANT]

# Token-model pools that give no usable map, and why. timm's 'map' attention pooling does attend over the patch
# tokens and gives a usable map, as do 'avg', 'max' and 'avgmax'.
_UNUSABLE_POOLS = {
    "token": "reads only the class token, so the gradient of the branch divergence is zero on every patch "
    "token and the uncertainty attention map is identically zero",
    "": "does not pool the tokens and classifies each one separately, so there is no per-image divergence",
}


def uncertainty_per_class(logits: Tensor, cal_logits: Tensor) -> Tensor:
    """Eq. 15's divergence split per label [B, C]: softmax(c)_k * (log softmax(c)_k - log softmax(z)_k)."""
    log_cal = torch.log_softmax(cal_logits.float(), dim=1)
    log_cls = torch.log_softmax(logits.float(), dim=1)
    return log_cal.exp() * (log_cal - log_cls)


def branch_divergence(logits: Tensor, cal_logits: Tensor) -> Tensor:
    """Eq. 15's D per sample [B]: KL(softmax(cal_logits) || softmax(logits)), in float32."""
    return uncertainty_per_class(logits, cal_logits).sum(dim=1)


def uncertainty_attention(
    model: CalibratedModel,
    features: Tensor,
    create_graph: bool,
    head_outputs: tuple[Tensor, Tensor] | None = None,
    form: AttentionForm = DEFAULT_FORM,
) -> Tensor:
    """Eq. 15-16: A_hw = sum_c w_c Z_chw with w_c = sum_hw dD/dZ_chw, D summed over the batch; [B, H, W] float32.

    Teacher: `create_graph=False`; the map is detached and the call works inside `torch.no_grad()`.
    Student: `create_graph=True` with the features of its own forward, so a loss on the map trains the student
    through both w and Z. `head_outputs` (student only; the teacher path ignores it) = the (logits, cal_logits)
    that `features` already produced with a graph: the divergence is then taken from them instead of a second
    head forward, which saves that forward and keeps a train-mode head from updating its BatchNorm statistics
    twice or drawing new dropout masks. In train mode the calibration branch's BatchNorm mixes the samples of
    the batch, so a sample's map also carries the other samples' divergence -- as a whole-network Grad-CAM of
    the summed D does. `form` (AttentionForm) holds the student's w_c as constants or applies a ReLU.
    """
    with torch.enable_grad():
        if create_graph:
            z = features
        else:
            z = features.detach().requires_grad_(True)
            head_outputs = None  # they belong to a graph that does not start at the detached copy
        logits, cal_logits = head_outputs if head_outputs is not None else model.forward_head(z)
        if cal_logits is None:
            raise ValueError("uncertainty attention needs a model with the calibration branch (--cal)")
        divergence = branch_divergence(logits, cal_logits).sum()
        second_order = create_graph and form.weights_in_graph
        # Constant weights need no graph of the gradient, but the head's graph stays for the losses on its outputs.
        (grad,) = torch.autograd.grad(divergence, z, create_graph=second_order, retain_graph=create_graph)
    if not create_graph:
        z = z.detach()
    weights = model.feature_grid(grad).float().sum(dim=(2, 3), keepdim=True)
    maps = (weights * model.feature_grid(z).float()).sum(dim=1)
    return torch.relu(maps) if form.relu else maps


def check_attention_support(model: CalibratedModel) -> None:
    """Raise ValueError for a model whose uncertainty attention map would be identically zero or misread.

    Refused: a model without the calibration branch (there is no D); a token model whose head reads the class
    token only (`global_pool` 'token', the timm ViT/DeiT default: the head never sees the patch tokens, so dD/dZ
    is zero on every grid position; a spatial head reads them, and is accepted with it) or pools nothing ('': logits
    per token); and channels-last (NHWC) feature maps (Swin, MambaOut), which `CalibratedModel.feature_grid` would
    read as NCHW. Average, max and 'map' attention pooling all see the patch tokens and are accepted.
    """
    if not model.has_cal:
        raise ValueError(
            "uncertainty attention compares the classification and calibration branches (Eq. 15), but this "
            "model has no calibration branch: build (or train) it with --cal"
        )
    backbone = model.backbone
    # Transformers name their pool with a string; CNNs hold a pooling module, which always sees every position.
    pool = getattr(backbone, "global_pool", None)
    spatial_head_reads_patches = pool == "token" and model.head is not None
    if isinstance(pool, str) and pool in _UNUSABLE_POOLS and not spatial_head_reads_patches:
        raise ValueError(
            f"{type(backbone).__name__} with global_pool={pool!r}: its head {_UNUSABLE_POOLS[pool]}. "
            "Build the model with --global-pool avg (or max / map) to use uncertainty attention."
        )
    if getattr(backbone, "output_fmt", "NCHW") != "NCHW":
        raise ValueError(
            f"{type(backbone).__name__} returns {backbone.output_fmt} feature maps; uncertainty attention "
            "reads the feature map as NCHW, so this backbone is not supported for --method ud"
        )
