"""--dataset wds: a split read from the WebDataset shards that `python -m udtimm.data.shards` writes
(docs/datasets.md#shards).

A split's samples come from its label index alone (no tar is scanned to list them); each image is then read by
position from its shard, which every process (each DataLoader worker included) opens for itself on first use.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from udtimm.errors import ConfigError

from .base import (
    LABELS_DTYPE,
    NO_LABELS,
    UNLISTED_STATES,
    CorruptImageError,
    DatasetError,
    EncodedImage,
    MultiLabelDataset,
    Sample,
    decode_file,
)

FORMAT = "udtimm-webdataset-1"
INFO = "_info.json"
INFO_KEYS = ("format", "classes", "unlisted", "source", "selection", "aliases", "splits")
# Keys are the running index of a record in its split, zero-padded: image ids may hold dots and slashes, which
# WebDataset reads as extensions and folders.
KEY_DIGITS = 9
# Shards each process keeps open (two file descriptors each, and wids' index of its headers). A shuffled epoch
# touches every shard of the split in every batch, so a split of more shards reopens (re-indexes) them as it goes.
OPEN_SHARDS = 64
LABEL_INDEX_ARRAYS = ("image_ids", "shard", "position", "labels", "label_offsets")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def label_index_name(split: str) -> str:
    return f"{split}-labels.npz"


def record_key(index: int) -> str:
    """The key of the split's `index`-th record."""
    return f"{index:0{KEY_DIGITS}d}"


def read_info(root: str) -> dict:
    """The _info.json of a shard folder; DatasetError naming it when it is missing or not udtimm's."""
    path = os.path.join(root, INFO)
    try:
        with open(path) as handle:
            info = json.load(handle)
    except FileNotFoundError as err:
        raise DatasetError(f"{path} does not exist: --dataset wds reads a folder written by python -m "
                           "udtimm.data.shards (docs/datasets.md#shards)") from err
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read it as JSON: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise DatasetError(f"{path}: format {found!r}, expected {FORMAT!r} (a folder written by python -m "
                           "udtimm.data.shards)")
    missing = [key for key in INFO_KEYS if key not in info]
    if missing or info["unlisted"] not in UNLISTED_STATES:
        raise DatasetError(f"{path}: " + (f"lacks {', '.join(missing)}" if missing else
                                          f"unlisted is {info['unlisted']!r}, not one of {', '.join(UNLISTED_STATES)}"))
    return info


def find_info(root: str | None) -> dict | None:
    """read_info, or None when `root` holds no _info.json: for the defaults worked out while the flags are parsed,
    before loading says what is missing."""
    return read_info(root) if root and os.path.isfile(os.path.join(root, INFO)) else None


def split_entry(root: str, info: dict, split: str) -> dict:
    """The _info.json entry of `split`; DatasetError naming the file and the splits it has."""
    if split not in info["splits"]:
        raise DatasetError(f"{os.path.join(root, INFO)} has no split {split!r} (it has "
                           f"{', '.join(sorted(info['splits'])) or 'none'}): write it with python -m "
                           f"udtimm.data.shards --split {split} --out {root} ...")
    return info["splits"][split]


def load_split(root: str, split: str, transform: Callable[[Tensor], Tensor] | None = None,
               name: str = "") -> ShardDataset:
    """Split `split` (its own name, as in _info.json) of the shard folder `root`, from _info.json and its label
    index; the shards are only checked to exist."""
    root = os.path.abspath(os.path.expanduser(root))
    info = read_info(root)
    entry = split_entry(root, info, split)
    shards = [os.path.join(root, shard["url"]) for shard in entry["shards"]]
    for path in shards:
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: a shard of split {split} that {os.path.join(root, INFO)} lists is missing")
    counts = [int(shard["nsamples"]) for shard in entry["shards"]]
    index_path = os.path.join(root, entry["labels"])
    ids, shard_of, labels, offsets = read_label_index(index_path, counts)
    bounds = offsets.tolist()
    try:
        samples = [Sample(image_id, f"{shards[shard]}#{record_key(row)}",
                          labels[bounds[row]:bounds[row + 1]] if bounds[row + 1] > bounds[row] else NO_LABELS)
                   for row, (image_id, shard) in enumerate(zip(ids, shard_of.tolist(), strict=True))]
    except (TypeError, ValueError) as err:  # Sample's checks of the labels
        raise DatasetError(f"{index_path}: {err}") from err
    firsts = np.cumsum([0, *counts[:-1]]).tolist()
    return ShardDataset(samples, info["classes"], transform, name or f"wds:{split}", info["unlisted"],
                        shards={path: (first, count) for path, first, count in zip(shards, firsts, counts,
                                                                                     strict=True)})


def load_shards(root: str, split: str) -> tuple[list[Sample], list[str]]:
    """The registry's loader: the samples and classes of load_split."""
    dataset = load_split(root, split)
    return dataset.samples, dataset.classes


