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
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .base import CorruptImageError, EncodedImage, decode_file
from .transforms import CROP_SCALES, ERASE, PIXELS, NormalizeBatch, draw_erase_box, multi_scale_crop_box, resize_size


@dataclass
class PartialBatch:
    """What a BatchTransform returns when it had to leave images out (--gpu-decode with --skip-corrupt: files that
    the workers read but the device could not decode)."""

    images: Tensor
    kept: list[int]  # the positions in the batch of the images that remain
    messages: list[str]  # why each left-out image was left out, naming its file


JPEG_MAGIC = [0xFF, 0xD8]


@dataclass
class EncodedBatch:
    """The encoded files of a batch, concatenated: one shared-memory tensor per batch from a worker, not one per file.

    It has no `.to` on purpose: accelerate's device placement then leaves it on the CPU, where nvJPEG wants it.
    """

    data: Tensor  # uint8 [total bytes]
    sizes: list[int]  # bytes per file, in batch order
    paths: list[str]  # to name a file that cannot be decoded

    def files(self) -> list[Tensor]:
        return list(self.data.split(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)


def collate_encoded(batch: Sequence[tuple]) -> tuple:
    """(EncodedBatch, target, difficult, index) of (EncodedImage, target, difficult, index) items."""
    files: list[EncodedImage] = [item[0] for item in batch]
    return (EncodedBatch(torch.cat([f.data for f in files]), [f.data.numel() for f in files], [f.path for f in files]),
            *default_collate([item[1:] for item in batch]))


def is_jpeg(file: Tensor) -> bool:
    return file[:2].tolist() == JPEG_MAGIC


def decode_images(batch: EncodedBatch, device: torch.device) -> tuple[list[Tensor], dict[int, str]]:
    """uint8 RGB [3, H, W] images on `device`: JPEGs in one batched call (nvJPEG on CUDA), other formats on the CPU
    (udtimm.data.base.decode_file: 16-bit PNGs, BMPs, TIFFs... as the CPU path decodes them).

    If the batched call fails, each file is decoded alone; the second value then gives, by position in the batch,
    the error of each file that could not be decoded (its image is left out of the first).
    """
    files = batch.files()
    jpeg = [is_jpeg(f) for f in files]
    try:
        decoded = iter(decode_jpeg([f for f, j in zip(files, jpeg, strict=True) if j], mode=ImageReadMode.RGB,
                                   device=device) if any(jpeg) else [])
        return [next(decoded) if j else decode_file(f, path).to(device)
                for f, j, path in zip(files, jpeg, batch.paths, strict=True)], {}
    except (RuntimeError, CorruptImageError):
        pass  # one bad file fails the whole call: decoding one at a time finds it, and keeps the others
    images, unreadable = [], {}
    for position, (file, path) in enumerate(zip(files, batch.paths, strict=True)):
        try:
            images.append(decode_one(file, path, device))
        except CorruptImageError as e:
            unreadable[position] = str(e)
    return images, unreadable


def decode_one(file: Tensor, path: str, device: torch.device) -> Tensor:
    if is_jpeg(file):
        try:
            return decode_jpeg(file, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # nvJPEG does not read every JPEG that libjpeg reads: the CPU has the last word
    return decode_file(file, path).to(device)


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

    A batch of JPEGs never makes this code wait for the device (no .item(), no copy from pageable memory), so that
    it can prepare the next batch while the GPU still works on the previous step; nvJPEG's decode itself makes the
    host wait, which is why udtimm.data.feed runs it in a thread of its own (docs/throughput.md). Other formats and
    files that fail the batched decode are decoded on the CPU and copied, which waits.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                 train: bool, reprob: float = 0.5, hflip: float = 0.5,
                 crop_scales: Sequence[float] = CROP_SCALES, skip_corrupt: bool = False) -> None:
        self.img_size, self.train, self.hflip, self.crop_scales = img_size, train, hflip, tuple(crop_scales)
        self.skip_corrupt = skip_corrupt
        self.device = torch.device(device)
        self.finish = NormalizeBatch(mean, std, self.device)
        # torchvision's nvJPEG writes its output from a stream of its own without waiting for the current stream, so
        # its buffers must not be memory the current stream freed but still uses (the last step's activations: NaN
        # losses on an H200). Allocated under this side stream, they come from the side stream's own pool.
        self.decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.erasing = v2.RandomErasing(p=reprob, value=0) if train and reprob > 0 else None

    def decode(self, batch: EncodedBatch) -> tuple[list[Tensor], dict[int, str]]:
        if self.decode_stream is None:
            return decode_images(batch, self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.decode_stream):
            images, unreadable = decode_images(batch, self.device)
        current.wait_stream(self.decode_stream)
        for image in images:
            image.record_stream(current)  # once freed, reused by the side stream only after the current one is done
        return images, unreadable

    def __call__(self, batch: EncodedBatch) -> Tensor | PartialBatch:
        """The batch's model input; with skip_corrupt, a PartialBatch when some files could not be decoded."""
        images, unreadable = self.decode(batch)
        if unreadable and not self.skip_corrupt:
            raise CorruptImageError(f"{next(iter(unreadable.values()))} (--skip-corrupt leaves such images out)")
        pixels = self.finish(self.transform(images)) if images else torch.empty(0, device=self.device)
        if not unreadable:
            return pixels
        kept = [i for i in range(len(batch)) if i not in unreadable]
        return PartialBatch(pixels, kept, list(unreadable.values()))

    def transform(self, images: list[Tensor]) -> Tensor | dict[str, Tensor]:
        """The pixel work of the eval or train transform on decoded images; NormalizeBatch's input."""
        if not self.train:
            return torch.stack(resize_all(images, self.img_size))
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
                images[i] = image
        pixels = torch.stack(images)
        # One flip of the whole batch and one select, instead of a flip per flipped image: fewer kernel launches.
        pixels = torch.where(self.to_device(torch.tensor(flips)).view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        return pixels if erasures is None else {PIXELS: pixels, ERASE: self.to_device(erasures)}

    def to_device(self, values: Tensor) -> Tensor:
        """A small host tensor on the device, its copy queued without the host waiting (pinned first on CUDA)."""
        if self.device.type == "cuda":
            values = values.pin_memory()
        return values.to(self.device, non_blocking=True)

    def draw(self, count: int, side: int) -> tuple[list, list[bool], Tensor | None]:
        """Per image, in the CPU pipeline's order: crop box (Python random), flip, erasing (torch's generator).

        The erasing boxes come as one int64 [count, 4] host tensor.
        """
        crops, flips, erasures = [], [], []
        for _ in range(count):
            crops.append(multi_scale_crop_box(side, side, self.crop_scales))
            flips.append(bool(torch.rand(1) < self.hflip))
            if self.erasing is not None:
                erasures.append(draw_erase_box(self.erasing, self.img_size))
        if self.erasing is None:
            return crops, flips, None
        return crops, flips, torch.tensor(erasures, dtype=torch.int64)
