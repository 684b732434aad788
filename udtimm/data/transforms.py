"""The paper's train and eval transforms (Sec. 5.1), on uint8 image tensors, scaled to any input size.

The loaders split each transform in two (docs/throughput.md): the workers do the pixel work and hand over uint8 images
(`train_pixels`, `eval_pixels`: a quarter of float32's bytes through shared memory and onto the GPU), and
`NormalizeBatch` normalises and erases a whole batch on the device. Together they give `train_transform` and
`eval_transform`, which stay whole for code that wants finished images one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

CROP_SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)
# The paper resizes to 512 and crops 448: keep that ratio at any --img-size.
RESIZE_RATIO = 512 / 448


def resize_size(img_size: int) -> int:
    return round(img_size * RESIZE_RATIO)


def crop_offsets(image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 fixed crop positions of the multi-scale crop (corners, centre, quarters)."""
    w_step, h_step = (image_w - crop_w) // 4, (image_h - crop_h) // 4
    return [
        (0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step),
        (0, 2 * h_step), (4 * w_step, 2 * h_step), (2 * w_step, 4 * h_step), (2 * w_step, 0),
        (w_step, h_step), (3 * w_step, h_step), (w_step, 3 * h_step), (3 * w_step, 3 * h_step),
    ]  # fmt: skip


def multi_scale_crop_box(
    image_w: int, image_h: int, scales: Sequence[float] = CROP_SCALES, max_distort: int = 2
) -> tuple[int, int, int, int]:
    """Draw (left, top, width, height): sides from `scales` of the short side, at most `max_distort` apart."""
    base = min(image_w, image_h)
    sides = [int(base * s) for s in scales]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = random.choice(pairs)
    left, top = random.choice(crop_offsets(image_w, image_h, crop_w, crop_h))
    return left, top, crop_w, crop_h


class MultiScaleCrop(nn.Module):
    """Crop a box drawn by `multi_scale_crop_box` and resize it to `size` x `size` (ML-GCN's recipe)."""

    def __init__(self, size: int, scales: Sequence[float] = CROP_SCALES, max_distort: int = 2) -> None:
        super().__init__()
        self.size, self.scales, self.max_distort = size, tuple(scales), max_distort

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        left, top, crop_w, crop_h = multi_scale_crop_box(width, height, self.scales, self.max_distort)
        return F.resized_crop(image, top, left, crop_h, crop_w, [self.size, self.size], antialias=True)


class NormalizeImage(nn.Module):
    """uint8 [0, 255] to normalised float32, the last step so everything before stays uint8."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255)

    def forward(self, image: Tensor) -> Tensor:
        # In place on the fresh float copy: the same numbers as (x - mean) / std, 2.7x faster on the CPU.
        return image.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)


class Renormalize(nn.Module):
    """A batch normalised with one (mean, std) re-expressed in another's: the same pixels, as another model expects."""

    def __init__(self, source_mean: Sequence[float], source_std: Sequence[float], target_mean: Sequence[float],
                 target_std: Sequence[float]) -> None:
        super().__init__()
        source_mean, source_std, target_mean, target_std = (
            torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)
            for values in (source_mean, source_std, target_mean, target_std))
        self.register_buffer("scale", source_std / target_std)
        self.register_buffer("shift", (source_mean - target_mean) / target_std)

    def forward(self, images: Tensor) -> Tensor:
        return torch.addcmul(self.shift.to(images.dtype), images, self.scale.to(images.dtype))


