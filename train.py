#!/usr/bin/env python3
"""Train a timm backbone for multi-label classification, optionally with the calibration branch (Eq. 10-12).

    python train.py                                   # small model on the embedded digits dataset, on the CPU
    accelerate launch train.py --model resnet101 --cal --dataset voc2007 --data-dir /data/VOCdevkit
    accelerate launch train.py -c hparams/voc2007_resnet101_cal.yaml --data-dir /data/VOCdevkit
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from accelerate.utils import set_seed

from udtimm import cli, config, devices, flags, loaders, runs
from udtimm.class_counts import ClassCounts
from udtimm.ema import method_suffix
from udtimm.flags import add_fixed
from udtimm.heads import LINEAR, head_suffix
from udtimm.objectives import (
    CLASSIFICATION_LOSSES,
    LOSS_SETTINGS,
    LossOptions,
    SupervisedObjective,
    unused_loss_settings,
)


def build_parser() -> argparse.ArgumentParser:
    parser = config.training_parser(__doc__)
    group = parser.add_argument_group("method")
    add_fixed(group, "--cal", action="store_true", help="add the calibration branch trained with PAL-N (Eq. 12)")
    group.add_argument("--cal-weight", type=float, default=0.1, help="lambda of Eq. 12")
    add_fixed(group, "--loss", default="bce", choices=tuple(CLASSIFICATION_LOSSES),
              help="classification loss (Table 5 baselines)")
    group.add_argument("--temperature", type=float, default=3.0, help="T of --loss temperature")
    add_fixed(group, "--asl-gamma-neg", type=float, default=4.0, help="--loss asl: focusing of the negatives")
    add_fixed(group, "--asl-gamma-pos", type=float, default=0.0, help="--loss asl: focusing of the positives")
    add_fixed(group, "--asl-clip", type=float, default=0.05, help="--loss asl: probability margin m of the negatives")
    add_long_tail_args(group)
    return parser


def add_long_tail_args(group: argparse._ArgumentGroup) -> None:
    """The long-tail losses' settings (docs/recipe.md#long-tailed-labels), defaulted as their official code."""
    add_fixed(group, "--db-map-alpha", type=float, default=0.1,
              help="--loss db, db-focal: alpha of the re-balancing weight alpha + sigmoid(beta (r - mu))")
    add_fixed(group, "--db-map-beta", type=float, default=10.0, help="--loss db, db-focal: beta of that map")
    add_fixed(group, "--db-map-mu", type=float, default=0.2, help="--loss db, db-focal: mu of that map")
    add_fixed(group, "--db-neg-scale", type=float, default=2.0,
              help="--loss db, db-focal: lambda, the scale of the negatives' logits (negative-tolerant "
                   "regularisation)")
    add_fixed(group, "--db-bias-factor", type=float, default=0.05,
              help="--loss db, db-focal: kappa, the class-prior bias factor of the logits")
    add_fixed(group, "--cb-beta", type=float, default=0.9999,
              help="--loss cb-bce, cb-focal: class weights (1 - beta) / (1 - beta^n), n the training positives")
    add_fixed(group, "--focal-gamma", type=float, default=2.0, help="--loss db-focal, cb-focal: focusing gamma")
    add_fixed(group, "--two-way-tp", type=float, default=4.0, help="--loss two-way: temperature of the positives")
    add_fixed(group, "--two-way-tn", type=float, default=1.0, help="--loss two-way: temperature of the negatives")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return config.parse_with_config(build_parser(), argv)


def method_name(loss: str, cal: bool, model_ema: bool = False, head: str = LINEAR) -> str:
    """The method column of results.csv: baseline, cal, or the Table 5 loss (or asl), +<head> with a spatial --head,
    +ema with --model-ema."""
    name = "baseline" if loss == "bce" else loss
    method = "cal" if cal and loss == "bce" else f"{name}+cal" if cal else name
    return method + head_suffix(head) + method_suffix(model_ema)


def warn_unused_loss_flags(args: argparse.Namespace) -> None:
    """A loss setting given (not at its default) that --loss does not read is said, before any work."""
    parser = build_parser()
    changed = [name for name in LOSS_SETTINGS if getattr(args, name) != parser.get_default(name)]
    for name in unused_loss_settings(args.loss, changed):
        flags.warn(f"{flags.flag_name(name)} does nothing: --loss {args.loss} does not read it")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    settings = config.training_settings(args)
    warn_unused_loss_flags(args)
    data, runtime = settings.data, settings.runtime
    method = method_name(args.loss, args.cal, settings.optim.model_ema, args.head) + \
        runs.data_suffix(data, settings.mixing)
    run_dir = runs.run_dir_path(runtime, args.model, method)
    accelerator = devices.make_training_accelerator(settings, run_dir)
    datasets = loaders.load_datasets(data, accelerator)
    set_seed(runtime.seed)
    model = devices.build_model(settings.model, data.img_size, datasets[0].classes, args.cal, accelerator)
    # Every loss gets the counts; the re-balanced ones (db, db-focal, cb-bce, cb-focal) weigh by them.
    counts = ClassCounts.of(datasets[0], data.difficult)
    objective = SupervisedObjective(args.loss, args.cal, args.cal_weight, data.difficult,
                                    config.settings_from(LossOptions, args, class_counts=counts), data.unknown)
    # The run directory is made after every check on the data and the weights (removed again if the run fails
    # before saving an epoch).
    return runs.train_model(settings, run_dir, method, "", model, datasets, accelerator, lambda norm: objective,
                            counts=counts)


if __name__ == "__main__":
    cli.run_script(main, lambda: parse_args().debug)
