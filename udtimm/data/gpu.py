"""--gpu-decode: workers read file bytes only; the device decodes them (nvJPEG) and applies the paper's transforms.

The transforms are those of udtimm.data.transforms (Sec. 5.1) with the same random draws in the same order, so a
seeded batch gets the crops, flips and erasings the CPU path would give it; only the pixel work moves, batched by
image size and crop size instead of one image at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .base import CorruptImageError
from .transforms import CROP_SCALES, ERASE, PIXELS, NormalizeBatch, draw_erase_box, multi_scale_crop_box, resize_size

JPEG_MAGIC = [0xFF, 0xD8]


@dataclass
class EncodedBatch:
    """The encoded files of a batch, concatenated: one shared-memory tensor per batch from a worker, not one per file.

    It has no `.to` on purpose: accelerate's device placement then leaves it on the CPU, where nvJPEG wants it.
    """

    data: Tensor  # uint8 [total bytes]
    sizes: list[int]  # bytes per file, in batch order

    def files(self) -> list[Tensor]:
        return list(self.data.split(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)


def collate_encoded(batch: Sequence[tuple]) -> tuple:
    """(EncodedBatch, target, difficult, index) of (encoded file, target, difficult, index) items."""
    files = [item[0] for item in batch]
    return (EncodedBatch(torch.cat(files), [len(f) for f in files]), *default_collate([item[1:] for item in batch]))


def decode_images(files: list[Tensor], device: torch.device) -> list[Tensor]:
    """uint8 RGB [3, H, W] images on `device`: JPEGs in one batched call (nvJPEG on CUDA), other formats on the CPU."""
    is_jpeg = [f[:2].tolist() == JPEG_MAGIC for f in files]
    jpegs = [f for f, jpeg in zip(files, is_jpeg, strict=True) if jpeg]
    try:
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
        return [next(decoded) if jpeg else decode_image(f, mode=ImageReadMode.RGB).to(device)
                for f, jpeg in zip(files, is_jpeg, strict=True)]
    except RuntimeError as e:
        raise CorruptImageError(f"cannot decode an image of this batch on {device}: {e}; run without --gpu-decode "
                                "to find it by name, or with --skip-corrupt to leave it out") from e


def resize_all(images: list[Tensor], size: int) -> list[Tensor]:
    """Each image resized to size x size; images of one shape share one call (VOC has few distinct shapes)."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[tuple(image.shape)].append(i)
    out: list[Tensor] = list(images)
    for members in by_shape.values():
        resized = F.resize(torch.stack([images[i] for i in members]), [size, size], antialias=True)
        for i, image in zip(members, resized, strict=True):
            out[i] = image
    return out


class DeviceTransform:
    """train_transform or eval_transform (udtimm.data.transforms) for a whole EncodedBatch, on `device`.

    This code never waits for the device (no .item(), no copy from pageable memory), so that it can prepare the
    next batch while the GPU still works on the previous step; nvJPEG's decode itself makes the host wait, which is
    why udtimm.data.feed runs it in a thread of its own (docs/throughput.md).
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                 train: bool, reprob: float = 0.5, hflip: float = 0.5,
                 crop_scales: Sequence[float] = CROP_SCALES) -> None:
        self.img_size, self.train, self.hflip, self.crop_scales = img_size, train, hflip, tuple(crop_scales)
        self.device = torch.device(device)
        self.finish = NormalizeBatch(mean, std, self.device)
        # torchvision's nvJPEG writes its output from a stream of its own without waiting for the current stream, so
        # its buffers must not be memory the current stream freed but still uses (the last step's activations: NaN
        # losses on an H200). Allocated under this side stream, they come from the side stream's own pool.
        self.decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.erasing = v2.RandomErasing(p=reprob, value=0) if train and reprob > 0 else None

    def decode(self, batch: EncodedBatch) -> list[Tensor]:
        if self.decode_stream is None:
            return decode_images(batch.files(), self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.decode_stream):
            images = decode_images(batch.files(), self.device)
        current.wait_stream(self.decode_stream)
        for image in images:
            image.record_stream(current)  # once freed, reused by the side stream only after the current one is done
        return images

    def __call__(self, batch: EncodedBatch) -> Tensor:
        images = self.decode(batch)
        if not self.train:
            return self.finish(torch.stack(resize_all(images, self.img_size)))
        side = resize_size(self.img_size)
        images = resize_all(images, side)
        crops, flips, erasures = self.draw(len(images), side)
        by_crop: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (_, _, width, height) in enumerate(crops):
            by_crop[width, height].append(i)
        for (width, height), members in by_crop.items():
            boxes = [images[i][:, crops[i][1]:crops[i][1] + height, crops[i][0]:crops[i][0] + width] for i in members]
            resized = F.resize(torch.stack(boxes), [self.img_size, self.img_size], antialias=True)
            for i, image in zip(members, resized, strict=True):
                images[i] = F.horizontal_flip(image) if flips[i] else image
        pixels = torch.stack(images)
        if erasures is None:
            return self.finish(pixels)
        return self.finish({PIXELS: pixels, ERASE: erasures.to(self.device, non_blocking=True)})

    def draw(self, count: int, side: int) -> tuple[list, list[bool], Tensor | None]:
        """Per image, in the CPU pipeline's order: crop box (Python random), flip, erasing (torch's generator).

        The erasing boxes come as one int64 [count, 4] tensor, pinned on CUDA so that its copy does not wait.
        """
        crops, flips, erasures = [], [], []
        for _ in range(count):
            crops.append(multi_scale_crop_box(side, side, self.crop_scales))
            flips.append(bool(torch.rand(1) < self.hflip))
            if self.erasing is not None:
                erasures.append(draw_erase_box(self.erasing, self.img_size))
        if self.erasing is None:
            return crops, flips, None
        boxes = torch.tensor(erasures, dtype=torch.int64)
        return crops, flips, boxes.pin_memory() if self.device.type == "cuda" else boxes
