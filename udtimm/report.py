"""Repeated runs as the paper's tables: n, mean ± std, best and worst over seeds (python -m udtimm.report).

    python -m udtimm.report output/*/                         # Markdown, one row per experiment
    python -m udtimm.report output/voc2007_* --paper          # + the paper's mAP and ours - paper
    python -m udtimm.report output/*/ --format csv > table.csv
    python -m udtimm.report output/voc2007_resnet101_* --by reprob,sched   # Table 1: split groups by args.yaml
    python -m udtimm.report output/voc2007_resnet18_* --plot curves.png   # mAP, ECE, train loss per epoch

Each argument is a run directory or a results.csv file (validate.py --results-file writes those too).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: reports are made on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from udtimm.checkpoint import CheckpointError, read_metadata  # noqa: E402
from udtimm.io import atomic_write  # noqa: E402
from udtimm.metrics import METRIC_COLUMNS  # noqa: E402

GROUP_KEYS: tuple[str, ...] = ("dataset", "split", "model", "method", "teacher")
# Settings that should agree inside a group; a mix (a 1-epoch trial among 20-epoch runs, say, or runs chosen on
# the test split among runs chosen on a held-out one) is warned about.
CONSISTENT_KEYS: tuple[str, ...] = ("epochs", "img_size", "difficult", "eval_difficult", "selection_split")
# The paper's columns (Tables 2-3) plus the calibration error: (results.csv name, heading).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = tuple((column.name, column.heading) for column in METRIC_COLUMNS
                                                   if column.report)
METRICS = frozenset(column.name for column in METRIC_COLUMNS)
LOWER_IS_BETTER = frozenset(column.name for column in METRIC_COLUMNS if column.lower_is_better)
# The methods whose paper number depends on the teacher's model.
TEACHER_KEYED_METHODS = frozenset({"kd", "ud", "ud-noatt"})
CURVES: tuple[tuple[str, str], ...] = (("map", "mAP (%)"), ("ece", "ECE (%)"), ("train_loss", "train loss"))


class ReportError(ValueError):
    """A results file or argument the report cannot use; the message names it."""


@dataclass(frozen=True)
class PaperNumber:
    map: float
    source: str


# mAP (%) published in the paper at 448 px, keyed by (dataset, model, method[, teacher model]); models without
# their timm pretrained tag. Where a table reports repeated runs this is their mean.
# The paper's "Baseline" rows disagree between tables: Table 3 lists ResNet-18 90.48 / MobileNet-v2 90.89 on VOC
# and 75.60 / 77.33 on COCO, Table 2 (and Table 5, "trained with hard label") 88.91 / 90.00 and 74.31 / 75.99,
# with no stated difference in setting. The baselines here are Table 2's, which Table 5 repeats.
PAPER_MAP: dict[tuple[str, ...], PaperNumber] = {
    ("voc2007", "resnet101", "baseline"): PaperNumber(93.75, "Table 2a"),
    ("voc2007", "resnet101", "cal"): PaperNumber(94.11, "Table 2a"),
    ("voc2007", "vgg19_bn", "baseline"): PaperNumber(91.29, "Table 2a"),
    ("voc2007", "vgg19_bn", "cal"): PaperNumber(91.87, "Table 2a"),
    ("voc2007", "mobilenetv2_100", "baseline"): PaperNumber(90.00, "Table 2a"),
    ("voc2007", "mobilenetv2_100", "cal"): PaperNumber(90.37, "Table 2a"),
    ("voc2007", "resnet18", "baseline"): PaperNumber(88.91, "Table 2a"),
    ("voc2007", "resnet18", "cal"): PaperNumber(89.50, "Table 2a"),
    ("coco2014", "resnet101", "baseline"): PaperNumber(82.41, "Table 2b"),
    ("coco2014", "resnet101", "cal"): PaperNumber(82.84, "Table 2b"),
    ("coco2014", "vgg19_bn", "baseline"): PaperNumber(76.25, "Table 2b"),
    ("coco2014", "vgg19_bn", "cal"): PaperNumber(77.79, "Table 2b"),
    ("coco2014", "mobilenetv2_100", "baseline"): PaperNumber(75.99, "Table 2b"),
    ("coco2014", "mobilenetv2_100", "cal"): PaperNumber(77.22, "Table 2b"),
    ("coco2014", "resnet18", "baseline"): PaperNumber(74.31, "Table 2b"),
    ("coco2014", "resnet18", "cal"): PaperNumber(75.48, "Table 2b"),
    ("voc2007", "resnet18", "kd", "resnet101"): PaperNumber(91.41, "Table 3a"),
    ("voc2007", "resnet18", "ud", "resnet101"): PaperNumber(91.67, "Table 3a"),
    ("voc2007", "resnet18", "kd", "vgg19_bn"): PaperNumber(90.99, "Table 3a"),
    ("voc2007", "resnet18", "ud", "vgg19_bn"): PaperNumber(91.24, "Table 3a"),
    ("voc2007", "mobilenetv2_100", "kd", "resnet101"): PaperNumber(92.01, "Table 3a"),
    ("voc2007", "mobilenetv2_100", "ud", "resnet101"): PaperNumber(92.22, "Table 3a"),
    ("voc2007", "mobilenetv2_100", "kd", "vgg19_bn"): PaperNumber(91.46, "Table 3a"),
    ("voc2007", "mobilenetv2_100", "ud", "vgg19_bn"): PaperNumber(91.78, "Table 3a"),
    ("coco2014", "resnet18", "kd", "resnet101"): PaperNumber(76.05, "Table 3b"),
    ("coco2014", "resnet18", "ud", "resnet101"): PaperNumber(77.19, "Table 3b"),
    ("coco2014", "resnet18", "kd", "vgg19_bn"): PaperNumber(75.90, "Table 3b"),
    ("coco2014", "resnet18", "ud", "vgg19_bn"): PaperNumber(76.12, "Table 3b"),
    ("coco2014", "mobilenetv2_100", "kd", "resnet101"): PaperNumber(77.77, "Table 3b"),
    ("coco2014", "mobilenetv2_100", "ud", "resnet101"): PaperNumber(78.12, "Table 3b"),
    ("coco2014", "mobilenetv2_100", "kd", "vgg19_bn"): PaperNumber(77.67, "Table 3b"),
    ("coco2014", "mobilenetv2_100", "ud", "vgg19_bn"): PaperNumber(77.92, "Table 3b"),
    ("voc2007", "resnet101", "self-ud"): PaperNumber(94.27, "Table 4"),
    ("voc2007", "resnet18", "self-ud"): PaperNumber(90.81, "Table 4"),
    ("voc2007", "mobilenetv2_100", "self-ud"): PaperNumber(91.34, "Table 4"),
    ("voc2007", "resnet18", "temperature"): PaperNumber(90.27, "Table 5"),
    ("voc2007", "resnet18", "label-smoothing"): PaperNumber(90.48, "Table 5"),
    ("voc2007", "resnet18", "one-over-k"): PaperNumber(91.37, "Table 5"),
    ("voc2007", "resnet18", "ud-noatt", "resnet101"): PaperNumber(91.46, "Table 5"),
}


def results_file(path: str) -> str:
    """The results.csv of a run directory, or `path` itself when it names a file."""
    if os.path.isdir(path):
        csv_path = os.path.join(path, "results.csv")
        if not os.path.isfile(csv_path):
            raise ReportError(f"{path}: no results.csv in this run directory (has the run finished?)")
        return csv_path
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such run directory or results.csv")
    return path


def base_model(name: str) -> str:
    """timm name without its pretrained tag: resnet101.tv_in1k -> resnet101."""
    return name.split(".", 1)[0]


def teacher_name(teacher: str) -> str:
    """The teacher column shown: the teacher's model name from its checkpoint, else the name of its run directory.

    Students of teachers of one architecture (different teacher seeds, say) form one group, as in the paper.
    """
    if teacher in ("", "self"):
        return teacher
    if os.path.isfile(teacher):
        try:
            model = read_metadata(teacher).get("model")
        except CheckpointError:
            model = None
        if model:
            return model
    return os.path.basename(os.path.dirname(os.path.abspath(teacher))) or teacher


def read_results_csv(path: str) -> pd.DataFrame:
    try:
        # Only the metric columns are numbers; "nan" there is a metric with no value (no difficult image, say).
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not a readable results.csv ({type(err).__name__}: {err})") from err
    missing = [column for column in (*GROUP_KEYS, "map") if column not in frame.columns]
    if missing:
        raise ReportError(f"{path}: not a udtimm results.csv, it lacks the columns {missing}")
    if frame.empty:
        raise ReportError(f"{path}: no result rows")
    if "seed" not in frame.columns:  # validate.py rows: the checkpoint's seed is not known there
        frame["seed"] = ""
    if "subset" in frame.columns:
        # validate.py --subset difficult scores other images than the whole split: never one group with those.
        partial = ~frame["subset"].isin(("", "all"))
        frame.loc[partial, "split"] = frame["split"][partial] + ":" + frame["subset"][partial]
    for column, _ in PAPER_COLUMNS:
        if column not in frame.columns:
            frame[column] = "nan"
        numbers = pd.to_numeric(frame[column].replace("", "nan"), errors="coerce")
        bad = frame[column][numbers.isna() & ~frame[column].str.lower().isin(("", "nan"))]
        if not bad.empty:
            raise ReportError(f"{path}: column {column} holds {bad.iloc[0]!r}, not a number")
        frame[column] = numbers
    return frame


def args_value(run_dir: str, key: str, cache: dict[str, dict]) -> str:
    """`key` from the run's args.yaml (the resolved arguments train.py/distill.py saved)."""
    if run_dir not in cache:
        path = os.path.join(run_dir, "args.yaml")
        if not os.path.isfile(path):
            raise ReportError(f"{run_dir}: no args.yaml to read --by {key} from")
        with open(path) as handle:
            cache[run_dir] = yaml.safe_load(handle) or {}
    values = cache[run_dir]
    if key not in values:
        raise ReportError(f"{run_dir}/args.yaml has no {key!r} (--by takes results.csv columns or argument names)")
    return str(values[key])


