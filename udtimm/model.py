"""Any timm backbone with its classification branch (timm's classifier, or a spatial head: udtimm.heads) and the
optional calibration branch (Sec. 4.2.2)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn

from udtimm.attention import DEFAULT_FORM, AttentionForm, uncertainty_attention
from udtimm.errors import ModelConfigError
from udtimm.heads import LINEAR, SpatialClassifier, create_head, head_options, spatial_tokens
from udtimm.settings import ModelSettings
from udtimm.weights import backbone_weights, check_pretrained_loaded, read_weights

CAL_WIDTH = 512


@dataclass
class ModelOutput:
    features: Tensor  # last feature map Z, before pooling: [B, C, H, W] or tokens [B, N, D]
    logits: Tensor  # classification branch, [B, num_classes]
    cal_logits: Tensor | None  # calibration branch, [B, num_classes]; None without --cal
    attention: Tensor | None = None  # uncertainty attention map [B, H, W] (Eq. 16), when asked for


def calibration_head(in_features: int, num_classes: int, width: int = CAL_WIDTH) -> nn.Sequential:
    """Sec. 4.2.2: the auxiliary branch FC -> BN -> ReLU -> FC on the pooled features."""
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


class CalibratedModel(nn.Module):
    """A timm backbone whose forward returns the feature map and the logits of both branches.

    The classification branch is the backbone's own classifier on the pooled features (the linear head), or `head`,
    a spatial head (udtimm.heads) on the last feature map, built with the options `head_kwargs`; the calibration
    branch always reads the pooled features.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cal: bool, cal_width: int = CAL_WIDTH,
                 head: nn.Module | None = None, head_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = head
        self.head_kwargs = dict(head_kwargs or {})
        # head_hidden_size is the width forward_head(pre_logits=True) returns; num_features is the
        # width of the feature map, and the two differ for VGG, MobileNetV3 and others.
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.cal_head = calibration_head(width, num_classes, cal_width) if cal else None

    @property
    def has_cal(self) -> bool:
        return self.cal_head is not None

    @property
    def head_name(self) -> str:
        """--head: linear (timm's classifier) or the registered name of the spatial head."""
        return LINEAR if self.head is None else self.head.name

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits of both branches from the last feature map (cal_logits None without the calibration branch)."""
        # A spatial head without the calibration branch leaves the pooled features unread: no pooling then.
        pooled = None if self.head is not None and self.cal_head is None else \
            self.backbone.forward_head(features, pre_logits=True)
        if self.head is None:
            logits = self.backbone.get_classifier()(pooled)
        else:
            logits = self.head(spatial_tokens(self.backbone, features))
        cal_logits = self.cal_head(pooled) if self.cal_head is not None else None
        return logits, cal_logits

    def forward(self, x: Tensor, with_attention: bool = False,
                attention_form: AttentionForm = DEFAULT_FORM) -> ModelOutput:
        """Feature map and both branches; `with_attention` adds the uncertainty attention map (Eq. 15-16), built
        as `attention_form` says (default: distill.py's, `attention.DEFAULT_VARIANT`).

        The map is computed inside forward so that a distributed (DDP) wrapper sees one forward per step; with
        gradients enabled it keeps its graph, so a loss on it trains the network through the map.
        """
        features = self.forward_features(x)
        logits, cal_logits = self.forward_head(features)
        attention = None
        if with_attention:
            create_graph = torch.is_grad_enabled() and features.requires_grad
            attention = uncertainty_attention(self, features, create_graph, head_outputs=(logits, cal_logits),
                                              form=attention_form)
        return ModelOutput(features, logits, cal_logits, attention)

    def feature_grid(self, features: Tensor) -> Tensor:
        """The feature map as [B, C, H, W]: token features lose their prefix tokens and become a grid."""
        if features.ndim == 4:
            return features
        if features.ndim != 3:
            raise ValueError(f"cannot lay out features of shape {tuple(features.shape)} as a spatial grid")
        tokens = features[:, self.num_prefix_tokens :]
        height, width = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", (0, 0))
        if height * width != tokens.shape[1]:
            # Square inputs at a size other than the build size (dynamic_img_size models).
            height = width = round(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def classifier_only(self) -> nn.Module:
        """The inference model, images to logits, the calibration branch dropped: the backbone alone (linear head),
        or the backbone and its spatial head."""
        return self.backbone if self.head is None else SpatialClassifier(self.backbone, self.head)


def suggest_models(name: str, count: int = 5) -> list[str]:
    return difflib.get_close_matches(name, timm.list_models(), n=count, cutoff=0.5)


def create_model(settings: ModelSettings, num_classes: int, cal: bool = False, img_size: int | None = None,
                 cal_width: int = CAL_WIDTH) -> CalibratedModel:
    """Build a CalibratedModel from `settings` (--initial-checkpoint and --sync-bn aside: devices.build_model); its
    `pretrained_path` loads local weights (no network). `cal` adds the calibration branch, `cal_width` wide.

    `model_kwargs` go to timm.create_model as they are (--model-kwargs, e.g. output_stride=16). `head` (--head) is
    linear (timm's classifier) or a spatial head of udtimm.heads built with `head_kwargs` (--head-kwargs); a spatial
    head replaces timm's classifier, which is then built with no classes.
    """
    name, head, pretrained_path = settings.model, settings.head, settings.pretrained_path
    model_kwargs = settings.model_kwargs or {}  # a YAML config may leave it empty (None)
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise ModelConfigError(f"unknown --model {name!r}.{hint} `timm.list_models('*pattern*')` lists them all.")
    options = head_options(head, settings.head_kwargs)  # before any work: HeadConfigError names the key at fault
    kwargs: dict = {"num_classes": num_classes if head == LINEAR else 0, "drop_rate": settings.drop}
    if settings.global_pool:
        kwargs["global_pool"] = settings.global_pool
    clashes = sorted(set(model_kwargs) & {*kwargs, "global_pool", "pretrained", "img_size"})
    if clashes:
        raise ModelConfigError(f"--model-kwargs {clashes}: set these with their own flags")
    kwargs.update(model_kwargs)
    pretrained = settings.pretrained or bool(pretrained_path)
    weights = None
    try:
        if pretrained_path:
            weights = backbone_weights(read_weights(pretrained_path)[0])
            kwargs["pretrained_cfg_overlay"] = {"state_dict": weights}
        backbone = _create_backbone(name, pretrained, img_size, kwargs)
    except (OSError, RuntimeError, ValueError, TypeError) as err:
        if isinstance(err, TypeError) and model_kwargs:
            raise ModelConfigError(f"{name} does not take --model-kwargs {dict(model_kwargs)}: {err}") from err
        if pretrained_path:
            raise ModelConfigError(f"cannot load --pretrained-path {pretrained_path} into {name}: {err}") from err
        if pretrained:
            raise ModelConfigError(
                f"could not fetch pretrained weights for {name} ({type(err).__name__}: {err}). "
                "Without network access download them elsewhere and pass the file with --pretrained-path FILE."
            ) from err
        raise
    if weights is not None:
        check_pretrained_loaded(backbone, weights, pretrained_path)
    spatial = None if head == LINEAR else create_head(head, backbone.num_features, num_classes, **options)
    return CalibratedModel(backbone, num_classes, cal=cal, cal_width=cal_width, head=spatial, head_kwargs=options)


def _create_backbone(name: str, pretrained: bool, img_size: int | None, kwargs: dict) -> nn.Module:
    # Transformers fix their position embeddings at build time and need img_size; CNNs take any size
    # and reject the keyword, so try it first and fall back.
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=pretrained, **kwargs)
