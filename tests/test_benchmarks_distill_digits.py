"""benchmarks/distill_digits.py: its plan of runs and its claims table (the runs themselves are the benchmark)."""

import numpy as np
import pandas as pd
from test_report import results_row, write_run

from benchmarks import distill_digits


def _flag(command: list[str], flag: str) -> str:
    return command[len(command) - 1 - command[::-1].index(flag) + 1]  # the last one wins, as in argparse


def test_plan_runs_each_seed_with_its_own_teacher_after_what_it_needs() -> None:
    args = distill_digits.parse_args(["--seeds", "0", "1", "--out", "/tmp/x", "--cache", "/tmp/c"])
    jobs = distill_digits.plan(args)
    names = [job.name for job in jobs]
    assert names[:3] == ["pretrain-teacher", "pretrain-student", "teacher-seed0"]
    assert len(names) == len(set(names)) == 2 + 2 * (1 + len(distill_digits.ARMS))
    for job in jobs:
        assert all(names.index(need) < names.index(job.name) for need in job.needs)
        if job.name.startswith("pretrain-"):
            assert "--digits-ambiguous" not in job.command and _flag(job.command, "--digits-seed") == "1"
            continue
        seed = job.name.rsplit("-seed", 1)[1]
        assert _flag(job.command, "--seed") == seed and "--digits-ambiguous" in job.command
        # Only the backbone comes from pretraining: --pretrained-path, never --initial-checkpoint.
        assert "--initial-checkpoint" not in job.command and "--select-on-test" not in job.command
        assert _flag(job.command, "--pretrained-path").startswith("/tmp/c/")
        if "--teacher-ckpt" in job.command:
            assert _flag(job.command, "--teacher-ckpt") == f"/tmp/x/teacher-seed{seed}/best.safetensors"
            assert f"teacher-seed{seed}" in job.needs
    commands = {job.name: job.command for job in jobs}
    assert _flag(commands["self-ud-paper-seed1"], "--epochs") == "16" and _flag(commands["kd-seed1"], "--epochs") == "8"
    paper = commands["ud-paper-seed0"]
    assert (_flag(paper, "--att-variant"), _flag(paper, "--att-distance"), _flag(paper, "--distill-warmup-epochs")) \
        == ("paper", "norm", "0")
    assert _flag(commands["ud-paper-squared-seed0"], "--att-distance") == "squared"
    assert _flag(commands["cal-lambda1-seed0"], "--cal-weight") == "1"


def test_claims_pair_the_arms_by_their_directory_names(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for seed in range(3):
        for arm, shift in (("ud-paper-squared", 0.0), ("ud-paper", 0.5)):
            # results.csv gives both arms one method name here; only the directory tells them apart.
            row = results_row(seed, rng, method="ud", model="resnet10t")
            row.update(map=60.0 + seed + shift, checkpoint=str(tmp_path / f"{arm}-seed{seed}" / "best.safetensors"))
            write_run(str(tmp_path), f"{arm}-seed{seed}", row)
    results = distill_digits.student_results(sorted(str(path) for path in tmp_path.iterdir()))
    assert sorted(set(results["method"])) == ["ud-paper", "ud-paper-squared"]
    table = distill_digits.claims_table(results, distill_digits.CLAIMS).set_index("claim")
    row = table.loc["Eq. 17's norm beats its square"]
    assert (row["n"], row["difference"], row["verdict"]) == (3, "0.50 ± 0.00", "holds")
    assert table.loc["KD beats the baseline", "paper"] == "+0.93"


def test_arm_table_gives_each_arms_mean_and_std_in_order() -> None:
    rows = [{"method": arm, "map": base + seed, "map_difficult": 50.0, "ece": 5.0, "brier": 10.0,
             "selection_map": 60.0 + seed} for seed in range(3) for arm, base in (("teacher", 90.0), ("kd", 80.0))]
    table = distill_digits.arm_table(pd.DataFrame(rows)).splitlines()
    assert table[0] == "| run | n | mAP | Difficult mAP | ECE ↓ | Brier ↓ | val mAP |"
    assert table[2] == "| teacher | 3 | 91.00 ± 1.00 | 50.00 ± 0.00 | 5.00 ± 0.00 | 10.00 ± 0.00 | 61.00 ± 1.00 |"
    assert table[3].startswith("| kd | 3 | 81.00 ± 1.00 |")
