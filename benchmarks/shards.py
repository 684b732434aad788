"""Images per second a training loader delivers from WebDataset shards against the same images as files, and the
converter's rate (docs/datasets.md#shards).

A synthetic VOC2007 folder (benchmarks/throughput.py's: 500x375 JPEGs of about VOC's size and decoding cost) is
read as `--dataset voc2007` (files) and, converted with `python -m udtimm.data.shards`, as `--dataset wds`
(shards), through train.py's loader (make_loader: shuffled, each image decoded and cropped to uint8 by the workers,
TrainPixels) with 0, 1 and 2 workers, at each --sizes. For each: the seconds from iter() to the first batch of the
first epoch (workers starting, shards opening) and the img/s of the fastest of the --repeats epochs after it
(persistent workers, open shards, whole epochs), files and shards alternating, so that other work on the machine
slows both alike. Also: the bytes alone, read in one process, and the converter's img/s.

    python benchmarks/shards.py --num-images 512 --sizes 48 224 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

from benchmarks.throughput import write_synthetic_voc  # noqa: E402
from udtimm.data import DataSource, MultiLabelDataset  # noqa: E402
from udtimm.data.loader import make_loader, seed_loader  # noqa: E402
from udtimm.data.shards import convert  # noqa: E402
from udtimm.data.transforms import TrainPixels  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=512, help="synthetic JPEGs, one epoch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 224], help="training input sizes (px)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=128, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed after the first; the fastest counts")
    parser.add_argument("--synthetic-voc", metavar="DIR", help="where the JPEGs are written (default: a temp dir)")
    return parser.parse_args(argv)


def training_loader(source: DataSource, size: int, workers: int, batch_size: int) -> DataLoader:
    """train.py's loader of the train split: shuffled, each image decoded and cropped to uint8 by the workers."""
    dataset = source.load("train")
    dataset.transform = TrainPixels(size, reprob=0.0, hflip=0.5)
    return make_loader(dataset, batch_size, True, workers)


def first_batch_s(loader: DataLoader) -> float:
    """Seconds from iter() to the first batch of the loader's first epoch (workers starting, shards opening); the
    epoch is then read to its end."""
    seed_loader(loader, 0)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    seconds = time.perf_counter() - start
    for _ in batches:
        pass
    return seconds


def epoch_rate(loader: DataLoader, epoch: int) -> float:
    """img/s of one whole epoch."""
    seed_loader(loader, epoch)
    start = time.perf_counter()
    images = sum(len(batch[0]) for batch in loader)
    return images / (time.perf_counter() - start)


def read_rate(dataset: MultiLabelDataset) -> float:
    """img/s of reading every image's bytes, in a shuffled order, in this process (no decoding)."""
    dataset.encoded = True
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for index in order:
        dataset.read(dataset.samples[index])
    return len(order) / (time.perf_counter() - start)


def converter_rate(root: str, out: str, shard_size: int, resize: int | None) -> float:
    """img/s of `python -m udtimm.data.shards` on the train split (all the images)."""
    source = DataSource("voc2007", root)
    start = time.perf_counter()
    convert(source, "train", out, shard_size, resize, progress=False)
    return len(source.load("train")) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core per loader process, as in a DataLoader worker
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = write_synthetic_voc(args.synthetic_voc or f"{scratch}/voc", args.num_images)
        converter = {"copy": converter_rate(root, f"{scratch}/shards", args.shard_size, None),
                     "resize 256": converter_rate(root, f"{scratch}/resized", args.shard_size, 256)}
        sources = {"files": DataSource("voc2007", root), "shards": DataSource("wds", f"{scratch}/shards")}
        datasets = {name: source.load("train") for name, source in sources.items()}
        reading = dict.fromkeys(sources, 0.0)
        for _ in range(args.repeats):  # alternating, the fastest of each: other work on the machine hits both
            for name, dataset in datasets.items():
                reading[name] = max(reading[name], read_rate(dataset))
        for size in args.sizes:
            for workers in args.workers:
                loaders = {name: training_loader(source, size, workers, args.batch_size)
                           for name, source in sources.items()}
                first = {name: first_batch_s(loader) for name, loader in loaders.items()}
                rates = dict.fromkeys(loaders, 0.0)
                for epoch in range(1, args.repeats + 1):
                    for name, loader in loaders.items():
                        rates[name] = max(rates[name], epoch_rate(loader, epoch))
                rows += [{"source": name, "px": size, "workers": workers, "first_batch_s": first[name],
                          "img_per_s": rates[name]} for name in loaders]
                del loaders  # their workers end here
    shards = -(-args.num_images // args.shard_size)
    print(f"{args.num_images} synthetic VOC JPEGs (500x375), batch {args.batch_size}, {shards} shard(s) of "
          f"{args.shard_size}, one thread per loader process; each rate the fastest of {args.repeats} epochs")
    print("| source | px | workers | first batch (s) | img/s | shards / files |")
    print("|---|---|---|---|---|---|")
    files = {(row["px"], row["workers"]): row["img_per_s"] for row in rows if row["source"] == "files"}
    for row in rows:
        ratio = f"{row['img_per_s'] / files[row['px'], row['workers']]:.2f}" if row["source"] == "shards" else ""
        print(f"| {row['source']} | {row['px']} | {row['workers']} | {row['first_batch_s']:.2f} | "
              f"{row['img_per_s']:.0f} | {ratio} |")
    print(f"reading the bytes alone (one process, shuffled, no decoding): files {reading['files']:.0f} img/s, "
          f"shards {reading['shards']:.0f} img/s")
    print(f"converter: {converter['copy']:.0f} img/s copying the files, {converter['resize 256']:.0f} img/s with "
          "--resize 256")
    return rows


if __name__ == "__main__":
    main()
