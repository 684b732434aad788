"""Datasets with their transforms, and the DataLoaders that feed them to a model."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from udtimm.data import build_dataset
from udtimm.data.base import CorruptImageError, MultiLabelDataset
from udtimm.data.gpu import collate_encoded

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unreadable:
    """What `SkipCorrupt` yields for an image it cannot read: the error, to be logged by the main process."""

    message: str


class SkipCorrupt(Dataset):
    """--skip-corrupt: an unreadable image becomes an `Unreadable` item, left out by `collate_skipping_unreadable`."""

    def __init__(self, dataset: MultiLabelDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple | Unreadable:
        try:
            return self.dataset[index]
        except CorruptImageError as err:
            return Unreadable(str(err))


def collate_skipping_unreadable(batch: Sequence[tuple | Unreadable], collate: Callable = default_collate) -> tuple:
    """`collate` of the readable items, plus a fifth field: the messages of the unreadable ones.

    The messages travel with the batch because workers are separate processes: only the main process can count
    the images left out per epoch and log each file once. A batch with no readable image is four empty tensors,
    so that every process still sees one batch per step.
    """
    messages = [item.message for item in batch if isinstance(item, Unreadable)]
    readable = [item for item in batch if not isinstance(item, Unreadable)]
    fields = collate(readable) if readable else (torch.empty(0),) * 4
    return (*fields, messages)


_REPORTED: set[str] = set()


def report_unreadable(messages: Sequence[str]) -> int:
    """Log each unreadable image the first time it is left out (not again every epoch); returns how many."""
    for message in messages:
        if message not in _REPORTED:
            _REPORTED.add(message)
            LOGGER.warning("--skip-corrupt: leaving out %s", message)
    return len(messages)


def dataset_options(args: argparse.Namespace) -> dict:
    if args.dataset == "digits":
        return {"num_trainval": args.digits_trainval, "num_test": args.digits_test}
    return {}


def load_split(args: argparse.Namespace, split: str) -> MultiLabelDataset:
    return build_dataset(args.dataset, args.data_dir, split, **dataset_options(args))


def make_loader(
    dataset: MultiLabelDataset,
    batch_size: int,
    train: bool,
    workers: int,
    skip_corrupt: bool = False,
) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch (BatchNorm needs > 1 sample); eval keeps all.

    A training loader shuffles with a generator of its own, which the trainer seeds from (seed, epoch) like the
    global RNG: accelerate keeps a multi-process sampler's generator across epochs, out of reach of set_seed.
    Workers are not persistent: every epoch they are seeded from that generator, so an epoch's shuffling and
    augmentation do not depend on whether the run resumed.
    """
    source = SkipCorrupt(dataset) if skip_corrupt else dataset
    collate = collate_encoded if getattr(dataset, "encoded", False) else default_collate
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=partial(collate_skipping_unreadable, collate=collate) if skip_corrupt else collate,
        generator=torch.Generator() if train else None,
    )
