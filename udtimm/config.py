"""Command-line arguments: a YAML file given with -c sets the defaults, flags on the command line win; the model,
optimisation, recipe and runtime flags, and the parsed flags turned into typed settings (the data flags:
udtimm.data_flags; the flag machinery: udtimm.flags)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import TypeVar

import yaml
from timm.data.auto_augment import rand_augment_transform

from udtimm.data_flags import add_data_args, check_evaluation, data_source, fill_dataset_defaults, resolve_selection
from udtimm.errors import ConfigError
from udtimm.flags import HelpFormatter, ParseKwargs, add_fixed, flag_name, resume_fixed
from udtimm.heads import HEAD_NAMES, LINEAR
from udtimm.io import atomic_write_text
from udtimm.provenance import file_sha256
from udtimm.settings import (
    DataSettings,
    MixingSettings,
    ModelSettings,
    OptimSettings,
    RuntimeSettings,
    TrainingSettings,
)

Settings = TypeVar("Settings")


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", default=None, metavar="YAML", help="YAML file of defaults; flags win")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    return parser


def add_debug_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--debug", action="store_true", help="on an error, show the whole traceback, not one line")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    add_fixed(group, "--model", default="resnet10t", help="any timm model name")
    # --no-pretrained lets a command line switch off a YAML's `pretrained: true` (offline smoke tests).
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                       help="start from timm's pretrained weights")
    group.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="local pretrained weights (.safetensors/.pth); implies --pretrained, no network")
    group.add_argument("--pretrained-sha256", default=None, metavar="HEX",
                       help="refuse --pretrained-path unless its sha256 is this (as a download is checked)")
    group.add_argument("--initial-checkpoint", default=None, metavar="FILE",
                       help="start from these weights (a udtimm checkpoint or timm weights): the backbone always, "
                            "the classifier and calibration branch when the file's class list is the dataset's")
    add_fixed(group, "--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
              help="extra timm.create_model arguments, e.g. output_stride=16 (kept in the checkpoint)")
    add_fixed(group, "--global-pool", default=None, help="timm global pooling: avg, max, avgmax, token, ...")
    add_fixed(group, "--head", default=LINEAR, choices=HEAD_NAMES,
              help="classification head: linear (timm's classifier on the pooled features), ml-decoder or "
                   "csra on the last feature map (docs/method.md#classification-heads)")
    add_fixed(group, "--head-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
              help="options of --head, e.g. embed_dim=256 (ml-decoder) or num_heads=4 lam=0.5 (csra); kept "
                   "in the checkpoint")
    group.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")


def add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    add_fixed(group, "--epochs", type=int, default=15, help="training epochs", while_on="self_distill")
    add_fixed(group, "--opt", default="adamw", help="timm optimizer name (sgd, momentum, adamw, ...)")
    group.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    add_fixed(group, "--head-lr-mult", type=float, default=1.0, metavar="M",
              help="train the classifier (timm's classifier or the --head, and the calibration branch) at M x "
                   "the backbone's learning rate at every step: its warm-up starts at M x --warmup-lr and its floor "
                   "is M x --min-lr (CSRA's recipe: 10); 1: one rate for all")
    add_fixed(group, "--momentum", type=float, default=0.9, help="SGD momentum (momentum, sgd)")
    add_fixed(group, "--weight-decay", type=float, default=0.05, help="weight decay")
    add_fixed(group, "--sched", default="cosine", help="timm scheduler name (cosine, step, ...)")
    group.add_argument("--decay-epochs", type=float, default=90, help="--sched step: epochs between decays")
    group.add_argument("--decay-rate", type=float, default=0.1, help="--sched step: factor of each decay")
    group.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up epochs from --warmup-lr")
    group.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the first step")
    group.add_argument("--min-lr", type=float, default=1e-6, help="lowest learning rate of the schedule")
    group.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The multi-label recipe of ASL and timm (docs/recipe.md): EMA, RandAugment + Cutout, accumulation, SyncBN,
    experiment trackers."""
    group = parser.add_argument_group("recipe (docs/recipe.md)")
    add_fixed(group, "--model-ema", action="store_true",
              help="also keep an exponential moving average of the weights (timm ModelEmaV3 with warm-up), "
                   "evaluated every epoch; best.safetensors holds the better of the two")
    add_fixed(group, "--model-ema-decay", type=float, default=0.9997, help="EMA decay (ASL's and Q2L's)")
    group.add_argument("--aa", default=None, metavar="CONFIG",
                       help="timm RandAugment config on each training image, e.g. rand-m9-mstd0.5 (off when unset)")
    group.add_argument("--cutout", type=float, nargs="?", const=0.5, default=0.0, metavar="FRACTION",
                       help="ASL's Cutout on every training image: a box of FRACTION of the image side (0.5 when "
                            "given alone) at a random centre, filled with a random colour; 0: off")
    group.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                       help="multi-label Mixup of the training batches with lam ~ Beta(ALPHA, ALPHA), timm's batch "
                            "mode; targets mix into soft multi-hot vectors (docs/method.md#mixup-and-cutmix); 0: off")
    group.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                       help="CutMix of the training batches, a box of area 1 - lam, lam ~ Beta(ALPHA, ALPHA) corrected "
                            "to the box cut; 0: off")
    group.add_argument("--mixup-prob", type=float, default=1.0,
                       help="probability that a batch is mixed (--mixup or --cutmix)")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5,
                       help="probability of CutMix instead of Mixup for a batch when both are on")
    group.add_argument("--mixup-off-epoch", type=int, default=0, metavar="EPOCH",
                       help="no mixing from this epoch on (counted from 0); 0: mix every epoch")
    add_fixed(group, "--grad-accum-steps", type=int, default=1, metavar="N",
              help="accumulate the gradients of N batches per optimizer step (the schedule counts steps)")
    group.add_argument("--sync-bn", action="store_true",
                       help="with several processes, BatchNorm statistics over the global batch (SyncBatchNorm); "
                            "one process: plain BatchNorm, nothing changes")
    group.add_argument("--log-with", default=None, choices=("tensorboard", "wandb", "mlflow", "all"),
                       help="also log every summary.csv row to this experiment tracker (in the run directory)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    add_fixed(group, "--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    group.add_argument("--output", default="output", help="parent folder of the run directories")
    group.add_argument("--experiment", default=None, help="run directory name (default: date-time-model-method)")
    group.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="autocast dtype")
    group.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster on tensor cores)")
    group.add_argument("--torchcompile", action="store_true", help="torch.compile the model")
    group.add_argument("--skip-nonfinite", action="store_true",
                       help="skip a step whose loss is NaN/inf (counted in summary.csv) instead of stopping")
    group.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and the last)")
    group.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    add_debug_arg(group)


