#!/usr/bin/env python3
"""The digits recipe benchmark: what EMA, ASL and ASL with the calibration branch do on train.py's default setup.

    python benchmarks/recipe_digits.py              # about 40 minutes on a 2-core CPU
    python benchmarks/recipe_digits.py --seeds 0 1 2 3 4 --out output/recipe-digits-5

For each seed, four train.py runs with its defaults (resnet10t from scratch, 48 px, 15 epochs on the embedded
digits set): the BCE baseline, `--model-ema`, `--loss asl` and `--loss asl --cal`. Runs go two at a time with
one thread each (`--jobs`); a finished run is skipped and an interrupted one resumed (benchmarks/common.py runs
them), so the command can be stopped and started again. At the end it writes `report.md` (python -m
udtimm.report over every run) and `claims.md` (paired differences over seeds, udtimm.claims) into `--out`.

The claims compare results.csv (the metrics of best.safetensors), plus one comparison inside the EMA runs: the EMA
weights against the raw weights of the same run at the last epoch (summary.csv), where no choice of checkpoint
favours either (best.safetensors of an EMA run is the better of the two each epoch, a selection the baseline
does not get).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import ROOT, Job, add_run_args, report_table, run_in, write_long_table  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402
from udtimm.report import load_results  # noqa: E402

# train.py's digits defaults when the design was registered, named so that a later default cannot move an arm.
COMMON = ("--dataset", "digits", "--model", "resnet10t", "--img-size", "48", "--epochs", "15", "--loss", "bce",
          "--workers", "0", "--no-progress")
METHODS = {
    "baseline": (),
    "baseline+ema": ("--model-ema",),
    "asl": ("--loss", "asl"),
    "asl+cal": ("--loss", "asl", "--cal"),
}
# The EMA and raw weights of the EMA runs at their last epoch, from summary.csv: (method name, column suffix).
LAST_EPOCH = (("ema weights, last epoch", "_ema"), ("raw weights, last epoch", ""))
CLAIMS = (
    Claim("`--model-ema` beats the baseline", "baseline+ema", "baseline", "map"),
    Claim("`--model-ema` lowers classwise ECE", "baseline+ema", "baseline", "ece", lower_is_better=True),
    Claim("EMA weights beat the raw weights of the same run (last epoch)", LAST_EPOCH[0][0], LAST_EPOCH[1][0], "map"),
    Claim("ASL beats BCE", "asl", "baseline", "map"),
    Claim("ASL raises Difficult mAP", "asl", "baseline", "map_difficult"),
    Claim("ASL lowers classwise ECE", "asl", "baseline", "ece", lower_is_better=True),
    Claim("`--cal` raises mAP with ASL", "asl+cal", "asl", "map"),
    Claim("`--cal` raises Difficult mAP with ASL", "asl+cal", "asl", "map_difficult"),
    Claim("`--cal` lowers classwise ECE with ASL", "asl+cal", "asl", "ece", lower_is_better=True),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/recipe-digits", help="folder of the runs and the tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of every method each")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every run, last on the command line (e.g. --extra --epochs 5)")
    add_run_args(parser, "recipe_digits")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run, seed by seed, so that the first seeds' comparisons are complete first."""
    out = os.path.abspath(args.out)
    jobs = []
    for seed in args.seeds:
        for method, flags in METHODS.items():
            experiment = f"{method}-seed{seed}"
            command = [sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--output", out, "--experiment",
                       experiment, "--seed", str(seed), *flags, *args.extra]
            jobs.append(Job(experiment, command, os.path.join(out, experiment), labels={"arm": method, "seed": seed}))
    return jobs


def last_epoch_rows(run_dirs: Sequence[str]) -> pd.DataFrame:
    """One row per (EMA run, weights): the last epoch's mAP, Difficult mAP and ECE of its EMA and raw weights."""
    rows = []
    for run_dir in run_dirs:
        last = pd.read_csv(os.path.join(run_dir, "summary.csv")).iloc[-1]
        seed = int(pd.read_csv(os.path.join(run_dir, "results.csv"))["seed"].iloc[0])
        for method, suffix in LAST_EPOCH:
            rows.append({"method": method, "seed": seed,
                         **{metric: last[metric + suffix] for metric in ("map", "map_difficult", "ece")}})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    minutes = run_in(out, jobs, args)
    write_long_table(args.results, jobs)
    run_dirs = [job.run_dir for job in jobs]
    report = report_table(run_dirs)
    atomic_write_text(os.path.join(out, "report.md"), report)
    ema_runs = [job.run_dir for job in jobs if job.name.startswith("baseline+ema-")]
    results = pd.concat([load_results(run_dirs), last_epoch_rows(ema_runs)], ignore_index=True)
    claims = to_markdown(claims_table(results, CLAIMS))
    atomic_write_text(os.path.join(out, "claims.md"), claims)
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
