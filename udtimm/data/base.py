"""What every dataset loader produces: samples, the dataset wrapper, errors and image reading."""

from __future__ import annotations

import copy
import enum
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import overload

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


class Label(enum.IntEnum):
    """The state of one (image, class) label as a Sample stores it (docs/datasets.md#sparse-labels)."""

    ABSENT = 0  # verified absent
    PRESENT = 1
    DIFFICULT = 2  # present only through difficult objects (docs/method.md#difficult-labels)
    UNKNOWN = 3  # nobody annotated it


# A sample's labels: the classes whose state is not the dataset's unlisted one, ascending, each once.
LABELS_DTYPE = np.dtype([("class_id", np.int32), ("state", np.int8)])
# What a class that a sample does not list means: absent (VOC, COCO, CSV) or unknown (OpenImages-style data).
UNLISTED_STATES = {"absent": Label.ABSENT, "unknown": Label.UNKNOWN}
# The dense target value and difficult flag of each state, indexed by Label.
_TARGET_OF_STATE = np.array([0.0, 1.0, 1.0, UNKNOWN], dtype=np.float32)
_DIFFICULT_OF_STATE = np.array([False, False, True, False])
NO_LABELS = np.zeros(0, dtype=LABELS_DTYPE)
NO_LABELS.flags.writeable = False  # shared by every sample that lists nothing


def make_labels(states: dict[int, int]) -> np.ndarray:
    """A sample's labels from {class id: Label}; an empty dict gives the shared NO_LABELS."""
    if not states:
        return NO_LABELS
    return np.array(sorted(states.items()), dtype=LABELS_DTYPE)


