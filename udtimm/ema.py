"""--model-ema: an exponential moving average of the weights, evaluated next to the raw weights every epoch.

timm's ModelEmaV3 with its warm-up: the t-th optimizer step moves the average with decay min(--model-ema-decay,
1 - t^(-2/3)), so the average follows the fast-changing weights of the first steps and reaches the set decay only
later (0.9997 after about 190k steps; before that the warm-up's decay applies: 0.992 after 1,400 steps, an average
over the last ~125 steps).
The EMA keeps every entry of the model's state_dict (BatchNorm statistics included) on the model's device.
"""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn

from udtimm.errors import ConfigError
from udtimm.settings import OptimSettings

RAW, EMA = "raw", "ema"  # the metadata "weights" of a checkpoint: which of the two it holds
# The metrics summary.csv lists for the EMA weights too, as <name>_ema.
EMA_COLUMNS = ("map", "map_difficult", "ece")


def make_ema(optim: OptimSettings, model: nn.Module) -> ModelEmaV3 | None:
    """--model-ema: the EMA of `model` (the bare model, without DDP or compile wrappers), starting from its current
    weights; None without the flag."""
    if not optim.model_ema:
        return None
    if not 0 < optim.model_ema_decay < 1:
        raise ConfigError(f"--model-ema-decay must lie in (0, 1), got {optim.model_ema_decay}")
    return ModelEmaV3(model, decay=optim.model_ema_decay, use_warmup=True)


def method_suffix(model_ema: bool) -> str:
    """What --model-ema adds to the method column of results.csv, so the report groups EMA runs apart."""
    return "+ema" if model_ema else ""