def read_label_index(path: str, counts: list[int]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, shard number of each record, labels LABELS_DTYPE, label offsets [N + 1]) of a split's label index,
    checked against the shards' record counts (`counts`, from _info.json); DatasetError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as index:
            arrays = {name: index[name] for name in LABEL_INDEX_ARRAYS}
        raw_ids = arrays["image_ids"].tobytes().decode()
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: the label index is missing") from err
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"{path}: not a label index ({err})") from err
    total = sum(counts)
    ids = raw_ids.split("\0") if total else []
    shard_of, position, offsets = arrays["shard"], arrays["position"], arrays["label_offsets"]
    lengths = {"image ids": len(ids), "shard numbers": len(shard_of), "positions": len(position),
               "label offsets": len(offsets) - 1}
    if set(lengths.values()) != {total}:
        raise DatasetError(f"{path}: holds {lengths}, the shards of _info.json {total} records")
    firsts = np.cumsum([0, *counts])
    if total and not ((shard_of >= 0).all() and (shard_of < len(counts)).all()
                      and (position == np.arange(total) - firsts[shard_of]).all()):
        raise DatasetError(f"{path}: its records are not the shards' records in order")
    labels = arrays["labels"]
    if labels.dtype != LABELS_DTYPE or offsets[:1].tolist() not in ([], [0]) or \
            (np.diff(offsets) < 0).any() or (len(offsets) and offsets[-1] != len(labels)):
        raise DatasetError(f"{path}: its labels are not LABELS_DTYPE rows cut by ascending offsets")
    labels.flags.writeable = False  # each sample's labels are a view of this array
    return ids, shard_of, labels, offsets


def open_shard(path: str, count: int) -> object:
    """wids' IndexedTarSamples of a shard (its headers indexed, its file memory-mapped), checked to hold `count`
    records; DatasetError naming the shard."""
    try:  # an optional dependency: only --dataset wds needs it
        from wids.wids import IndexedTarSamples
    except ImportError as err:
        raise ConfigError("--dataset wds reads shards with wids, which is not installed: pip install "
                          "'wids>=0.1.11'") from err
    try:
        tar = IndexedTarSamples(path=path)
    except Exception as err:  # wids raises whatever its header parser meets (ValueError, struct.error, ...)
        raise DatasetError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from err
    if len(tar) != count:
        tar.close()
        raise DatasetError(f"{path}: holds {len(tar)} records, {INFO} says {count} (a shard cut short or replaced: "
                           "convert the split again)")
    return tar


class ShardDataset(MultiLabelDataset):
    """A split of WebDataset shards (docs/datasets.md#shards): a sample's path is `<shard>#<key>`, and its image the
    record at that key's position in the shard. Each process opens the shards it reads (the last OPEN_SHARDS);
    pickling drops them, so that DataLoader workers open their own."""

    def __init__(self, samples: list[Sample], classes: list[str], transform: Callable[[Tensor], Tensor] | None = None,
                 name: str = "", unlisted: str = "absent", shards: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(samples, classes, transform, name, unlisted)
        self.shards = shards or {}  # shard path -> (running index of its first record, its number of records)
        self._open: OrderedDict[str, object] = OrderedDict()

    def __getstate__(self) -> dict:
        # Open files and memory maps do not travel to another process (or to a copy: with_samples).
        return {**self.__dict__, "_open": OrderedDict()}

    def read(self, sample: Sample) -> Tensor | EncodedImage:
        """The sample's image from its shard, decoded, or its encoded bytes with --gpu-decode; errors name
        `<shard>#<key>`."""
        data = self.record_bytes(sample.path)
        if self.encoded:
            if data.numel() == 0:
                raise CorruptImageError(f"cannot read image {sample.path}: the record's image file is empty")
            return EncodedImage(data, sample.path)
        return decode_file(data, sample.path)

    def record_bytes(self, path: str) -> Tensor:
        """The image file (1-D uint8) of the record `<shard>#<key>`."""
        shard, _, key = path.rpartition("#")
        first, _ = self.shards[shard]
        record = self.shard(shard)[int(key) - first]
        if record["__key__"] != key:
            raise DatasetError(f"{path}: the shard holds key {record['__key__']} at this record's position: the shard "
                               "and its label index disagree (convert the split again)")
        images = [value for ext, value in record.items() if ext not in ("__key__", ".json")]
        if len(images) != 1:
            raise CorruptImageError(f"cannot read image {path}: the record holds {len(images)} image files, not one")
        data = images[0].getbuffer()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)

    def shard(self, path: str) -> object:
        """The open shard `path`, opened now if this process has not (closing the least recently read beyond
        OPEN_SHARDS)."""
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        self._open[path] = open_shard(path, self.shards[path][1])
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return self._open[path]

    def __repr__(self) -> str:
        return (f"ShardDataset({self.name!r}, {len(self)} images in {len(self.shards)} shards, "
                f"{len(self.classes)} classes)")