class Cutout(nn.Module):
    """ASL's Cutout (its train.py, every image): a box of `fraction` of each side around a uniformly drawn centre,
    clipped at the border, filled with one uniformly drawn colour; uint8 [C, H, W] in and out."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        half_h, half_w = int(self.fraction * height + 0.5) // 2, int(self.fraction * width + 0.5) // 2
        centre_y, centre_x = (int(torch.randint(side, ())) for side in (height, width))
        colour = torch.randint(0, 256, (image.shape[0], 1, 1), dtype=image.dtype)
        out = image.clone()
        out[:, max(centre_y - half_h, 0):centre_y + half_h, max(centre_x - half_w, 0):centre_x + half_w] = colour
        return out


class RandAugment(nn.Module):
    """timm's RandAugment (a config such as rand-m9-mstd0.5) on a uint8 image tensor, through PIL as timm applies
    it; geometric operations fill with `fill` (the mean colour, as timm's transform factory sets it).

    Its draws come from Python's `random` and NumPy's global generator, which the training loader seeds per image
    (udtimm.data.loader.EpochSeeded), so the augmentation does not depend on the loader worker that draws it.
    """

    def __init__(self, config: str, img_size: int, fill: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.augment = rand_augment_transform(config, {"translate_const": int(img_size * 0.45),
                                                       "img_mean": tuple(fill)})

    def forward(self, image: Tensor) -> Tensor:
        return F.pil_to_tensor(self.augment(F.to_pil_image(image)))


def recipe_steps(img_size: int, mean: Sequence[float], aa: str | None = None, cutout: float = 0.0) -> list[nn.Module]:
    """--cutout then --aa, after the crop and flip (ASL's order: Cutout, then RandAugment), before random erasing."""
    fill = [min(255, round(255 * value)) for value in mean]
    return [*([Cutout(cutout)] if cutout > 0 else []), *([RandAugment(aa, img_size, fill)] if aa else [])]


ERASE = "erase"  # the key of random erasing's box in a train_pixels item
PIXELS = "pixels"


def train_geometry(img_size: int, hflip: float, crop_scales: Sequence[float]) -> list[nn.Module]:
    """Resize to 8/7 of the input size, multi-scale crop, flip: the train transform's pixel work (Sec. 5.1)."""
    return [
        v2.Resize([resize_size(img_size)] * 2, antialias=True),
        MultiScaleCrop(img_size, crop_scales),
        v2.RandomHorizontalFlip(hflip),
    ]


def train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    reprob: float = 0.5,
    hflip: float = 0.5,
    crop_scales: Sequence[float] = CROP_SCALES,
    aa: str | None = None,
    cutout: float = 0.0,
) -> nn.Module:
    """Resize to 8/7 of the input size, multi-scale crop, flip, normalise, random erasing (Sec. 5.1); --cutout and
    --aa (recipe_steps) before the normalisation."""
    steps = [*train_geometry(img_size, hflip, crop_scales), *recipe_steps(img_size, mean, aa, cutout),
             NormalizeImage(mean, std)]
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value=0))
    return v2.Compose(steps)


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Resize straight to img_size x img_size, normalise (Sec. 5.1)."""
    return v2.Compose([eval_pixels(img_size), NormalizeImage(mean, std)])


def eval_pixels(img_size: int) -> nn.Module:
    """eval_transform without its normalisation: uint8 [3, img_size, img_size]."""
    return v2.Resize([img_size, img_size], antialias=True)


def draw_erase_box(erasing: v2.RandomErasing, img_size: int) -> tuple[int, int, int, int]:
    """The (top, left, height, width) that `erasing` would zero in an image of that size, from the same random
    draws in the same order; height 0 when it erases nothing."""
    if torch.rand(1) >= erasing.p:
        return 0, 0, 0, 0
    params = erasing.make_params([torch.empty(3, img_size, img_size, device="meta")])  # it reads only the size
    return (params["i"], params["j"], params["h"], params["w"]) if params["v"] is not None else (0, 0, 0, 0)


class TrainPixels(nn.Module):
    """train_transform up to its normalisation, on uint8; with random erasing, the item is a dict of the image
    (PIXELS) and the box to erase (ERASE, int64 [4]), drawn here so the draws stay in train_transform's order."""

    def __init__(self, img_size: int, reprob: float = 0.5, hflip: float = 0.5,
                 crop_scales: Sequence[float] = CROP_SCALES, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 aa: str | None = None, cutout: float = 0.0) -> None:
        super().__init__()
        self.img_size = img_size
        self.geometry = v2.Compose([*train_geometry(img_size, hflip, crop_scales),
                                    *recipe_steps(img_size, mean, aa, cutout)])
        self.erasing = v2.RandomErasing(p=reprob, value=0) if reprob > 0 else None

    def forward(self, image: Tensor) -> Tensor | dict[str, Tensor]:
        image = self.geometry(image)
        if self.erasing is None:
            return image
        return {PIXELS: image, ERASE: torch.tensor(draw_erase_box(self.erasing, self.img_size))}


def erase_boxes(images: Tensor, boxes: Tensor) -> Tensor:
    """Zero boxes[i] = (top, left, height, width) in images[i] [B, C, H, W], all at once on the images' device."""
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    top, left, height, width = (side.view(-1, 1, 1) for side in boxes.unbind(1))
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return images.masked_fill(inside.unsqueeze(1), 0)


class NormalizeBatch:
    """The device half of the loaders' transforms: a batch of train_pixels or eval_pixels items (uint8) becomes
    normalised float32 model input, random erasing's boxes zeroed, without the host waiting for the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        self.normalize = NormalizeImage(mean, std).to(device)

    def __call__(self, images: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(images, Tensor):
            return self.normalize(images)
        return erase_boxes(self.normalize(images[PIXELS]), images[ERASE])
