"""A run's datasets and loaders, and the transforms that finish their batches on the device."""

from __future__ import annotations

import timm
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from udtimm.data import HOLDOUT, DataSource
from udtimm.data.base import MultiLabelDataset, drop_labels, hold_out, unknown_only_classes
from udtimm.data.feed import BatchTransform
from udtimm.data.gpu import DeviceTransform
from udtimm.data.loader import make_loader
from udtimm.data.transforms import NormalizeBatch, TrainPixels, eval_pixels
from udtimm.errors import ConfigError
from udtimm.settings import DataSettings


def load_datasets(data: DataSettings, accelerator: Accelerator,
                  ) -> tuple[MultiLabelDataset, MultiLabelDataset, MultiLabelDataset]:
    """(train, selection, test): the images trained on, those that choose best.safetensors every epoch, and those
    that report at the end (the selection set itself with --select-on-test). --val-split holdout takes the selection
    images out of the train split; a named selection split may share no image with the other two."""
    # The main process generates the digits set (if needed) before the others read it.
    with accelerator.main_process_first():
        train_set = data.source.load(data.train_split)
        test_set = data.source.load(data.test_split)
        if data.val_split == HOLDOUT:
            train_set, eval_set = hold_out(train_set, data.holdout_fraction, data.holdout_seed)
        else:
            eval_set = test_set if data.select_on_test else data.source.load(data.val_split)
    if data.drop_labels > 0:
        train_set = drop_labels(train_set, data.drop_labels, data.drop_labels_seed)
    unlabelled = unknown_only_classes(train_set)
    if unlabelled:
        effect = {"ignore": "--unknown ignore gives them no supervised loss",
                  "negative": "--unknown negative trains them as absent everywhere",
                  "teacher": "--unknown teacher trains them on the teacher's probabilities alone"}[data.unknown]
        accelerator.print(f"warning: no training image has a known label of class(es) {', '.join(unlabelled)}: "
                          f"{effect}")
    for split, dataset in ((data.val_split, eval_set), (data.test_split, test_set)):
        if dataset.classes != train_set.classes:
            raise ConfigError(f"splits {data.train_split} and {split} have different class lists")
    if data.val_split != HOLDOUT and not data.select_on_test:
        for flag, split, dataset in (("--train-split", data.train_split, train_set),
                                     ("--test-split", data.test_split, test_set)):
            check_disjoint(eval_set, dataset, f"--val-split {data.val_split} and {flag} {split}")
    return train_set, eval_set, test_set


def tuning_dataset(source: DataSource, split: str, trained: dict | None) -> MultiLabelDataset:
    """The split that validate.py fits calibrations and thresholds on: a named split of `source`, or `holdout`, the
    images of the training split that the checkpoint's run held out (`trained`: its provenance record). Refused,
    naming an image, when it shares one with the images that run trained on."""
    same_data = trained is not None and trained["dataset"] == source.name
    if split == HOLDOUT and not (same_data and trained["val_split"] == HOLDOUT):
        held = "its run held no images out" if same_data else "the checkpoint records no run on this dataset"
        raise ConfigError(f"--tune-split {HOLDOUT}: {held}; name a held-out split (e.g. val)")
    training = held_out = None
    if same_data:  # the images the run trained on, and those it held out (the train split read once)
        training = source.load(trained["train_split"])
        if trained["val_split"] == HOLDOUT:
            training, held_out = hold_out(training, trained["holdout_fraction"], trained["holdout_seed"])
    tune_set = held_out if split == HOLDOUT else source.load(split)
    if training is not None:
        shared = set(tune_set.samples.paths()) & set(training.samples.paths())
        if shared:
            raise ConfigError(f"--tune-split {split} shares {len(shared)} image(s) with the images the checkpoint "
                              f"was trained on ({trained['train_split']}), e.g. {min(shared)}: calibrations and "
                              f"thresholds are fitted on held-out images (--tune-split {trained['val_split']}, which "
                              "chose the checkpoint)")
    return tune_set


def describe_splits(data: DataSettings, train_set: MultiLabelDataset, eval_set: MultiLabelDataset,
                    test_set: MultiLabelDataset) -> str:
    """The images of each split, for the run's first line: "96 train / 20 val (chooses) / 40 test (reports)"."""
    return (f"{len(train_set)} train / {len(eval_set)} {data.val_split} (chooses) / {len(test_set)} "
            f"{data.test_split} (reports) images")


def check_disjoint(first: MultiLabelDataset, second: MultiLabelDataset, what: str) -> None:
    """ConfigError naming `what` and an image if the two sets share an image file."""
    shared = set(first.samples.paths()) & set(second.samples.paths())
    if shared:
        raise ConfigError(f"{what} share {len(shared)} image(s), e.g. {min(shared)}: the split that chooses "
                          f"best.safetensors must be held out of training and of the split that reports "
                          f"(--val-split {HOLDOUT} holds a part of --train-split out)")


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
    train_loader = make_loader(train_set, data.batch_size, True, data.workers, data.skip_corrupt)
    eval_loader, eval_transform = build_eval_loader(data, eval_set, mean, std, device)
    return train_loader, eval_loader, train_transform, eval_transform


def build_eval_loader(data: DataSettings, dataset: MultiLabelDataset, mean: list[float], std: list[float],
                      device: torch.device) -> tuple[DataLoader, BatchTransform]:
    """An evaluation loader of `dataset` (the selection or the test split) and what finishes its batches."""
    transform = eval_pipeline(dataset, data.img_size, mean, std, device, data.gpu_decode, data.skip_corrupt)
    return make_loader(dataset, data.batch_size, False, data.workers, data.skip_corrupt), transform


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
