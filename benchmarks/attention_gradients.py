#!/usr/bin/env python3
"""How hard each term of Eq. 18 pulls on the student's backbone, per --att-variant: gradient norms, not training.

    python benchmarks/attention_gradients.py --teacher-ckpt output/distill-digits/teacher-seed0/best.safetensors \\
        --model resnet10t --img-size 56 --model-kwargs output_stride=8 "channels=[16,32,64,128]" stem_width=16 \\
        --pretrained-path benchmarks/weights/digits56-student.safetensors --dataset digits --digits-ambiguous

Takes distill.py's flags (the student, its start, the data) and, over the first --batches training batches,
prints for each variant the mean L2 norm of the gradient that each weighted term (Eq. 13, alpha Eq. 14,
beta Eq. 17) sends into the backbone, the attention term's share, the attention loss and the norm of the
student's map before Eq. 17 normalises it. The student is in train mode, as in a step; nothing is updated.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill  # noqa: E402
from udtimm import config, devices, loaders  # noqa: E402
from udtimm.attention import ATTENTION_VARIANTS  # noqa: E402
from udtimm.data.feed import DeviceFeeder  # noqa: E402


def gradient_norms(student: torch.nn.Module, objective: distill.DistillationObjective, batches: list,
                   weights: dict[str, float]) -> dict[str, float]:
    """Mean over batches of ||d(weight * term) / d backbone|| for each term of the objective."""
    params = [p for p in student.backbone.parameters() if p.requires_grad]
    sums = dict.fromkeys([*weights, "attention_loss", "map_norm"], 0.0)
    for images, target, difficult in batches:
        terms = objective(student, images, target, difficult)
        for name, weight in weights.items():
            grads = torch.autograd.grad(weight * terms[name], params, retain_graph=True, allow_unused=True)
            sums[name] += torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
        sums["attention_loss"] += terms["attention"].item()
        with torch.no_grad():
            maps = student(images, with_attention=True, attention_form=objective.attention_form).attention
        sums["map_norm"] += maps.flatten(1).norm(dim=1).mean().item()
    return {name: total / len(batches) for name, total in sums.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--batches", type=int, default=4)
    own, rest = parser.parse_known_args(argv)
    # beta defaults to the paper's 0.5 here (distill.py's default 0 has no attention term to measure).
    args = distill.parse_args(["--att-weight", "0.5", *rest, "--method", "ud", "--workers", "0", "--no-progress"])
    settings = config.training_settings(args)
    accelerator = devices.make_accelerator()
    train_set, eval_set, _ = loaders.load_datasets(settings.data, accelerator)
    teacher, teacher_metadata = distill.load_teacher(args.teacher_ckpt, train_set.classes, "ud", accelerator, False)
    torch.manual_seed(args.seed)
    student = devices.build_model(settings.model, args.img_size, train_set.classes, True, accelerator).train()
    student_norm = loaders.normalisation(student.backbone)
    train_loader, _, train_transform, _ = loaders.build_loaders(settings.data, train_set, eval_set, *student_norm,
                                                                accelerator.device)
    batches = []
    for batch in DeviceFeeder(train_loader, train_transform, accelerator.device, 0):
        batches.append(tuple(batch[:3]))
        if len(batches) == own.batches:
            break
    weights = {"kd": 1.0, "kd_cal": args.dist_weight, "attention": args.att_weight}
    print(f"student {args.model} from {args.initial_checkpoint or 'random weights'}, teacher {args.teacher_ckpt}, "
          f"{own.batches} batches of {args.batch_size}")
    print(f"{'variant':<14} {'Eq. 13':>9} {'a Eq. 14':>9} {'b Eq. 17':>9} {'Eq.17 / Eq.13':>14} {'L_att':>7} "
          f"{'|A_S|':>9}")
    state = {key: value.clone() for key, value in student.state_dict().items()}
    for variant in ATTENTION_VARIANTS:
        student.load_state_dict(state)  # BatchNorm statistics move in train mode: every variant starts the same
        variant_args = argparse.Namespace(**{**vars(args), "att_variant": variant})
        objective = distill.make_objective(variant_args, teacher, teacher_metadata, student_norm, accelerator, "ud")
        norms = gradient_norms(student, objective, batches, weights)
        print(f"{variant:<14} {norms['kd']:9.4f} {norms['kd_cal']:9.4f} {norms['attention']:9.4f} "
              f"{norms['attention'] / norms['kd']:14.2f} {norms['attention_loss']:7.3f} {norms['map_norm']:9.2e}")


if __name__ == "__main__":
    main()
