import random

import pytest
import torch

from udtimm.data.transforms import (
    CROP_SCALES,
    MultiScaleCrop,
    NormalizeImage,
    crop_offsets,
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
