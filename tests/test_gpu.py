"""The --gpu-decode path (udtimm.data.gpu) run with device="cpu" against the CPU path it must reproduce."""

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from conftest import TINY_DIGITS
from PIL import Image

import train
from udtimm import config, loaders
from udtimm.config import ConfigError
from udtimm.data import build_dataset, gpu, read_image
from udtimm.data.base import CorruptImageError, MultiLabelDataset, Sample, read_encoded
from udtimm.data.feed import DeviceFeeder
from udtimm.data.gpu import DeviceTransform, EncodedBatch, PartialBatch, collate_encoded, decode_images
from udtimm.data.loader import make_loader
from udtimm.data.transforms import eval_transform, train_transform
from udtimm.engine import predict
from udtimm.model import create_model
from udtimm.settings import ModelSettings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, COUNT = 32, 12


@pytest.fixture(scope="module")
def digits(tiny_digits: str) -> MultiLabelDataset:
    return build_dataset("digits", tiny_digits, "test", **TINY_DIGITS)


def encoded_batch(dataset: MultiLabelDataset) -> tuple:
    dataset.encoded = True
    try:
        return collate_encoded([dataset[i] for i in range(COUNT)])
    finally:
        dataset.encoded = False


def cpu_path(dataset: MultiLabelDataset, transform: torch.nn.Module) -> torch.Tensor:
    return torch.stack([transform(read_image(dataset.samples[i].path)) for i in range(COUNT)])


def test_eval_batch_equals_the_cpu_eval_transform(digits: MultiLabelDataset) -> None:
    files, target, difficult, indices = encoded_batch(digits)
    out = DeviceTransform(SIZE, MEAN, STD, "cpu", train=False)(files)
    torch.testing.assert_close(out, cpu_path(digits, eval_transform(SIZE, MEAN, STD)), rtol=0, atol=1e-5)
    targets, difficult_masks = digits.dense_labels()
    torch.testing.assert_close(target, targets[:COUNT])
    torch.testing.assert_close(difficult, difficult_masks[:COUNT])
    assert indices.tolist() == list(range(COUNT))


@pytest.mark.parametrize("seed", [0, 1])
def test_train_batch_draws_and_applies_the_cpu_augmentations(digits: MultiLabelDataset, seed: int) -> None:
    files, *_ = encoded_batch(digits)
    random.seed(seed)
    torch.manual_seed(seed)
    out = DeviceTransform(SIZE, MEAN, STD, "cpu", train=True, reprob=1.0)(files)
    random.seed(seed)
    torch.manual_seed(seed)
    expected = cpu_path(digits, train_transform(SIZE, MEAN, STD, reprob=1.0))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    erased = (out == 0).all(dim=1).flatten(1).any(dim=1)
    assert erased.any(), "reprob=1 erases (value 0) a box in most images"


def encoded_files(*paths: str) -> EncodedBatch:
    return collate_encoded([(read_encoded(path), torch.zeros(1), torch.zeros(1, dtype=torch.bool), i)
                            for i, path in enumerate(paths)])[0]


def truncated_copy(path: str, folder) -> str:
    data = open(path, "rb").read()
    broken = folder / "truncated.jpg"
    broken.write_bytes(data[:len(data) // 2])
    return str(broken)


def test_non_jpeg_files_are_decoded_on_the_cpu_as_read_image_decodes_them(tmp_path, digits: MultiLabelDataset) -> None:
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "image.png")
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(tmp_path / "gray16.png")
    for name in ("image.bmp", "image.tif"):
        Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / name)
    paths = [str(tmp_path / name) for name in ("image.png", "gray16.png", "image.bmp", "image.tif")]
    paths.append(digits.samples[0].path)
    images, unreadable = decode_images(encoded_files(*paths), torch.device("cpu"))
    assert not unreadable and all(torch.equal(image, read_image(p)) for image, p in zip(images, paths, strict=True))
    assert all(image.dtype == torch.uint8 for image in images)
    pixels = DeviceTransform(SIZE, MEAN, STD, "cpu", train=True)(encoded_files(*paths))  # 16-bit: no uint16 to stack
    assert pixels.shape == (len(paths), 3, SIZE, SIZE)


def test_jpegs_the_batched_decoder_refuses_are_decoded_one_by_one_then_on_the_cpu(
        monkeypatch, digits: MultiLabelDataset) -> None:
    # Stands in for nvJPEG refusing a JPEG that libjpeg reads: every call of the device decoder fails.
    def refuse(*args, **kwargs):
        raise RuntimeError("nvjpeg refuses")

    monkeypatch.setattr(gpu, "decode_jpeg", refuse)
    paths = [s.path for s in digits.samples[:3]]
    images, unreadable = decode_images(encoded_files(*paths), torch.device("cpu"))
    assert not unreadable and all(torch.equal(image, read_image(p)) for image, p in zip(images, paths, strict=True))


