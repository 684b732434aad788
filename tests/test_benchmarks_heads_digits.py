"""benchmarks/heads_digits.py: its plan of runs, its step-time table and its claims (the runs themselves are
train.py's, tested in test_train.py and test_reliability.py)."""

import pandas as pd
import pytest
from conftest import assert_arm_ignores_moved_defaults

from benchmarks import heads_digits
from udtimm.claims import claims_table


def test_every_head_runs_alone_and_mixed_for_every_seed_from_scratch() -> None:
    args = heads_digits.parse_args(["--setting", "scratch", "--out", "bench", "--seeds", "0", "3", "--extra",
                                    "--epochs", "2"])
    jobs = heads_digits.plan(args)
    assert [job.name for job in jobs[:6]] == ["linear-seed0", "linear+mix-seed0", "ml-decoder-seed0",
                                              "ml-decoder+mix-seed0", "csra-seed0", "csra+mix-seed0"]
    assert len(jobs) == 12 and args.results.endswith("heads_digits_scratch.csv")
    commands = {job.name: " ".join(job.command) for job in jobs}
    assert "--head linear --mixup 0 --cutmix 0" in commands["linear-seed3"]
    assert "--head csra --mixup 0.8 --cutmix 1.0" in commands["csra+mix-seed3"]
    assert all(command.endswith("--epochs 2") and "--seed" in command for command in commands.values())


def test_every_head_runs_at_both_rates_and_at_ten_mixed_and_longer_on_the_pretrained_backbone() -> None:
    args = heads_digits.parse_args(["--out", "bench"])
    jobs = heads_digits.plan(args)
    assert args.seeds == [0, 1, 2, 3, 4] and len(jobs) == 5 * 12
    assert args.results.endswith("heads_digits_pretrained.csv")
    commands = {job.name: " ".join(job.command) for job in jobs}
    assert all("--pretrained-path benchmarks/weights/digits56-student.safetensors --pretrained-sha256" in command
               for command in commands.values())
    assert "--head csra --head-lr-mult 1 --mixup 0 --cutmix 0" in commands["csra-seed4"]
    assert "--head ml-decoder --head-lr-mult 10 --mixup 0 --cutmix 0" in commands["ml-decoder-lr10-seed4"]
    assert commands["linear-lr10+mix-seed0"].endswith(
        "--head linear --head-lr-mult 10 --mixup 0.8 --cutmix 1.0 --mixup-prob 0.5 --mixup-off-epoch 6")
    assert "--epochs 16" in commands["csra-lr10-long-seed2"]
    assert "--epochs 16" not in commands["csra-lr10-seed2"]


@pytest.mark.parametrize("setting", heads_digits.SETTINGS)
def test_every_run_names_the_setting_of_its_design_and_prints_without_running(setting, tmp_path, capsys) -> None:
    moved = {"model": "resnet18", "img_size": 64, "epochs": 3, "loss": "asl", "head": "csra", "mixup": 0.5,
             "cutmix": 0.5}
    if setting == "pretrained":  # the scratch design was registered before the flag existed
        moved["head_lr_mult"] = 2.0
    args = heads_digits.parse_args(["--setting", setting, "--out", str(tmp_path / "out"), "--seeds", "0"])
    for job in heads_digits.plan(args):
        assert_arm_ignores_moved_defaults(job, moved, tmp_path)
    with pytest.raises(SystemExit):
        heads_digits.main(["--setting", setting, "--print-commands", "--seeds", "0", "--out", str(tmp_path / "out")])
    arms = len(heads_digits.arms(setting))
    assert len(capsys.readouterr().out.splitlines()) == 2 * arms and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setting", "claims"), [("scratch", heads_digits.CLAIMS),
                                                 ("pretrained", heads_digits.PRETRAINED_CLAIMS)])
def test_every_claim_compares_two_arms_of_the_plan(setting, claims) -> None:
    arms = list(heads_digits.arms(setting))
    rows = [{"method": arm, "seed": seed, "map": 80.0 + index + seed, "map_difficult": 70.0 + index, "ece": 3.0}
            for index, arm in enumerate(arms) for seed in range(3)]
    table = claims_table(pd.DataFrame(rows), claims)
    assert set(table["n"]) == {3}  # every claim found both of its arms in every seed
    assert {claim.method for claim in claims} | {claim.against for claim in claims} <= set(arms)


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "model"), [("scratch", ["--model", "test_resnet"]), ("pretrained", [])])
def test_step_times_give_each_head_against_the_linear_head(setting: str, model: list[str]) -> None:
    # The pretrained setting times its own model, the committed backbone loaded: only the batch is made small.
    args = heads_digits.parse_args(["--setting", setting, "--steps", "1", "--extra", *model, "--img-size", "32", "-b",
                                    "4"])
    lines = heads_digits.step_time_table(args).splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "ms / step" not in line]
    assert [row[0].strip() for row in rows] == list(heads_digits.HEADS)
    assert rows[0][2].strip() == "1.00x"
    assert all(float(row[1]) > 0 for row in rows)
