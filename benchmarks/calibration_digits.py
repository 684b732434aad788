#!/usr/bin/env python3
"""Post-hoc calibration against the calibration branch, on the students of the digits distillation benchmark.

    python benchmarks/calibration_digits.py                 # seeds 0-11, reusing output/distill-digits
    python benchmarks/calibration_digits.py --seeds 0 1 2 3 4 --calibrate temperature

Three students per seed, in benchmarks/distill_digits.py's setting and directories, so the runs that benchmark
finished are reused: the baseline, `--cal` (lambda 0.1) and `--loss asl`, each chosen on `val`. Each one's
best.safetensors is calibrated by `validate.py --calibrate per-class --tune-split val` and evaluated on `test`:
classwise ECE, pooled ECE and Brier before and after, and mAP. docs/deployment.md#post-hoc-calibration-measured
registers the claims. Writes `calibration.md` into `--out` (a table of means and the claims, paired by seed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks import distill_digits  # noqa: E402
from benchmarks.common import RESULTS_DIR, ROOT, Job, add_run_args, run_in, write_long_table  # noqa: E402
from udtimm.calibration import METHODS  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402

ARMS = {"baseline": distill_digits.ARMS["baseline"], "cal": distill_digits.ARMS["cal"],
        "asl": ("train.py", ("--loss", "asl", "--asl-gamma-neg", "4", "--asl-gamma-pos", "0", "--asl-clip", "0.05"))}
COLUMNS = ("map", "ece", "ece_pooled", "brier")


def claims(method: str) -> tuple[Claim, ...]:
    after = {arm: f"{arm}+{method}" for arm in ARMS}
    return (
        *(Claim(f"`--calibrate {method}` lowers the classwise ECE of {arm}", after[arm], arm, "ece",
                lower_is_better=True) for arm in ARMS),
        *(Claim(f"`--calibrate {method}` lowers the Brier score of {arm}", after[arm], arm, "brier",
                lower_is_better=True) for arm in ARMS),
        Claim(f"baseline + `--calibrate {method}` beats `--cal` on classwise ECE", after["baseline"], "cal", "ece",
              lower_is_better=True),
        Claim(f"baseline + `--calibrate {method}` beats `--cal` + `--calibrate {method}` on classwise ECE",
              after["baseline"], after["cal"], "ece", lower_is_better=True),
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/distill-digits",
                        help="folder of the runs (the distillation benchmark's, to reuse its students)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(12)), help="one student of each arm each")
    parser.add_argument("--calibrate", default="per-class", choices=METHODS, help="validate.py --calibrate")
    distill_digits.add_setting_args(parser)
    add_run_args(parser, None)
    args = parser.parse_args(argv)
    args.results = args.results or os.path.join(RESULTS_DIR, f"calibration_digits_{args.calibrate}.csv")
    return args


def calibration_jobs(args: argparse.Namespace, students: Sequence[Job]) -> list[Job]:
    """validate.py --calibrate on each student's best.safetensors; its results.csv row goes to
    `<out>/calibration-<method>/<student>/results.csv`, so a finished one is skipped."""
    folder = os.path.join(os.path.abspath(args.out), f"calibration-{args.calibrate}")
    return [Job(f"calibrate-{job.name}", [
        sys.executable, os.path.join(ROOT, "validate.py"),
        "--checkpoint", os.path.join(job.run_dir, "best.safetensors"), *distill_digits.MAIN_DATA,
        "--split", "test", "--calibrate", args.calibrate, "--tune-split", "val",
        "--workers", "0", "--no-progress", "--results-file", os.path.join(folder, job.name, "results.csv"),
    ], os.path.join(folder, job.name), (job.name,), labels={**job.labels, "calibrate": args.calibrate})
        for job in students]


def before_and_after(rows: Sequence[tuple[str, int, pd.Series]], method: str) -> pd.DataFrame:
    """One row per (arm, seed) before calibration (the `_uncalibrated` values) and one after (`<arm>+<method>`)."""
    table = []
    for arm, seed, row in rows:
        table.append({"method": arm, "seed": seed, "map": float(row["map"]),
                      **{name: float(row[f"{name}_uncalibrated"]) for name in COLUMNS[1:]}})
        table.append({"method": f"{arm}+{method}", "seed": seed, **{name: float(row[name]) for name in COLUMNS}})
    return pd.DataFrame(table)


def means_table(results: pd.DataFrame, method: str) -> str:
    """Markdown: per arm, mAP and each calibration metric before -> after, mean ± std over seeds."""
    lines = ["| student | mAP | classwise ECE | pooled ECE | Brier |", "|---|---|---|---|---|"]

    def cell(name: str, metric: str) -> str:
        return distill_digits.mean_std(results[results["method"] == name][metric])

    for arm in ARMS:
        after = f"{arm}+{method}"
        lines.append(f"| {arm} | {cell(after, 'map')} | " + " | ".join(
            f"{cell(arm, metric)} → **{cell(after, metric)}**" for metric in COLUMNS[1:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    students = distill_digits.plan(args, ARMS)
    calibrations = calibration_jobs(args, students)
    if not args.print_commands:
        for job in calibrations:
            os.makedirs(job.run_dir, exist_ok=True)  # validate.py appends its row there
    minutes = run_in(out, [*students, *calibrations], args)
    write_long_table(args.results, calibrations)
    rows = [(job.name.rsplit("-seed", 1)[0], int(job.name.rsplit("-seed", 1)[1]),
             pd.read_csv(os.path.join(out, f"calibration-{args.calibrate}", job.name, "results.csv")).iloc[-1])
            for job in students]
    results = before_and_after(rows, args.calibrate)
    text = (f"Test split, percent, mean ± std over seeds {' '.join(map(str, args.seeds))}; before → after "
            f"`--calibrate {args.calibrate}` fitted on val.\n\n{means_table(results, args.calibrate)}\n"
            f"{to_markdown(claims_table(results, claims(args.calibrate)))}")
    atomic_write_text(os.path.join(out, f"calibration-{args.calibrate}.md"), text)
    print(f"\n{text}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); table in {out}")


if __name__ == "__main__":
    main()
