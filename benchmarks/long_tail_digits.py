#!/usr/bin/env python3
"""Long-tailed labels on digits: which loss a user with long-tailed data should start from.

    python benchmarks/long_tail_digits.py                       # seeds 0-5, about 40 minutes on a 2-core CPU
    python benchmarks/long_tail_digits.py --print-commands      # every run's command line, nothing run

The training split is digits with `--digits-long-tail 100` (class frequencies falling geometrically from "zero" to
"nine", 100 to 1); val and test stay balanced. Every run starts from the committed pretrained student backbone of
benchmarks/pretrain_digits.py (classifier at random), 56 px, 8 epochs, one thread. Arms: every loss of LOSSES at
its official defaults (nothing tuned here), each alone and with `--cal` (lambda 0.1). best.safetensors is chosen
on `val`; results.csv reports `test`, with mAP over all classes and over the head, medium and tail classes (by
training positives, VOC-LT's thresholds scaled to the split). The design, registered before the runs:
docs/recipe.md#long-tailed-labels-measured. Writes `report.md` and `claims.md` into `--out` and the long table
to `--results`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import ROOT, Job, add_run_args  # noqa: E402
from benchmarks.distill_digits import arm_table, run_and_tabulate  # noqa: E402
from benchmarks.pretrain_digits import ARCHITECTURES, pretrained_flags  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402

DATA = ("--dataset", "digits", "--digits-long-tail", "100", "--digits-trainval", "1500", "--digits-test", "1000")
COMMON = (*DATA, *ARCHITECTURES["student"], "--img-size", "56", "--epochs", "8", "--workers", "0", "--no-progress",
          "--head", "linear", "--head-lr-mult", "1", "--mixup", "0", "--cutmix", "0")
# Each loss with every setting its design names, at the official code's defaults.
LOSSES: dict[str, tuple[str, ...]] = {
    "bce": ("--loss", "bce"),
    "asl": ("--loss", "asl", "--asl-gamma-neg", "4", "--asl-gamma-pos", "0", "--asl-clip", "0.05"),
    "cb-bce": ("--loss", "cb-bce", "--cb-beta", "0.9999"),
    "db": ("--loss", "db", "--db-map-alpha", "0.1", "--db-map-beta", "10", "--db-map-mu", "0.2",
           "--db-neg-scale", "2", "--db-bias-factor", "0.05"),
    "db-focal": ("--loss", "db-focal", "--db-map-alpha", "0.1", "--db-map-beta", "10", "--db-map-mu", "0.2",
                 "--db-neg-scale", "2", "--db-bias-factor", "0.05", "--focal-gamma", "2"),
    "two-way": ("--loss", "two-way", "--two-way-tp", "4", "--two-way-tn", "1"),
}
CAL = ("--cal", "--cal-weight", "0.1")
LONG_TAIL = ("cb-bce", "db", "db-focal", "two-way")
CLAIMS = (
    *(Claim(f"`--loss {loss}` beats BCE", loss, "bce", "map") for loss in (*LONG_TAIL, "asl")),
    *(Claim(f"`--loss {loss}` beats BCE on the tail classes", loss, "bce", "map_tail") for loss in LONG_TAIL),
    *(Claim(f"`--cal` raises mAP with `--loss {loss}`", f"{loss}+cal", loss, "map") for loss in LOSSES),
    *(Claim(f"`--cal` lowers classwise ECE with `--loss {loss}`", f"{loss}+cal", loss, "ece", lower_is_better=True)
      for loss in LOSSES),
)
SUMMARY = (("map", "mAP"), ("map_head", "head"), ("map_medium", "medium"), ("map_tail", "tail"), ("ece", "ECE ↓"),
           ("selection_map", "val mAP"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/long-tail-digits", help="folder of the runs and the tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)), help="one run of every arm each")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every run, last on the command line (e.g. --extra --epochs 2)")
    add_run_args(parser, "long_tail_digits")
    return parser.parse_args(argv)


def arms() -> dict[str, tuple[str, ...]]:
    """Every loss alone and with the calibration branch, by name."""
    return {name: flags for loss, loss_flags in LOSSES.items()
            for name, flags in ((loss, loss_flags), (f"{loss}+cal", (*loss_flags, *CAL)))}


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run, seed by seed, so that the first seeds' comparisons are complete first."""
    out = os.path.abspath(args.out)
    jobs = []
    for seed in args.seeds:
        for arm, flags in arms().items():
            experiment = f"{arm}-seed{seed}"
            command = [sys.executable, os.path.join(ROOT, "train.py"), *COMMON, *pretrained_flags("student"),
                       "--output", out, "--experiment", experiment, "--seed", str(seed), *flags, *args.extra]
            jobs.append(Job(experiment, command, os.path.join(out, experiment), labels={"arm": arm, "seed": seed}))
    return jobs


def recommended(results: pd.DataFrame) -> str:
    """The registered rule: the loss (without `--cal`) of the highest mean val mAP, never a test number."""
    means = results[results["method"].isin(list(LOSSES))].groupby("method")["selection_map"].mean()
    return str(means.idxmax())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    minutes, runs = run_and_tabulate(args, plan(args))
    report = (f"## Long-tailed digits, ratio 100 (test split; val mAP chose the checkpoint)\n\n"
              f"{arm_table(runs, SUMMARY)}\n"
              f"Highest mean val mAP (the registered choice): `--loss {recommended(runs)}`\n")
    atomic_write_text(os.path.join(out, "report.md"), report)
    claims = to_markdown(claims_table(runs, CLAIMS))
    atomic_write_text(os.path.join(out, "claims.md"), claims)
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
