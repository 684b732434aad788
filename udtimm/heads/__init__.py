"""Classification heads (--head): the registry, and the backbone's last feature map as the tokens a head reads.

`linear` is the backbone's own timm classifier on the pooled features, and has no module here: checkpoints, the
`--format timm` export and everything written before the heads existed keep it. Every other head is a *spatial*
head, registered in HEADS in one line: a module with a class attribute `name` (its --head), built as
`Head(in_features, num_classes, **options)`, whose forward takes the spatial tokens [B, L, C] of the last feature map
(spatial_tokens) and returns logits [B, num_classes]. Its options are --head-kwargs, stored in the checkpoint.
docs/method.md#classification-heads says what each computes and why.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from udtimm.errors import HeadConfigError
from udtimm.heads.csra import CSRAHead
from udtimm.heads.ml_decoder import MLDecoderHead

LINEAR = "linear"
HEAD_PREFIX = "head."  # the state-dict prefix of a spatial head in CalibratedModel and SpatialClassifier
HEADS: dict[str, type[nn.Module]] = {
    MLDecoderHead.name: MLDecoderHead,
    CSRAHead.name: CSRAHead,
}
HEAD_NAMES = (LINEAR, *HEADS)


def head_suffix(name: str) -> str:
    """What --head adds to the method column of results.csv (+ml-decoder, +csra), so the report keeps heads apart."""
    return "" if name == LINEAR else f"+{name}"


def head_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option of head `name`: its defaults, updated with `options` (--head-kwargs); refuses unknown keys."""
    options = dict(options or {})
    if name == LINEAR:
        if options:
            raise HeadConfigError(f"--head-kwargs {options}: the linear head (timm's classifier) takes none")
        return {}
    if name not in HEADS:
        raise HeadConfigError(f"unknown --head {name!r}: choose one of {', '.join(HEAD_NAMES)}")
    parameters = list(inspect.signature(HEADS[name].__init__).parameters.values())[3:]  # self, in_features, classes
    defaults = {parameter.name: parameter.default for parameter in parameters}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise HeadConfigError(f"--head-kwargs {unknown}: the {name} head takes {', '.join(defaults)}")
    return {**defaults, **options}


def create_head(name: str, in_features: int, num_classes: int, **options: Any) -> nn.Module:
    """The spatial head `name` over `in_features` channels; `options` as head_options returns them."""
    try:
        return HEADS[name](in_features, num_classes, **options)
    except (TypeError, ValueError) as err:
        raise HeadConfigError(f"--head {name} with --head-kwargs {options}: {err}") from err


def spatial_tokens(backbone: nn.Module, features: Tensor) -> Tensor:
    """The backbone's last feature map as tokens [B, L, C]: NCHW maps flattened over H x W, NHWC ones (Swin) too,
    and token features [B, N, D] without their prefix (class, register) tokens."""
    if features.ndim == 3:
        return features[:, int(getattr(backbone, "num_prefix_tokens", 0) or 0):]
    if features.ndim != 4:
        raise ValueError(f"a spatial head needs a feature map or tokens, got features of shape {tuple(features.shape)}")
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
        return features.flatten(1, 2)
    return features.flatten(2).transpose(1, 2)


class SpatialClassifier(nn.Module):
    """The inference model of a spatial head: images -> the backbone's last feature map -> the head's logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(spatial_tokens(self.backbone, self.backbone.forward_features(images)))

