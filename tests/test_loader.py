"""udtimm.data.loader: a training loader's batches depend on (seed, epoch) alone, whatever the workers."""

import random

import pytest
import torch
from conftest import TINY_DIGITS

from udtimm.data import build_dataset
from udtimm.data.base import MultiLabelDataset
from udtimm.data.loader import make_loader, seed_loader
from udtimm.data.transforms import TrainPixels
from udtimm.trainer import seed_epoch

SIZE = 32


@pytest.fixture(scope="module")
def augmented(tiny_digits: str) -> MultiLabelDataset:
    dataset = build_dataset("digits", tiny_digits, "trainval", **TINY_DIGITS)
    # Crops, flips, erasing boxes, Cutout and RandAugment (it draws from Python's and NumPy's generators): all random.
    dataset.transform = TrainPixels(SIZE, reprob=0.5, hflip=0.5, aa="rand-m9-mstd0.5", cutout=0.5)
    return dataset


def epochs_of(loader, seeds: list[int]) -> list[list[tuple]]:
    batches = []
    for seed in seeds:
        seed_loader(loader, seed)
        batches.append([(batch[0]["pixels"], batch[0]["erase"], batch[3]) for batch in loader])
    return batches


def assert_same_batches(got: list[list[tuple]], want: list[list[tuple]]) -> None:
    assert len(got) == len(want)
    for got_epoch, want_epoch in zip(got, want, strict=True):
        assert len(got_epoch) == len(want_epoch)
        for got_batch, want_batch in zip(got_epoch, want_epoch, strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got_batch, want_batch, strict=True))


@pytest.mark.slow
def test_batches_depend_on_the_seed_alone_not_on_the_workers_or_their_persistence(
        augmented: MultiLabelDataset) -> None:
    seeds = [5, 6, 7]  # three epochs: the persistent workers of the second loader serve all three
    in_process = epochs_of(make_loader(augmented, 16, True, 0), seeds)
    assert_same_batches(epochs_of(make_loader(augmented, 16, True, 2), seeds), in_process)
    assert_same_batches(epochs_of(make_loader(augmented, 16, True, 2), seeds[1:]), in_process[1:])  # a resumed run


def test_each_epoch_shuffles_and_augments_anew(augmented: MultiLabelDataset) -> None:
    first, second = epochs_of(make_loader(augmented, 16, True, 0), [5, 6])
    assert first[0][2].tolist() != second[0][2].tolist()
    first_order = torch.cat([indices for *_, indices in first]).argsort()
    second_order = torch.cat([indices for *_, indices in second]).argsort()
    first_pixels, second_pixels = (torch.cat([p for p, *_ in epoch]) for epoch in (first, second))
    assert not torch.equal(first_pixels[first_order], second_pixels[second_order])


def test_drawing_items_in_the_main_process_leaves_its_generators_alone(augmented: MultiLabelDataset) -> None:
    loader = make_loader(augmented, 16, True, 0)

    def draws(iterate: bool) -> tuple[float, float]:
        seed_epoch(3, loader)
        if iterate:
            list(loader)
        return random.random(), torch.rand(1).item()

    assert draws(iterate=True) == draws(iterate=False)


def test_workers_start_once_per_run(augmented: MultiLabelDataset) -> None:
    loader = make_loader(augmented, 16, True, 2)
    pids = []
    for seed in (0, 1):
        seed_loader(loader, seed)
        iterator = iter(loader)
        next(iterator)
        pids.append(sorted(worker.pid for worker in iterator._workers))
        list(iterator)
    assert pids[0] == pids[1]


@pytest.mark.slow
def test_spawned_workers_draw_what_forked_ones_draw(augmented: MultiLabelDataset) -> None:
    # spawn is the default start method on macOS and Windows: there the dataset is pickled to the workers.
    forked = make_loader(augmented, 16, True, 2)
    spawned = make_loader(augmented, 16, True, 2)
    spawned = torch.utils.data.DataLoader(spawned.dataset, batch_size=16, sampler=spawned.sampler, drop_last=True,
                                          num_workers=2, persistent_workers=True, multiprocessing_context="spawn")
    assert_same_batches(epochs_of(spawned, [5, 6]), epochs_of(forked, [5, 6]))
