"""--model-ema: timm's ModelEmaV3 with its warm-up, against the update written out."""

import pytest
import torch

import train
from udtimm import config
from udtimm.config import ConfigError
from udtimm.ema import make_ema, method_suffix
from udtimm.settings import OptimSettings


def ema_settings(*flags: str) -> OptimSettings:
    return config.training_settings(train.parse_args(["--model-ema", *flags])).optim


def test_ema_follows_the_warm_up_decay_then_the_set_decay() -> None:
    """EMA_t = d_t EMA_(t-1) + (1 - d_t) w_t with d_t = min(decay, 1 - t^(-2/3)): a copy at the first step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(ema_settings("--model-ema-decay", "0.9"), model)
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    for step in range(1, 40):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.update(model, step=step)
        decay = min(0.9, 1 - step ** (-2 / 3))
        expected = {key: decay * expected[key] + (1 - decay) * value for key, value in model.state_dict().items()}
        for key, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    assert 1 - 39 ** (-2 / 3) > 0.9  # the set decay was reached


def test_bad_decay_is_refused_and_ema_runs_are_their_own_method() -> None:
    with pytest.raises(ConfigError, match="--model-ema-decay must lie in \\(0, 1\\), got 1.0"):
        make_ema(ema_settings("--model-ema-decay", "1.0"), torch.nn.Linear(2, 2))
    assert make_ema(config.training_settings(train.parse_args([])).optim, torch.nn.Linear(2, 2)) is None
    assert method_suffix(True) == "+ema" and method_suffix(False) == ""
