#!/usr/bin/env python3
"""Missing labels on digits: how far each way of training on partial labels closes the gap to full labels.

    python benchmarks/missing_labels_digits.py                  # seeds 0-4, 50 % and 80 % of the labels dropped
    python benchmarks/missing_labels_digits.py --fractions 0.5 --seeds 0 1 2 3 4 5

In benchmarks/distill_digits.py's setting and folder, so that its full-label students (`baseline-seed<N>`) and its
pretraining are reused. For each dropped fraction f and seed s, `--drop-labels f --drop-labels-seed s` hides the
same labels from every run of that pair, the teacher included (nothing sees the hidden labels):
- the teacher (train.py --cal, `--unknown ignore`), trained on the partial labels;
- students: `--unknown negative` (the common baseline), `--unknown ignore`, KD (Eq. 13), UD as registered
  (`ud-gradcam-warmup`: Eq. 18 with distill.py's defaults of then, Grad-CAM maps, Eq. 17 squared, 4-epoch warm-up)
  and UD without Eq. 17 (`ud-noatt`, distill.py's default since), which read no label, and the registered UD with
  the ground-truth term whose unknown pairs take the teacher's probability (`--gt-weight 0.5 --unknown teacher`).
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
from benchmarks.common import Job, add_run_args, run_in, write_long_table  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402

UD_REGISTERED = distill_digits.ARMS["ud-gradcam-warmup"][1]
# Student arms: script, flags, and whether they learn from the fraction's teacher.
ARMS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "negative": ("train.py", ("--loss", "bce", "--unknown", "negative"), False),
    "ignore": ("train.py", ("--loss", "bce", "--unknown", "ignore"), False),
    "kd": distill_digits.ARMS["kd"] + (True,),
    "ud-noatt": distill_digits.ARMS["ud-noatt"] + (True,),
    "ud-gradcam-warmup": ("distill.py", UD_REGISTERED, True),
    "ud-gradcam-warmup-fill": ("distill.py", (*UD_REGISTERED, "--gt-weight", "0.5", "--cal-weight", "0.1",
                                              "--unknown", "teacher"), True),
}
TEACHER = (*distill_digits.TEACHER_FLAGS, "--unknown", "ignore")
FULL = "baseline"  # the distillation benchmark's student on every label
CLAIMS = (
    Claim("`--unknown ignore` beats `negative`", "ignore", "negative", "map"),
    Claim("KD beats `--unknown ignore`", "kd", "ignore", "map"),
    Claim("UD (Eq. 17 on, as registered) beats KD", "ud-gradcam-warmup", "kd", "map"),
    Claim("UD with teacher-filled labels beats the same UD", "ud-gradcam-warmup-fill", "ud-gradcam-warmup", "map"),
    Claim("UD with teacher-filled labels beats `--unknown ignore`", "ud-gradcam-warmup-fill", "ignore", "map"),
    Claim("(not registered) UD without Eq. 17 beats KD", "ud-noatt", "kd", "map"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/distill-digits",
                        help="folder of the runs (the distillation benchmark's, to reuse its full-label students)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)), help="one replicate each")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8], help="--drop-labels values")
    distill_digits.add_setting_args(parser)
    add_run_args(parser, "missing_labels_digits")
    return parser.parse_args(argv)


def drop_name(fraction: float) -> str:
    return f"drop{round(100 * fraction)}"


def plan(args: argparse.Namespace) -> list[Job]:
    """The full-label students of distill_digits (reused when done), then per fraction and seed the teacher and
    the student arms."""
    jobs = [job for seed in args.seeds
            for job in distill_digits.seed_jobs(args, seed, {FULL: distill_digits.ARMS[FULL]})]
    out = os.path.abspath(args.out)
    for fraction in args.fractions:
        for seed in args.seeds:
            partial = ("--drop-labels", str(fraction), "--drop-labels-seed", str(seed))
            teacher = f"teacher-{drop_name(fraction)}-seed{seed}"
            runs = {teacher: ("teacher", "train.py", (*distill_digits.TEACHER,
                                                      *distill_digits.pretrained_flags("teacher"), *TEACHER), ())}
            for arm, (name, flags, taught) in ARMS.items():
                with_teacher = ("--teacher-ckpt", os.path.join(out, teacher, "best.safetensors")) if taught else ()
                runs[f"{arm}-{drop_name(fraction)}-seed{seed}"] = (
                    arm, name, (*distill_digits.STUDENT, *distill_digits.pretrained_flags("student"), *flags,
                                *with_teacher), (teacher,) if taught else ())
            jobs += [Job(experiment, distill_digits.script(name, out, experiment, *distill_digits.MAIN_DATA,
                                                           "--epochs", str(args.epochs), *flags, *partial, "--seed",
                                                           str(seed), *args.extra),
                         os.path.join(out, experiment), needs, labels={"arm": arm, "dropped": fraction, "seed": seed})
                     for experiment, (arm, name, flags, needs) in runs.items()]
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
    minutes = run_in(out, jobs, args)
    table = write_long_table(args.results, jobs)
    text = "".join(fraction_tables(distill_digits.arm_results(table), fraction) for fraction in args.fractions)
    atomic_write_text(os.path.join(out, "missing-labels.md"), text)
    print(f"\n{text}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


def fraction_tables(results: pd.DataFrame, fraction: float) -> str:
    """Markdown for one dropped fraction: the full-label mAP, each arm's mean and gap closed, the claims."""
    full = results[results["arm"] == FULL]
    chosen = pd.concat([full, results[(results["arm"] != FULL) & (results["dropped"] == fraction)]])
    return (f"**{round(100 * fraction)} % of the training labels dropped.**\n\n"
            f"Full labels ({FULL}): {full['map'].mean():.2f} mAP.\n\n"
            + to_markdown(gap_closed(chosen).round(3)) + "\n" + to_markdown(claims_table(chosen, CLAIMS)) + "\n")


if __name__ == "__main__":
    main()
