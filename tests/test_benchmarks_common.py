"""benchmarks/common.py: jobs run a few at a time, each after what it needs, once."""

import os
import sys

import pandas as pd
import pytest
import yaml

from benchmarks import common
from udtimm.io import append_csv_row


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_benchmark_scheduler_runs_each_job_once_and_stops_at_a_failure(tmp_path, fail) -> None:
    def job(name, needs=(), code=0):
        run_dir = tmp_path / name
        write = f"import os; os.makedirs({str(run_dir)!r}); open(os.path.join({str(run_dir)!r}, 'results.csv'), 'w')"
        command = [sys.executable, "-c", f"{write}; raise SystemExit({code})"]
        return common.Job(name, command, str(run_dir), needs)

    jobs = [job("a"), job("b", ("a",), code=int(fail)), job("c", ("b",))]
    if fail:
        with pytest.raises(SystemExit, match="b failed"):
            common.run_all(jobs, 2, str(tmp_path))
        assert not (tmp_path / "c").exists()
    else:
        common.run_all(jobs, 2, str(tmp_path))
        assert all(j.done for j in jobs)
        common.run_all(jobs, 2, str(tmp_path))  # all done: nothing runs again (a second makedirs would fail)


def _train_job(tmp_path, *flags: str) -> common.Job:
    command = [sys.executable, os.path.join(common.ROOT, "train.py"), "--output", str(tmp_path), "--experiment", "r",
               "--epochs", "2", *flags]
    return common.Job("r", command, str(tmp_path / "r"), labels={"arm": "baseline", "seed": 0})


def _finish(job: common.Job, commit: str, dirty: str = "no") -> None:
    """The run directory of `job` as its script leaves it: args.yaml from its command, results.csv with a commit."""
    os.makedirs(job.run_dir)
    with open(os.path.join(job.run_dir, "args.yaml"), "w") as handle:
        yaml.safe_dump(common.planned_args(job), handle, sort_keys=False)
    append_csv_row(os.path.join(job.run_dir, "results.csv"),
                   {"dataset": "digits", "seed": 0, "commit": commit, "dirty": dirty, "map": 80.5, "last_map": 79.0,
                    "best_epoch": 1, "checkpoint": os.path.join(job.run_dir, "best.safetensors"), "teacher": ""})


def test_a_run_in_out_is_reused_only_with_the_planned_flags_and_commit(tmp_path) -> None:
    job = _train_job(tmp_path)
    _finish(job, "c" * 40)
    common.check_reusable([job], "c" * 40, other_commits=False)
    with pytest.raises(common.ReuseError, match=r"r was made with other flags .*--epochs: the run has 2, the plan 3"):
        common.check_reusable([_train_job(tmp_path, "--epochs", "3")], "c" * 40, other_commits=False)
    with pytest.raises(common.ReuseError, match=f"made by commit {'c' * 40}, not by this checkout's {'d' * 40}"):
        common.check_reusable([job], "d" * 40, other_commits=False)
    common.check_reusable([job], "d" * 40, other_commits=True)


def test_a_flag_added_after_a_run_is_no_difference_at_its_default(tmp_path) -> None:
    job = _train_job(tmp_path)
    _finish(job, "c" * 40)
    saved_path = os.path.join(job.run_dir, "args.yaml")
    with open(saved_path) as handle:
        saved = yaml.safe_load(handle)
    del saved["min_positives"]  # as an args.yaml written before --min-positives existed
    with open(saved_path, "w") as handle:
        yaml.safe_dump(saved, handle)
    common.check_reusable([job], "c" * 40, other_commits=False)
    with pytest.raises(common.ReuseError, match=r"--min-positives: the run has None, the plan 5"):
        common.check_reusable([_train_job(tmp_path, "--min-positives", "5")], "c" * 40, other_commits=False)


def test_a_run_from_a_changed_tree_is_not_reused_as_its_commits(tmp_path) -> None:
    job = _train_job(tmp_path)
    _finish(job, "c" * 40, dirty="yes")
    with pytest.raises(common.ReuseError, match="with uncommitted changes"):
        common.check_reusable([job], "c" * 40, other_commits=False)


def test_print_commands_lists_every_job_after_what_it_needs(capsys) -> None:
    jobs = [common.Job("a", ["python", "train.py", "--model-kwargs", "channels=[1, 2]"], "/x/a"),
            common.Job("b", ["python", "distill.py"], "/x/b", ("a",))]
    common.print_commands(jobs)
    assert capsys.readouterr().out.splitlines() == [
        "# a", "python train.py --model-kwargs 'channels=[1, 2]'", "# b (after a)", "python distill.py"]


def test_the_long_table_has_a_row_per_run_without_machine_paths(tmp_path) -> None:
    jobs = []
    for seed in range(2):
        job = _train_job(tmp_path / str(seed), "--seed", str(seed))
        job.labels = {"arm": "baseline", "seed": seed}
        _finish(job, "c" * 40)
        jobs.append(job)
    table = common.write_long_table(str(tmp_path / "results" / "long.csv"), jobs)
    read = pd.read_csv(tmp_path / "results" / "long.csv")
    assert list(read.columns[:6]) == ["arm", "seed", "run", "commit", "dirty", "dataset"]
    assert read["seed"].tolist() == [0, 1] and read["map"].tolist() == [80.5, 80.5] and len(table) == 2
    assert not {"checkpoint", "teacher", "run_dir"} & set(read.columns)
