"""Datasets with their transforms, and the DataLoaders that feed them to a model."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from udtimm.data import build_dataset
from udtimm.data.base import CorruptImageError, MultiLabelDataset
from udtimm.data.transforms import eval_transform, train_transform

LOGGER = logging.getLogger(__name__)


class SkipCorrupt(Dataset):
    """--skip-corrupt: an unreadable image becomes None (dropped by `collate_skipping_none`) and is logged."""

    def __init__(self, dataset: MultiLabelDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple | None:
        try:
            return self.dataset[index]
        except CorruptImageError as err:
            LOGGER.warning("skipping corrupt image: %s", err)
            return None


def collate_skipping_none(batch: Sequence[tuple | None]) -> tuple:
    return default_collate([item for item in batch if item is not None])


def dataset_options(args: argparse.Namespace) -> dict:
    if args.dataset == "digits":
        return {"num_trainval": args.digits_trainval, "num_test": args.digits_test}
    return {}


def load_split(args: argparse.Namespace, split: str) -> MultiLabelDataset:
    return build_dataset(args.dataset, args.data_dir, split, **dataset_options(args))


def attach_transforms(
    train_set: MultiLabelDataset | None,
    eval_set: MultiLabelDataset | None,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    reprob: float,
) -> None:
    if train_set is not None:
        train_set.transform = train_transform(img_size, mean, std, reprob=reprob)
    if eval_set is not None:
        eval_set.transform = eval_transform(img_size, mean, std)


def make_loader(
    dataset: MultiLabelDataset,
    batch_size: int,
    train: bool,
    workers: int,
    skip_corrupt: bool = False,
) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch (BatchNorm needs > 1 sample); eval keeps all.

    Workers are not persistent: they are re-seeded from the global RNG every epoch, which the trainer sets
    from (seed, epoch), so an epoch's shuffling and augmentation do not depend on whether the run resumed.
    """
    source = SkipCorrupt(dataset) if skip_corrupt else dataset
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_skipping_none if skip_corrupt else None,
    )
