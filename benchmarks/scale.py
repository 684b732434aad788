"""OpenImages-shaped sets on one machine: the memory of loading a split and of evaluating it, exact and binned.

Design (registered before the runs; docs/datasets.md#scale gives the results):

- Data: a synthetic label-list CSV set (`--csv-unlisted unknown`) of 10,000 classes whose images each list 8
  verified positives and 20 verified negatives, every other class unknown, as OpenImages' human-verified labels
  do. Classes are long-tailed: an image's 28 labelled classes are drawn without replacement with probability
  proportional to 1 / (rank + 1) (Zipf), the first 8 drawn present, with seed 0. One 8x8 PNG, hard-linked under each
  image's name, stands for the images: only the labels are measured. Sizes: 20 k, 100 k and 500 k images.
- Loading: peak resident memory of `build_dataset` on the train split in a fresh process, above what the process
  held after its imports (the peak restarted there), and the seconds it took.
- Evaluation: one pass over the split's labels in batches of 256, with scores drawn per pair (a logit from
  N(+1.5, 1.5) for a present label, N(-1.5, 1.5) otherwise, so AP is far from 0 and 100), through the exact path
  (every score kept, as engine.predict does, then metrics.compute_metrics) and through the binned statistics, each
  in a fresh process: peak resident memory above what the process held with the split loaded, seconds, and mAP.
  (Changed after the first run, which measured from the process's start: its evaluation rows grew with the
  loaded split, which the load rows measure, not with the evaluation.) The exact path runs only
  where images x classes x 16 bytes fits in half of this machine's memory; elsewhere its row says what it would
  need.
- Targets: 500 k images x 10 k classes load in under 2 GB; binned evaluation memory does not grow with the number
  of images; binned mAP within 0.05 of exact.

    python -m benchmarks.scale --work /tmp/scale --results benchmarks/results/scale.csv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import RESULTS_DIR  # noqa: E402
from udtimm.data import build_dataset  # noqa: E402
from udtimm.data.base import MultiLabelDataset  # noqa: E402
from udtimm.io import atomic_write_text, csv_line  # noqa: E402
from udtimm.provenance import source_state  # noqa: E402

SIZES = (20_000, 100_000, 500_000)
CLASSES, POSITIVES, NEGATIVES, BATCH = 10_000, 8, 20, 256
LINKS_PER_FILE = 50_000
DRAWS_AT_ONCE = 4096
EXACT_BYTES_PER_PAIR = 16  # engine.predict's float32 logits, target and difficult, and the probabilities
COLUMNS = ("images", "classes", "labels", "measure", "peak_mb", "seconds", "map", "note", "commit", "dirty")


def class_name(index: int) -> str:
    return f"c{index:05d}"


def write_set(root: str, num_images: int, seed: int = 0) -> int:
    """The synthetic split `root/train.csv` (and classes.txt, img/); returns its number of labels."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    from PIL import Image

    pixels = Image.new("RGB", (8, 8), (127, 127, 127))
    atomic_write_text(os.path.join(root, "classes.txt"), "".join(class_name(c) + "\n" for c in range(CLASSES)))
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(1.0 / np.arange(1, CLASSES + 1))
    per_image = POSITIVES + NEGATIVES
    lines = ["image,labels,negatives\n"]
    for row in range(num_images):
        if row % DRAWS_AT_ONCE == 0:
            # Draws with replacement, of which each image keeps its first 28 distinct classes: sampling without
            # replacement in proportion to 1 / (rank + 1), 64 draws at a time per image (more when they fall short).
            draws = np.searchsorted(cumulative, rng.random((DRAWS_AT_ONCE, 64)) * cumulative[-1], side="right")
        classes = list(dict.fromkeys(draws[row % DRAWS_AT_ONCE].tolist()))
        while len(classes) < per_image:
            extra = np.searchsorted(cumulative, rng.random(64) * cumulative[-1], side="right").tolist()
            classes = list(dict.fromkeys(classes + extra))
        classes = classes[:per_image]
        # One file per LINKS_PER_FILE images: a file system allows some 65,000 hard links to one file.
        png = os.path.join(root, f"pixel{row // LINKS_PER_FILE}.png")
        if not os.path.exists(png):
            pixels.save(png)
        name = f"img/{row:07d}.png"
        if not os.path.exists(os.path.join(root, name)):
            os.link(png, os.path.join(root, name))
        lines.append(csv_line([name, ";".join(map(class_name, sorted(classes[:POSITIVES]))),
                               ";".join(map(class_name, sorted(classes[POSITIVES:])))]))
    atomic_write_text(os.path.join(root, "train.csv"), "".join(lines))
    return num_images * (POSITIVES + NEGATIVES)


def memory_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: resident now, VmHWM: its peak) in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def start_peak() -> float:
    """Restart the peak at what is resident now (Linux: `5` to clear_refs), and return that."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return memory_mb("VmRSS")


def peak_since(start: float) -> float:
    return memory_mb("VmHWM") - start


def measure_load(root: str) -> dict[str, float]:
    """In this (fresh) process: peak memory of loading the split above the imports, and its seconds."""
    before, start = start_peak(), time.perf_counter()
    dataset = build_dataset("csv", root, "train", unlisted="unknown")
    seconds = time.perf_counter() - start
    assert len(dataset.classes) == CLASSES
    return {"peak_mb": peak_since(before), "seconds": seconds, "map": float("nan")}


def scored_batches(dataset: MultiLabelDataset) -> Iterator[tuple]:
    """The split's (probabilities, target, difficult) in batches of BATCH, the scores drawn with seed 0."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(dataset), BATCH):
        rows = [s.dense(CLASSES, dataset.unlisted) for s in dataset.samples[start:start + BATCH]]
        target = torch.from_numpy(np.stack([t for t, _ in rows]))
        difficult = torch.from_numpy(np.stack([d for _, d in rows]))
        logits = torch.randn(target.shape, generator=generator) * 1.5 + torch.where(target == 1, 1.5, -1.5)
        yield torch.sigmoid(logits), target, difficult


