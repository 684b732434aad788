"""What every dataset loader produces: samples, the dataset wrapper, errors and image reading."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from udtimm.errors import CorruptImageError, DatasetError

# The first bytes of the formats torchvision decodes (JPEG, PNG, GIF, WEBP at offset 8); PIL reads the others.
SIGNATURES = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF8"), (8, b"WEBP"))
INTEGER_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # read as 16-bit values (pil_pixels)


# The target value of a label that nobody annotated (docs/datasets.md#missing-labels): neither present nor absent.
UNKNOWN = -1.0


@dataclass(frozen=True)
class Sample:
    """One image: its id, absolute path and labels (docs/method.md#difficult-labels).

    `target` is float32 [C]: 1 = present (difficult or not), 0 = absent, UNKNOWN (-1) = not annotated;
    `difficult` is bool [C], True where the class is present only through difficult objects.
    """

    image_id: str
    path: str
    target: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        # Caught here, a loader bug names the image instead of surfacing as a shape error in collate.
        if self.target.dtype != np.float32 or self.target.ndim != 1:
            raise TypeError(f"{self.image_id}: target must be float32 [C], got {self.target.dtype} {self.target.shape}")
        if self.difficult.dtype != np.bool_ or self.difficult.shape != self.target.shape:
            raise TypeError(
                f"{self.image_id}: difficult must be bool {self.target.shape}, "
                f"got {self.difficult.dtype} {self.difficult.shape}"
            )


def read_image(path: str) -> Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W] (decode_file); any failure raises CorruptImageError."""
    try:
        data = read_file(path)
    except Exception as e:  # torchvision raises bare RuntimeErrors for missing, empty or unreadable files
        raise CorruptImageError(f"cannot read image {path}: {e}") from e
    return decode_file(data, path)


def decode_file(data: Tensor, path: str) -> Tensor:
    """A file's bytes (1-D uint8) as a uint8 RGB image [3, H, W] (docs/datasets.md#image-files); CorruptImageError
    naming `path` when it cannot be decoded.

    JPEG, PNG, GIF and WEBP go to torchvision's decoders (the fast path), every other format and what those decoders
    refuse (an animated WEBP) to PIL. An animation gives its first frame, 16-bit pixels their high byte.
    """
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        return decode_with_pil(data, path, err)
    if image.ndim == 4:  # an animated GIF: [frames, 3, H, W]
        image = image[0]
    # A 16-bit PNG decodes to uint16; to_dtype keeps the high byte (v >> 8), as PIL does for 16-bit RGB.
    return image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)


def decode_with_pil(data: Tensor, path: str, torchvision_error: RuntimeError) -> Tensor:
    """decode_file's PIL path; the error names the file, with torchvision's reason for the formats it decodes."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return pil_pixels(image)
    except UnidentifiedImageError as e:
        reason = torchvision_error if has_torchvision_signature(data[:12].numpy().tobytes()) else \
            "not an image format that PIL or torchvision reads"
        raise CorruptImageError(f"cannot read image {path}: {reason}") from e
    except Exception as e:  # PIL's errors for damaged files are of many types (OSError, SyntaxError, struct.error...)
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


def has_torchvision_signature(head: bytes) -> bool:
    """Whether a file's first 12 bytes are those of a format torchvision decodes (SIGNATURES)."""
    return any(head[offset:offset + len(magic)] == magic for offset, magic in SIGNATURES)


def pil_pixels(image: Image.Image) -> Tensor:
    """A PIL image of any mode as uint8 RGB [3, H, W] (docs/datasets.md#image-files).

    16-bit and 32-bit integer grayscale (I;16*, I) keep the high byte of their 0-65535 range, float grayscale (F)
    maps 0-1 to 0-255, both clipped; every other mode is PIL's own conversion to RGB (alpha dropped).
    """
    if image.mode in INTEGER_GRAY_MODES:
        gray = torch.from_numpy(np.asarray(image).astype(np.int32)).clamp(0, 65535) >> 8
    elif image.mode == "F":
        gray = torch.from_numpy(np.array(image, dtype=np.float32)).clamp(0, 1).mul(255).round()
    else:
        return F.pil_to_tensor(image.convert("RGB"))
    return gray.to(torch.uint8).expand(3, -1, -1).contiguous()


@dataclass(frozen=True)
class EncodedImage:
    """A file's bytes (1-D uint8), decoded later on the device (--gpu-decode), with its path to name it if it fails."""

    data: Tensor
    path: str


def read_encoded(path: str) -> EncodedImage:
    """The file's bytes, decoded later on the device (--gpu-decode); raises CorruptImageError.

    Only a missing or empty file is caught here: decoding errors surface where the batch is decoded.
    """
    try:
        data = read_file(path)
    except Exception as e:  # torchvision raises bare RuntimeErrors for missing or unreadable files
        raise CorruptImageError(f"cannot read image {path}: {e}") from e
    if data.numel() == 0:
        raise CorruptImageError(f"cannot read image {path}: the file is empty")
    return EncodedImage(data, path)


