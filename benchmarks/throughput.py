"""Does the data pipeline keep the GPU busy? Real loops against the model-only ceiling, measured in one run.

Pipelines, each timed in the steady state (after --warmup batches):
  ceiling     the loop on one random batch already on the device: no files, no decoding
  cpu-decode  the loop on a DataLoader over JPEG files, the loader workers decoding and augmenting (the default)
  gpu-decode  the same with --gpu-decode: the workers read bytes, the GPU decodes (nvJPEG) and augments (CUDA only)
Workloads: train (train.py's step: engine.train_one_epoch, SupervisedObjective, timm optimizer, --cal as given),
distill (distill.py --method ud --att-weight 0.5 from a random-init --teacher to --student) and predict (validate.py's
engine.predict). The JPEGs are a synthetic VOC2007 folder at VOC's image sizes (--synthetic-voc).

Prints img/s, real/ceiling per pipeline (docs/design.md#speed: >= 0.90), the calibration branch's cost (the median of
--cal-rounds rounds of train ceilings without and with it; target: < 1 %), peak GPU memory, the seconds to the
first batch (paid every epoch, with the workers' start-up in a loader's first) and the card; --csv appends one row
per measurement.

    python benchmarks/throughput.py --model resnet101 --cal --teacher resnet101 --student resnet18 --img-size 448 \\
        --batch-size 64 --mixed-precision bf16 --channels-last --workers 16 --num-images 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

import distill  # noqa: E402
import train  # noqa: E402
from udtimm import config, devices, loaders, optimization  # noqa: E402
from udtimm.data import VOC_CLASSES  # noqa: E402
from udtimm.data.feed import DeviceFeeder  # noqa: E402
from udtimm.engine import predict, train_one_epoch  # noqa: E402
from udtimm.io import append_csv_row  # noqa: E402
from udtimm.model import create_model  # noqa: E402
from udtimm.objectives import LossOptions, SupervisedObjective  # noqa: E402
from udtimm.settings import ModelSettings  # noqa: E402

WORKLOADS = ("train", "distill", "predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet101", help="train and predict this model")
    parser.add_argument("--cal", action="store_true", help="with the calibration branch, as train.py --cal")
    parser.add_argument("--teacher", help="also measure distillation (ud) from this random-init teacher")
    parser.add_argument("--student", help="the distilled model (default: --model)")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed ceiling steps")
    parser.add_argument("--cal-rounds", type=int, default=3,
                        help="rounds of train ceilings without and with the calibration branch (its cost: the median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (real loops: at most half)")
    parser.add_argument("--num-images", type=int, default=1000, help="synthetic JPEGs: one epoch of the real loops")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader worker processes")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="the scripts' --prefetch: batches prepared ahead by the feeder thread (default: 2 on "
                             "CUDA, 0 elsewhere)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: bf16 on GPU, else no")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--torchcompile", action="store_true")
    parser.add_argument("--synthetic-voc", metavar="DIR", help="where the JPEGs are written (default: a temp dir)")
    parser.add_argument("--csv", metavar="FILE", help="append one row per measurement to this CSV file")
    args = parser.parse_args(argv)
    args.student = args.student or args.model
    if args.prefetch is None:
        args.prefetch = 2 if torch.cuda.is_available() else 0
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return args


def write_synthetic_voc(root: str, count: int) -> str:
    """`count` JPEGs in the VOC2007 layout, both trainval and test listing all; kept if already written."""
    voc = Path(root) / "VOC2007"
    marker = voc / f".synthetic-{count}"
    if not marker.exists():
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor() as pool:
            list(pool.map(write_image, [voc] * count, range(count), chunksize=16))
        ids = "".join(f"{index:06d}\n" for index in range(count))
        for split in ("trainval", "test"):
            (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
        marker.touch()
    return root


def write_image(voc: Path, index: int) -> None:
    """One image at VOC's usual sizes (500x375, a quarter 375x500) with 1-3 random VOC objects."""
    rng = np.random.default_rng(index)
    width, height = (375, 500) if index % 4 == 3 else (500, 375)
    # Smooth colour fields plus sensor-like noise: about VOC's 80 KB per file, so about its decoding cost.
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 12
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(voc / "JPEGImages" / f"{index:06d}.jpg", quality=90)
    objects = "".join(f"<object><name>{rng.choice(VOC_CLASSES)}</name><difficult>{int(rng.random() < 0.1)}"
                      "</difficult></object>" for _ in range(rng.integers(1, 4)))
    (voc / "Annotations" / f"{index:06d}.xml").write_text(f"<annotation>{objects}</annotation>\n")


