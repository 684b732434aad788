"""benchmarks/missing_labels_digits.py: its plan and its gap table (the runs themselves are the benchmark)."""

import pandas as pd
from conftest import assert_arm_ignores_moved_defaults

import distill
import train
from benchmarks import distill_digits, missing_labels_digits


def _flag(command: list[str], flag: str) -> str:
    return command[len(command) - 1 - command[::-1].index(flag) + 1]


def test_plan_hides_the_same_labels_from_every_run_of_a_fraction_and_seed() -> None:
    args = missing_labels_digits.parse_args(["--seeds", "0", "1", "--out", "/tmp/x"])
    jobs = missing_labels_digits.plan(args)
    names = [job.name for job in jobs]
    assert names[:2] == ["baseline-seed0", "baseline-seed1"]
    assert len(names) == len(set(names)) == 2 + 2 * 2 * (1 + len(missing_labels_digits.ARMS))
    full = {job.name: job.command for job in distill_digits.plan(distill_digits.parse_args(
        ["--seeds", "0", "1", "--out", "/tmp/x"]))}
    for job in jobs:
        assert all(names.index(need) < names.index(job.name) for need in job.needs)
        if job.name.startswith("baseline-"):
            assert job.command == full[job.name] and "--drop-labels" not in job.command  # reused, full labels
        elif not job.name.startswith("pretrain-"):
            fraction, seed = job.name.rsplit("-drop", 1)[1].split("-seed")
            assert _flag(job.command, "--drop-labels") == str(int(fraction) / 100)
            assert _flag(job.command, "--drop-labels-seed") == _flag(job.command, "--seed") == seed
            assert job.labels["dropped"] == int(fraction) / 100 and job.labels["seed"] == int(seed)
            if "--teacher-ckpt" in job.command:
                teacher = f"teacher-drop{fraction}-seed{seed}"
                assert _flag(job.command, "--teacher-ckpt") == f"/tmp/x/{teacher}/best.safetensors"
    commands = {job.name: job.command for job in jobs}
    assert _flag(commands["ud-gradcam-warmup-fill-drop80-seed1"], "--unknown") == "teacher"
    assert _flag(commands["negative-drop50-seed0"], "--unknown") == "negative"
    # UD as registered (distill.py's defaults of then, Eq. 17 on) and UD without Eq. 17, each by its own name.
    registered = commands["ud-gradcam-warmup-drop50-seed0"]
    assert [_flag(registered, flag) for flag in ("--att-weight", "--att-variant", "--att-distance",
                                                 "--distill-warmup-epochs")] == ["0.5", "gradcam", "squared", "4"]
    assert _flag(commands["ud-noatt-drop50-seed0"], "--att-weight") == "0"


def test_gap_closed_is_the_part_of_the_gap_between_negative_and_full_labels() -> None:
    rows = [{"method": method, "seed": seed, "map": value + seed}
            for seed in range(2) for method, value in (("baseline", 90.0), ("negative", 80.0), ("ignore", 85.0),
                                                      ("kd", 88.0), ("ud-noatt", 88.0), ("ud-gradcam-warmup", 86.0),
                                                      ("ud-gradcam-warmup-fill", 92.0))]
    gap = missing_labels_digits.gap_closed(pd.DataFrame(rows)).set_index("arm")["gap closed"]
    assert gap.to_dict() == {"negative": 0.0, "ignore": 0.5, "kd": 0.8, "ud-noatt": 0.8, "ud-gradcam-warmup": 0.6,
                             "ud-gradcam-warmup-fill": 1.2}


def test_every_arm_names_the_flags_of_its_design(tmp_path) -> None:
    distill_flags = {"temperature": 3.0, "dist_weight": 0.5}
    ud = {**distill_flags, "method": "ud", "att_weight": 0.5, "att_variant": "gradcam", "att_distance": "squared",
          "distill_warmup_epochs": 4}
    design = {
        "teacher": {"loss": "bce", "cal": True, "cal_weight": 0.1, "unknown": "ignore"},
        "negative": {"loss": "bce", "unknown": "negative"}, "ignore": {"loss": "bce", "unknown": "ignore"},
        "kd": {"temperature": 3.0, "method": "kd"},
        "ud-noatt": {**distill_flags, "method": "ud", "att_weight": 0.0, "distill_warmup_epochs": 0},
        "ud-gradcam-warmup": {**ud, "gt_weight": 0.0},
        "ud-gradcam-warmup-fill": {**ud, "gt_weight": 0.5, "cal_weight": 0.1, "unknown": "teacher"},
        "baseline": {"loss": "bce", "cal": False},
    }
    moved = {"temperature": 7.0, "dist_weight": 0.9, "att_weight": 0.7, "att_variant": "paper", "att_distance": "norm",
             "distill_warmup_epochs": 2, "gt_weight": 0.3, "cal_weight": 0.6, "unknown": "negative", "loss": "asl",
             "drop_labels": 0.3, "drop_labels_seed": 7, "epochs": 3}
    jobs = missing_labels_digits.plan(missing_labels_digits.parse_args(["--seeds", "2", "--out", str(tmp_path)]))
    for job in jobs:
        arm = job.labels["arm"]
        named = {*design[arm], "epochs", *(("drop_labels", "drop_labels_seed") if arm != "baseline" else ())}
        assert_arm_ignores_moved_defaults(job, {key: moved[key] for key in named if key in moved}, tmp_path)
        parsed = vars((distill if job.command[1].endswith("distill.py") else train).parse_args(job.command[2:]))
        assert {key: parsed[key] for key in design[arm]} == design[arm], arm
