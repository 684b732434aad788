"""Write a split of any registered dataset as WebDataset shards with a label index, for --dataset wds
(docs/datasets.md#shards).

    python -m udtimm.data.shards --dataset voc2007 --data-dir /data/VOCdevkit --split train --out /data/voc-shards

Each record is `<key>.<ext>` (the image file's bytes, or a JPEG of shortest side --resize) and `<key>.json` (image id,
labels, source path); `<split>-labels.npz` lists every record's id, shard, position and labels, and `_info.json` the
classes and the splits written so far. Files are written in a temporary folder and renamed, _info.json last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from torch import Tensor
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from udtimm import cli, data_flags, flags
from udtimm.errors import ConfigError, DatasetError
from udtimm.io import atomic_write_text

from . import DATASETS, DataSource
from .base import LABELS_DTYPE, MultiLabelDataset, decode_file
from .images import image_extensions
from .wds import FORMAT, INFO, find_info, label_index_name, record_key, shard_name

SHARD_SIZE = 1000  # records per shard: about 100 MB of VOC-sized JPEGs
JPEG_QUALITY = 95  # --resize's re-encoding
GENERIC_SPLITS = ("train", "val", "test")


def convert(source: DataSource, split: str, out: str, shard_size: int = SHARD_SIZE, resize: int | None = None,
            progress: bool = True) -> str:
    """Write split `split` of `source` into the shard folder `out`, merged with the splits already there; returns
    the split's own name (the one its files and _info.json entry carry)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size is the number of images per shard, at least 1: got {shard_size}")
    if resize is not None and resize < 1:
        raise ConfigError(f"--resize is the shortest side in pixels, at least 1: got {resize}")
    dataset = source.load(split)
    own = dataset.name.partition(":")[2]
    info = merged_info(out, dataset, source)
    os.makedirs(out, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{own}-", suffix=".tmp", dir=out)
    try:
        entry = write_split(dataset, own, temporary, shard_size, resize, progress)
        install(out, temporary, own, entry, info)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return own


def merged_info(out: str, dataset: MultiLabelDataset, source: DataSource) -> dict:
    """_info.json as it will be with the new split (its entry still to add): refused, naming the file, when `out`
    already holds splits of another dataset, other classes or another unlisted state."""
    spec = DATASETS[source.name]
    root = source.root or ""
    info = {
        "format": FORMAT, "classes": dataset.classes, "unlisted": dataset.unlisted,
        "source": {"dataset": source.name, "options": source.options},
        "selection": spec.selection_split(source.root),
        "aliases": {name: spec.own_split(root, name) for name in GENERIC_SPLITS if spec.own_split(root, name) != name},
        "splits": {},
    }
    existing = find_info(out)
    if existing is None:
        return info
    differ = [key for key in ("classes", "unlisted", "source") if existing[key] != info[key]]
    if differ:
        raise DatasetError(f"{os.path.join(out, INFO)} holds splits of another dataset ({', '.join(differ)} "
                           f"differ: {existing['source']} there, {info['source']} here): write into another --out")
    return {**info, "splits": existing["splits"]}


def write_split(dataset: MultiLabelDataset, split: str, folder: str, shard_size: int, resize: int | None,
                progress: bool) -> dict:
    """The shards and the label index of `dataset` in `folder`; returns the split's _info.json entry."""
    dataset.encoded = True  # read() then gives the image file's bytes, whatever the format keeps them in
    extensions = image_extensions()
    try:  # an optional dependency: only the shards need it
        from webdataset import TarWriter
    except ImportError as err:
        raise ConfigError("writing shards needs webdataset, which is not installed: pip install "
                          "'webdataset>=1.0'") from err

    shards, ids, labels = [], [], []
    bar = tqdm(total=len(dataset), desc=f"{dataset.name} -> shards", unit="img", disable=not progress)
    for number, start in enumerate(range(0, len(dataset), shard_size)):
        samples = dataset.samples[start:start + shard_size]
        # mtime 0: the same split gives the same bytes, whenever it is converted.
        with TarWriter(os.path.join(folder, shard_name(split, number)), mtime=0) as tar:
            for index, sample in enumerate(samples, start):
                data = dataset.read(sample).data
                extension, image = image_file(data, sample.path, extensions, resize)
                record = {"image_id": sample.image_id, "labels": sample.labels.tolist(), "source": sample.path}
                tar.write({"__key__": record_key(index), extension: image, "json": json.dumps(record).encode()})
                bar.update()
        shards.append({"url": shard_name(split, number), "nsamples": len(samples)})
        ids += [sample.image_id for sample in samples]
        labels += [sample.labels for sample in samples]
    bar.close()
    write_label_index(os.path.join(folder, label_index_name(split)), ids, [shard["nsamples"] for shard in shards],
                      labels)
    return {"shards": shards, "num_samples": len(ids), "labels": label_index_name(split)}


def image_file(data: Tensor, path: str, extensions: frozenset[str], resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a record's image: the file as it is, or with --resize a JPEG of shortest side `resize`
    when the image is larger (a smaller one is kept as it is)."""
    if resize is not None:
        image = decode_file(data, path)
        if min(image.shape[-2:]) > resize:
            return "jpg", encode_jpeg(F.resize(image, [resize], antialias=True), quality=JPEG_QUALITY).numpy().tobytes()
    suffix = os.path.splitext(path)[1].lower()
    return (suffix[1:] if suffix in extensions else "img"), data.numpy().tobytes()


def write_label_index(path: str, ids: list[str], counts: list[int], labels: list[np.ndarray]) -> None:
    """`<split>-labels.npz`: the ids (UTF-8, NUL-separated), each record's shard and position in it, and the labels
    of every record concatenated (LABELS_DTYPE) with their offsets: what loading a split reads instead of the tars."""
    if any("\0" in image_id for image_id in ids):
        raise DatasetError(f"an image id holds a NUL character, which {path} uses to separate them")
    sizes = np.array([len(rows) for rows in labels], dtype=np.int64)
    np.savez(path,
             image_ids=np.frombuffer("\0".join(ids).encode(), dtype=np.uint8),
             shard=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
             position=np.concatenate([np.arange(count, dtype=np.int32) for count in counts] or
                                     [np.zeros(0, np.int32)]),
             labels=np.concatenate(labels) if labels else np.zeros(0, LABELS_DTYPE),
             label_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def install(out: str, folder: str, split: str, entry: dict, info: dict) -> None:
    """Move the split's files from `folder` into `out` and list it in _info.json, written last.

    A split written before is first taken out of _info.json, so that no reader ever sees its entry over files half
    replaced; its shards that the new split does not overwrite are removed.
    """
    info_path = os.path.join(out, INFO)
    names = [shard["url"] for shard in entry["shards"]] + [entry["labels"]]
    for name in names:  # on disk before they are renamed into place
        with open(os.path.join(folder, name), "rb") as handle:
            os.fsync(handle.fileno())
    previous = info["splits"].pop(split, None)
    if previous is not None:
        atomic_write_text(info_path, json.dumps(info, indent=1) + "\n")
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(out, name))
    for shard in (previous or {}).get("shards", []):
        if shard["url"] not in names:
            os.remove(os.path.join(out, shard["url"]))
    info["splits"][split] = entry
    atomic_write_text(info_path, json.dumps(info, indent=1) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=flags.HelpFormatter)
    data = parser.add_argument_group("the split to convert (train.py's data flags)")
    data_flags.add_dataset_args(data, None, "the dataset to convert",
                                split_help="the split to convert: train, val, test (each dataset's own name for it, "
                                           "as train.py reads it) or a dataset's own split name")
    parser.set_defaults(split=None)  # no default: a conversion names its split
    out = parser.add_argument_group("the shards")
    out.add_argument("--out", required=True, help="the shard folder: --data-dir of --dataset wds")
    out.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per shard")
    out.add_argument("--resize", type=int, default=None, metavar="S",
                     help="re-encode as JPEG (quality 95) every image whose shortest side is larger than S, to S "
                          "(default: each image file as it is)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for flag, value in (("--dataset", args.dataset), ("--split", args.split)):
        if value is None:
            parser.error(f"{flag} is required")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Convert the split the flags name; prints and returns the folder's _info.json path."""
    args = parse_args(argv)
    source = data_flags.data_source(args)
    split = convert(source, args.split, args.out, args.shard_size, args.resize, not args.no_progress)
    print(f"{source.name} {split} -> {os.path.join(args.out, INFO)}")
    return os.path.join(args.out, INFO)


if __name__ == "__main__":
    cli.run_script(main)