class Clock:
    """Hands the batches on, timing those from the `skip`-th to the `tail`-th from the end.

    Skipped at the start: worker start-up and cuDNN's tuning. Left out at the end: the batches a DeviceFeeder had
    prepared before the window opened, so that the window starts and ends with as many batches prepared ahead.
    The wait for the first batch is timed apart (`first_batch_s`): one worker preparing a whole batch, after the
    workers' start-up in a loader's first epoch (each measurement here is one).
    """

    def __init__(self, batches: Sized, skip: int, sync: Callable[[], None], tail: int = 0) -> None:
        self.batches, self.skip, self.sync = batches, skip, sync
        self.end = len(batches) - tail
        self.images = self.steps = 0
        self.start = self.stopped = self.first_batch_s = math.nan

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        begun = time.perf_counter()
        for index, batch in enumerate(self.batches):
            if index == 0:
                self.first_batch_s = time.perf_counter() - begun
            # The window opens and closes with the device idle, so it holds exactly the timed batches' work.
            if index == self.skip:
                self.sync()
                self.start = time.perf_counter()
            if index == self.end:
                self.stop()
            if self.skip <= index < self.end:
                self.images += len(batch[1])
                self.steps += 1
            yield batch

    def stop(self) -> float:
        if math.isnan(self.stopped):
            self.sync()
            self.stopped = time.perf_counter()
        return self.stopped - self.start


@dataclass
class Row:
    workload: str
    pipeline: str
    cal: bool
    images: int
    steps: int
    seconds: float
    peak_mib: float
    first_batch_s: float
    cal_round: int | None = None  # the calibration branch's rounds of ceilings (calibration_rounds)
    ratio: float = math.nan

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds


def script_args(script: object, args: argparse.Namespace, root: str, *extra: str) -> argparse.Namespace:
    """The arguments train.py or distill.py would run with (their defaults: optimizer, loss weights, ...)."""
    flags = ["--dataset", "voc2007", "--data-dir", root, "--img-size", str(args.img_size), "-b", str(args.batch_size),
             "--workers", str(args.workers), "--mixed-precision", args.mixed_precision, "--no-progress"]
    flags += ["--channels-last"] * args.channels_last + ["--torchcompile"] * args.torchcompile
    flags += ["--prefetch", str(args.prefetch)]
    return script.parse_args([*flags, *extra])


def device_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    size, classes = (args.batch_size, 3, args.img_size, args.img_size), len(VOC_CLASSES)
    images = torch.randn(size, generator=generator)
    target = (torch.rand(args.batch_size, classes, generator=generator) < 0.1).float()
    difficult = torch.zeros(args.batch_size, classes, dtype=torch.bool)
    return tuple(t.to(device) for t in (images, target, difficult, torch.arange(args.batch_size)))


@dataclass
class Loop:
    """A workload set up as its script sets it up, ready to run over (timed) batches."""

    batches: Sized
    skip: int  # batches before the timed window
    tail: int  # batches after it
    run: Callable[[Iterable], object]


