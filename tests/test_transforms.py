import random

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from udtimm.data.transforms import (
    CROP_SCALES,
    ERASE,
    PIXELS,
    Cutout,
    MultiScaleCrop,
    NormalizeBatch,
        NormalizeImage,
    RandAugment,
    Renormalize,
    TrainPixels,
    crop_offsets,
    erase_boxes,
    eval_pixels,
    eval_transform,
    multi_scale_crop_box,
    resize_size,
    train_transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_resize_keeps_the_papers_512_to_448_ratio() -> None:
    assert resize_size(448) == 512 and resize_size(64) == 73


def test_crop_boxes_use_the_scales_with_at_most_two_steps_of_distortion() -> None:
    random.seed(0)
    sides = {int(512 * s): i for i, s in enumerate(CROP_SCALES)}
    seen = set()
    for _ in range(500):
        left, top, width, height = multi_scale_crop_box(512, 512)
        assert width in sides and height in sides and abs(sides[width] - sides[height]) <= 2
        assert 0 <= left <= 512 - width and 0 <= top <= 512 - height
        assert (left, top) in crop_offsets(512, 512, width, height)
        seen.add((width, height))
    assert len(seen) == 19  # 5 squares + 8 one-step + 6 two-step aspect pairs


def test_multi_scale_crop_output_size_and_content() -> None:
    image = torch.arange(3 * 40 * 40, dtype=torch.uint8).view(3, 40, 40)
    out = MultiScaleCrop(24)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_normalise_matches_float_formula() -> None:
    image = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    expected = (image.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(NormalizeImage(MEAN, STD)(image), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_train_and_eval_transforms_give_normalised_square_tensors(size: int) -> None:
    image = torch.randint(0, 256, (3, 71, 90), dtype=torch.uint8)
    for transform in (train_transform(size, MEAN, STD, reprob=1.0), eval_transform(size, MEAN, STD)):
        out = transform(image)
        assert out.shape == (3, size, size) and out.dtype == torch.float32


def test_eval_transform_is_deterministic_resize() -> None:
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    transform = eval_transform(32, MEAN, STD)
    torch.testing.assert_close(transform(image), transform(image))


def test_random_erasing_probability_zero_disables_it() -> None:
    assert "RandomErasing" not in repr(train_transform(32, MEAN, STD, reprob=0.0))
    assert "RandomErasing" in repr(train_transform(32, MEAN, STD, reprob=0.5))


def images_of_sizes(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 40 + 7 * i, 90 - 5 * i), dtype=torch.uint8, generator=generator)
            for i in range(count)]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize(("reprob", "hflip", "seed", "aa", "cutout"), [
    (1.0, 0.5, 0, None, 0.0), (0.5, 0.5, 1, None, 0.0), (0.0, 0.0, 2, None, 0.0), (0.5, 0.5, 3, "rand-m9-mstd0.5", 0.5),
])
def test_worker_pixels_then_device_normalisation_equal_the_whole_train_transform(
        reprob: float, hflip: float, seed: int, aa: str | None, cutout: float) -> None:
    """The loaders' split transform (uint8 in the workers, NormalizeBatch on the device) draws and gives the same."""
    images = images_of_sizes(8)
    seed_all(seed)
    whole = train_transform(32, MEAN, STD, reprob=reprob, hflip=hflip, aa=aa, cutout=cutout)
    expected = torch.stack([whole(image) for image in images])
    seed_all(seed)
    pixels = TrainPixels(32, reprob=reprob, hflip=hflip, mean=MEAN, aa=aa, cutout=cutout)
    items = [pixels(image) for image in images]
    if reprob > 0:
        assert all(item[PIXELS].dtype == torch.uint8 for item in items)
        batch = {key: torch.stack([item[key] for item in items]) for key in (PIXELS, ERASE)}
        assert (batch[ERASE][:, 2] > 0).any()
    else:
        assert all(item.dtype == torch.uint8 for item in items)
        batch = torch.stack(items)
    assert torch.equal(NormalizeBatch(MEAN, STD, "cpu")(batch), expected)


def test_cutout_fills_a_box_of_the_fraction_with_one_random_colour() -> None:
    """ASL's Cutout: half the side around a uniform centre, clipped at the border; every box has one colour."""
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    torch.manual_seed(0)
    sides, colours = set(), set()
    for _ in range(200):
        out = Cutout(0.5)(image)
        changed = (out != image).any(0)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        if len(rows) == 0:  # the colour drawn was black
            continue
        box = changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and changed.sum() == box.numel()  # one rectangle
        assert len(rows) <= 20 and len(cols) <= 20
        sides.update((len(rows), len(cols)))
        colours.add(tuple(out[:, rows[0], cols[0]].tolist()))
    assert 20 in sides and min(sides) <= 12  # whole boxes, and boxes cut by the border
    assert len(colours) > 100


def test_rand_augment_follows_the_seeded_python_and_numpy_generators() -> None:
    image = images_of_sizes(1)[0][:, :32, :32].contiguous()
    augment = RandAugment("rand-m9-mstd0.5", 32, fill=(124, 116, 104))
    outputs = []
    for seed in (0, 0, 1):
        seed_all(seed)
        outputs.append(augment(image))
    assert outputs[0].dtype == torch.uint8 and outputs[0].shape == image.shape
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_eval_pixels_then_normalisation_equal_the_eval_transform() -> None:
    images = [image[:, :40, :60] for image in images_of_sizes(4)]
    expected = torch.stack([eval_transform(24, MEAN, STD)(image) for image in images])
    pixels = torch.stack([eval_pixels(24)(image) for image in images])
    assert pixels.dtype == torch.uint8 and torch.equal(NormalizeBatch(MEAN, STD, "cpu")(pixels), expected)


def test_erase_boxes_equals_erasing_each_image() -> None:
    images = torch.randn(4, 3, 10, 12)
    boxes = torch.tensor([[0, 0, 10, 12], [2, 3, 4, 5], [0, 0, 0, 0], [9, 11, 1, 1]])
    expected = torch.stack([F.erase(image, *box.tolist(), v=torch.tensor(0.0))
                            for image, box in zip(images, boxes, strict=True)])
    assert torch.equal(erase_boxes(images, boxes), expected)
    assert torch.equal(erase_boxes(images, boxes)[2], images[2])


def test_renormalize_turns_one_normalisation_into_another() -> None:
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    source, target = ([0.5] * 3, [0.5] * 3), ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    renormalized = Renormalize(*source, *target)(NormalizeImage(*source)(pixels))
    torch.testing.assert_close(renormalized, NormalizeImage(*target)(pixels), rtol=1e-5, atol=1e-5)
