"""The user's own images, without annotations: a folder or a list of files, for predictions (validate.py --images)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import DatasetError, EncodedImage, read_encoded, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their .jpg/.jpeg/.png files (recursive, sorted); DatasetError if none."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found.extend(sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            ))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise DatasetError(f"{path} is neither an image file nor a folder")
    if not found:
        raise DatasetError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found in {', '.join(paths)}")
    return found


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
