"""udtimm.data.feed.DeviceFeeder: prepared inline (ahead=0) or by its thread, the same batches in the same order."""

import random
import threading

import pytest
import torch
from conftest import TINY_DIGITS, read_rows, tiny_train_args

from udtimm.data import build_dataset
from udtimm.data.base import CorruptImageError, MultiLabelDataset, Sample
from udtimm.data.feed import DeviceFeeder
from udtimm.data.loader import make_loader
from udtimm.data.transforms import NormalizeBatch, TrainPixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(tiny_digits: str) -> MultiLabelDataset:
    dataset = build_dataset("digits", tiny_digits, "test", **TINY_DIGITS)
    dataset.transform = TrainPixels(32, reprob=1.0, hflip=0.5)
    return dataset


def feed(digits: MultiLabelDataset, ahead: int, workers: int = 0) -> list[tuple]:
    random.seed(0)
    torch.manual_seed(0)
    loader = make_loader(digits, 8, True, workers)
    loader.generator.manual_seed(0)
    return list(DeviceFeeder(loader, NormalizeBatch(MEAN, STD, CPU), CPU, ahead=ahead))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_thread_gives_the_batches_prepared_inline(digits: MultiLabelDataset, workers: int) -> None:
    inline, ahead = feed(digits, 0, workers), feed(digits, 2, workers)
    assert len(inline) == len(ahead) == len(digits) // 8
    for expected, got in zip(inline, ahead, strict=True):
        assert got[0].dtype == torch.float32 and got[0].shape == (8, 3, 32, 32)
        for expected_field, got_field in zip(expected, got, strict=True):
            assert torch.equal(expected_field, got_field)


def test_an_error_in_the_loader_reaches_the_consumer_with_its_message(tmp_path, digits: MultiLabelDataset) -> None:
    first = digits.samples[0]
    broken = MultiLabelDataset([*digits.samples[:8], Sample("gone", str(tmp_path / "gone.jpg"), first.labels)],
                               digits.classes, digits.transform)
    batches = iter(DeviceFeeder(make_loader(broken, 8, False, 0), NormalizeBatch(MEAN, STD, CPU), CPU, ahead=2))
    assert next(batches)[0].shape[0] == 8
    with pytest.raises(CorruptImageError, match="gone.jpg"):
        next(batches)


def test_a_consumer_that_stops_early_stops_the_thread(digits: MultiLabelDataset) -> None:
    before = threading.active_count()
    for _ in DeviceFeeder(make_loader(digits, 4, False, 0), None, CPU, ahead=1):
        break
    assert threading.active_count() == before
    assert not any(thread.name == "udtimm-feeder" for thread in threading.enumerate())


def test_an_empty_skip_corrupt_batch_passes_untransformed() -> None:
    empty = (torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), ["cannot read image a.jpg"])

    def refuse(images: object) -> torch.Tensor:
        raise AssertionError("an empty batch has nothing to transform")

    (batch,) = DeviceFeeder([empty], refuse, CPU, ahead=2)
    assert batch[0].numel() == 0 and batch[4] == ["cannot read image a.jpg"]


def test_prepare_moves_tensors_inside_dicts_and_leaves_the_rest() -> None:
    batch = ({"pixels": torch.zeros(2), "erase": torch.zeros(2, 4)}, torch.zeros(2), torch.zeros(2), torch.zeros(2),
             ["a.jpg"])
    moved, *_, messages = DeviceFeeder([], None, torch.device("meta")).prepare(batch)
    assert {value.device.type for value in moved.values()} == {"meta"}
    assert messages == ["a.jpg"]


@pytest.mark.slow
def test_a_training_run_fed_by_the_thread_equals_one_fed_inline(tiny_digits: str, tmp_path) -> None:
    """train.py --prefetch 2 (the thread, as on a GPU) against --prefetch 0: the same losses and metrics."""
    import train

    runs = {}
    for prefetch in (0, 2):
        train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", f"p{prefetch}", "--workers", "2",
                                   "--prefetch", str(prefetch)))
        runs[prefetch] = [{key: value for key, value in row.items() if key not in ("epoch_time", "images_per_s")}
                          for row in read_rows(str(tmp_path / f"p{prefetch}" / "summary.csv"))]
    assert runs[2] == runs[0] and len(runs[0]) == 2
