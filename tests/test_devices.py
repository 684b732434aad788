"""devices.py: the accelerator's settings and the model on the run's processes (--sync-bn)."""

import pytest
import torch

import train
from udtimm import config, devices
from udtimm.config import ConfigError
from udtimm.model import create_model
from udtimm.settings import ModelSettings


class FakeAccelerator:
    def __init__(self, processes: int, device: str) -> None:
        self.num_processes, self.device = processes, torch.device(device)


def test_sync_bn_converts_batchnorm_only_with_several_gpu_processes() -> None:
    model = create_model(ModelSettings("test_resnet"), 3, cal=True)
    assert devices.sync_batchnorm(model, True, FakeAccelerator(1, "cpu")) is model  # one process: the whole batch
    assert devices.sync_batchnorm(model, False, FakeAccelerator(2, "cuda")) is model
    converted = devices.sync_batchnorm(model, True, FakeAccelerator(2, "cuda"))
    kinds = {type(module) for module in converted.modules()}
    assert torch.nn.SyncBatchNorm in kinds and not kinds & {torch.nn.BatchNorm1d, torch.nn.BatchNorm2d}
    assert converted.state_dict().keys() == create_model(ModelSettings("test_resnet"), 3, cal=True).state_dict().keys()
    with pytest.raises(ConfigError, match="--sync-bn .* 2 processes on cpu"):
        devices.sync_batchnorm(create_model(ModelSettings("test_resnet"), 3), True, FakeAccelerator(2, "cpu"))


def test_gradient_accumulation_needs_a_positive_count() -> None:
    with pytest.raises(ConfigError, match="--grad-accum-steps"):
        devices.make_training_accelerator(config.training_settings(train.parse_args(["--grad-accum-steps", "0"])),
                                          "unused")
