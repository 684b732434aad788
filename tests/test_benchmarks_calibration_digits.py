"""benchmarks/calibration_digits.py: its plan, the validate.py commands, and the tables (the runs are the benchmark)."""

import pandas as pd

from benchmarks import calibration_digits


def test_plan_reuses_the_distillation_benchmarks_students_and_needs_no_teacher() -> None:
    args = calibration_digits.parse_args(["--seeds", "0", "1", "--out", "/tmp/x"])
    assert args.results.endswith("benchmarks/results/calibration_digits_per-class.csv")
    training = calibration_digits.distill_digits.plan(args, calibration_digits.ARMS)
    names = [job.name for job in training]
    assert names == ["baseline-seed0", "cal-seed0", "asl-seed0", "baseline-seed1", "cal-seed1", "asl-seed1"]
    distill = {job.name: job.command for job in calibration_digits.distill_digits.plan(
        calibration_digits.distill_digits.parse_args(["--seeds", "0", "1", "--out", "/tmp/x"]))}
    for job in training:
        if not job.name.startswith("asl"):
            assert job.command == distill[job.name]  # the same run, so a finished one is reused
    asl = training[2].command
    assert asl[asl.index("--loss") + 1] == "asl" and asl[asl.index("--seed") + 1] == "0"
    calibrations = calibration_digits.calibration_jobs(args, training)
    command = calibrations[0].command
    assert command[command.index("--checkpoint") + 1] == "/tmp/x/baseline-seed0/best.safetensors"
    assert command[command.index("--tune-split") + 1] == "val" and command[command.index("--split") + 1] == "test"
    assert command[command.index("--calibrate") + 1] == "per-class" and "--digits-ambiguous" in command
    assert calibrations[0].run_dir == "/tmp/x/calibration-per-class/baseline-seed0"
    assert calibrations[0].needs == ("baseline-seed0",)
    assert calibrations[0].labels == {"arm": "baseline", "seed": 0, "calibrate": "per-class"}


def test_tables_pair_before_and_after_by_seed() -> None:
    rows = []
    for seed in range(3):
        for arm, before in (("baseline", 5.0), ("cal", 6.0), ("asl", 28.0)):
            row = {"map": 80.0 + seed, "ece": before / 2 + 0.1 * seed, "ece_uncalibrated": before + 0.1 * seed,
                   "ece_pooled": 1.0, "ece_pooled_uncalibrated": 2.0, "brier": 10.0, "brier_uncalibrated": 11.0}
            rows.append((arm, seed, pd.Series(row)))
    results = calibration_digits.before_and_after(rows, "per-class")
    assert len(results) == 18 and set(results["method"]) == {"baseline", "cal", "asl", "baseline+per-class",
                                                             "cal+per-class", "asl+per-class"}
    table = calibration_digits.claims_table(results, calibration_digits.claims("per-class")).set_index("claim")
    asl = table.loc["`--calibrate per-class` lowers the classwise ECE of asl"]
    assert asl["difference"] == "-14.00 ± 0.00" and asl["verdict"] == "holds"
    branch = table.loc["baseline + `--calibrate per-class` beats `--cal` on classwise ECE"]
    assert branch["difference"] == "-3.50 ± 0.00" and branch["verdict"] == "holds"
    means = calibration_digits.means_table(results, "per-class")
    assert "| asl | 81.00 ± 1.00 | 28.10 ± 0.10 → **14.10 ± 0.10** |" in means