def test_undecodable_file_is_named_and_stops_the_batch(tmp_path, digits: MultiLabelDataset) -> None:
    broken = truncated_copy(digits.samples[0].path, tmp_path)
    files = encoded_files(digits.samples[1].path, broken)
    with pytest.raises(CorruptImageError, match="truncated.jpg.*--skip-corrupt"):
        DeviceTransform(SIZE, MEAN, STD, "cpu", train=False)(files)


@pytest.mark.parametrize("train", [False, True])
def test_skip_corrupt_leaves_undecodable_files_out_of_the_batch(tmp_path, digits: MultiLabelDataset,
                                                                train: bool) -> None:
    broken = truncated_copy(digits.samples[0].path, tmp_path)
    paths = [digits.samples[1].path, broken, digits.samples[2].path]
    transform = DeviceTransform(SIZE, MEAN, STD, "cpu", train=train, reprob=1.0, skip_corrupt=True)
    random.seed(0)
    torch.manual_seed(0)
    out = transform(encoded_files(*paths))
    random.seed(0)
    torch.manual_seed(0)
    expected = transform(encoded_files(paths[0], paths[2]))  # the same draws: none are made for the broken file
    assert isinstance(out, PartialBatch) and out.kept == [0, 2] and len(out.messages) == 1
    assert "truncated.jpg" in out.messages[0]
    torch.testing.assert_close(out.images, expected, rtol=0, atol=0)


def test_feeder_drops_the_labels_of_images_left_out_on_the_device(tmp_path, digits: MultiLabelDataset) -> None:
    samples = digits.samples[:4]
    broken = Sample("broken", truncated_copy(samples[1].path, tmp_path), samples[1].labels)
    dataset = MultiLabelDataset([samples[0], broken, *samples[2:]], digits.classes)
    dataset.encoded = True
    transform = DeviceTransform(SIZE, MEAN, STD, "cpu", train=False, skip_corrupt=True)
    feeder = DeviceFeeder(make_loader(dataset, 4, False, 0, skip_corrupt=True), transform, torch.device("cpu"))
    images, target, difficult, indices, unreadable = next(iter(feeder))
    keep = [0, 2, 3]
    assert images.shape == (3, 3, SIZE, SIZE) and indices.tolist() == keep
    targets, difficult_masks = dataset.dense_labels()
    assert torch.equal(target, targets[keep]) and torch.equal(difficult, difficult_masks[keep])
    assert len(unreadable) == 1 and "truncated.jpg" in unreadable[0]


def test_a_batch_with_no_decodable_file_is_empty(tmp_path, digits: MultiLabelDataset) -> None:
    out = DeviceTransform(SIZE, MEAN, STD, "cpu", train=True, skip_corrupt=True)(
        encoded_files(truncated_copy(digits.samples[0].path, tmp_path)))
    assert isinstance(out, PartialBatch) and out.kept == [] and out.images.numel() == 0


def test_missing_file_is_skipped_in_the_workers(tmp_path, digits: MultiLabelDataset) -> None:
    first = digits.samples[0]
    gone = Sample("gone", str(tmp_path / "gone.jpg"), first.labels)
    missing = MultiLabelDataset([gone, *digits.samples[:3]], digits.classes)
    missing.encoded = True
    files, target, _, indices, unreadable = next(iter(make_loader(missing, 4, False, 0, skip_corrupt=True)))
    assert isinstance(files, EncodedBatch) and len(files) == 3 and indices.tolist() == [1, 2, 3]
    assert target.shape[0] == 3 and len(unreadable) == 1 and "gone.jpg" in unreadable[0]


def test_device_placement_leaves_encoded_files_on_the_cpu(digits: MultiLabelDataset) -> None:
    # What accelerate's prepared DataLoader does to every batch; "meta" stands in for the GPU.
    files, target, _, _ = send_to_device(encoded_batch(digits), torch.device("meta"))
    assert isinstance(files, EncodedBatch) and files.data.device.type == "cpu" and target.device.type == "meta"


def test_predict_with_the_device_transform_matches_the_cpu_path(digits: MultiLabelDataset) -> None:
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), len(digits.classes))
    digits.transform = eval_transform(SIZE, MEAN, STD)
    expected = predict(model, make_loader(digits, 16, False, 0), Accelerator(cpu=True), show_progress=False)
    digits.transform, digits.encoded = None, True
    try:
        batches = DeviceFeeder(make_loader(digits, 16, False, 0), DeviceTransform(SIZE, MEAN, STD, "cpu", train=False),
                               torch.device("cpu"))
        got = predict(model, batches, Accelerator(cpu=True), show_progress=False)
    finally:
        digits.encoded = False
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-5)
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.target, expected.target)


def test_gpu_decode_without_cuda_is_a_clear_error(digits: MultiLabelDataset) -> None:
    args = train.parse_args(["--gpu-decode", "--img-size", str(SIZE), "-b", "4", "--workers", "0"])
    with pytest.raises(ConfigError, match="--gpu-decode .* CUDA"):
        loaders.build_loaders(config.training_settings(args).data, digits, digits, list(MEAN), list(STD),
                              torch.device("cpu"))
