"""benchmarks/long_tail_digits.py: its plan of runs, its claims and its registered choice (the runs themselves are
train.py's)."""

import pandas as pd
import pytest
from conftest import assert_arm_ignores_moved_defaults

from benchmarks import long_tail_digits
from udtimm.claims import claims_table


def test_every_loss_runs_alone_and_with_the_calibration_branch_for_six_seeds() -> None:
    args = long_tail_digits.parse_args(["--out", "bench"])
    jobs = long_tail_digits.plan(args)
    assert args.seeds == list(range(6)) and len(jobs) == 6 * 12
    assert [job.name for job in jobs[:4]] == ["bce-seed0", "bce+cal-seed0", "asl-seed0", "asl+cal-seed0"]
    commands = {job.name: " ".join(job.command) for job in jobs}
    assert all("--digits-long-tail 100 --digits-trainval 1500 --digits-test 1000" in command
               and "--pretrained-path benchmarks/weights/digits56-student.safetensors" in command
               for command in commands.values())
    assert commands["db-focal+cal-seed5"].endswith("--loss db-focal --db-map-alpha 0.1 --db-map-beta 10 "
                                                   "--db-map-mu 0.2 --db-neg-scale 2 --db-bias-factor 0.05 "
                                                   "--focal-gamma 2 --cal --cal-weight 0.1")
    assert "--cal" not in commands["two-way-seed5"]


def test_every_run_names_the_setting_of_its_design_and_prints_without_running(tmp_path, capsys) -> None:
    moved = {"model": "resnet18", "img_size": 64, "epochs": 3, "head": "csra", "head_lr_mult": 2.0, "mixup": 0.5,
             "cutmix": 0.5, "digits_long_tail": 10.0, "digits_trainval": 100}
    for job in long_tail_digits.plan(long_tail_digits.parse_args(["--out", str(tmp_path / "out"), "--seeds", "0"])):
        loss = job.name.split("-seed")[0].removesuffix("+cal")
        loss_moved = {"cb-bce": {"cb_beta": 0.9}, "db": {"db_map_mu": 0.3, "db_neg_scale": 5.0},
                      "db-focal": {"focal_gamma": 1.0, "db_bias_factor": 0.1}, "two-way": {"two_way_tp": 2.0},
                      "asl": {"asl_gamma_neg": 2.0}}.get(loss, {})
        with_cal = {"cal_weight": 0.5} if "+cal" in job.name else {}
        assert_arm_ignores_moved_defaults(job, {**moved, **loss_moved, **with_cal}, tmp_path)
    with pytest.raises(SystemExit):
        long_tail_digits.main(["--print-commands", "--seeds", "0", "--out", str(tmp_path / "out")])
    assert len(capsys.readouterr().out.splitlines()) == 2 * 12 and not (tmp_path / "out").exists()


def test_every_claim_compares_two_arms_of_the_plan_and_the_choice_reads_val_only() -> None:
    arms = list(long_tail_digits.arms())
    rows = [{"method": arm, "seed": seed, "map": 80.0 - index, "map_tail": 40.0 + index, "ece": 3.0,
             "selection_map": 70.0 + (5.0 if arm == "db" else 0.0)}
            for index, arm in enumerate(arms) for seed in range(3)]
    table = claims_table(pd.DataFrame(rows), long_tail_digits.CLAIMS)
    assert set(table["n"]) == {3}
    assert {claim.method for claim in long_tail_digits.CLAIMS} | {claim.against for claim in long_tail_digits.CLAIMS} \
        <= set(arms)
    assert long_tail_digits.recommended(pd.DataFrame(rows)) == "db"  # bce has the best test mAP, db the best val