def check_unique_ids(samples: Iterable[Sample], source: str) -> None:
    """Raise DatasetError naming `source` and the id if an image id is listed twice."""
    seen: set[str] = set()
    for s in samples:
        if s.image_id in seen:
            raise DatasetError(f"{source}: image id {s.image_id!r} is listed twice")
        seen.add(s.image_id)


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images listed by file name (decoded on access) with multi-hot targets and difficult masks."""

    def __init__(
        self,
        samples: list[Sample],
        classes: list[str],
        transform: Callable[[Tensor], Tensor] | None = None,
        name: str = "",
    ) -> None:
        for s in samples:
            if s.target.shape != (len(classes),):
                raise DatasetError(f"{name or 'dataset'}: {s.image_id} has {s.target.shape[0]} labels, "
                                   f"expected {len(classes)} classes")
        self.samples = samples
        self.classes = list(classes)
        self.transform = transform
        self.name = name
        # True: items carry the encoded file instead of the decoded image (--gpu-decode; see udtimm.data.gpu).
        self.encoded = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | EncodedImage, Tensor, Tensor, int]:
        """Return (image, target float32 [C], difficult bool [C], index); the index lets callers match outputs."""
        s = self.samples[index]
        image = read_encoded(s.path) if self.encoded else read_image(s.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(s.target.copy()), torch.from_numpy(s.difficult.copy()), index

    def targets(self) -> Tensor:
        """All targets, float32 [N, C]."""
        return _stack([s.target for s in self.samples], len(self.classes), np.float32)

    def difficult_masks(self) -> Tensor:
        """All difficult masks, bool [N, C]."""
        return _stack([s.difficult for s in self.samples], len(self.classes), np.bool_)

    def __repr__(self) -> str:
        return f"MultiLabelDataset({self.name!r}, {len(self)} images, {len(self.classes)} classes)"


def hold_out(dataset: MultiLabelDataset, fraction: float, seed: int) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """(kept, held out): round(fraction * N) images of `dataset` (at least one), drawn by `seed` from its sorted
    image ids, so the same images are held out whatever the order the split lists them in. No image is in both."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--holdout-fraction is the part of the train split held out, in (0, 1): got {fraction}")
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise DatasetError(f"{dataset.name}: {len(dataset)} image(s) are too few to hold {fraction} of them out and "
                           "train on the rest")
    ids = sorted(s.image_id for s in dataset.samples)
    held = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count]}
    kept = [s for s in dataset.samples if s.image_id not in held]
    out = [s for s in dataset.samples if s.image_id in held]
    return (MultiLabelDataset(kept, dataset.classes, dataset.transform, f"{dataset.name} without holdout"),
            MultiLabelDataset(out, dataset.classes, dataset.transform, f"{dataset.name} holdout"))


def drop_labels(dataset: MultiLabelDataset, fraction: float, seed: int) -> MultiLabelDataset:
    """--drop-labels: the same images with round(fraction * N) labels of each class made UNKNOWN, positives and
    negatives alike, on images drawn per class by `seed` from the sorted image ids (so whatever the order the split
    lists them in). A hidden difficult label loses its flag: nobody annotated it."""
    if not 0 <= fraction < 1:
        raise DatasetError(f"--drop-labels is the part of each class's training labels hidden, in [0, 1): got "
                           f"{fraction}")
    order = np.array(sorted(range(len(dataset)), key=lambda index: dataset.samples[index].image_id), dtype=int)
    hidden = np.zeros((len(dataset), len(dataset.classes)), dtype=bool)
    count = round(fraction * len(order))
    rng = np.random.default_rng(seed)
    for column in range(len(dataset.classes)):
        hidden[order[rng.permutation(len(order))[:count]], column] = True
    samples = [Sample(s.image_id, s.path, np.where(hide, np.float32(UNKNOWN), s.target), s.difficult & ~hide)
               for s, hide in zip(dataset.samples, hidden, strict=True)]
    return MultiLabelDataset(samples, dataset.classes, dataset.transform, f"{dataset.name} with labels dropped")


def unknown_only_classes(dataset: MultiLabelDataset) -> list[str]:
    """The classes of which no image of `dataset` has a known label."""
    if not dataset.samples:
        return []
    known = (np.stack([s.target for s in dataset.samples]) >= 0).any(axis=0)
    return [name for name, any_known in zip(dataset.classes, known, strict=True) if not any_known]


def _stack(rows: list[np.ndarray], num_classes: int, dtype: type) -> Tensor:
    # np.stack fails on an empty list; an empty dataset still has a well-defined [0, C] shape.
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, num_classes), dtype=dtype))
