"""The user's own images, without annotations: folders, files or glob patterns, for predictions (predict.py)."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import CorruptImageError, DatasetError, EncodedImage, read_encoded, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The first bytes of the formats torchvision decodes (JPEG, PNG, GIF, WEBP at offset 8).
SIGNATURES = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF8"), (8, b"WEBP"))


def list_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their .jpg/.jpeg/.png files (recursive, sorted), glob patterns to what
    they match; every file checked to be an image before any is decoded. DatasetError naming the input at fault."""
    found: list[str] = []
    for path in paths:
        if not os.path.exists(path) and glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DatasetError(f"no file matches {path}")
            for match in matches:
                found.extend(_expand(match))
        else:
            found.extend(_expand(path))
    if not found:
        raise DatasetError("no images given")
    for path in found:
        check_image_file(path)
    return found


def _expand(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetError(f"{path} is neither an image file nor a folder")
    inside = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                    if name.lower().endswith(IMAGE_EXTENSIONS))
    if not inside:
        raise DatasetError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found in {path}")
    return inside


def check_image_file(path: str) -> None:
    """CorruptImageError naming `path` unless it starts like a JPEG, PNG, GIF or WEBP file (a cheap look at its
    first bytes, so that a wrong file stops a run before the first batch rather than at it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as err:
        raise CorruptImageError(f"cannot read image {path}: {err.strerror}") from err
    if not any(head[offset:offset + len(magic)] == magic for offset, magic in SIGNATURES):
        raise CorruptImageError(f"{path} is not an image (JPEG, PNG, GIF or WEBP)")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images by path, shaped like MultiLabelDataset's items (all-zero labels) so that engine.predict runs on them."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Tensor], Tensor] | None = None,
                 num_classes: int = 0) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.num_classes = num_classes
        self.encoded = False  # True: items carry the file's bytes, decoded on the device (--gpu-decode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | EncodedImage, Tensor, Tensor, int]:
        """(image, zero target float32 [C], all-False difficult [C], index); a bad file raises CorruptImageError."""
        image = read_encoded(self.paths[index]) if self.encoded else read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.zeros(self.num_classes), torch.zeros(self.num_classes, dtype=torch.bool), index
