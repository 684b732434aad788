#!/usr/bin/env python3
"""The digits distillation benchmark: the paper's claims on a setting that gives them a fair chance.

    python benchmarks/distill_digits.py                           # seeds 0-11, about 75 minutes on a 2-core CPU
    python benchmarks/distill_digits.py --seeds 0 1 --out output/distill-digits-2

docs/distillation.md#the-benchmark registers its design (claims, metric, seeds, test) and gives the measured table.
1. Pretraining (the analogue of ImageNet weights, shared by every seed as ImageNet weights are): the teacher's and
   the student's architectures are each trained once on a digits set of their own (`--digits-seed 1`: other scenes
   made only of the glyphs that the main set uses for training), cached under $UDTIMM_CACHE/pretrained. Every later
   run keeps only the backbone (`--pretrained-path`): the classifier and the calibration branch start at random.
2. For each seed, a teacher (resnet10t at half width, 1.27 M parameters) is trained with `--cal` on the main set:
   twelve seeds, twelve teachers, so the intervals cover the teacher's variance.
3. For each seed, the student (resnet10t at quarter width, 0.33 M: 3.8x fewer) is trained as the baseline, with
   `--cal` at lambda 0.1 and 1, by KD, by UD without attention, by UD as the paper writes it (Eq. 16 as written,
   Eq. 17's norm, no warm-up), by UD with Eq. 17 squared, by UD with distill.py's defaults, and by self-distillation
   (the paper's form, twice the epochs), each from its seed's teacher.
The main set is digits with `--digits-ambiguous` (its difficult digits are tiny, blurred, faint or covered); every
model sees 56 px at `output_stride=8`, so the uncertainty attention maps are 7 x 7. best.safetensors is chosen on
`val`; results.csv reports `test`.

Every run is a train.py/distill.py process with one thread; `--jobs` of them run at once. A run that finished is
skipped, one that was interrupted is resumed, so the command can be stopped and started again (a finished run is
recognised by its directory name only: after changing a setting or the code, use another --out). At the end it
writes `report.md` (python -m udtimm.report over every run) and `claims.md` (the registered claims) into `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import ROOT, Job, report_table, run_in  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402
from udtimm.report import load_results  # noqa: E402

# resnet10t at half and quarter width (its stem too, for the student): 1.27 M and 0.33 M parameters.
TEACHER = ("--model", "resnet10t", "--model-kwargs", "output_stride=8", "channels=[32,64,128,256]")
STUDENT = ("--model", "resnet10t", "--model-kwargs", "output_stride=8", "channels=[16,32,64,128]", "stem_width=16")
# Shared by every run: 56 px at stride 8 (7 x 7 attention maps), one process without loader workers.
COMMON = ("--img-size", "56", "--workers", "0", "--no-progress")
MAIN_DATA = ("--dataset", "digits", "--digits-ambiguous", "--digits-trainval", "1500", "--digits-test", "1000")
PRETRAIN_DATA = ("--dataset", "digits", "--digits-seed", "1", "--digits-trainval", "3000", "--digits-test", "500")
# UD as the paper writes it: Eq. 16's signed map with its weights' graph, Eq. 17's norm, alpha and beta from the start.
PAPER_UD = ("--method", "ud", "--att-variant", "paper", "--att-distance", "norm", "--distill-warmup-epochs", "0")
# The student arms: script and flags, those that need no teacher first (they fill the second process while the
# teacher trains). Each run's directory is `<arm>-seed<N>`.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("train.py", ()),
    "cal": ("train.py", ("--cal", "--cal-weight", "0.1")),
    "cal-lambda1": ("train.py", ("--cal", "--cal-weight", "1")),
    "self-ud-paper": ("distill.py", ("--self-distill", *PAPER_UD)),
    "kd": ("distill.py", ("--method", "kd")),
    "ud-noatt": ("distill.py", ("--method", "ud", "--att-weight", "0", "--distill-warmup-epochs", "0")),
    "ud-paper": ("distill.py", PAPER_UD),
    "ud-paper-squared": ("distill.py", ("--method", "ud", "--att-variant", "paper", "--att-distance", "squared",
                                        "--distill-warmup-epochs", "0")),
    "ud-default": ("distill.py", ("--method", "ud")),
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
    Claim("UD without attention beats KD", "ud-noatt", "kd", "map", paper="+0.05"),
    Claim("UD beats UD without attention", "ud-paper", "ud-noatt", "map", paper="+0.21"),
    Claim("UD beats KD", "ud-paper", "kd", "map", paper="+0.26"),
    Claim("UD beats KD on Difficult mAP", "ud-paper", "kd", "map_difficult"),
    Claim("Self-distillation beats the baseline", "self-ud-paper", "baseline", "map", paper="+1.66"),
    Claim("Eq. 17's norm beats its square", "ud-paper", "ud-paper-squared", "map"),
    Claim("distill.py's defaults beat UD as written", "ud-default", "ud-paper", "map"),
)


# The registered rule for distill.py's defaults: another UD arm replaces them only if it beats them on val mAP.
DEFAULT_CHOICE = tuple(Claim(f"{arm} beats ud-default on val mAP", arm, "ud-default", "selection_map")
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
    return parser.parse_args(argv)


def add_setting_args(parser: argparse.ArgumentParser) -> None:
    """The flags of this benchmark's setting, shared by the benchmarks that reuse its runs."""
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each teacher and student run")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="epochs of each pretraining run")
    parser.add_argument("--cache", default=None,
                        help="folder of the pretraining runs, shared by every seed and every later benchmark "
                             "(default: $UDTIMM_CACHE/pretrained or ~/.cache/udtimm/pretrained)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every run, last on the command line (e.g. --extra --digits-test 50)")