def load_results(paths: Sequence[str], by: Sequence[str] = ()) -> pd.DataFrame:
    """All rows of the results.csv of `paths` (run directories or files), one row per evaluated checkpoint.

    Adds `run_dir`, `results_file` and `teacher_ckpt` (the raw teacher path); `teacher` becomes the teacher's
    model name. `by` names extra columns to fill from each run's args.yaml where results.csv lacks them.
    """
    if not paths:
        raise ReportError("no run directories or results.csv files given")
    files = list(dict.fromkeys(os.path.abspath(results_file(path)) for path in paths))  # each file once
    frames = []
    args_cache: dict[str, dict] = {}
    for path in files:
        frame = read_results_csv(path)
        frame["results_file"] = path
        frame["run_dir"] = os.path.dirname(path)
        for key in by:
            if key not in frame.columns:
                frame[key] = [args_value(run_dir, key, args_cache) for run_dir in frame["run_dir"]]
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    # Files from other versions may lack a text column that others have: empty text, as in the files themselves.
    text = [column for column in df.columns if column not in METRICS]
    df[text] = df[text].fillna("")
    df["teacher_ckpt"] = df["teacher"]
    df["teacher"] = [teacher_name(teacher) for teacher in df["teacher"]]
    # One checkpoint evaluated twice with the same settings (a run finished again after --resume) counts once.
    same = [column for column in (*GROUP_KEYS, "teacher_ckpt", "seed", *CONSISTENT_KEYS, "checkpoint", *by)
            if column in df.columns]
    if "checkpoint" in df.columns:
        df = df[(df["checkpoint"] == "") | ~df.duplicated(same, keep="last")].reset_index(drop=True)
    return df