def training_parser(description: str | None, distillation: bool = False) -> argparse.ArgumentParser:
    """The flags train.py and distill.py (`distillation`) share (data, model, optimisation, runtime), -c and --resume
    included."""
    parser = argparse.ArgumentParser(description=description, parents=[config_parser()], formatter_class=HelpFormatter)
    add_data_args(parser, distillation)
    add_model_args(parser)
    add_optim_args(parser)
    add_recipe_args(parser)
    add_runtime_args(parser)
    return parser


def check_pretrained_sha256(args: argparse.Namespace) -> None:
    """--pretrained-sha256: the --pretrained-path file is the one named, before any work."""
    if args.pretrained_sha256 is None:
        return
    if not args.pretrained_path:
        raise ConfigError("--pretrained-sha256 checks the --pretrained-path file: give that file, or drop the flag")
    if not os.path.isfile(args.pretrained_path):
        raise ConfigError(f"--pretrained-path {args.pretrained_path} does not exist")
    found = file_sha256(args.pretrained_path)
    if found != args.pretrained_sha256.lower():
        raise ConfigError(f"--pretrained-path {args.pretrained_path} has sha256 {found}, not the "
                          f"--pretrained-sha256 {args.pretrained_sha256}: the file changed, or is another one")


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: -c YAML (or the args.yaml of the --resume run) sets the defaults, then the flags win.

    Unknown YAML keys are an error; a --resume whose flags change a setting declared with add_fixed is refused.
    """
    cfg_args, remaining = config_parser().parse_known_args(argv)
    if cfg_args.config and cfg_args.resume:
        raise ConfigError("use -c or --resume, not both: a resumed run takes its settings from its args.yaml")
    source = os.path.join(cfg_args.resume, "args.yaml") if cfg_args.resume else cfg_args.config
    saved = load_yaml(source) if source else {}
    known = {action.dest for action in parser._actions}
    unknown = sorted(key for key in saved if key.replace("-", "_") not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; keys are the flag names, e.g. img_size")
    saved = {key.replace("-", "_"): value for key, value in saved.items()}
    parser.set_defaults(**saved)
    args = parser.parse_args(remaining)
    args.config, args.resume = cfg_args.config, cfg_args.resume
    if args.pretrained_path:
        args.pretrained = True
    check_pretrained_sha256(args)
    fill_dataset_defaults(args)
    if hasattr(args, "test_split"):
        resolve_selection(args)
    check_augmentation(args)
    check_mixing(args)
    check_evaluation(args)
    if args.resume:
        fixed = {key: f" (fixed with {flag_name(condition)})" if condition else ""
                 for key, condition in resume_fixed(parser).items() if not condition or getattr(args, condition, False)}
        differences = [
            f"{flag_name(key)}: the run has {saved[key]!r}, now {getattr(args, key)!r}{reason}"
            for key, reason in fixed.items()
            if key in saved and getattr(args, key, saved[key]) != saved[key]
        ]
        if differences:
            raise ConfigError(f"cannot --resume {args.resume} with other settings: " + "; ".join(differences))
    return args


def check_augmentation(args: argparse.Namespace) -> None:
    """--aa and --cutout: a RandAugment config timm reads, a box smaller than the image, and CPU decoding."""
    if not 0 <= args.cutout < 1:
        raise ConfigError(f"--cutout is the box side as a fraction of the image side, in [0, 1): got {args.cutout}")
    if args.aa:
        try:
            rand_augment_transform(args.aa, {})
        except (AssertionError, ValueError) as err:
            raise ConfigError(f"--aa {args.aa!r} is not a timm RandAugment config (e.g. rand-m9-mstd0.5): "
                              f"{err or 'unknown form'}") from err
    if args.gpu_decode and (args.aa or args.cutout):
        raise ConfigError("--aa and --cutout run in the loader workers (PIL), and --gpu-decode augments on the GPU "
                          "without them: drop --gpu-decode, or the two flags")


def check_mixing(args: argparse.Namespace) -> None:
    """--mixup, --cutmix and their probabilities: alphas of a Beta distribution (>= 0), probabilities in [0, 1]."""
    for flag, value, valid, what in (
            ("--mixup", args.mixup, args.mixup >= 0, ">= 0 (0: off)"),
            ("--cutmix", args.cutmix, args.cutmix >= 0, ">= 0 (0: off)"),
            ("--mixup-prob", args.mixup_prob, 0 <= args.mixup_prob <= 1, "a probability in [0, 1]"),
            ("--mixup-switch-prob", args.mixup_switch_prob, 0 <= args.mixup_switch_prob <= 1,
             "a probability in [0, 1]"),
            ("--mixup-off-epoch", args.mixup_off_epoch, args.mixup_off_epoch >= 0, "an epoch >= 0 (0: never off)")):
        if not valid:
            raise ConfigError(f"{flag} must be {what}: got {value}")


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist")
    with open(path) as handle:
        try:
            # safe_load: a python/object tag in a config file is refused, never run.
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not a valid config file: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def experiment_name(model: str, method: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model.replace('/', '_')}-{method}"


def save_args(values: dict, path: str) -> None:
    """args.yaml: the resolved arguments, enough to rerun with -c."""
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def settings_from(cls: type[Settings], args: argparse.Namespace, **given: object) -> Settings:
    """A settings dataclass from the flags of the same names; `given` sets the fields that have no flag."""
    names = (field.name for field in dataclasses.fields(cls) if field.name not in given)
    return cls(**{name: getattr(args, name) for name in names}, **given)


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    """The typed settings of train.py's and distill.py's shared flags."""
    return TrainingSettings(
        data=settings_from(DataSettings, args, source=data_source(args), crop_scales=tuple(args.crop_scales),
                           class_groups=tuple(args.class_groups) if args.class_groups else None),
        model=settings_from(ModelSettings, args),
        optim=settings_from(OptimSettings, args),
        runtime=settings_from(RuntimeSettings, args),
        mixing=settings_from(MixingSettings, args),
        saved_args={key: value for key, value in sorted(vars(args).items()) if key not in ("config", "resume")},
    )