def script(name: str, output: str, experiment: str, *flags: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name), *COMMON, "--output", output, "--experiment", experiment,
            *flags]


def pretrained_cache(args: argparse.Namespace) -> str:
    if args.cache:
        return args.cache
    cache = os.environ.get("UDTIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "udtimm")
    return os.path.join(cache, "pretrained")


def needs_teacher(arm: tuple[str, tuple[str, ...]]) -> bool:
    name, flags = arm
    return name == "distill.py" and "--self-distill" not in flags


def plan(args: argparse.Namespace, arms: Mapping[str, tuple[str, tuple[str, ...]]] | None = None) -> list[Job]:
    """Every run, each after the runs it needs: the pretraining runs, then seed by seed the teacher (when an arm
    needs one) and the student `arms` (default: ARMS named by --arms)."""
    arms = arms if arms is not None else {arm: ARMS[arm] for arm in ARMS if arm in args.arms}
    with_teacher = any(needs_teacher(arm) for arm in arms.values())
    jobs, pretrained = pretraining(args, ("teacher", "student") if with_teacher else ("student",))
    for seed in args.seeds:
        jobs += seed_jobs(args, seed, pretrained, arms)
    return jobs


def pretraining(args: argparse.Namespace, roles: Sequence[str]) -> tuple[list[Job], dict[str, str]]:
    """The pretraining runs of the `roles` ("teacher", "student"), and the best.safetensors of each role."""
    cache = pretrained_cache(args)
    jobs, pretrained = [], {}
    for role in roles:
        name = f"digits-seed1-56px-os8-{role}-e{args.pretrain_epochs}"
        pretrained[role] = os.path.join(cache, name, "best.safetensors")
        model = TEACHER if role == "teacher" else STUDENT
        jobs.append(Job(f"pretrain-{role}", script("train.py", cache, name, *model, *PRETRAIN_DATA, "--epochs",
                                                   str(args.pretrain_epochs)), os.path.join(cache, name)))
    return jobs, pretrained


def seed_jobs(args: argparse.Namespace, seed: int, pretrained: dict[str, str],
              arms: Mapping[str, tuple[str, tuple[str, ...]]]) -> list[Job]:
    """One replicate: the teacher if an arm needs it, then the student arms, all with `seed`."""
    out = os.path.abspath(args.out)
    teacher = f"teacher-seed{seed}"

    def job(experiment: str, name: str, epochs: int, flags: Sequence[str], needs: tuple[str, ...]) -> Job:
        return Job(experiment, script(name, out, experiment, *MAIN_DATA, "--epochs", str(epochs), *flags, "--seed",
                                      str(seed), *args.extra), os.path.join(out, experiment), needs)

    jobs = [job(teacher, "train.py", args.epochs, (*TEACHER, "--cal", "--pretrained-path", pretrained["teacher"]),
                ("pretrain-teacher",))] if any(needs_teacher(arm) for arm in arms.values()) else []
    for arm, (name, flags) in arms.items():
        self_distill = "--self-distill" in flags
        with_teacher = needs_teacher((name, flags))
        start = (*STUDENT, "--pretrained-path", pretrained["student"], *flags)
        jobs.append(job(f"{arm}-seed{seed}", name, 2 * args.epochs if self_distill else args.epochs,
                        (*start, *(("--teacher-ckpt", os.path.join(out, teacher, "best.safetensors"))
                                   if with_teacher else ())),
                        ("pretrain-student", *((teacher,) if with_teacher else ()))))
    return jobs


def student_results(run_dirs: Sequence[str]) -> pd.DataFrame:
    """results.csv of the student runs, each with its arm (its directory's name less `-seed<N>`) as its method."""
    results = load_results(run_dirs)
    results["method"] = [os.path.basename(run_dir).rsplit("-seed", 1)[0] for run_dir in results["run_dir"]]
    for column in {"brier", "selection_map", "best_epoch", "last_map"} & set(results.columns):  # kept as text
        results[column] = pd.to_numeric(results[column])
    return results


def arm_table(results: pd.DataFrame) -> str:
    """Markdown: per arm (results' method column, in its order), each of SUMMARY's test metrics and the val mAP that
    chose the checkpoint, mean ± std over the seeds, and their number."""
    lines = ["| run | n | " + " | ".join(heading for _, heading in SUMMARY) + " |", "|---|---|" + "---|" * len(SUMMARY)]
    for arm, rows in results.groupby("method", sort=False):
        cells = [f"{rows[name].mean():.2f} ± {rows[name].std(ddof=1):.2f}" for name, _ in SUMMARY]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    minutes = run_in(out, jobs, args.jobs)
    pretraining = [job.run_dir for job in jobs if job.name.startswith("pretrain-")]
    runs = student_results([job.run_dir for job in jobs if job.run_dir not in pretraining])
    report = (f"## Pretraining (`--digits-seed 1`, its own test split)\n\n{report_table(pretraining)}\n"
              f"## Teachers and students (test split; val mAP chose the checkpoint)\n\n{arm_table(runs)}")
    atomic_write_text(os.path.join(out, "report.md"), report)
    claims = (f"{to_markdown(claims_table(runs, CLAIMS))}\ndistill.py's defaults, decided on val:\n\n"
              f"{to_markdown(claims_table(runs, DEFAULT_CHOICE))}")
    atomic_write_text(os.path.join(out, "claims.md"), claims)
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