def setup(workload: str, pipeline: str, cal: bool, args: argparse.Namespace, root: str,
          accelerator: Accelerator) -> Loop:
    """`workload` fed by `pipeline`, set up as the script that runs it does."""
    device = accelerator.device
    gpu_decode = ["--gpu-decode"] * (pipeline == "gpu-decode")
    if workload == "distill":
        # Full UD, with the attention term (the paper's beta; distill.py's default 0 leaves Eq. 17 out).
        run = script_args(distill, args, root, "--model", args.student, "--teacher-ckpt", "random-init",
                          "--att-weight", "0.5", *gpu_decode)
    else:
        run = script_args(train, args, root, "--model", args.model, *["--cal"] * cal, *gpu_decode)
    settings = config.training_settings(run)
    set_seed(0)
    model = create_model(settings.model, len(VOC_CLASSES), cal=cal, img_size=run.img_size)
    if pipeline == "ceiling":
        batches, skip, tail = [device_batch(args, device)] * (args.warmup + args.steps), args.warmup, 0
    else:
        train_set, eval_set, _ = loaders.load_datasets(settings.data, accelerator)
        mean, std = loaders.normalisation(model.backbone)
        train_loader, eval_loader, train_transform, eval_transform = loaders.build_loaders(
            settings.data, train_set, eval_set, mean, std, device)
        loader, transform = (eval_loader, eval_transform) if workload == "predict" else (train_loader, train_transform)
        batches = DeviceFeeder(accelerator.prepare(loader), transform, device, run.prefetch)
        skip, tail = min(args.warmup, len(loader) // 2), min(batches.ahead, len(loader) // 4)
    model = devices.place_model(model, device, run.channels_last)
    if workload == "predict":  # as validate.py: only mixed precision and --torchcompile, no distributed wrapper
        model = accelerator.prepare_model(model, evaluation_mode=True)
        return Loop(batches, skip, tail, lambda timed: predict(model, timed, accelerator, show_progress=False))
    optimizer, scheduler = optimization.build_optimization(settings.optim, model, len(batches))
    student_norm = loaders.normalisation(model.backbone)
    model, optimizer = accelerator.prepare(model, optimizer)
    if workload == "distill":
        teacher = create_model(ModelSettings(args.teacher), len(VOC_CLASSES), cal=True, img_size=run.img_size)
        teacher_mean, teacher_std = loaders.normalisation(teacher.backbone)
        objective = distill.make_objective(run, devices.place_model(teacher, device, run.channels_last),
                                           {"mean": json.dumps(teacher_mean), "std": json.dumps(teacher_std)},
                                           student_norm, accelerator, "ud")
    else:
        objective = SupervisedObjective(run.loss, run.cal, run.cal_weight, run.difficult,
                                        LossOptions(temperature=run.temperature))
    return Loop(batches, skip, tail, lambda timed: train_one_epoch(
        model, timed, optimizer, scheduler, accelerator, objective, epoch=0, num_updates=0, optim=settings.optim,
        runtime=settings.runtime))


def timed(workload: str, pipeline: str, cal: bool, loop: Loop, accelerator: Accelerator,
          cal_round: int | None = None) -> Row:
    """One pass of `loop`, its window timed."""
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    clock = Clock(loop.batches, loop.skip, torch.cuda.synchronize if cuda else lambda: None, loop.tail)
    loop.run(clock)
    seconds = clock.stop()
    peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if cuda else math.nan
    return Row(workload, pipeline, cal, clock.images, clock.steps, seconds, peak, clock.first_batch_s, cal_round)


def measure(workload: str, pipeline: str, cal: bool, args: argparse.Namespace, root: str,
            accelerator: Accelerator) -> Row:
    """One timed epoch of `workload` fed by `pipeline`."""
    accelerator.free_memory()  # the previous measurement's model and optimizer, so peak memory is this one's
    return timed(workload, pipeline, cal, setup(workload, pipeline, cal, args, root, accelerator), accelerator)


def calibration_rounds(args: argparse.Namespace, root: str, accelerator: Accelerator) -> Iterator[Row]:
    """Train ceilings without and with the calibration branch, in alternating order, --cal-rounds times each.

    Both models stay set up, so the blocks follow each other closely; alternating the order cancels a drift of the
    machine's speed (a GPU's clock settling, a CPU's neighbours), and print_summary takes the median round.
    """
    accelerator.free_memory()
    loops = {cal: setup("train", "ceiling", cal, args, root, accelerator) for cal in (False, True)}
    for round_index in range(args.cal_rounds):
        for cal in (False, True) if round_index % 2 == 0 else (True, False):
            yield timed("train", "ceiling", cal, loops[cal], accelerator, round_index)


def step_flops(args: argparse.Namespace, root: str, accelerator: Accelerator) -> dict[bool, int]:
    """The matmul and convolution FLOPs of one training step without and with the calibration branch.

    Unlike time, they do not vary from run to run: the share the branch adds is the floor of its time cost.
    """
    flops = {}
    for cal in (False, True):
        accelerator.free_memory()
        loop = setup("train", "ceiling", cal, args, root, accelerator)
        with FlopCounterMode(display=False) as counter:
            loop.run(loop.batches[:1])
        flops[cal] = counter.get_total_flops()
    return flops


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = write_synthetic_voc(args.synthetic_voc or scratch, args.num_images)
        train_args = script_args(train, args, root)
        accelerator = devices.make_accelerator(train_args.mixed_precision, train_args.torchcompile)
        cuda = accelerator.device.type == "cuda"
        card = torch.cuda.get_device_name(accelerator.device) if cuda else "cpu"
        pipelines = ("cpu-decode", "gpu-decode") if cuda else ("cpu-decode",)
        plan = [("train", pipeline, args.cal) for pipeline in ("ceiling", *pipelines)]
        for workload in ("distill", "predict") if args.teacher else ("predict",):
            cal = True if workload == "distill" else args.cal
            plan += [(workload, pipeline, cal) for pipeline in ("ceiling", *pipelines)]
        print_header(args, card)
        rows, failed, flops = [], [], {}
        # The calibration branch's cost first: a measurement that fails later does not cost it.
        try:
            for row in calibration_rounds(args, root, accelerator):
                rows.append(row)
                report_row(rows, args, card)
            if not args.torchcompile:  # the FLOP counter does not see into compiled graphs
                flops = step_flops(args, root, accelerator)
        except Exception:
            traceback.print_exc()
            failed.append("calibration rounds")
        for workload, pipeline, cal in plan:
            # One failing pipeline (say nvJPEG missing) must not cost the other measurements of a GPU session.
            try:
                rows.append(measure(workload, pipeline, cal, args, root, accelerator))
            except Exception:
                traceback.print_exc()
                failed.append(f"{workload} {pipeline}")
                continue
            report_row(rows, args, card)
    print_summary(rows, flops)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
    return rows


def print_header(args: argparse.Namespace, card: str) -> None:
    distilled = f", distill {args.teacher} -> {args.student} (ud)" if args.teacher else ""
    print(f"{card}: train/predict {args.model}{' --cal' if args.cal else ''}{distilled}; {args.img_size} px, batch "
          f"{args.batch_size}, mixed precision {args.mixed_precision}, channels_last {args.channels_last}, "
          f"{args.workers} workers, {args.num_images} images, --prefetch {args.prefetch}")
    print(f"{'workload':>8} {'pipeline':>10} {'cal':>3} {'img/s':>9} {'ms/step':>9} {'peak MiB':>9} {'real/ceil':>9} "
          f"{'1st batch s':>11}", flush=True)


def report_row(rows: list[Row], args: argparse.Namespace, card: str) -> None:
    """Print (and append to --csv) the newest row, as a ratio to its workload's ceiling, measured before it.

    The calibration branch's rounds have no ratio: print_summary compares them with each other.
    """
    row = rows[-1]
    ceiling = next((r for r in rows if r.pipeline == "ceiling" and r.cal_round is None
                    and (r.workload, r.cal) == (row.workload, row.cal)), None)
    row.ratio = row.img_per_s / ceiling.img_per_s if ceiling and row.cal_round is None else math.nan
    ms_per_step = row.seconds / row.steps * 1e3
    print(f"{row.workload:>8} {row.pipeline:>10} {'yes' if row.cal else 'no':>3} {row.img_per_s:9.1f} "
          f"{ms_per_step:9.1f} {row.peak_mib:9.0f} {row.ratio:9.3f} {row.first_batch_s:11.3f}", flush=True)
    if args.csv:
        distilling = row.workload == "distill"
        append_csv_row(args.csv, {
            "device": card, "workload": row.workload, "pipeline": row.pipeline,
            "model": args.student if distilling else args.model, "teacher": args.teacher if distilling else "",
            "cal": row.cal, "img_size": args.img_size, "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision, "channels_last": args.channels_last, "workers": args.workers,
            "prefetch": args.prefetch,
            "images": row.images, "img_per_s": f"{row.img_per_s:.1f}", "ms_per_step": f"{ms_per_step:.2f}",
            "peak_mib": f"{row.peak_mib:.0f}", "real_over_ceiling": f"{row.ratio:.3f}",
            "first_batch_s": f"{row.first_batch_s:.3f}", "cal_round": "" if row.cal_round is None else row.cal_round,
        })


def print_summary(rows: list[Row], flops: dict[bool, int]) -> None:
    real = [row for row in rows if row.pipeline != "ceiling"]
    print("ratio real/ceiling: " + ", ".join(f"{row.workload} {row.pipeline} {row.ratio:.3f}" for row in real))
    rounds: dict[int, dict[bool, Row]] = {}
    for row in rows:
        if row.cal_round is not None:
            rounds.setdefault(row.cal_round, {})[row.cal] = row
    costs = [(pair[True].seconds / pair[True].images) / (pair[False].seconds / pair[False].images) - 1
             for pair in rounds.values() if len(pair) == 2]
    if costs:
        print(f"calibration branch: {np.median(costs) * 100:+.2f} % train step time (median of {len(costs)} rounds "
              f"of ceilings without and with it: {', '.join(f'{cost * 100:+.2f}' for cost in costs)} %)")
    if flops:
        print(f"calibration branch: {(flops[True] / flops[False] - 1) * 100:+.4f} % train step FLOPs "
              f"({flops[False] / 1e9:.3f} -> {flops[True] / 1e9:.3f} GFLOP per step, matmuls and convolutions)")


if __name__ == "__main__":
    main()
