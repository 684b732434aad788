#!/usr/bin/env python3
"""Missing labels on digits: how far each way of training on partial labels closes the gap to full labels.

    python benchmarks/missing_labels_digits.py                  # seeds 0-4, 50 % and 80 % of the labels dropped
    python benchmarks/missing_labels_digits.py --fractions 0.5 --seeds 0 1 2 3 4 5

In benchmarks/distill_digits.py's setting and folder, so that its full-label students (`baseline-seed<N>`) and its
pretraining are reused. For each dropped fraction f and seed s, `--drop-labels f --drop-labels-seed s` hides the
same labels from every run of that pair, the teacher included (nothing sees the hidden labels):
- the teacher (train.py --cal, `--unknown ignore`), trained on the partial labels;
- students: `--unknown negative` (the common baseline), `--unknown ignore`, KD (Eq. 13) and UD (Eq. 18,
  distill.py's defaults), which read no label, and UD with the ground-truth term whose unknown pairs take the
  teacher's probability (`--gt-weight 0.5 --unknown teacher`).
docs/datasets.md#missing-labels-measured registers the claims. Writes `missing-labels.md` into `--out`: test mAP per
arm and fraction, the part of the gap between `negative` and the full-label student that each arm closes, and the
claims, paired by seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks import distill_digits  # noqa: E402
from benchmarks.common import Job, run_in  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402

# Student arms: script, flags, and whether they learn from the fraction's teacher.
ARMS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "negative": ("train.py", ("--unknown", "negative"), False),
    "ignore": ("train.py", ("--unknown", "ignore"), False),
    "kd": ("distill.py", ("--method", "kd"), True),
    "ud": ("distill.py", ("--method", "ud"), True),
    "ud-fill": ("distill.py", ("--method", "ud", "--gt-weight", "0.5", "--unknown", "teacher"), True),
}
FULL = "baseline"  # the distillation benchmark's student on every label
CLAIMS = (
    Claim("`--unknown ignore` beats `negative`", "ignore", "negative", "map"),
    Claim("KD beats `--unknown ignore`", "kd", "ignore", "map"),
    Claim("UD beats KD", "ud", "kd", "map"),
    Claim("UD with teacher-filled labels beats UD", "ud-fill", "ud", "map"),
    Claim("UD with teacher-filled labels beats `--unknown ignore`", "ud-fill", "ignore", "map"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/distill-digits",
                        help="folder of the runs (the distillation benchmark's, to reuse its full-label students)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)), help="one replicate each")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8], help="--drop-labels values")
    distill_digits.add_setting_args(parser)
    return parser.parse_args(argv)


def drop_name(fraction: float) -> str:
    return f"drop{round(100 * fraction)}"


def plan(args: argparse.Namespace) -> list[Job]:
    """The pretraining and full-label students (distill_digits.plan, reused when done), then per fraction and seed
    the teacher and the student arms."""
    jobs, pretrained = distill_digits.pretraining(args, ("teacher", "student"))
    for seed in args.seeds:
        jobs += distill_digits.seed_jobs(args, seed, pretrained, {FULL: distill_digits.ARMS[FULL]})
    out = os.path.abspath(args.out)
    for fraction in args.fractions:
        for seed in args.seeds:
            partial = ("--drop-labels", str(fraction), "--drop-labels-seed", str(seed))
            teacher = f"teacher-{drop_name(fraction)}-seed{seed}"
            runs = {teacher: ("train.py", (*distill_digits.TEACHER, "--cal", "--pretrained-path",
                                           pretrained["teacher"]), ("pretrain-teacher",))}
            for arm, (name, flags, taught) in ARMS.items():
                with_teacher = ("--teacher-ckpt", os.path.join(out, teacher, "best.safetensors")) if taught else ()
                runs[f"{arm}-{drop_name(fraction)}-seed{seed}"] = (
                    name, (*distill_digits.STUDENT, "--pretrained-path", pretrained["student"], *flags, *with_teacher),
                    ("pretrain-student", *((teacher,) if taught else ())))
            jobs += [Job(experiment, distill_digits.script(name, out, experiment, *distill_digits.MAIN_DATA,
                                                           "--epochs", str(args.epochs), *flags, *partial, "--seed",
                                                           str(seed), *args.extra),
                         os.path.join(out, experiment), needs) for experiment, (name, flags, needs) in runs.items()]
    return jobs


def gap_closed(results: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean test mAP, and the part of the gap between `negative` and the full-label student it closes,
    (arm - negative) / (full - negative) of the means over seeds."""
    means = results.groupby("method")["map"].mean()
    gap = means[FULL] - means["negative"]
    return pd.DataFrame({"arm": list(ARMS), "map": [means[arm] for arm in ARMS],
                         "gap closed": [(means[arm] - means["negative"]) / gap for arm in ARMS]})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    minutes = run_in(out, jobs, args.jobs)
    students = {job.name: job.run_dir for job in jobs if not job.name.startswith(("pretrain-", "teacher-"))}
    results = distill_digits.student_results(list(students.values()))
    text = ""
    for fraction in args.fractions:
        tag = drop_name(fraction)
        chosen = results[results["method"].isin([FULL, *(f"{arm}-{tag}" for arm in ARMS)])].copy()
        chosen["method"] = chosen["method"].str.removesuffix(f"-{tag}")
        gap = gap_closed(chosen)
        text += (f"## {round(100 * fraction)} % of the training labels dropped\n\n"
                 f"Full labels ({FULL}): {chosen[chosen['method'] == FULL]['map'].mean():.2f} mAP.\n\n"
                 + to_markdown(gap.round(3)) + "\n" + to_markdown(claims_table(chosen, CLAIMS)) + "\n")
    atomic_write_text(os.path.join(out, "missing-labels.md"), text)
    print(f"\n{text}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
