"""The flags that say which images a run reads and how a split is evaluated (--dataset and its options, the splits,
the labels' policies, --min-positives, --class-groups, --eval-memory), the defaults per dataset, and the dataset
they name (data_source)."""

from __future__ import annotations

import argparse

from udtimm.data import DATASETS, DIGITS_SEED, DIGITS_TEST, DIGITS_TRAINVAL, HOLDOUT, DataSource
from udtimm.data.base import UNLISTED_STATES
from udtimm.data.hf import OPTIONS as HF_OPTIONS
from udtimm.errors import ConfigError
from udtimm.flags import add_fixed, flag_name, warn
from udtimm.losses import DIFFICULT_POLICIES, UNKNOWN_POLICIES
from udtimm.metric_statistics import AP_BINS, EVAL_MEMORY, EXACT_PAIRS_LIMIT, LOGIT_RANGE


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


def add_prefetch_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--prefetch", type=int, default=None, metavar="N",
                       help="batches a feeder thread prepares ahead of the step (copy to the device, normalisation, "
                            "--gpu-decode); default 2 on a GPU, 0 (none, no thread) on the CPU")


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