def measure_exact(root: str) -> dict[str, float]:
    """Every score kept, as engine.predict keeps them, then compute_metrics; the split loaded first."""
    from udtimm.metrics import compute_metrics

    dataset = build_dataset("csv", root, "train", unlisted="unknown")
    before, start = start_peak(), time.perf_counter()
    scores, target, difficult = (torch_cat(column) for column in zip(*scored_batches(dataset), strict=True))
    value = compute_metrics(scores, target, difficult)["map"]
    return {"peak_mb": peak_since(before), "seconds": time.perf_counter() - start, "map": value}


def measure_binned(root: str) -> dict[str, float]:
    """The batches added to MetricStatistics, as engine.evaluate_streaming adds them; the split loaded first."""
    from udtimm.metric_statistics import MetricStatistics

    dataset = build_dataset("csv", root, "train", unlisted="unknown")
    before, start = start_peak(), time.perf_counter()
    statistics = MetricStatistics(CLASSES)
    for scores, target, difficult in scored_batches(dataset):
        statistics.update(scores, target, difficult)
    value = statistics.compute()["map"]
    return {"peak_mb": peak_since(before), "seconds": time.perf_counter() - start, "map": value}


def torch_cat(parts: tuple) -> object:
    import torch

    return torch.cat(parts)


def exact_fits(num_images: int) -> bool:
    """Whether the exact path's scores fit in half of this machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return num_images * CLASSES * EXACT_BYTES_PER_PAIR <= memory / 2


def wide(results: pd.DataFrame) -> pd.DataFrame:
    """One row per size: each measurement's peak MB, seconds and mAP side by side (`<measure>_<column>`)."""
    results = results.assign(note=results["note"].fillna("").astype(str))
    frame = results.pivot(index="images", columns="measure", values=["peak_mb", "seconds", "map", "note"])
    frame.columns = [f"{measure}_{column}" for column, measure in frame.columns]
    return frame.join(results.groupby("images")["labels"].first())


def dense_gb(images: int) -> float:
    """What the dense rows of every image would hold before this layout: a float32 target and a bool flag per
    class."""
    return images * CLASSES * 5 / 1e9


def cell(value: object, digits: int = 0) -> str:
    return "—" if pd.isna(value) else f"{value:,.{digits}f}"


def scale_table(results: pd.DataFrame) -> str:
    """Markdown: per size, loading, exact and binned evaluation (peak MB, seconds), binned − exact mAP."""
    lines = ["| images × classes | labels | load: peak MB (s) | dense rows would hold | exact evaluation: peak MB "
             "(s) | binned evaluation: peak MB (s) | binned − exact mAP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for images, row in wide(results).iterrows():
        exact = row["exact_note"] or f"{cell(row['exact_peak_mb'])} ({cell(row['exact_seconds'], 1)})"
        difference = row["binned_map"] - row["exact_map"]
        lines.append(f"| {images:,} × {CLASSES:,} | {row['labels']:,} | {cell(row['load_peak_mb'])} "
                     f"({cell(row['load_seconds'], 1)}) | {dense_gb(images):,.1f} GB | {exact} | "
                     f"{cell(row['binned_peak_mb'])} ({cell(row['binned_seconds'], 1)}) | {cell(difference, 3)} |")
    return "\n".join(lines) + "\n"


def scale_short(results: pd.DataFrame) -> str:
    """Markdown for the README: per size, the peak MB of loading and of binned evaluation."""
    lines = ["| images | load | binned evaluation |", "|---|---:|---:|"]
    for images, row in wide(results).iterrows():
        lines.append(f"| {images:,} | {cell(row['load_peak_mb'])} MB | {cell(row['binned_peak_mb'])} MB |")
    return "\n".join(lines) + "\n"


def run_fresh(measure: str, root: str) -> dict[str, float]:
    """`measure` of the set at `root` in a new Python process, so that each peak is its own."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--measure", measure, "--work", root],
                          capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(done.stdout.strip().splitlines()[-1])


MEASURES = {"load": measure_load, "exact": measure_exact, "binned": measure_binned}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the synthetic sets (about 10 MB per 10 k images)")
    parser.add_argument("--results", default=os.path.join(RESULTS_DIR, "scale.csv"), help="one row per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--measures", nargs="+", choices=tuple(MEASURES), default=list(MEASURES),
                        help="the measurements to make (default: all)")
    parser.add_argument("--measure", choices=tuple(MEASURES), help=argparse.SUPPRESS)  # one measurement, internal
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(MEASURES[args.measure](args.work)))
        return
    rows = [csv_line(COLUMNS)]
    made = source_state()
    for size in args.sizes:
        root = os.path.join(args.work, f"{size}")
        labels = write_set(root, size)
        for measure in args.measures:
            if measure == "exact" and not exact_fits(size):
                note = f"not run: its scores alone need {size * CLASSES * EXACT_BYTES_PER_PAIR / 1e6:,.0f} MB"
                result = {"peak_mb": math.nan, "seconds": math.nan, "map": math.nan}
            else:
                note, result = "", run_fresh(measure, root)
            print(f"{size} images: {measure} {result} {note}", flush=True)
            rows.append(csv_line([size, CLASSES, labels, measure, f"{result['peak_mb']:.1f}",
                                  f"{result['seconds']:.2f}", f"{result['map']:.4f}", note, made["commit"],
                                  made["dirty"]]))
            atomic_write_text(args.results, "".join(rows))

if __name__ == "__main__":
    main()
