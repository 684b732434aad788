"""The user's own images, without annotations: folders, files or glob patterns, for predictions (predict.py)."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

from .base import CorruptImageError, DatasetError, EncodedImage, has_torchvision_signature, read_encoded, read_image

LOGGER = logging.getLogger(__name__)
NAMED_SKIPPED = 10  # file names a note about a folder's left-out files lists before it counts the rest


def image_extensions() -> frozenset[str]:
    """The file extensions of the formats PIL decodes (torchvision's JPEG, PNG, GIF and WEBP among them), lower case.

    PIL's stub formats (HDF5, GRIB, BUFR, WMF: identified, never decoded without a plugin of one's own) and MPEG
    (video, identified only) are left out: a folder's .h5 or .mpg files are not pictures to label.
    """
    Image.init()
    decoded = {name for name, (factory, _) in Image.OPEN.items()
               if name != "MPEG" and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in decoded)


def list_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their image files (recursive, sorted; image_extensions), glob patterns to
    what they match; every file checked to be an image before any is decoded. DatasetError naming the input at
    fault. A folder's other files are left out with a warning naming them (logging), never silently."""
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
    extensions = image_extensions()
    inside, other = [], []
    for name in sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names):
        (inside if os.path.splitext(name)[1].lower() in extensions else other).append(name)
    if not inside:
        raise DatasetError(f"no image files in {path}{_listed(path, other)}")
    if other:
        LOGGER.warning("left out %d file(s) of %s, whose extensions are not those of an image format%s",
                       len(other), path, _listed(path, other))
    return inside


def _listed(folder: str, files: Sequence[str]) -> str:
    """': a.txt, b.csv' (names relative to `folder`, the first NAMED_SKIPPED) or '' when there are none."""
    if not files:
        return ""
    names = [os.path.relpath(file, folder) for file in files[:NAMED_SKIPPED]]
    more = f" and {len(files) - NAMED_SKIPPED} more" if len(files) > NAMED_SKIPPED else ""
    return f": {', '.join(names)}{more}"


def check_image_file(path: str) -> None:
    """CorruptImageError naming `path` unless it starts like a JPEG, PNG, GIF or WEBP file or PIL identifies its
    format (a look at its first bytes, so that a wrong file stops a run before the first batch rather than at it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as err:
        raise CorruptImageError(f"cannot read image {path}: {err.strerror}") from err
    if has_torchvision_signature(head):
        return
    try:
        with Image.open(path):
            return
    except UnidentifiedImageError as err:
        raise CorruptImageError(f"{path} is not an image (no format that PIL or torchvision reads)") from err
    except OSError as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


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
