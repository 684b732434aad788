"""benchmarks/common.py: jobs run a few at a time, each after what it needs, once."""

import sys

import pytest

from benchmarks import common


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
