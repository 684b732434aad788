#!/usr/bin/env python3
"""Teach a student from a calibrated teacher by uncertainty distillation (Eq. 13-18), plain KD, or itself.

    accelerate launch distill.py --teacher-ckpt output/<run>/best.safetensors --model resnet18 --method ud
    accelerate launch distill.py --self-distill --model resnet101 --epochs 80 --dataset voc2007 --data-dir ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence

from accelerate import Accelerator
from accelerate.utils import set_seed

from udtimm import checkpoint, cli, config, devices, flags, loaders, runs
from udtimm.attention import ATTENTION_VARIANTS, DEFAULT_VARIANT, check_attention_support
from udtimm.data.transforms import Renormalize
from udtimm.ema import method_suffix
from udtimm.flags import add_fixed
from udtimm.heads import head_suffix
from udtimm.losses import ATTENTION_DISTANCES
from udtimm.model import CalibratedModel
from udtimm.objectives import (
    DISTILL_METHODS,
    DistillationObjective,
    DistillOptions,
    Objective,
    SelfDistillationObjective,
    SupervisedObjective,
    check_teacher,
    ud_method,
)


def build_parser() -> argparse.ArgumentParser:
    parser = config.training_parser(__doc__, distillation=True)
    group = parser.add_argument_group("distillation")
    add_fixed(group, "--teacher-ckpt", default=None, metavar="FILE", help="teacher: best.safetensors of train.py")
    add_fixed(group, "--method", default="ud", choices=tuple(DISTILL_METHODS),
              help="kd: Eq. 13 only; ud: Eq. 18")
    group.add_argument("--temperature", type=float, default=3.0, help="T of Eq. 13-14")
    group.add_argument("--dist-weight", type=float, default=0.5, help="alpha: weight of Eq. 14")
    add_fixed(group, "--att-weight", type=float, default=0.0,
              help="beta: weight of Eq. 17 (0: no attention, chosen on val by the digits benchmark; the "
                   "paper's 0.5 in hparams/; docs/distillation.md)")
    add_fixed(group, "--att-variant", default=DEFAULT_VARIANT, choices=tuple(ATTENTION_VARIANTS),
              help="how Eq. 16's maps are built: paper (as written), const-weights (w_c held as "
                   "constants), gradcam (constants and ReLU); docs/distillation.md has the measured table")
    add_fixed(group, "--att-distance", default="norm", choices=ATTENTION_DISTANCES,
              help="Eq. 17 between the normalised maps: norm (as the paper writes it; measured 3 mAP above "
                   "the square by the digits benchmark), or squared; docs/distillation.md")
    add_fixed(group, "--distill-warmup-epochs", type=int, default=0, metavar="N",
              help="alpha and beta grow linearly from 0 over the first N distilled epochs (0: the paper); "
                   "docs/distillation.md has the measured table")
    add_fixed(group, "--gt-weight", type=float, default=0.0, help="weight of a ground-truth L_b + lambda L_ps")
    group.add_argument("--cal-weight", type=float, default=0.1, help="lambda of the ground-truth term")
    add_fixed(group, "--self-distill", action="store_true",
              help="first half: hard labels; second half: the best model so far teaches itself by "
                   "--method ud (the paper's self-UD; --method kd is refused)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = config.parse_with_config(parser, argv)
    if args.self_distill and args.teacher_ckpt:
        raise config.ConfigError("--self-distill makes its own teacher: drop --teacher-ckpt")
    if args.self_distill and args.method != "ud":
        raise config.ConfigError(f"--self-distill distils by --method ud (the paper's self-UD), not --method "
                                 f"{args.method}: drop one of the two flags")
    if not args.self_distill and not args.teacher_ckpt:
        raise config.ConfigError("distill.py needs --teacher-ckpt FILE (or --self-distill)")
    if args.torchcompile and args.att_weight > 0 and (args.self_distill or args.method == "ud"):
        # The attention map takes autograd.grad inside the student's forward, which torch.compile cannot trace.
        raise config.ConfigError("--torchcompile does not support uncertainty attention (autograd.grad inside the "
                                 "forward): drop it, or use --att-weight 0 / --method kd")
    if args.unknown == "teacher" and (args.gt_weight <= 0 or args.self_distill):
        raise config.ConfigError("--unknown teacher fills the unknown labels of the ground-truth term with the "
                                 "teacher's probabilities: it needs --gt-weight > 0 (Eq. 18 itself reads no label) "
                                 "and a --teacher-ckpt, not --self-distill")
    if args.self_distill and args.epochs < 2:
        raise config.ConfigError("--self-distill needs --epochs >= 2: half with labels, half distilled")
    for line in inert_flags(args, parser):
        flags.warn(line)
    return args


def inert_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """A line for each group of flags set away from their default that this run would not read."""
    lines = []
    if args.method == "kd" and not args.self_distill:
        unread = flags.changed_from_default(args, parser, ("dist_weight", "att_weight", "att_variant",
                                                            "att_distance", "distill_warmup_epochs"))
        if unread:
            lines.append(f"{', '.join(unread)} do(es) nothing with --method kd (Eq. 13 alone has neither alpha, "
                         "beta nor a warm-up of them)")
    elif args.att_weight == 0:
        unread = flags.changed_from_default(args, parser, ("att_variant", "att_distance"))
        if unread:
            lines.append(f"{', '.join(unread)} do(es) nothing with --att-weight 0 (no Eq. 17): give --att-weight "
                         "0.5 to distil the attention maps")
    if args.unknown == "negative" and args.gt_weight == 0 and not args.self_distill:
        lines.append("--unknown negative does nothing without --gt-weight: Eq. 18 reads no label, only the "
                     "teacher's scores")
    return lines


def method_name(args: argparse.Namespace) -> str:
    """The method column of results.csv: kd, ud-noatt or self-ud-noatt (beta = 0), else ud or self-ud with an
    --att-variant other than paper appended (ud-const-weights, self-ud-gradcam), then -squared with --att-distance
    squared;
    +<head> with a spatial --head, +ema with --model-ema."""
    if args.method == "kd" and not args.self_distill:
        method = "kd"
    elif args.att_weight == 0:
        method = "self-ud-noatt" if args.self_distill else "ud-noatt"
    else:
        method = f"self-{ud_method(args.att_variant)}" if args.self_distill else ud_method(args.att_variant)
        method += "-squared" if args.att_distance == "squared" else ""
    return method + head_suffix(args.head) + method_suffix(args.model_ema)


def load_teacher(path: str, class_names: list[str], method: str, accelerator: Accelerator,
                 channels_last: bool) -> tuple[CalibratedModel, dict[str, str]]:
    metadata = checkpoint.read_metadata(path)
    check_teacher(metadata, path, class_names, method)
    teacher = checkpoint.load_for_inference(path, accelerator.device)
    return devices.place_model(teacher.model, accelerator.device, channels_last), teacher.metadata


def make_objective(args: argparse.Namespace, teacher: CalibratedModel, teacher_metadata: dict[str, str],
                   student_norm: tuple[list[float], list[float]], accelerator: Accelerator,
                   method: str, first_epoch: int = 0) -> DistillationObjective:
    """Eq. 18's objective; the teacher sees the student's batch normalised with its own mean and std."""
    teacher_norm = (json.loads(teacher_metadata["mean"]), json.loads(teacher_metadata["std"]))
    teacher_input = None if teacher_norm == student_norm else \
        Renormalize(*student_norm, *teacher_norm).to(accelerator.device)
    return DISTILL_METHODS[method](
        teacher, config.settings_from(DistillOptions, args), args.difficult, autocast=accelerator.autocast,
        teacher_input=teacher_input,
        attention_form=ATTENTION_VARIANTS[args.att_variant], warmup_epochs=args.distill_warmup_epochs,
        first_epoch=first_epoch, unknown=args.unknown)


def self_distillation(args: argparse.Namespace, run_dir: str, class_names: list[str],
                      student_norm: tuple[list[float], list[float]], accelerator: Accelerator) -> Objective:
    """Labels for the first half; at the half, the best checkpoint so far, copied (so that later bests do not move
    it) to teacher.safetensors, becomes the frozen teacher."""
    half = args.epochs // 2
    teacher_path = os.path.join(run_dir, "teacher.safetensors")

    def make_distillation() -> DistillationObjective:
        if accelerator.is_main_process and not os.path.isfile(teacher_path):
            shutil.copyfile(os.path.join(run_dir, "best.safetensors"), teacher_path + ".tmp")
            os.replace(teacher_path + ".tmp", teacher_path)
        accelerator.wait_for_everyone()
        teacher, teacher_metadata = load_teacher(teacher_path, class_names, "ud", accelerator, args.channels_last)
        accelerator.print(f"epoch {half}+: self-distillation from {teacher_path} "
                          f"(epoch {teacher_metadata['epoch']}), cosine restart")
        return make_objective(args, teacher, teacher_metadata, student_norm, accelerator, "ud", half)

    supervised = SupervisedObjective("bce", cal=True, cal_weight=args.cal_weight, difficult=args.difficult,
                                     unknown=args.unknown)
    return SelfDistillationObjective(supervised, half, make_distillation)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    settings = config.training_settings(args)
    data, runtime = settings.data, settings.runtime
    method = method_name(args) + runs.data_suffix(data, settings.mixing)
    run_dir = runs.run_dir_path(runtime, args.model, method)
    accelerator = devices.make_training_accelerator(settings, run_dir)
    datasets = loaders.load_datasets(data, accelerator)
    train_set = datasets[0]
    # Every check on the teacher happens before the run directory exists and before any step.
    teacher, teacher_metadata = (None, {}) if args.self_distill else load_teacher(
        args.teacher_ckpt, train_set.classes, args.method, accelerator, runtime.channels_last)
    student_cal = args.self_distill or DISTILL_METHODS[args.method].uses_calibration
    set_seed(runtime.seed)
    student = devices.build_model(settings.model, data.img_size, train_set.classes, student_cal, accelerator)
    if student_cal and args.att_weight > 0:
        for model in (student, teacher):
            if model is not None:
                check_attention_support(model)
    teacher_name = "self" if args.self_distill else args.teacher_ckpt

    def objective(student_norm: tuple[list[float], list[float]]) -> Objective:
        if args.self_distill:
            return self_distillation(args, run_dir, train_set.classes, student_norm, accelerator)
        return make_objective(args, teacher, teacher_metadata, student_norm, accelerator, args.method)

    return runs.train_model(settings, run_dir, method, teacher_name, student, datasets, accelerator, objective,
                            cycles=2 if args.self_distill else 1)


if __name__ == "__main__":
    cli.run_script(main, lambda: parse_args().debug)
