"""Datasets with their transforms, and the DataLoaders that feed them to a model."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate, get_worker_info

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


class EpochSeeded(Dataset):
    """Training items whose random augmentation depends on (epoch seed, index) only, and the generator that
    shuffles them (accelerate's wrappers hide a loader's sampler but keep its dataset).

    Not on which worker process draws an item, how many there are, or whether they outlive an epoch: so --workers
    does not change a run, a resumed run repeats an uninterrupted one, and the workers can persist across epochs.
    The epoch's seed sits in shared memory, set by the main process (`seed_loader`) before the epoch's indices go out.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch_seed = torch.zeros((), dtype=torch.int64).share_memory_()
        self.shuffle = torch.Generator()

    def __getstate__(self) -> dict:
        # What spawned workers get: they shuffle nothing, and a pickled torch.Generator does not survive the trip.
        return {**self.__dict__, "shuffle": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> object:
        seed = np.random.SeedSequence([int(self.epoch_seed) % 2**64, index]).generate_state(1, np.uint64)[0]
        with seeded_cpu_rng(int(seed)):
            return self.dataset[index]


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators (those the transforms draw from; timm's RandAugment draws from
    the first two) seeded with `seed`.

    Outside a worker (--workers 0) the main process's states are restored after, so its own draws go on unchanged.
    """
    restore = get_worker_info() is None
    if restore:
        python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)


def seed_loader(loader: DataLoader, seed: int) -> None:
    """Seed a training loader (make_loader) for an epoch: its shuffling and its items' augmentation.

    set_seed does not reach either: the shuffling generator is the sampler's own (accelerate keeps a multi-process
    sampler's generator across epochs), and the augmentation's seeds are drawn in the workers.
    """
    loader.dataset.shuffle.manual_seed(seed)
    loader.dataset.epoch_seed.fill_(seed)


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


def make_loader(
    dataset: MultiLabelDataset,
    batch_size: int,
    train: bool,
    workers: int,
    skip_corrupt: bool = False,
) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch (BatchNorm needs > 1 sample); eval keeps all.

    A training loader shuffles with a generator of its own and seeds each item's augmentation (EpochSeeded); the
    trainer seeds both from (seed, epoch) every epoch (`seed_loader`), so an epoch's batches do not depend on
    --workers or on whether the run resumed. The workers persist across epochs: they start once per run, not
    twice per epoch (train and eval).
    """
    source = SkipCorrupt(dataset) if skip_corrupt else dataset
    collate = collate_encoded if getattr(dataset, "encoded", False) else default_collate
    if train:
        source = EpochSeeded(source)
    return DataLoader(
        source,
        batch_size=batch_size,
        sampler=RandomSampler(source, generator=source.shuffle) if train else None,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=partial(collate_skipping_unreadable, collate=collate) if skip_corrupt else collate,
        # The workers' base seed is drawn from this one when they start: never from the global generator, whose
        # draws would then depend on --workers. The items' augmentation does not use it (EpochSeeded).
        generator=torch.Generator(),
    )
