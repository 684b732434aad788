"""A run's datasets and loaders, and the transforms that finish their batches on the device."""

from __future__ import annotations

import timm
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from udtimm.config import ConfigError
from udtimm.data.base import MultiLabelDataset
from udtimm.data.feed import BatchTransform
from udtimm.data.gpu import DeviceTransform
from udtimm.data.loader import make_loader
from udtimm.data.transforms import NormalizeBatch, TrainPixels, eval_pixels
from udtimm.settings import DataSettings


def load_datasets(data: DataSettings, accelerator: Accelerator) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    # The main process generates the digits set (if needed) before the others read it.
    with accelerator.main_process_first():
        train_set = data.source.load(data.train_split)
        eval_set = data.source.load(data.val_split)
    if train_set.classes != eval_set.classes:
        raise ConfigError(f"splits {data.train_split} and {data.val_split} have different class lists")
    return train_set, eval_set


def normalisation(backbone: nn.Module) -> tuple[list[float], list[float]]:
    config = timm.data.resolve_data_config({}, model=backbone)
    return list(config["mean"]), list(config["std"])


def check_gpu_decode(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"--gpu-decode decodes on a CUDA GPU (nvJPEG), but this run is on {device}: "
                          "drop --gpu-decode to decode with the loader workers")


def build_loaders(
    data: DataSettings, train_set: MultiLabelDataset, eval_set: MultiLabelDataset, mean: list[float],
    std: list[float], device: torch.device,
) -> tuple[DataLoader, DataLoader, BatchTransform, BatchTransform]:
    """Train and eval loaders, and the transforms that finish their batches on `device` (DeviceFeeder applies them).

    The workers decode and augment each image and hand over uint8 batches, normalised and erased on the device
    (NormalizeBatch). With --gpu-decode the workers only read the files; the device decodes and augments them too.
    """
    if data.gpu_decode:
        check_gpu_decode(device)
        train_set.encoded = True
        train_transform: BatchTransform = DeviceTransform(
            data.img_size, mean, std, device, train=True, reprob=data.reprob, hflip=data.hflip,
            crop_scales=data.crop_scales, skip_corrupt=data.skip_corrupt)
    else:
        train_set.transform = TrainPixels(data.img_size, reprob=data.reprob, hflip=data.hflip,
                                          crop_scales=data.crop_scales, mean=mean, aa=data.aa, cutout=data.cutout)
        train_transform = NormalizeBatch(mean, std, device)
    eval_transform = eval_pipeline(eval_set, data.img_size, mean, std, device, data.gpu_decode, data.skip_corrupt)
    train_loader = make_loader(train_set, data.batch_size, True, data.workers, data.skip_corrupt)
    eval_loader = make_loader(eval_set, data.batch_size, False, data.workers, data.skip_corrupt)
    return train_loader, eval_loader, train_transform, eval_transform


def eval_pipeline(dataset: Dataset, img_size: int, mean: list[float], std: list[float], device: torch.device,
                  gpu_decode: bool, skip_corrupt: bool = False) -> BatchTransform:
    """Set what the workers do with `dataset`'s images for evaluation; return what finishes its batches on `device`
    (train.py's and distill.py's eval split, validate.py's split or image folder)."""
    if gpu_decode:
        check_gpu_decode(device)
        dataset.encoded = True
        return DeviceTransform(img_size, mean, std, device, train=False, skip_corrupt=skip_corrupt)
    dataset.transform = eval_pixels(img_size)
    return NormalizeBatch(mean, std, device)
