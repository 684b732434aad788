"""Command-line arguments: a YAML file given with -c sets the defaults, flags on the command line win."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import TypeVar

import yaml
from timm.data.auto_augment import rand_augment_transform

from udtimm.data import DATASETS, DIGITS_SEED, DIGITS_TEST, DIGITS_TRAINVAL, HOLDOUT, DataSource
from udtimm.heads import HEAD_NAMES, LINEAR
from udtimm.io import atomic_write_text
from udtimm.losses import DIFFICULT_POLICIES, UNKNOWN_POLICIES
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


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot be used."""


# A resumed run must be the same experiment: these may not change between the first start and --resume
# (docs/resuming.md#what-may-not-change lists them; tests/test_config.py checks that it does).
RESUME_FIXED = ("model", "model_kwargs", "head", "head_kwargs", "dataset", "cal", "loss", "global_pool", "img_size",
                "batch_size", "seed", "method", "teacher_ckpt", "self_distill", "att_variant", "distill_warmup_epochs",
                "difficult", "asl_gamma_neg", "asl_gamma_pos", "asl_clip",
                # the state holds the EMA weights (or none), and the optimizer's state and parameter groups
                "model_ema", "model_ema_decay", "opt", "momentum", "weight_decay",
                # the schedule's position is a count of optimizer steps; its length and rates may change, its kind not
                "grad_accum_steps", "sched",
                # the images trained on, and those that choose best.safetensors (its saved best mAP is theirs)
                "train_split", "val_split", "test_split", "select_on_test", "holdout_fraction", "holdout_seed")