def _joined(values: pd.Series) -> str:
    unique = sorted(set(values.astype(str)), key=lambda v: (len(v), v))  # numeric strings in numeric order
    return "/".join(unique)


def summarise(df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (dataset, split, model, method, teacher, *by): n, seeds, and for each paper column its
    mean, std (ddof=1; nan for a single run), best and worst (ECE: lower is better). A metric missing in any run
    of a group (nan) gives nan statistics rather than statistics over fewer runs than n says."""
    keys = [*GROUP_KEYS, *by]
    rows = []
    for values, group in df.groupby(keys, sort=True, dropna=False):
        row: dict[str, object] = dict(zip(keys, values, strict=True))
        row["n"] = len(group)
        row["seeds"] = _joined(group["seed"])
        for column in CONSISTENT_KEYS:
            if column in group.columns:
                row[column] = _joined(group[column])
        for column, _ in PAPER_COLUMNS:
            scores = group[column].to_numpy(dtype=float)
            finite = not np.isnan(scores).any()
            low, high = (scores.min(), scores.max()) if finite else (math.nan, math.nan)
            row[f"{column}_mean"] = scores.mean() if finite else math.nan
            row[f"{column}_std"] = scores.std(ddof=1) if finite and len(scores) > 1 else math.nan
            row[f"{column}_best"], row[f"{column}_worst"] = (low, high) if column in LOWER_IS_BETTER else (high, low)
        rows.append(row)
    return pd.DataFrame(rows)


def group_warnings(summary: pd.DataFrame) -> list[str]:
    """Groups whose runs differ in a setting outside the group key, or repeat a seed (n would overstate)."""
    warnings = []
    for _, row in summary.iterrows():
        label = " ".join(str(row[key]) for key in GROUP_KEYS if row[key])
        mixed = [f"{column} {row[column]}" for column in CONSISTENT_KEYS if "/" in str(row.get(column, ""))]
        if mixed:
            warnings.append(f"warning: the runs of {label} differ in {', '.join(mixed)}")
        if row["seeds"] and len(str(row["seeds"]).split("/")) < row["n"]:
            warnings.append(f"warning: {label} has {row['n']} runs but only the seeds {row['seeds']}")
    return warnings


def paper_number(dataset: str, model: str, method: str, teacher: str) -> PaperNumber | None:
    key = (dataset, base_model(model), method)
    return PAPER_MAP.get((*key, base_model(teacher)) if method in TEACHER_KEYED_METHODS else key)


def add_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """Adds paper_map, paper_source and map_diff = our mean mAP - the paper's (nan where the paper has none)."""
    found = [paper_number(r.dataset, r.model, r.method, r.teacher) for r in summary.itertuples()]
    out = summary.copy()
    out["paper_map"] = [number.map if number else math.nan for number in found]
    out["paper_source"] = [number.source if number else "" for number in found]
    out["map_diff"] = out["map_mean"] - out["paper_map"]
    return out


def _number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def metric_cell(row: pd.Series, column: str) -> str:
    """mean ± std (min–max over seeds); '-' for a std of one run, for a metric without values."""
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    if math.isnan(mean):
        return "-"
    low, high = sorted((row[f"{column}_best"], row[f"{column}_worst"]))
    spread = f" ({low:.2f}–{high:.2f})" if row["n"] > 1 else ""
    return f"{mean:.2f} ± {_number(std)}{spread}"


def to_markdown(summary: pd.DataFrame, by: Sequence[str] = ()) -> str:
    """A GitHub Markdown table of summarise() (and add_paper()) output, one row per group."""
    paper = "paper_map" in summary.columns
    headings = ["Dataset", "Split", "Model", "Method", "Teacher", *by, "n", "Epochs",
                *(heading for _, heading in PAPER_COLUMNS)]
    if paper:
        headings += ["Paper mAP", "Ours − paper"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join("---" for _ in headings) + "|"]
    for _, row in summary.iterrows():
        cells = [str(row[key]) or "-" for key in (*GROUP_KEYS, *by)]
        cells += [str(row["n"]), str(row.get("epochs", ""))]
        cells += [metric_cell(row, column) for column, _ in PAPER_COLUMNS]
        if paper:
            source = f" ({row['paper_source']})" if row["paper_source"] else ""
            diff = "-" if math.isnan(row["map_diff"]) else f"{row['map_diff']:+.2f}"
            cells += [_number(row["paper_map"]) + source, diff]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    note = ("Cells: mean ± std over seeds (std with ddof=1, '-' for one run), then (lowest–highest); best is the "
            "highest, except for ECE. Percent.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def training_curves(run_dirs: Sequence[str]) -> Figure:
    """One figure, three axes (mAP, ECE, train loss per epoch from summary.csv), one line per run."""
    names = [os.path.basename(os.path.normpath(run_dir)) for run_dir in run_dirs]
    if len(set(names)) < len(names):  # the same run name under two parents: tell them apart by path
        names = [os.path.normpath(run_dir) for run_dir in run_dirs]
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for run_dir, name in zip(run_dirs, names, strict=True):
        path = os.path.join(run_dir, "summary.csv")
        try:
            summary = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ReportError(f"{path}: not a readable summary.csv ({err})") from err
        missing = [column for column in ("epoch", *(c for c, _ in CURVES)) if column not in summary.columns]
        if missing:
            raise ReportError(f"{path}: lacks the columns {missing}")
        for axis, (column, _) in zip(axes, CURVES, strict=True):
            # Epochs without evaluation (--eval-interval) hold nan: leave them out rather than break the line.
            points = summary[["epoch", column]].apply(pd.to_numeric, errors="coerce").dropna()
            axis.plot(points["epoch"], points[column], marker="o", markersize=3, label=name)
    for axis, (_, label) in zip(axes, CURVES, strict=True):
        axis.set(xlabel="epoch", ylabel=label, title=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_curves(paths: Sequence[str], out: str) -> list[str]:
    """Write the training curves of the runs of `paths` to the PNG `out`; returns the runs left out (no summary)."""
    run_dirs = list(dict.fromkeys(os.path.dirname(os.path.abspath(results_file(path))) for path in paths))
    with_summary = [run_dir for run_dir in run_dirs if os.path.isfile(os.path.join(run_dir, "summary.csv"))]
    if not with_summary:
        raise ReportError(f"--plot: none of {len(run_dirs)} run(s) has a summary.csv (training curves)")
    figure = training_curves(with_summary)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(figure)
    return [run_dir for run_dir in run_dirs if run_dir not in with_summary]


def expand(paths: Sequence[str]) -> list[str]:
    """Shell globs arrive expanded; a pattern that was quoted (or a shell without globbing) is expanded here."""
    expanded = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) and not os.path.exists(path) else [path]
        if not matches:
            raise ReportError(f"{path}: matches no run directory")
        expanded.extend(matches)
    return expanded


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m udtimm.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory or results.csv (globs welcome)")
    parser.add_argument("--format", default="markdown", choices=("markdown", "csv"))
    parser.add_argument("--paper", action="store_true", help="add the paper's mAP and ours - paper")
    parser.add_argument("--by", default="", metavar="KEY[,KEY]",
                        help="also group by these results.csv columns or args.yaml arguments (e.g. reprob,sched)")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="training curves of the runs (PNG)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    by = [key.strip().replace("-", "_") for key in args.by.split(",") if key.strip()]
    paths = expand(args.runs)
    summary = summarise(load_results(paths, by), by)
    if args.paper:
        summary = add_paper(summary)
    for warning in group_warnings(summary):
        print(warning, file=sys.stderr)
    print(summary.to_csv(index=False) if args.format == "csv" else to_markdown(summary, by), end="")
    if args.plot:
        for run_dir in plot_curves(paths, args.plot):
            print(f"warning: {run_dir} has no summary.csv, left out of {args.plot}", file=sys.stderr)
        print(f"training curves: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except ReportError as err:
        sys.exit(f"error: {err}")
