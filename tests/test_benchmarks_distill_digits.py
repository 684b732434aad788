"""benchmarks/distill_digits.py: its plan of runs (the runs themselves are the benchmark, not a test)."""

from benchmarks import distill_digits


def test_benchmark_plan_orders_runs_after_what_they_need() -> None:
    args = distill_digits.parse_args(["--seeds", "0", "1", "--out", "/tmp/x", "--cache", "/tmp/c"])
    jobs = distill_digits.plan(args)
    names = [job.name for job in jobs]
    assert names[:3] == ["pretrain-resnet10t", "pretrain-test_resnet", "teacher"]
    assert len(names) == len(set(names)) == 3 + 2 * (4 + len(args.att_variants) + 1)
    for job in jobs:
        assert all(names.index(need) < names.index(job.name) for need in job.needs)
        if "--teacher-ckpt" in job.command:
            assert "teacher" in job.needs
        if job.name.endswith("-seed1"):
            assert job.command[job.command.index("--seed") + 1] == "1"
            assert "--initial-checkpoint" in job.command