def labels_from_dense(target: np.ndarray, difficult: np.ndarray, unlisted: str = "absent") -> np.ndarray:
    """A sample's labels from a dense target (1 present, 0 absent, UNKNOWN) and difficult mask [C]."""
    states = np.where(target == UNKNOWN, Label.UNKNOWN, np.where(target > 0.5, Label.PRESENT, Label.ABSENT))
    states = np.where(difficult & (target > 0.5), Label.DIFFICULT, states)
    listed = np.flatnonzero(states != UNLISTED_STATES[unlisted])
    if not len(listed):
        return NO_LABELS
    labels = np.empty(len(listed), dtype=LABELS_DTYPE)
    labels["class_id"], labels["state"] = listed, states[listed]
    return labels


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: its id, absolute path and sparse labels (docs/datasets.md#sparse-labels).

    `labels` (LABELS_DTYPE [k]) lists the classes whose Label differs from what the dataset makes of an unlisted
    class (MultiLabelDataset.unlisted): so memory grows with the labels, not with images x classes.
    """

    image_id: str
    path: str
    labels: np.ndarray = field(default_factory=lambda: NO_LABELS)

    def __post_init__(self) -> None:
        # Caught here, a loader bug names the image instead of surfacing as a wrong target in training.
        if self.labels.dtype != LABELS_DTYPE or self.labels.ndim != 1:
            raise TypeError(f"{self.image_id}: labels must be LABELS_DTYPE [k], got {self.labels.dtype} "
                            f"{self.labels.shape}")
        if len(self.labels) > 1 and not (np.diff(self.labels["class_id"]) > 0).all():
            raise ValueError(f"{self.image_id}: labels must list each class once, in ascending order")
        states = self.labels["state"]
        if len(states) and not ((states >= 0) & (states < len(Label))).all():
            raise ValueError(f"{self.image_id}: a label state is not a Label: {sorted(set(states.tolist()))}")

    @classmethod
    def from_dense(cls, image_id: str, path: str, target: np.ndarray, difficult: np.ndarray) -> Sample:
        """A sample of a dataset whose unlisted classes are absent, from a dense target and difficult mask [C]."""
        return cls(image_id, path, labels_from_dense(target, difficult))

    def dense(self, num_classes: int, unlisted: str = "absent") -> tuple[np.ndarray, np.ndarray]:
        """(target float32 [C]: 1 present, 0 absent, UNKNOWN; difficult bool [C]), the rows a batch is made of."""
        states = np.full(num_classes, UNLISTED_STATES[unlisted], dtype=np.int8)
        states[self.labels["class_id"]] = self.labels["state"]
        return _TARGET_OF_STATE[states], _DIFFICULT_OF_STATE[states]


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


def _pack_strings(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of `texts` end to end (uint8) and the offsets [N + 1] that cut them apart."""
    encoded = [text.encode() for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _take_runs(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs `values[offsets[r]:offsets[r + 1]]` of `rows`, end to end, and their new offsets."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    gather = np.repeat(offsets[rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[gather], new_offsets


class SampleTable(Sequence[Sample]):
    """A split's samples packed in a few arrays (docs/datasets.md#sparse-labels): image ids and paths as UTF-8 bytes,
    every label in one LABELS_DTYPE array, each cut by offsets. No Python object stands for an image, so a split of
    millions of images costs its bytes, and DataLoader workers share it without copying: the reference counts of
    per-image objects would make each worker's copy-on-write pages its own. Indexing gives a Sample; a slice or
    take() gives a table."""

    def __init__(self, ids: tuple[np.ndarray, np.ndarray], paths: tuple[np.ndarray, np.ndarray],
                 labels: tuple[np.ndarray, np.ndarray]) -> None:
        (self._ids, self._id_offsets), (self._paths, self._path_offsets) = ids, paths
        self._labels, self._label_offsets = labels
        for array in (self._ids, self._id_offsets, self._paths, self._path_offsets, self._labels,
                      self._label_offsets):
            array.flags.writeable = False  # a Sample's labels are a view of this table

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleTable:
        samples = list(samples)
        labels = np.concatenate([s.labels for s in samples]) if samples else NO_LABELS.copy()
        label_offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(s.labels) for s in samples], out=label_offsets[1:])
        return cls(_pack_strings(s.image_id for s in samples), _pack_strings(s.path for s in samples),
                   (labels, label_offsets))

    def __len__(self) -> int:
        return len(self._id_offsets) - 1

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SampleTable: ...

    def __getitem__(self, index: int | slice) -> Sample | SampleTable:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of a table of {len(self)}")
        row = index % len(self)
        first, last = self._label_offsets[row], self._label_offsets[row + 1]
        return Sample(self._text(self._ids, self._id_offsets, row), self._text(self._paths, self._path_offsets, row),
                      self._labels[first:last] if last > first else NO_LABELS)

    def take(self, rows: Sequence[int] | np.ndarray) -> SampleTable:
        """The samples at `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return SampleTable(_take_runs(self._ids, self._id_offsets, rows),
                           _take_runs(self._paths, self._path_offsets, rows),
                           _take_runs(self._labels, self._label_offsets, rows))

    def image_ids(self) -> list[str]:
        return [self._text(self._ids, self._id_offsets, row) for row in range(len(self))]

    def paths(self) -> list[str]:
        return [self._text(self._paths, self._path_offsets, row) for row in range(len(self))]

    def all_labels(self) -> np.ndarray:
        """Every sample's labels, end to end."""
        return self._labels

    @staticmethod
    def _text(blob: np.ndarray, offsets: np.ndarray, row: int) -> str:
        return blob[offsets[row]:offsets[row + 1]].tobytes().decode()


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images listed by file name (decoded on access) with sparse labels, given as dense targets and difficult
    masks one image at a time. `unlisted` says what a class that a sample does not list is: "absent" or "unknown"."""

    def __init__(
        self,
        samples: Iterable[Sample],
        classes: list[str],
        transform: Callable[[Tensor], Tensor] | None = None,
        name: str = "",
        unlisted: str = "absent",
    ) -> None:
        if unlisted not in UNLISTED_STATES:
            raise ValueError(f"unlisted must be one of {', '.join(UNLISTED_STATES)}, got {unlisted!r}")
        table = samples if isinstance(samples, SampleTable) else SampleTable.from_samples(samples)
        class_ids = table.all_labels()["class_id"]
        outside = np.flatnonzero((class_ids < 0) | (class_ids >= len(classes)))
        if len(outside):
            row = int(np.searchsorted(table._label_offsets, outside[0], side="right")) - 1
            raise DatasetError(f"{name or 'dataset'}: {table[row].image_id} has a label of class id "
                               f"{class_ids[outside[0]]}, expected ids 0 to {len(classes) - 1} of {len(classes)} "
                               "classes")
        self.samples = table
        self.classes = list(classes)
        self.transform = transform
        self.name = name
        self.unlisted = unlisted
        # True: items carry the encoded file instead of the decoded image (--gpu-decode; see udtimm.data.gpu).
        self.encoded = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | EncodedImage, Tensor, Tensor, int]:
        """Return (image, target float32 [C], difficult bool [C], index); the index lets callers match outputs."""
        s = self.samples[index]
        image = self.read(s)
        if self.transform is not None:
            image = self.transform(image)
        target, difficult = s.dense(len(self.classes), self.unlisted)
        return image, torch.from_numpy(target), torch.from_numpy(difficult), index

    def read(self, sample: Sample) -> Tensor | EncodedImage:
        """The sample's image, decoded, or its encoded bytes with --gpu-decode; a format that keeps its images
        elsewhere than in files (udtimm.data.shards) reads them here."""
        return read_encoded(sample.path) if self.encoded else read_image(sample.path)

    def dense_labels(self) -> tuple[Tensor, Tensor]:
        """All targets float32 [N, C] and difficult masks bool [N, C]: images x classes, for small sets only."""
        rows = [s.dense(len(self.classes), self.unlisted) for s in self.samples]
        return (_stack([target for target, _ in rows], len(self.classes), np.float32),
                _stack([difficult for _, difficult in rows], len(self.classes), np.bool_))

    def with_samples(self, samples: Iterable[Sample], name: str) -> MultiLabelDataset:
        """The same classes, transform, unlisted state and way of reading images over other samples."""
        subset = copy.copy(self)
        subset.samples = samples if isinstance(samples, SampleTable) else SampleTable.from_samples(samples)
        subset.name = name
        return subset

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
    image_ids = dataset.samples.image_ids()
    ids = sorted(image_ids)
    held = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count]}
    is_held = np.array([image_id in held for image_id in image_ids], dtype=bool)
    kept, out = dataset.samples.take(np.flatnonzero(~is_held)), dataset.samples.take(np.flatnonzero(is_held))
    return (dataset.with_samples(kept, f"{dataset.name} without holdout"),
            dataset.with_samples(out, f"{dataset.name} holdout"))


def drop_labels(dataset: MultiLabelDataset, fraction: float, seed: int) -> MultiLabelDataset:
    """--drop-labels: the same images with round(fraction * N) labels of each class made UNKNOWN, positives and
    negatives alike, on images drawn per class by `seed` from the sorted image ids (so whatever the order the split
    lists them in). A hidden difficult label loses its flag: nobody annotated it."""
    if not 0 <= fraction < 1:
        raise DatasetError(f"--drop-labels is the part of each class's training labels hidden, in [0, 1): got "
                           f"{fraction}")
    image_ids = dataset.samples.image_ids()
    order = np.array(sorted(range(len(dataset)), key=lambda index: image_ids[index]), dtype=int)
    hidden: list[list[int]] = [[] for _ in range(len(dataset))]
    count = round(fraction * len(order))
    rng = np.random.default_rng(seed)
    for column in range(len(dataset.classes)):
        for row in order[rng.permutation(len(order))[:count]]:
            hidden[row].append(column)
    samples = [Sample(s.image_id, s.path, _hide(s.labels, classes, dataset.unlisted)) if classes else s
               for s, classes in zip(dataset.samples, hidden, strict=True)]
    return dataset.with_samples(samples, f"{dataset.name} with labels dropped")


def _hide(labels: np.ndarray, classes: list[int], unlisted: str) -> np.ndarray:
    """`labels` with the labels of `classes` made unknown."""
    states = {int(c): int(state) for c, state in zip(labels["class_id"], labels["state"], strict=True)}
    states.update((c, Label.UNKNOWN) for c in classes)
    if unlisted == "unknown":
        states = {c: state for c, state in states.items() if state != Label.UNKNOWN}
    return make_labels(states)


def label_counts(dataset: MultiLabelDataset) -> np.ndarray:
    """int64 [C, 4]: how many images of `dataset` hold each class in each Label state (columns indexed by Label)."""
    listed = dataset.samples.all_labels()
    counts = np.zeros((len(dataset.classes), len(Label)), dtype=np.int64)
    np.add.at(counts, (listed["class_id"], listed["state"]), 1)
    counts[:, UNLISTED_STATES[dataset.unlisted]] += len(dataset) - counts.sum(axis=1)
    return counts


def unknown_only_classes(dataset: MultiLabelDataset) -> list[str]:
    """The classes of which no image of `dataset` has a known label."""
    if not dataset.samples:
        return []
    known = label_counts(dataset)[:, [Label.ABSENT, Label.PRESENT, Label.DIFFICULT]].sum(axis=1) > 0
    return [name for name, any_known in zip(dataset.classes, known, strict=True) if not any_known]


def _stack(rows: list[np.ndarray], num_classes: int, dtype: type) -> Tensor:
    # np.stack fails on an empty list; an empty dataset still has a well-defined [0, C] shape.
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, num_classes), dtype=dtype))
