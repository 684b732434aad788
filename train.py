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

from udtimm import cli, config, devices, loaders, runs
from udtimm.config import add_fixed
from udtimm.ema import method_suffix
from udtimm.heads import LINEAR, head_suffix
from udtimm.objectives import CLASSIFICATION_LOSSES, LossOptions, SupervisedObjective


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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return config.parse_with_config(build_parser(), argv)


def method_name(loss: str, cal: bool, model_ema: bool = False, head: str = LINEAR) -> str:
    """The method column of results.csv: baseline, cal, or the Table 5 loss (or asl), +<head> with a spatial --head,
    +ema with --model-ema."""
    name = "baseline" if loss == "bce" else loss
    method = "cal" if cal and loss == "bce" else f"{name}+cal" if cal else name
    return method + head_suffix(head) + method_suffix(model_ema)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    settings = config.training_settings(args)
    data, runtime = settings.data, settings.runtime
    method = method_name(args.loss, args.cal, settings.optim.model_ema, args.head) + \
        runs.data_suffix(data, settings.mixing)
    run_dir = runs.run_dir_path(runtime, args.model, method)
    accelerator = devices.make_training_accelerator(settings, run_dir)
    datasets = loaders.load_datasets(data, accelerator)
    set_seed(runtime.seed)
    model = devices.build_model(settings.model, data.img_size, datasets[0].classes, args.cal, accelerator)
    objective = SupervisedObjective(args.loss, args.cal, args.cal_weight, data.difficult,
                                    config.settings_from(LossOptions, args), data.unknown)
    # The run directory is made after every check on the data and the weights (removed again if the run fails
    # before saving an epoch).
    return runs.train_model(settings, run_dir, method, "", model, datasets, accelerator, lambda norm: objective)


if __name__ == "__main__":
    cli.run_script(main, lambda: parse_args().debug)
