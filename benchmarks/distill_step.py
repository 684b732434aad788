"""Time distill.py's training step, --method kd against --method ud, on one random batch.

Both objectives are built as distill.py builds them (distill.make_objective, distill.py's defaults: the default
--att-variant, alpha and beta at full weight after the warm-up; beta is the paper's 0.5, since distill.py's default
0 would time UD without attention) and stepped by the training loop distill.py runs
(engine.train_one_epoch with timm's optimizer and schedule), so the ratio is the cost of what distill.py runs:

  kd   teacher forward (no grad) + student forward + Eq. 13
  ud   kd + the teacher's uncertainty attention (head-only gradients, no graph) + the student's calibration branch
       + Eq. 14 + Eq. 17 with the student's head-only attention

The target (docs/design.md#speed): ud within 1.10x the kd step time. Prints img/s per method and the ratio.

    python benchmarks/distill_step.py --teacher resnet101 --student resnet18 --img-size 448 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

import distill  # noqa: E402
from udtimm import config, devices, loaders, optimization  # noqa: E402
from udtimm.engine import train_one_epoch  # noqa: E402
from udtimm.io import append_csv_row  # noqa: E402
from udtimm.model import CalibratedModel, create_model  # noqa: E402
from udtimm.objectives import DISTILL_METHODS  # noqa: E402
from udtimm.settings import ModelSettings  # noqa: E402

METHODS = ("kd", "ud")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet101")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method before timing")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--mixed-precision", choices=("bf16", "no"), help="default: bf16 on a GPU, no on the CPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--csv", help="append one row per method to this CSV file")
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() and not args.cpu else "no"
    return args


def distill_args(method: str, args: argparse.Namespace) -> argparse.Namespace:
    """distill.py's flags for `method`: its defaults, with this benchmark's model, size and precision."""
    flags = ["--teacher-ckpt", "random-init", "--method", method, "--model", args.student, "--img-size",
             str(args.img_size), "--batch-size", str(args.batch_size), "--mixed-precision", args.mixed_precision,
             "--att-weight", "0.5", "--no-progress"]
    return distill.parse_args(flags + ["--channels-last"] * args.channels_last)


def step_seconds(method: str, teacher: CalibratedModel, batch: tuple[torch.Tensor, ...], args: argparse.Namespace,
                 accelerator: Accelerator) -> float:
    """Seconds per training step of a fresh student (the same initial weights for both methods)."""
    run = distill_args(method, args)
    settings = config.training_settings(run)
    set_seed(0)
    student = create_model(settings.model, args.num_classes, cal=DISTILL_METHODS[method].uses_calibration,
                           img_size=args.img_size)
    student_norm = loaders.normalisation(student.backbone)
    teacher_norm = loaders.normalisation(teacher.backbone)
    optimizer, scheduler = optimization.build_optimization(settings.optim, student, args.warmup + args.steps)
    student, optimizer = accelerator.prepare(devices.place_model(student, accelerator.device, run.channels_last),
                                             optimizer)
    objective = distill.make_objective(run, teacher, {"mean": json.dumps(teacher_norm[0]),
                                                      "std": json.dumps(teacher_norm[1])},
                                       student_norm, accelerator, method)
    objective.start_epoch(run.distill_warmup_epochs)  # past the warm-up: every term at its full weight

    def steps(count: int) -> None:
        train_one_epoch(student, [batch] * count, optimizer, scheduler, accelerator, objective, epoch=0,
                        num_updates=0, optim=settings.optim, runtime=settings.runtime)

    steps(args.warmup)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    begin = time.perf_counter()
    steps(args.steps)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    return (time.perf_counter() - begin) / args.steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Seconds per step, by method."""
    args = parse_args(argv)
    accelerator = devices.make_accelerator(args.mixed_precision, cpu=args.cpu)
    card = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else "cpu"
    set_seed(0)
    teacher = create_model(ModelSettings(args.teacher), args.num_classes, cal=True, img_size=args.img_size)
    teacher = devices.place_model(teacher, accelerator.device, args.channels_last)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    target = (torch.rand(args.batch_size, args.num_classes, generator=generator) < 0.1).float()
    difficult = torch.zeros(args.batch_size, args.num_classes, dtype=torch.bool)
    batch = tuple(t.to(accelerator.device) for t in (images, target, difficult, torch.arange(args.batch_size)))
    print(f"{card}: {args.teacher} -> {args.student}, {args.img_size} px, batch {args.batch_size}, mixed precision "
          f"{args.mixed_precision}, channels_last {args.channels_last}, att-variant "
          f"{distill_args('ud', args).att_variant}, {args.steps} steps")
    seconds = {}
    for method in METHODS:
        seconds[method] = step_seconds(method, teacher, batch, args, accelerator)
        print(f"{method:>4}: {seconds[method] * 1e3:9.1f} ms/step {args.batch_size / seconds[method]:9.1f} img/s")
    print(f"step time ratio: ud/kd = {seconds['ud'] / seconds['kd']:.2f}x")
    if args.csv:
        for method, sec in seconds.items():
            append_csv_row(args.csv, {
                "device": card, "method": method, "att_variant": distill_args(method, args).att_variant,
                "teacher": args.teacher, "student": args.student, "img_size": args.img_size,
                "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
                "channels_last": args.channels_last, "ms_per_step": f"{sec * 1e3:.2f}",
                "img_per_s": f"{args.batch_size / sec:.1f}", "ratio_vs_kd": f"{sec / seconds['kd']:.3f}"})
    return seconds


if __name__ == "__main__":
    main()
