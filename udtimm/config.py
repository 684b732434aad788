"""Command-line arguments: a YAML file given with -c sets the defaults, flags on the command line win."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from collections.abc import Sequence
from typing import TypeVar

import yaml
from timm.data.auto_augment import rand_augment_transform

from udtimm.data import DATASETS, DIGITS_SEED, DIGITS_TEST, DIGITS_TRAINVAL, HOLDOUT, DataSource
from udtimm.data.base import UNLISTED_STATES
from udtimm.data.hf import OPTIONS as HF_OPTIONS
from udtimm.errors import ConfigError
from udtimm.heads import HEAD_NAMES, LINEAR
from udtimm.io import atomic_write_text
from udtimm.losses import DIFFICULT_POLICIES, UNKNOWN_POLICIES
from udtimm.metric_statistics import AP_BINS, EVAL_MEMORY, EXACT_PAIRS_LIMIT, LOGIT_RANGE
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


# A resumed run must be the same experiment: the flags that define it are declared with add_fixed, and
# parse_with_config reads the tags (docs/resuming.md#what-may-not-change lists them; tests/test_config.py checks
# that it does, that each is refused on resume, and that every other flag may change).
FIXED_ON_RESUME = "udtimm_fixed_on_resume"


def add_fixed(group: argparse._ActionsContainer, *names: str, while_on: str = "", **options: object) -> argparse.Action:
    """add_argument for a flag that defines the experiment: a --resume with another value is refused (with
    `while_on`, only while that setting is on). These are the flags that change what the run learns, the images it
    trains on or chooses with, or what its saved state, schedule position or summary.csv columns mean."""
    action = group.add_argument(*names, **options)
    setattr(action, FIXED_ON_RESUME, while_on)
    return action


def warn(line: str) -> None:
    """One `warning:` line on stderr: a flag that does nothing, said before any work."""
    print(f"warning: {line}", file=sys.stderr)


def changed_from_default(args: argparse.Namespace, parser: argparse.ArgumentParser, names: Sequence[str]) -> list[str]:
    """The flags among `names` (settings' names) whose value is not their default, as written on a command line."""
    return [flag_name(name) for name in names if getattr(args, name) != parser.get_default(name)]


def resume_fixed(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The settings of `parser` declared with add_fixed: name -> the setting that must be on for it to be fixed
    ("" for always)."""
    return {action.dest: getattr(action, FIXED_ON_RESUME) for action in parser._actions
            if hasattr(action, FIXED_ON_RESUME)}


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
                     training: bool = False, split_help: str = "split to evaluate (test = VOC test, COCO val2014)",
                     ) -> None:
    """The flags that say which images (read by data_source): --dataset, --data-dir, the split(s) and the digits
    set. `training`: --train-split, the splits that choose and report (docs/design.md#selection) and --holdout-*;
    else the one --split (to evaluate, unless `split_help` says otherwise)."""
    add_fixed(group, "--dataset", default=default, choices=tuple(DATASETS), help=dataset_help)
    group.add_argument("--data-dir", default=None,
                       help="dataset root (digits: generated there on first use; without it, in the cache folder; wds: "
                            "the folder of _info.json; hf: a save_to_disk folder, a folder or file of Parquet files, "
                            "or a Hub name)")
    if training:
        add_fixed(group, "--train-split", default="train", help="train split (train = VOC trainval, COCO train2014)")
        add_fixed(group, "--val-split", default=None,
                  help=f"split evaluated every epoch, whose mAP chooses best.safetensors (default: digits "
                       f"val; voc2007, coco2014: {HOLDOUT}, the --holdout-fraction of --train-split left out "
                       f"of training; csv: val.csv when there is a test.csv, else {HOLDOUT}; hf: its val or "
                       f"validation split, else {HOLDOUT})")
        add_fixed(group, "--test-split", default="test",
                  help="split that reports: best.safetensors and the last epoch are evaluated on it once, at "
                       "the end, for results.csv (test = VOC test, COCO val2014)")
        add_fixed(group, "--select-on-test", action="store_true",
                  help="choose best.safetensors on --test-split, as the paper does (its tables report the "
                       "best test epoch); results.csv's selection_split says so")
        add_fixed(group, "--holdout-fraction", type=float, default=0.1,
                  help=f"--val-split {HOLDOUT}: the part of --train-split held out of training")
        add_fixed(group, "--holdout-seed", type=int, default=0,
                  help=f"--val-split {HOLDOUT}: the seed that draws the held-out images (not --seed: every "
                       "run of a comparison holds the same images out)")
    else:
        group.add_argument("--split", default="test", help=split_help)
    add_fixed(group, "--digits-trainval", type=int, default=DIGITS_TRAINVAL, help="digits: number of trainval images")
    add_fixed(group, "--digits-test", type=int, default=DIGITS_TEST, help="digits: number of test images")
    add_fixed(group, "--digits-seed", type=int, default=DIGITS_SEED,
              help="digits: scene seed; any seed but 0 makes a pretraining set whose glyphs are all "
                   "trainval glyphs of the default (seed 0) set, never its test glyphs")
    add_fixed(group, "--digits-ambiguous", action="store_true",
              help="digits: a set whose difficult digits are ambiguous (tiny, blurred, faint or covered; "
                   "docs/datasets.md#digits), in a folder of its own")
    add_fixed(group, "--digits-long-tail", type=float, default=None, metavar="RATIO",
              help="digits: a long-tailed trainval split, in a folder of its own: the images holding a class fall "
                   "geometrically from zero to nine, RATIO (> 1) times rarer; val and test stay balanced "
                   "(default: balanced)")
    add_fixed(group, "--csv-unlisted", default="absent", choices=tuple(UNLISTED_STATES),
              help="csv label lists: what a class that an image's row does not list is; unknown for "
                   "OpenImages-style data, whose rows list verified positives and negatives "
                   "(docs/datasets.md#sparse-labels)")
    add_fixed(group, "--oi-machine-labels", type=float, default=None, metavar="MIN_CONFIDENCE",
              help="openimages: also read the machine-generated labels, those of at least this confidence as "
                   "present where no human verified the class (default: human-verified labels only)")
    hf_column = "hf: the column of the classes {} (default: the column named {}, where the dataset has one)"
    add_fixed(group, "--hf-image-column", metavar="COLUMN", default=HF_OPTIONS["image_column"],
              help="hf: the column of the images (a datasets Image feature, a {bytes, path} struct, image file "
                   "bytes or file paths)")
    add_fixed(group, "--hf-labels-column", metavar="COLUMN", default=HF_OPTIONS["labels_column"],
              help="hf: the column of each image's present classes: a list of class names or ids, or one")
    add_fixed(group, "--hf-difficult-column", metavar="COLUMN", default=None,
              help=hf_column.format("present only through difficult objects", "difficult"))
    add_fixed(group, "--hf-unknown-column", metavar="COLUMN", default=None,
              help=hf_column.format("nobody annotated", "unknown"))
    add_fixed(group, "--hf-negatives-column", metavar="COLUMN", default=None,
              help=hf_column.format("verified absent", "negatives"))
    add_fixed(group, "--hf-classes", default=None, metavar="FILE",
              help="hf: the class list, one name per line (default: the labels column's ClassLabel names, else the "
                   "sorted class names of the train split)")
    add_fixed(group, "--hf-unlisted", default=HF_OPTIONS["unlisted"], choices=tuple(UNLISTED_STATES),
              help="hf: what a class that an image's label columns do not name is; unknown for OpenImages-style "
                   "data (docs/datasets.md#hf-datasets)")


def add_data_args(parser: argparse.ArgumentParser, distillation: bool) -> None:
    group = parser.add_argument_group("data")
    add_dataset_args(group, "digits", "dataset (digits: embedded, generated)", training=True)
    add_fixed(group, "--img-size", type=int, default=None, help="square input size (default: per dataset)")
    add_fixed(group, "-b", "--batch-size", type=int, default=32, help="images per process and step")
    add_workers_arg(group)
    group.add_argument("--reprob", type=float, default=None,
                       help="random erasing probability (default: 0.5, the paper's; digits: 0)")
    group.add_argument("--hflip", type=float, default=None,
                       help="horizontal flip probability (default: 0.5; digits: 0, a mirrored digit is another glyph)")
    group.add_argument("--crop-scales", type=float, nargs="+", default=None, metavar="S",
                       help="multi-scale crop sides as fractions of the short side (default: 1 .875 .75 .66 .5, "
                            "the paper's; digits: 1 .875, since smaller crops cut whole digits out)")
    add_fixed(group, "--difficult", default="positive", choices=DIFFICULT_POLICIES,
              help="how the training losses treat VOC difficult labels")
    teacher = ", teacher (with --gt-weight > 0) takes the teacher's probability as their target" if distillation else ""
    choices = (*UNKNOWN_POLICIES, "teacher") if distillation else UNKNOWN_POLICIES
    add_fixed(group, "--unknown", default="ignore", choices=choices,
              help="how the training losses treat labels nobody annotated (docs/datasets.md#missing-labels): ignore "
                   f"leaves them out, negative counts them as absent{teacher}")
    add_fixed(group, "--drop-labels", type=float, default=0.0, metavar="FRACTION",
              help="make this part of each class's training labels unknown, positives and negatives alike, "
                   "to simulate partial annotation (the splits that choose and report keep theirs)")
    add_fixed(group, "--drop-labels-seed", type=int, default=0, help="the seed that draws the dropped labels")
    group.add_argument("--eval-difficult-negative", action="store_true",
                       help="CP..OF1 count difficult pairs as negatives (ML-GCN's code) instead of leaving them out")
    add_evaluation_args(group)
    group.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out instead of stopping")
    group.add_argument("--gpu-decode", action="store_true", help="decode and augment JPEGs on the GPU")
    add_prefetch_arg(group)


def add_evaluation_args(group: argparse._ArgumentGroup) -> None:
    """How a split is evaluated (docs/method.md#evaluation-in-bounded-memory), for train.py, distill.py and
    validate.py: --min-positives, --class-groups, --eval-memory, --eval-bins. A resume keeps --min-positives, since
    the best mAP saved is one of that average, and --class-groups, so that every epoch's group columns average the
    same classes; the path may change (its mAP moves by less than 0.05)."""
    add_fixed(group, "--min-positives", type=int, default=1, metavar="K",
              help="mAP and Difficult mAP average the classes with at least K evaluated positives in the evaluated "
                   "images (OpenImages' protocol); the num_classes_few_positives column counts those left out "
                   "with fewer")
    group.add_argument("--eval-memory", default="auto", choices=EVAL_MEMORY,
                       help="exact: the metrics from every image's scores, gathered in one place (16 bytes per "
                            "image and class); binned: from fixed-size per-class statistics added batch by batch, "
                            "AP from --eval-bins score bins (mAP within 0.05 of exact on the sets measured, the rest "
                            "equal; validate.py then refuses --save-preds, --plots, --per-class, --calibrate and "
                            "--tune-thresholds, which need every score); auto: exact unless the evaluated split has "
                            f"more than {EXACT_PAIRS_LIMIT:,} images x classes")
    add_fixed(group, "--class-groups", type=float, nargs=2, default=None, metavar=("HEAD_ABOVE", "TAIL_BELOW"),
                       help="map_head / map_medium / map_tail: head classes have more than HEAD_ABOVE training "
                            "positives, tail classes fewer than TAIL_BELOW (default: VOC-LT's 100 and 20 scaled from "
                            "its 1,142 training images to the training split's; validate.py: the run's)")
    group.add_argument("--eval-bins", type=int, default=AP_BINS, metavar="N",
                       help=f"binned evaluation: AP score bins per class, uniform in logit over [-{LOGIT_RANGE:g}, "
                            f"{LOGIT_RANGE:g}] (4 int32 counts each: 16 bytes per class and bin)")


def check_evaluation(args: argparse.Namespace) -> None:
    """--min-positives and --eval-bins: at least 1."""
    for flag, value in (("--min-positives", args.min_positives), ("--eval-bins", args.eval_bins)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


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
    # Shards of digits train as digits do: the defaults follow the images, not their container.
    kind = DATASETS[args.dataset].source_dataset(args.data_dir) or args.dataset
    defaults = DATASET_DEFAULTS["digits" if kind == "digits" else "paper"]
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
    """The dataset `name` (default --dataset) at --data-dir; digits with its --digits-* options, hf with the --hf-*
    options that differ from their defaults."""
    name = name or args.dataset
    options = {"num_trainval": args.digits_trainval, "num_test": args.digits_test, "seed": args.digits_seed,
               "ambiguous": args.digits_ambiguous} if name == "digits" else {}
    # Only a set read otherwise than before names it: older checkpoints' provenance stays equal.
    if name == "digits" and args.digits_long_tail is not None:
        options["long_tail"] = args.digits_long_tail
    if args.oi_machine_labels is not None:
        if name == "openimages":
            options["machine_labels"] = args.oi_machine_labels
        else:
            warn(f"--oi-machine-labels does nothing: --dataset {name} is not openimages")
    if args.csv_unlisted != "absent":
        if name == "csv":
            options["unlisted"] = args.csv_unlisted
        else:
            warn(f"--csv-unlisted {args.csv_unlisted} does nothing: --dataset {name} says itself what an unlisted "
                 "class is")
    for key, default in HF_OPTIONS.items():
        value = getattr(args, f"hf_{key}")
        if value != default:
            if name == "hf":
                options[key] = value
            else:
                warn(f"{flag_name(f'hf_{key}')} does nothing: --dataset {name} is not hf")
    return DataSource(name, args.data_dir, options)


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
