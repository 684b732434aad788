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

from udtimm import config, runs
from udtimm.checkpoint import model_metadata
from udtimm.ema import method_suffix
from udtimm.engine import bare_model
from udtimm.objectives import LOSSES, SupervisedObjective
from udtimm.trainer import RunSetup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = config.training_parser(__doc__)
    group = parser.add_argument_group("method")
    group.add_argument("--cal", action="store_true", help="add the calibration branch trained with PAL-N (Eq. 12)")
    group.add_argument("--cal-weight", type=float, default=0.1, help="lambda of Eq. 12")
    group.add_argument("--loss", default="bce", choices=LOSSES, help="classification loss (Table 5 baselines)")
    group.add_argument("--temperature", type=float, default=3.0, help="T of --loss temperature")
    group.add_argument("--asl-gamma-neg", type=float, default=4.0, help="--loss asl: focusing of the negatives")
    group.add_argument("--asl-gamma-pos", type=float, default=0.0, help="--loss asl: focusing of the positives")
    group.add_argument("--asl-clip", type=float, default=0.05, help="--loss asl: probability margin m of the negatives")
    return config.parse_with_config(parser, argv)


def method_name(args: argparse.Namespace) -> str:
    """The method column of results.csv: baseline, cal, or the Table 5 loss (or asl), +ema with --model-ema."""
    name = "baseline" if args.loss == "bce" else args.loss
    method = "cal" if args.cal and args.loss == "bce" else f"{name}+cal" if args.cal else name
    return method + method_suffix(args.model_ema)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    method = method_name(args)
    run_dir = runs.run_dir_path(args, method)
    accelerator = runs.make_training_accelerator(args, run_dir)
    train_set, eval_set = runs.load_datasets(args, accelerator)
    set_seed(args.seed)
    model = runs.build_model(args, train_set.classes, args.cal, accelerator)
    runs.prepare_run_dir(args, run_dir, accelerator)  # after every check on the data and the weights
    mean, std = runs.normalisation(model.backbone)
    train_loader, eval_loader, train_transform, eval_transform = runs.build_loaders(
        args, train_set, eval_set, mean, std, accelerator.device)
    optimizer, scheduler = runs.build_optimization(args, model, len(train_loader))
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        runs.place_model(model, accelerator.device, args.channels_last), optimizer, train_loader, eval_loader)
    accelerator.print(f"{run_dir}: {args.model} ({method}) on {args.dataset}, {len(train_set)} train / "
                      f"{len(eval_set)} eval images, {len(train_set.classes)} classes, {accelerator.num_processes} "
                      f"process(es) on {accelerator.device}")
    metadata = model_metadata(args.model, bare_model(accelerator, model), train_set.classes, args.global_pool,
                              args.img_size, mean, std, dataset=args.dataset, method=method, teacher="",
                              model_kwargs=args.model_kwargs)
    objective = SupervisedObjective(args.loss, args.cal_weight, args.difficult, args.temperature,
                                    asl=(args.asl_gamma_neg, args.asl_gamma_pos, args.asl_clip))
    setup = RunSetup(
        run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
        eval_loader=eval_loader, objective=objective, loss_terms=objective.term_names(args.cal), metadata=metadata,
        train_transform=train_transform, eval_transform=eval_transform, prefetch=args.prefetch,
        result_fields=runs.result_fields(args, method, ""), ema=runs.make_ema(args, model, accelerator),
    )
    return runs.fit_and_report(args, setup, accelerator)


if __name__ == "__main__":
    runs.run_script(main)
