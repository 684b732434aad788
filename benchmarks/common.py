"""What the benchmarks that train many runs share: the jobs, run a few at a time, checked against the runs an
`--out` already holds, and their per-run results as one long table."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
TRAINING_SCRIPTS = ("train.py", "distill.py")  # the scripts whose runs keep an args.yaml to check
# results.csv columns that say which run a row is and how its checkpoint was chosen, first in the long table;
# paths (checkpoint, run directory, teacher file) are left out: they name folders of one machine.
RUN_COLUMNS = ("commit", "dirty", "dataset", "split", "selection_split", "model", "method", "epochs", "img_size",
               "best_epoch", "best_weights", "selection_map", "last_epoch")
PATH_COLUMNS = ("checkpoint", "teacher", "run_dir", "results_file", "teacher_ckpt")


@dataclass
class Job:
    name: str
    command: list[str]
    run_dir: str
    needs: tuple[str, ...] = ()
    labels: Mapping[str, object] = field(default_factory=dict)  # the long table's columns for this run (arm, seed)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.run_dir, "results.csv"))

    @property
    def script(self) -> str:
        return os.path.basename(self.command[1])


class ReuseError(SystemExit):
    """A run in --out that another plan made; the message names the run and what differs."""


def add_run_args(parser: argparse.ArgumentParser, results_name: str | None) -> None:
    """The flags every benchmark that trains runs has: printing its plan, reusing runs, where its long table goes."""
    parser.add_argument("--print-commands", action="store_true",
                        help="print every run's command, in order, and exit without running anything")
    parser.add_argument("--reuse-other-commits", action="store_true",
                        help="reuse finished runs in --out made by another commit (their rows keep their own)")
    parser.add_argument("--results", default=results_name and os.path.join(RESULTS_DIR, f"{results_name}.csv"),
                        help="the long table: one row per run (commit it when the run is the registered one)")


def print_commands(jobs: Sequence[Job]) -> None:
    for job in jobs:
        print(f"# {job.name}" + (f" (after {', '.join(job.needs)})" if job.needs else ""))
        print(shlex.join(job.command))


def planned_args(job: Job) -> dict:
    """args.yaml as the job's command would write it: its script's own parse of the command line, as YAML reads it
    back."""
    module = importlib.import_module(job.script.removesuffix(".py"))
    args = module.parse_args(job.command[2:])
    values = {key: value for key, value in sorted(vars(args).items()) if key not in ("config", "resume")}
    return yaml.safe_load(yaml.safe_dump(values, sort_keys=False))


def script_defaults(script: str) -> dict:
    """Every flag's default of a training script, as YAML reads it back."""
    parser = importlib.import_module(script.removesuffix(".py")).build_parser()
    return yaml.safe_load(yaml.safe_dump({action.dest: action.default for action in parser._actions}))


def last_results_row(run_dir: str) -> pd.Series:
    """The finished run's results.csv row (the last: a run finished again after --resume appends one), as text."""
    return pd.read_csv(os.path.join(run_dir, "results.csv"), dtype=str, keep_default_na=False).iloc[-1]


def check_reusable(jobs: Sequence[Job], current_commit: str, other_commits: bool) -> None:
    """Refuse, before anything runs, a run in --out whose args.yaml differs from its planned command, or (unless
    `other_commits`) a finished one made by another commit than `current_commit` or from a changed tree."""
    for job in jobs:
        saved_path = os.path.join(job.run_dir, "args.yaml")
        if job.script not in TRAINING_SCRIPTS or not os.path.isfile(saved_path):
            continue
        with open(saved_path) as handle:
            saved = yaml.safe_load(handle) or {}
        planned, defaults = planned_args(job), script_defaults(job.script)
        # A flag added since the run was made does, at its default, what that run did without it.
        differences = [f"--{key.replace('_', '-')}: the run has {saved.get(key)!r}, the plan {planned.get(key)!r}"
                       for key in sorted(set(saved) | set(planned)) if saved.get(key) != planned.get(key)
                       and not (key not in saved and planned.get(key) == defaults.get(key))]
        if differences:
            raise ReuseError(f"{job.run_dir} was made with other flags than this benchmark plans ("
                             + "; ".join(differences) + "): give another --out, or remove that run to redo it")
        if job.done and not other_commits:
            made = last_results_row(job.run_dir)
            commit, dirty = made.get("commit", ""), made.get("dirty", "")
            if commit != current_commit or dirty != "no":
                changes = "" if dirty == "no" else " with uncommitted changes" if dirty == "yes" else \
                    " (uncommitted changes unknown)"
                raise ReuseError(f"{job.run_dir} was made by commit {commit or 'unknown'}{changes}, not by this "
                                 f"checkout's {current_commit}: give another --out, remove that run to redo it, or "
                                 "pass --reuse-other-commits to keep it (its row names its commit)")


def launch(job: Job, log_dir: str) -> None:
    command = list(job.command)
    if os.path.isfile(os.path.join(job.run_dir, "args.yaml")):
        # Interrupted: continue it (its settings, checked against the plan, come from its args.yaml).
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


def run_in(out: str, jobs: list[Job], args: argparse.Namespace) -> float:
    """The benchmark's runs: printed only with --print-commands (then exit), else checked against what `out` holds
    and run `args.jobs` at a time, logs in `out`/logs; the minutes it took (finished runs skipped)."""
    if args.print_commands:
        print_commands(jobs)
        raise SystemExit(0)
    from udtimm.provenance import source_state

    check_reusable(jobs, source_state()["commit"], args.reuse_other_commits)
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    started = time.perf_counter()
    run_all(jobs, args.jobs, log_dir)
    return (time.perf_counter() - started) / 60


def long_table(jobs: Sequence[Job]) -> pd.DataFrame:
    """One row per run: its labels (arm, seed, ...), the run's name, then its results.csv row (the last one, of the
    finished run) without machine paths: commit, how the checkpoint was chosen, every test metric of the chosen
    and of the last epoch."""
    rows = []
    for job in jobs:
        results = last_results_row(job.run_dir)
        rest = [column for column in results.index if column not in (*RUN_COLUMNS, *PATH_COLUMNS, "seed")]
        rows.append({**job.labels, "run": os.path.basename(job.run_dir),
                     **{column: results[column] for column in (*RUN_COLUMNS, *rest) if column in results.index}})
    return pd.DataFrame(rows)


def write_long_table(path: str, jobs: Sequence[Job]) -> pd.DataFrame:
    from udtimm.io import atomic_write_text

    table = long_table(jobs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, table.to_csv(index=False))
    print(f"{len(table)} runs, one row each: {path}")
    return table


def report_table(run_dirs: Sequence[str]) -> str:
    """python -m udtimm.report over `run_dirs`: the Markdown table it prints."""
    return subprocess.run([sys.executable, "-m", "udtimm.report", *run_dirs], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
