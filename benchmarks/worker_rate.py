"""How many images per second one loader worker prepares, against decoding alone (its ceiling), in one run.

A worker decodes each JPEG (torchvision.io, libjpeg-turbo) and applies the workers' half of the transforms, which
ends in uint8 (`TrainPixels`, `eval_pixels`); the device normalises and erases whole batches (`NormalizeBatch`).
For comparison it also times the whole transforms (`train_transform`, `eval_transform`: normalised float32 per
image), which is what the workers did before the split. One thread, like a DataLoader worker.

    python benchmarks/worker_rate.py --images /tmp/synthetic-voc/VOC2007/JPEGImages --img-size 448
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

from udtimm.data.base import read_image  # noqa: E402
from udtimm.data.transforms import TrainPixels, eval_pixels, eval_transform, train_transform  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="a folder of .jpg files")
    parser.add_argument("--count", type=int, default=100, help="images timed (the first ones, sorted by name)")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many passes counts")
    return parser.parse_args(argv)


def images_per_second(work: Callable[[str], object], files: list[str], repeats: int) -> float:
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            work(path)
        fastest = min(fastest, time.perf_counter() - start)
    return len(files) / fastest


def decode_and(transform: Callable[[torch.Tensor], object], path: str) -> object:
    return transform(read_image(path))


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.images, "*.jpg")))[:args.count]
    if not files:
        sys.exit(f"no .jpg files in {args.images}")
    torch.set_num_threads(1)  # as in a DataLoader worker
    random.seed(0)
    torch.manual_seed(0)
    size = args.img_size
    transforms = {
        "decode only (ceiling)": None,
        "train, workers' uint8 half": TrainPixels(size),
        "train, whole float transform": train_transform(size, MEAN, STD),
        "eval, workers' uint8 half": eval_pixels(size),
        "eval, whole float transform": eval_transform(size, MEAN, STD),
    }
    rates = {name: images_per_second(read_image if transform is None else partial(decode_and, transform), files,
                                     args.repeats) for name, transform in transforms.items()}
    ceiling = rates["decode only (ceiling)"]
    print(f"one thread, {len(files)} images, {size} px (paper augmentation, random erasing 0.5)")
    for name, rate in rates.items():
        print(f"{name:<30} {rate:8.1f} img/s  {rate / ceiling:6.3f} of decoding alone")
    return rates


if __name__ == "__main__":
    main()
