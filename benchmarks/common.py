"""What the benchmarks that train many runs share: the jobs, run a few at a time, and their report."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Job:
    name: str
    command: list[str]
    run_dir: str
    needs: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.run_dir, "results.csv"))


def launch(job: Job, log_dir: str) -> None:
    command = list(job.command)
    if os.path.isfile(os.path.join(job.run_dir, "args.yaml")):
        # Interrupted: continue it (its settings come from its args.yaml).
        command = [command[0], command[1], "--resume", job.run_dir, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(os.path.join(log_dir, f"{job.name}.log"), "a")  # noqa: SIM115 (closed with the process)
    job.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)


def run_all(jobs: list[Job], parallel: int, log_dir: str) -> None:
    """Run the jobs, `parallel` at a time, each once the jobs it needs have finished; stop at the first failure."""
    finished = {job.name for job in jobs if job.done}
    waiting = [job for job in jobs if job.name not in finished]
    running: list[Job] = []
    while waiting or running:
        for job in list(running):
            code = job.process.poll()
            if code is None:
                continue
            running.remove(job)
            if code != 0 or not job.done:
                for other in running:
                    other.process.terminate()
                raise SystemExit(f"{job.name} failed (exit {code}): see {os.path.join(log_dir, job.name + '.log')}")
            finished.add(job.name)
            print(f"[{time.strftime('%H:%M:%S')}] done  {job.name}", flush=True)
        for job in list(waiting):
            if len(running) < parallel and set(job.needs) <= finished:
                waiting.remove(job)
                launch(job, log_dir)
                running.append(job)
        time.sleep(1)


def run_in(out: str, jobs: list[Job], parallel: int) -> float:
    """run_all with the logs in `out`/logs; the minutes it took (finished runs skipped)."""
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    started = time.perf_counter()
    run_all(jobs, parallel, log_dir)
    return (time.perf_counter() - started) / 60


def report_table(run_dirs: Sequence[str]) -> str:
    """python -m udtimm.report over `run_dirs`: the Markdown table it prints."""
    return subprocess.run([sys.executable, "-m", "udtimm.report", *run_dirs], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout

