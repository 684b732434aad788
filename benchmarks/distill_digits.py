#!/usr/bin/env python3
"""The digits distillation benchmark: the paper's claims, registered before the runs, 12 seeds, chosen on val.

    python benchmarks/distill_digits.py                           # seeds 0-11, about 75 minutes on a 2-core CPU
    python benchmarks/distill_digits.py --print-commands          # every run's command line, nothing run
    python benchmarks/distill_digits.py --seeds 0 1 --out output/distill-digits-2 --results output/trial.csv

docs/distillation.md#the-benchmark registers its design (claims, metric, seeds, test) and its limits.
1. Every run starts from the committed pretrained backbones of benchmarks/pretrain_digits.py (the analogue of
   ImageNet weights), loaded as a download is (`--pretrained-path`, `--pretrained-sha256`): the classifier and the
   calibration branch start at random.
2. For each seed, a teacher (resnet10t at half width, 1.27 M parameters) is trained with `--cal` on the main set:
   twelve seeds, twelve teachers, so the intervals cover the teacher's variance.
3. For each seed, the student (resnet10t at quarter width, 0.33 M: 3.8x fewer) is trained by every arm of ARMS,
   each from its seed's teacher. Every arm names every flag of its design (the attention weight, distance and
   variant, the warm-up, lambda, alpha and T), never a script's default.
The main set is digits with `--digits-ambiguous` (its difficult digits are tiny, blurred, faint or covered); every
model sees 56 px at `output_stride=8`, so the uncertainty attention maps are 7 x 7. best.safetensors is chosen on
`val`; results.csv reports `test`.

Every run is a train.py/distill.py process with one thread; `--jobs` of them run at once. A run that finished is
skipped and one that was interrupted is resumed, after a check that its args.yaml is what the plan asks and that
it was made by this commit from a clean tree (else the benchmark refuses, naming the run and the flag). At the end it
writes the long table (`--results`, one row per run) and, into `--out`, `report.md` and `claims.md`;
`python -m benchmarks.tables` makes the README's and docs' tables from the committed long table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import ROOT, Job, add_run_args, report_table, run_in, write_long_table  # noqa: E402
from benchmarks.pretrain_digits import ARCHITECTURES, pretrained_flags  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402

# Shared by every run: 56 px, one process without loader workers, the models of the pretraining.
TEACHER = ARCHITECTURES["teacher"]
STUDENT = ARCHITECTURES["student"]
COMMON = ("--img-size", "56", "--workers", "0", "--no-progress")
MAIN_DATA = ("--dataset", "digits", "--digits-ambiguous", "--digits-trainval", "1500", "--digits-test", "1000")
TEACHER_FLAGS = ("--loss", "bce", "--cal", "--cal-weight", "0.1")  # the paper's lambda
# Eq. 13's temperature, no ground-truth term; UD adds alpha, Eq. 14's weight (the paper's values).
KD = ("--temperature", "3", "--gt-weight", "0")
DISTILL = (*KD, "--dist-weight", "0.5")
NO_ATTENTION = ("--att-weight", "0", "--distill-warmup-epochs", "0")
# UD as the paper writes it: Eq. 16's signed map with its weights' graph, Eq. 17's norm, beta 0.5, no warm-up.
PAPER_UD = ("--method", "ud", *DISTILL, "--att-weight", "0.5", "--att-variant", "paper", "--att-distance", "norm",
            "--distill-warmup-epochs", "0")
# The student arms: script and flags, those that need no teacher first (they fill the second process while the
# teacher trains). Each run's directory is `<arm>-seed<N>`.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("train.py", ("--loss", "bce")),
    "cal": ("train.py", ("--loss", "bce", "--cal", "--cal-weight", "0.1")),
    "cal-lambda1": ("train.py", ("--loss", "bce", "--cal", "--cal-weight", "1")),
    "self-ud-paper": ("distill.py", ("--self-distill", "--cal-weight", "0.1", *PAPER_UD)),
    "kd": ("distill.py", ("--method", "kd", *KD)),
    "ud-noatt": ("distill.py", ("--method", "ud", *DISTILL, *NO_ATTENTION)),
    "ud-paper": ("distill.py", PAPER_UD),
    "ud-paper-squared": ("distill.py", ("--method", "ud", *DISTILL, "--att-weight", "0.5", "--att-variant", "paper",
                                        "--att-distance", "squared", "--distill-warmup-epochs", "0")),
    # distill.py's defaults when the design was registered (aefb1e1): Grad-CAM maps, Eq. 17 squared, 4-epoch warm-up.
    "ud-gradcam-warmup": ("distill.py", ("--method", "ud", *DISTILL, "--att-weight", "0.5", "--att-variant", "gradcam",
                                         "--att-distance", "squared", "--distill-warmup-epochs", "4")),
}
# The paper's effects: ResNet-18 on VOC2007 (Table 2a; Table 3a with the ResNet-101 teacher; Tables 4 and 5).
CLAIMS = (
    Claim("`--cal` lowers classwise ECE", "cal", "baseline", "ece", lower_is_better=True, paper="lower (Fig. 3)"),
    Claim("`--cal` raises mAP", "cal", "baseline", "map", paper="+0.59"),
    Claim("`--cal` raises Difficult mAP", "cal", "baseline", "map_difficult", paper="+0.95"),
    Claim("`--cal` at lambda 1 lowers classwise ECE", "cal-lambda1", "baseline", "ece", lower_is_better=True),
    Claim("`--cal` at lambda 1 raises mAP", "cal-lambda1", "baseline", "map"),
    Claim("`--cal` at lambda 1 raises Difficult mAP", "cal-lambda1", "baseline", "map_difficult"),
    Claim("KD beats the baseline", "kd", "baseline", "map", paper="+0.93"),
    Claim("UD without attention (Eq. 13 + 14) beats KD", "ud-noatt", "kd", "map", paper="+0.05"),
    Claim("UD as written (Eq. 18) beats UD without attention", "ud-paper", "ud-noatt", "map", paper="+0.21"),
    Claim("UD as written beats KD", "ud-paper", "kd", "map", paper="+0.26"),
    Claim("UD as written beats KD on Difficult mAP", "ud-paper", "kd", "map_difficult"),
    Claim("Self-distillation (UD as written) beats the baseline", "self-ud-paper", "baseline", "map", paper="+1.66",
          needs_distilled_epoch=True),
    Claim("Eq. 17's norm beats its square", "ud-paper", "ud-paper-squared", "map"),
    Claim("the former defaults (Grad-CAM maps, Eq. 17 squared, 4-epoch warm-up) beat UD as written",
          "ud-gradcam-warmup", "ud-paper", "map"),
)
# Not a claim of the design: self-distillation's last (distilled) epoch, whatever val chose, read after the fact.
POST_HOC = (
    Claim("(post hoc) self-distillation's last epoch beats the baseline", "self-ud-paper", "baseline", "last_map",
          against_metric="map"),
)


# The registered rule for distill.py's defaults: another UD arm replaces them only if it beats them on val mAP.
DEFAULT_CHOICE = tuple(Claim(f"{arm} beats ud-gradcam-warmup on val mAP", arm, "ud-gradcam-warmup", "selection_map")
                       for arm in ("ud-noatt", "ud-paper", "ud-paper-squared"))
SUMMARY = (("map", "mAP"), ("map_difficult", "Difficult mAP"), ("ece", "ECE ↓"), ("brier", "Brier ↓"),
           ("selection_map", "val mAP"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/distill-digits", help="folder of the runs and the tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(12)),
                        help="one replicate each: teacher and students")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=tuple(ARMS), help="the student runs")
    add_setting_args(parser)
    add_run_args(parser, "distill_digits")
    return parser.parse_args(argv)


def add_setting_args(parser: argparse.ArgumentParser) -> None:
    """The flags of this benchmark's setting, shared by the benchmarks that reuse its runs."""
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each teacher and student run")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every run, last on the command line (e.g. --extra --digits-test 50)")


def script(name: str, output: str, experiment: str, *flags: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name), *COMMON, "--output", output, "--experiment", experiment,
            *flags]


def needs_teacher(arm: tuple[str, tuple[str, ...]]) -> bool:
    name, flags = arm
    return name == "distill.py" and "--self-distill" not in flags


def plan(args: argparse.Namespace, arms: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> list[Job]:
    """Every run, seed by seed: the teacher (when an arm needs one), then the student `arms` (default: ARMS named
    by --arms)."""
    arms = arms if arms is not None else {arm: ARMS[arm] for arm in ARMS if arm in args.arms}
    return [job for seed in args.seeds for job in seed_jobs(args, seed, arms)]


def seed_jobs(args: argparse.Namespace, seed: int, arms: Mapping[str, tuple[str, tuple[str, ...]]]) -> list[Job]:
    """One replicate: the teacher if an arm needs it, then the student arms, all with `seed`."""
    out = os.path.abspath(args.out)
    teacher = f"teacher-seed{seed}"

    def job(arm: str, name: str, epochs: int, flags: Sequence[str], needs: tuple[str, ...]) -> Job:
        experiment = f"{arm}-seed{seed}"
        return Job(experiment, script(name, out, experiment, *MAIN_DATA, "--epochs", str(epochs), *flags, "--seed",
                                      str(seed), *args.extra), os.path.join(out, experiment), needs,
                   labels={"arm": arm, "seed": seed})

    jobs = [job("teacher", "train.py", args.epochs, (*TEACHER, *pretrained_flags("teacher"), *TEACHER_FLAGS), ())] \
        if any(needs_teacher(arm) for arm in arms.values()) else []
    for arm, (name, flags) in arms.items():
        self_distill = "--self-distill" in flags
        with_teacher = needs_teacher((name, flags))
        start = (*STUDENT, *pretrained_flags("student"), *flags)
        jobs.append(job(arm, name, 2 * args.epochs if self_distill else args.epochs,
                        (*start, *(("--teacher-ckpt", os.path.join(out, teacher, "best.safetensors"))
                                   if with_teacher else ())),
                        (teacher,) if with_teacher else ()))
    return jobs


def arm_results(table: pd.DataFrame) -> pd.DataFrame:
    """The long table with each run's arm as its method (the claims pair methods), its numbers as numbers."""
    results = table.copy()
    results["method"] = results["arm"]
    for column in results.columns:
        given = results[column].notna() & (results[column].astype(str) != "")
        converted = pd.to_numeric(results[column].where(given), errors="coerce")
        if (converted.notna() == given).all():
            results[column] = converted
    return results


def run_and_tabulate(args: argparse.Namespace, jobs: list[Job]) -> tuple[float, pd.DataFrame]:
    """The plan's runs in --out (run_in: the minutes they took), then their long table written to --results and
    read back as arm_results."""
    minutes = run_in(os.path.abspath(args.out), jobs, args)
    return minutes, arm_results(write_long_table(args.results, jobs))


def mean_std(values: pd.Series) -> str:
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def arm_table(results: pd.DataFrame, summary: Sequence[tuple[str, str]] = SUMMARY) -> str:
    """Markdown: per arm (results' method column, in its order), each of `summary`'s test metrics (and the val mAP
    that chose the checkpoint), mean ± std over the seeds, and their number."""
    lines = ["| run | n | " + " | ".join(heading for _, heading in summary) + " |", "|---|---|" + "---|" * len(summary)]
    for arm, rows in results.groupby("method", sort=False):
        cells = [mean_std(rows[name]) for name, _ in summary]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    minutes, runs = run_and_tabulate(args, jobs)
    report = f"## Teachers and students (test split; val mAP chose the checkpoint)\n\n{arm_table(runs)}"
    atomic_write_text(os.path.join(out, "report.md"), report + "\n" + report_table([job.run_dir for job in jobs]))
    claims = (f"{to_markdown(claims_table(runs, (*CLAIMS, *POST_HOC)))}\ndistill.py's defaults, decided on val:\n\n"
              f"{to_markdown(claims_table(runs, DEFAULT_CHOICE))}")
    atomic_write_text(os.path.join(out, "claims.md"), claims)
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