# Fixed only while the other setting is on: self-distillation takes its teacher, and restarts its cosine cycle,
# at half the epochs.
RESUME_FIXED_WITH = {"epochs": "self_distill"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and ends each option's help with its default (unless it has
    none, or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class ParseKwargs(argparse.Action):
    """KEY=VALUE pairs into a dict; each value is read as a YAML scalar (16 -> int, true -> bool, avg -> str)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[str],
                 option_string: str | None = None) -> None:
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} takes KEY=VALUE pairs, got {item!r}")
            kwargs[key.replace("-", "_")] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", default=None, metavar="YAML", help="YAML file of defaults; flags win")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    return parser


def add_dataset_args(group: argparse._ArgumentGroup, default: str | None, dataset_help: str,
                     training: bool = False) -> None:
    """The flags that say which images (read by data_source): --dataset, --data-dir, the split(s) and the digits
    set. `training`: --train-split, the splits that choose and report (docs/design.md#selection) and --holdout-*;
    else the one --split to evaluate."""
    group.add_argument("--dataset", default=default, choices=tuple(DATASETS), help=dataset_help)
    group.add_argument("--data-dir", default=None,
                       help="dataset root (digits: generated there on first use; without it, in the cache folder)")
    if training:
        group.add_argument("--train-split", default="train", help="train split (train = VOC trainval, COCO train2014)")
        group.add_argument("--val-split", default=None,
                           help=f"split evaluated every epoch, whose mAP chooses best.safetensors (default: digits "
                                f"val; voc2007, coco2014: {HOLDOUT}, the --holdout-fraction of --train-split left out "
                                f"of training; csv: val.csv when there is a test.csv, else {HOLDOUT})")
        group.add_argument("--test-split", default="test",
                           help="split that reports: best.safetensors and the last epoch are evaluated on it once, at "
                                "the end, for results.csv (test = VOC test, COCO val2014)")
        group.add_argument("--select-on-test", action="store_true",
                           help="choose best.safetensors on --test-split, as the paper does (its tables report the "
                                "best test epoch); results.csv's selection_split says so")
        group.add_argument("--holdout-fraction", type=float, default=0.1,
                           help=f"--val-split {HOLDOUT}: the part of --train-split held out of training")
        group.add_argument("--holdout-seed", type=int, default=0,
                           help=f"--val-split {HOLDOUT}: the seed that draws the held-out images (not --seed: every "
                                "run of a comparison holds the same images out)")
    else:
        group.add_argument("--split", default="test", help="split to evaluate (test = VOC test, COCO val2014)")
    group.add_argument("--digits-trainval", type=int, default=DIGITS_TRAINVAL, help="digits: number of trainval images")
    group.add_argument("--digits-test", type=int, default=DIGITS_TEST, help="digits: number of test images")
    group.add_argument("--digits-seed", type=int, default=DIGITS_SEED,
                       help="digits: scene seed; any seed but 0 makes a pretraining set whose glyphs are all "
                            "trainval glyphs of the default (seed 0) set, never its test glyphs")
    group.add_argument("--digits-ambiguous", action="store_true",
                       help="digits: a set whose difficult digits are ambiguous (tiny, blurred, faint or covered; "
                            "docs/datasets.md#digits), in a folder of its own")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_dataset_args(group, "digits", "dataset (digits: embedded, generated)", training=True)
    group.add_argument("--img-size", type=int, default=None, help="square input size (default: per dataset)")
    group.add_argument("-b", "--batch-size", type=int, default=32, help="images per process and step")
    add_workers_arg(group)
    group.add_argument("--reprob", type=float, default=None,
                       help="random erasing probability (default: 0.5, the paper's; digits: 0)")
    group.add_argument("--hflip", type=float, default=None,
                       help="horizontal flip probability (default: 0.5; digits: 0, a mirrored digit is another glyph)")
    group.add_argument("--crop-scales", type=float, nargs="+", default=None, metavar="S",
                       help="multi-scale crop sides as fractions of the short side (default: 1 .875 .75 .66 .5, "
                            "the paper's; digits: 1 .875, since smaller crops cut whole digits out)")
    group.add_argument("--difficult", default="positive", choices=DIFFICULT_POLICIES,
                       help="how the training losses treat VOC difficult labels")
    group.add_argument("--unknown", default="ignore", choices=(*UNKNOWN_POLICIES, "teacher"),
                       help="how the training losses treat labels nobody annotated (docs/datasets.md#missing-labels): "
                            "ignore leaves them out, negative counts them as absent, teacher (distill.py, "
                            "--gt-weight > 0) takes the teacher's probability as their target")
    group.add_argument("--drop-labels", type=float, default=0.0, metavar="FRACTION",
                       help="make this part of each class's training labels unknown, positives and negatives alike, "
                            "to simulate partial annotation (the splits that choose and report keep theirs)")
    group.add_argument("--drop-labels-seed", type=int, default=0, help="the seed that draws the dropped labels")
    group.add_argument("--eval-difficult-negative", action="store_true",
                       help="CP..OF1 count difficult pairs as negatives (ML-GCN's code) instead of leaving them out")
    group.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out instead of stopping")
    group.add_argument("--gpu-decode", action="store_true", help="decode and augment JPEGs on the GPU")
    add_prefetch_arg(group)


def add_workers_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("-j", "--workers", type=int, default=2, help="data loader worker processes per device")


def add_debug_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--debug", action="store_true", help="on an error, show the whole traceback, not one line")


def add_prefetch_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--prefetch", type=int, default=None, metavar="N",
                       help="batches a feeder thread prepares ahead of the step (copy to the device, normalisation, "
                            "--gpu-decode); default 2 on a GPU, 0 (none, no thread) on the CPU")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="resnet10t", help="any timm model name")
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
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="extra timm.create_model arguments, e.g. output_stride=16 (kept in the checkpoint)")
    group.add_argument("--global-pool", default=None, help="timm global pooling: avg, max, avgmax, token, ...")
    group.add_argument("--head", default=LINEAR, choices=HEAD_NAMES,
                       help="classification head: linear (timm's classifier on the pooled features), ml-decoder or "
                            "csra on the last feature map (docs/method.md#classification-heads)")
    group.add_argument("--head-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="options of --head, e.g. embed_dim=256 (ml-decoder) or num_heads=4 lam=0.5 (csra); kept "
                            "in the checkpoint")
    group.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")


def add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=15, help="training epochs")
    group.add_argument("--opt", default="adamw", help="timm optimizer name (sgd, momentum, adamw, ...)")
    group.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (momentum, sgd)")
    group.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    group.add_argument("--sched", default="cosine", help="timm scheduler name (cosine, step, ...)")
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
    group.add_argument("--model-ema", action="store_true",
                       help="also keep an exponential moving average of the weights (timm ModelEmaV3 with warm-up), "
                            "evaluated every epoch; best.safetensors holds the better of the two")
    group.add_argument("--model-ema-decay", type=float, default=0.9997, help="EMA decay (ASL's and Q2L's)")
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
    group.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                       help="accumulate the gradients of N batches per optimizer step (the schedule counts steps)")
    group.add_argument("--sync-bn", action="store_true",
                       help="with several processes, BatchNorm statistics over the global batch (SyncBatchNorm); "
                            "one process: plain BatchNorm, nothing changes")
    group.add_argument("--log-with", default=None, choices=("tensorboard", "wandb", "mlflow", "all"),
                       help="also log every summary.csv row to this experiment tracker (in the run directory)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
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


def training_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags train.py and distill.py share (data, model, optimisation, runtime), -c and --resume included."""
    parser = argparse.ArgumentParser(description=description, parents=[config_parser()], formatter_class=HelpFormatter)
    add_data_args(parser)
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

    Unknown YAML keys are an error; a --resume whose flags change RESUME_FIXED settings is refused.
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
    if args.resume:
        fixed = {key: "" for key in RESUME_FIXED}
        fixed.update({key: f" (fixed with {flag_name(condition)})" for key, condition in RESUME_FIXED_WITH.items()
                      if getattr(args, condition, False)})
        differences = [
            f"{flag_name(key)}: the run has {saved[key]!r}, now {getattr(args, key)!r}{reason}"
            for key, reason in fixed.items()
            if key in saved and getattr(args, key, saved[key]) != saved[key]
        ]
        if differences:
            raise ConfigError(f"cannot --resume {args.resume} with other settings: " + "; ".join(differences))
    return args


def flag_name(key: str) -> str:
    """The command-line flag of an argument's dest: img_size -> --img-size."""
    return "--" + key.replace("_", "-")


def resolve_selection(args: argparse.Namespace) -> None:
    """--val-split: the dataset's selection split unless given; the test split only with --select-on-test."""
    if args.select_on_test:
        if args.val_split not in (None, args.test_split):
            raise ConfigError(f"--select-on-test chooses on --test-split {args.test_split}: drop --val-split "
                              f"{args.val_split}")
        args.val_split = args.test_split
    elif args.val_split is None:
        args.val_split = DATASETS[args.dataset].selection_split(args.data_dir)
    elif args.val_split == args.test_split:
        raise ConfigError(f"--val-split {args.val_split} is the split that reports (--test-split): choose on another "
                          "split, or add --select-on-test for the paper's protocol")


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


# What flags left unset become, per dataset. The paper's recipe (448 px, random erasing, crops down to half the
# side) is for VOC/COCO objects; on the small digits scenes such crops and erasings remove whole digits while their
# labels stay, so the embedded default trains with milder augmentation at 48 px (fast on a CPU).
DATASET_DEFAULTS = {
    "digits": {"img_size": 48, "reprob": 0.0, "hflip": 0.0, "crop_scales": [1.0, 0.875]},
    "paper": {"img_size": 448, "reprob": 0.5, "hflip": 0.5, "crop_scales": [1.0, 0.875, 0.75, 0.66, 0.5]},
}


def fill_dataset_defaults(args: argparse.Namespace) -> None:
    defaults = DATASET_DEFAULTS["digits" if args.dataset == "digits" else "paper"]
    for key, value in defaults.items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)


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


def data_source(args: argparse.Namespace, name: str | None = None) -> DataSource:
    """The dataset `name` (default --dataset) at --data-dir; digits with its --digits-* options."""
    name = name or args.dataset
    options = {"num_trainval": args.digits_trainval, "num_test": args.digits_test, "seed": args.digits_seed,
               "ambiguous": args.digits_ambiguous} if name == "digits" else {}
    return DataSource(name, args.data_dir, options)


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    """The typed settings of train.py's and distill.py's shared flags."""
    return TrainingSettings(
        data=settings_from(DataSettings, args, source=data_source(args), crop_scales=tuple(args.crop_scales)),
        model=settings_from(ModelSettings, args),
        optim=settings_from(OptimSettings, args),
        runtime=settings_from(RuntimeSettings, args),
        mixing=settings_from(MixingSettings, args),
        saved_args={key: value for key, value in sorted(vars(args).items()) if key not in ("config", "resume")},
    )
