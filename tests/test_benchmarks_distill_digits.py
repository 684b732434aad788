"""benchmarks/distill_digits.py: its plan of runs, pinned to its registered design, and its claims table (the runs
themselves are the benchmark)."""

import pandas as pd
import pytest
from conftest import assert_arm_ignores_moved_defaults

import distill
import train
from benchmarks import distill_digits
from benchmarks.pretrain_digits import pretrained_flags, weights_path

# docs/distillation.md#the-benchmark: the flags each arm's design names, as the script reads them.
DISTILL_DESIGN = {"temperature": 3.0, "dist_weight": 0.5, "gt_weight": 0.0}
PAPER_UD = {"method": "ud", **DISTILL_DESIGN, "att_weight": 0.5, "att_variant": "paper", "att_distance": "norm",
            "distill_warmup_epochs": 0}
COMMON_DESIGN = {"epochs": 8, "img_size": 56, "digits_ambiguous": True, "digits_trainval": 1500, "digits_test": 1000}
DESIGN = {
    "teacher": {"loss": "bce", "cal": True, "cal_weight": 0.1, "channels": [32, 64, 128, 256]},
    "baseline": {"loss": "bce", "cal": False, "channels": [16, 32, 64, 128]},
    "cal": {"loss": "bce", "cal": True, "cal_weight": 0.1},
    "cal-lambda1": {"loss": "bce", "cal": True, "cal_weight": 1.0},
    "kd": {"method": "kd", "temperature": 3.0, "gt_weight": 0.0},
    "ud-noatt": {"method": "ud", **DISTILL_DESIGN, "att_weight": 0.0, "distill_warmup_epochs": 0},
    "ud-paper": PAPER_UD,
    "ud-paper-squared": {**PAPER_UD, "att_distance": "squared"},
    "ud-gradcam-warmup": {**PAPER_UD, "att_variant": "gradcam", "att_distance": "squared", "distill_warmup_epochs": 4},
    "self-ud-paper": {**PAPER_UD, "self_distill": True, "cal_weight": 0.1, "epochs": 16},
}
# Other values for every flag a design names: a registered arm must not move when a script's default does.
MOVED_DEFAULTS = {"temperature": 7.0, "dist_weight": 0.9, "gt_weight": 0.3, "att_weight": 0.7, "att_variant": "gradcam",
                  "att_distance": "squared", "distill_warmup_epochs": 2, "cal_weight": 0.6, "epochs": 3, "seed": 99,
                  "img_size": 40, "loss": "asl", "digits_trainval": 100, "digits_test": 50}
SCRIPTS = {"train.py": train, "distill.py": distill}


def _flag(command: list[str], flag: str) -> str:
    return command[len(command) - 1 - command[::-1].index(flag) + 1]  # the last one wins, as in argparse


def _jobs(*seeds: int) -> list:
    return distill_digits.plan(distill_digits.parse_args(["--seeds", *map(str, seeds), "--out", "/tmp/x"]))


def test_plan_runs_each_seed_with_its_own_teacher_after_what_it_needs() -> None:
    jobs = _jobs(0, 1)
    names = [job.name for job in jobs]
    assert names[0] == "teacher-seed0"
    assert len(names) == len(set(names)) == 2 * (1 + len(distill_digits.ARMS))
    for job in jobs:
        assert all(names.index(need) < names.index(job.name) for need in job.needs)
        seed = job.name.rsplit("-seed", 1)[1]
        assert _flag(job.command, "--seed") == seed and "--digits-ambiguous" in job.command
        assert job.labels == {"arm": job.name.rsplit("-seed", 1)[0], "seed": int(seed)}
        # Only the backbone comes from the committed pretraining, checked by its sha256.
        assert "--initial-checkpoint" not in job.command and "--select-on-test" not in job.command
        role = "teacher" if job.name.startswith("teacher-") else "student"
        assert _flag(job.command, "--pretrained-path") == weights_path(role)
        assert _flag(job.command, "--pretrained-sha256") == pretrained_flags(role)[3]
        if "--teacher-ckpt" in job.command:
            assert _flag(job.command, "--teacher-ckpt") == f"/tmp/x/teacher-seed{seed}/best.safetensors"
            assert f"teacher-seed{seed}" in job.needs


def _parsed(job) -> dict:
    return vars(SCRIPTS[job.script].parse_args(job.command[2:]))


def test_every_arm_carries_the_flags_its_design_names() -> None:
    for job in _jobs(3):
        arm = job.name.rsplit("-seed", 1)[0]
        args = _parsed(job)
        expected = {**COMMON_DESIGN, "seed": 3, **DESIGN[arm]}
        channels = expected.pop("channels", None)
        assert {key: args[key] for key in expected} == expected, arm
        assert channels is None or args["model_kwargs"]["channels"] == channels


def test_no_arm_moves_when_a_scripts_default_moves(tmp_path) -> None:
    for job in _jobs(0):
        named = {*COMMON_DESIGN, *DESIGN[job.name.rsplit("-seed", 1)[0]], "seed"} & set(MOVED_DEFAULTS)
        assert_arm_ignores_moved_defaults(job, {key: MOVED_DEFAULTS[key] for key in named}, tmp_path)


def test_print_commands_runs_nothing(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        distill_digits.main(["--print-commands", "--seeds", "0", "--out", str(tmp_path / "out")])
    assert stop.value.code == 0 and not (tmp_path / "out").exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# teacher-seed0" and "--att-distance norm" in next(line for line in lines if "ud-paper-seed0"
                                                                            in line and not line.startswith("#"))
    assert len(lines) == 2 * (1 + len(distill_digits.ARMS))


def _long_table(arms_shift: dict[str, float]) -> pd.DataFrame:
    rows = [{"arm": arm, "seed": seed, "run": f"{arm}-seed{seed}", "commit": "a" * 40, "map": 60.0 + seed + shift,
             "map_difficult": 50.0, "ece": 5.0, "best_epoch": 5, "epochs": 8}
            for seed in range(3) for arm, shift in arms_shift.items()]
    return distill_digits.arm_results(pd.DataFrame(rows).astype(str))


def test_claims_pair_the_arms_of_the_long_table() -> None:
    results = _long_table({"ud-paper-squared": 0.0, "ud-paper": 0.5})
    assert results["map"].dtype.kind == "f" and results["seed"].dtype.kind == "i"
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
