"""Time one distillation training step (forward, loss, backward, optimizer step) three ways on one random batch.

  kd        teacher forward (no grad) + student forward + Eq. 13
  ud        kd + teacher uncertainty attention (head-only gradients, no graph) + student calibration branch
            + Eq. 14 + Eq. 17 with head-only student attention (create_graph=True)
  ud-naive  ud, but both attention maps come from a gradient taken through the whole network, as Grad-CAM
            is usually written (the student's with create_graph=True)

The target (docs/design.md#speed): ud within 1.10x the kd step time. Prints img/s per mode and the ratios.

    python benchmarks/distill_step.py --teacher resnet101 --student resnet18 --img-size 448 --batch-size 64
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

from udtimm.attention import branch_divergence, uncertainty_attention  # noqa: E402
from udtimm.losses import attention_distillation_loss, binary_kd_loss, softmax_kd_loss  # noqa: E402
from udtimm.model import CalibratedModel, ModelOutput, create_model  # noqa: E402

MODES = ("kd", "ud", "ud-naive")
TEMPERATURE, ALPHA, BETA = 3.0, 0.5, 0.5  # docs/method.md#eq-18--distillation-objective


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet101")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per mode before timing")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--mixed-precision", choices=("bf16", "no"), help="default: bf16 on GPU, no on CPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--csv", help="append one row per mode to this CSV file")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"
    return args


def naive_attention(model: CalibratedModel, out: ModelOutput, create_graph: bool) -> torch.Tensor:
    """Eq. 15-16 with D back-propagated through every layer (all parameter gradients), Z's gradient kept."""
    params = [p for p in model.parameters() if p.requires_grad]
    divergence = branch_divergence(out.logits, out.cal_logits).sum()
    grad = torch.autograd.grad(divergence, [out.features, *params], create_graph=create_graph)[0]
    z = out.features if create_graph else out.features.detach()
    weights = model.feature_grid(grad).float().sum(dim=(2, 3), keepdim=True)
    return (weights * model.feature_grid(z).float()).sum(dim=1)


def ud_loss(
    student_out: ModelOutput, teacher_out: ModelOutput, maps_s: torch.Tensor, maps_t: torch.Tensor
) -> torch.Tensor:
    """Eq. 18: L'_b + alpha L'_ps + beta L_att."""
    return (
        binary_kd_loss(student_out.logits, teacher_out.logits, TEMPERATURE)
        + ALPHA * softmax_kd_loss(student_out.cal_logits, teacher_out.cal_logits, TEMPERATURE)
        + BETA * attention_distillation_loss(maps_s, maps_t)
    )


def step_loss(mode: str, teacher: CalibratedModel, student: CalibratedModel, x: torch.Tensor) -> torch.Tensor:
    if mode == "ud-naive":
        t = teacher(x)  # with grad: the naive teacher map needs the backward through the teacher
        maps_t = naive_attention(teacher, t, create_graph=False)
        s = student(x)
        return ud_loss(s, t, naive_attention(student, s, create_graph=True), maps_t)
    with torch.no_grad():
        t = teacher(x)
        maps_t = uncertainty_attention(teacher, t.features, create_graph=False) if mode == "ud" else None
    s = student(x)
    if mode == "kd":
        return binary_kd_loss(s.logits, t.logits, TEMPERATURE)
    maps_s = uncertainty_attention(student, s.features, create_graph=True, head_outputs=(s.logits, s.cal_logits))
    return ud_loss(s, t, maps_s, maps_t)


def time_mode(mode: str, teacher: CalibratedModel, x: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds per training step of a fresh student (same initial weights for every mode)."""
    torch.manual_seed(0)
    student = create_model(args.student, args.num_classes, cal=mode != "kd", img_size=args.img_size)
    student = student.to(args.device, memory_format=memory_format(args)).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    teacher.requires_grad_(mode == "ud-naive")
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def step() -> None:
        with autocast:
            loss = step_loss(mode, teacher, student, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / args.steps
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - begin) / args.steps


def memory_format(args: argparse.Namespace) -> torch.memory_format:
    return torch.channels_last if args.channels_last else torch.contiguous_format


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    torch.backends.cudnn.benchmark = True  # as in training: fixed shapes, so let cuDNN pick its fastest kernels
    torch.manual_seed(0)
    teacher = create_model(args.teacher, args.num_classes, cal=True, img_size=args.img_size)
    teacher = teacher.to(args.device, memory_format=memory_format(args)).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    x = x.contiguous(memory_format=memory_format(args))
    print(
        f"{card}: {args.teacher} -> {args.student}, {args.img_size} px, batch {args.batch_size}, "
        f"mixed precision {args.mixed_precision}, channels_last {args.channels_last}, {args.steps} steps"
    )

    seconds: dict[str, float] = {}
    for mode in args.modes:
        try:
            seconds[mode] = time_mode(mode, teacher, x, args)
            print(f"{mode:>9}: {seconds[mode] * 1e3:9.1f} ms/step {args.batch_size / seconds[mode]:9.1f} img/s")
        except torch.cuda.OutOfMemoryError:
            seconds[mode] = math.nan  # the naive baseline may not fit where the head-only one does
            print(f"{mode:>9}: out of memory")
            torch.cuda.empty_cache()

    kd = seconds.get("kd", math.nan)
    others = [mode for mode in ("ud", "ud-naive") if mode in seconds]
    print("step time ratio: " + ", ".join(f"{mode}/kd = {seconds[mode] / kd:.2f}x" for mode in others))
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["device", "mode", "teacher", "student", "img_size", "batch_size", "mixed_precision",
                                 "channels_last", "ms_per_step", "img_per_s", "ratio_vs_kd"])  # fmt: skip
            for mode, sec in seconds.items():
                writer.writerow([card, mode, args.teacher, args.student, args.img_size, args.batch_size,
                                 args.mixed_precision, args.channels_last, f"{sec * 1e3:.2f}",
                                 f"{args.batch_size / sec:.1f}", f"{sec / kd:.3f}"])  # fmt: skip


if __name__ == "__main__":
    main()
