#!/usr/bin/env python3
"""The digits distillation benchmark: the paper's setting in miniature, and a table of its claims.

    python benchmarks/distill_digits.py                      # about 35 minutes on a 2-core CPU
    python benchmarks/distill_digits.py --seeds 0 1 2 3 4 --out output/distill-digits-5

As in the paper, the teacher is much stronger than the student and both start from pretrained weights:
1. Pretraining (the analogue of ImageNet weights): each architecture is trained on a digits set of its own
   (`--digits-seed 1`: other scenes, made only of glyphs that the default set uses for trainval, never its test
   glyphs). Cached under $UDTIMM_CACHE/pretrained and reused by every later benchmark.
2. The teacher (resnet10t) is fine-tuned with `--cal` on the default digits set from its pretrained weights.
3. For each seed, the student (test_resnet, 13x fewer parameters) starts from its pretrained weights
   (`--initial-checkpoint`) and is trained as the baseline, with `--cal`, by KD, by UD without attention, by UD
   with each `--att-variant`, and by self-distillation (twice the epochs, as in the paper).
Both models see 64 px with `output_stride=16`, so the uncertainty attention maps are 4 x 4 (2 x 2 at stride 32).

Every run is a train.py/distill.py process with one thread; `--jobs` of them run at once. A run that finished
is skipped, one that was interrupted is resumed, so the command can be stopped and started again (a finished run
is recognised by its directory name only: after changing a setting or the code, use another --out). At the end it
writes `report.md` (python -m udtimm.report over every run) and `claims.md` (python -m udtimm.claims over the
student runs) into `--out` and prints both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from udtimm.attention import ATTENTION_VARIANTS, DEFAULT_VARIANT  # noqa: E402
from udtimm.objectives import ud_method  # noqa: E402

STUDENT, TEACHER = "test_resnet", "resnet10t"
# Shared by every run: 64 px at stride 16 (4 x 4 attention maps), one process without loader workers.
COMMON = ("--dataset", "digits", "--img-size", "64", "--model-kwargs", "output_stride=16", "--workers", "0",
          "--no-progress")
PRETRAIN_DATA = ("--digits-seed", "1", "--digits-trainval", "3000", "--digits-test", "500")


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/distill-digits", help="folder of the runs and the tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one set of student runs each")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each student run and of the teacher")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of each pretraining run")
    parser.add_argument("--cache", default=None,
                        help="folder of the pretrained runs (default: $UDTIMM_CACHE/pretrained or "
                             "~/.cache/udtimm/pretrained)")
    parser.add_argument("--att-variants", nargs="+", default=list(ATTENTION_VARIANTS), choices=ATTENTION_VARIANTS,
                        help="the --att-variant of the UD runs, one set of runs each")
    parser.add_argument("--self-att-variant", default=DEFAULT_VARIANT, choices=ATTENTION_VARIANTS,
                        help="the --att-variant of the self-distillation runs")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every student run, last on the command line (e.g. --extra --lr 1e-3)")
    return parser.parse_args(argv)


def pretrained_cache(args: argparse.Namespace) -> str:
    if args.cache:
        return args.cache
    cache = os.environ.get("UDTIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "udtimm")
    return os.path.join(cache, "pretrained")


def script(name: str, output: str, experiment: str, *flags: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name), *COMMON, "--output", output, "--experiment", experiment,
            *flags]


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run of the benchmark, each with the runs it needs first; the teacher's chain comes first."""
    cache, out = pretrained_cache(args), os.path.abspath(args.out)
    jobs = []
    pretrained = {}
    for model in (TEACHER, STUDENT):
        name = f"digits-seed1-64px-os16-{model}-e{args.pretrain_epochs}"
        pretrained[model] = os.path.join(cache, name, "best.safetensors")
        jobs.append(Job(f"pretrain-{model}", script("train.py", cache, name, "--model", model, *PRETRAIN_DATA,
                                                   "--epochs", str(args.pretrain_epochs)),
                        os.path.join(cache, name)))
    teacher = os.path.join(out, "teacher", "best.safetensors")
    jobs.append(Job("teacher", script("train.py", out, "teacher", "--model", TEACHER, "--cal", "--epochs",
                                      str(args.epochs), "--initial-checkpoint", pretrained[TEACHER]),
                    os.path.join(out, "teacher"), needs=(f"pretrain-{TEACHER}",)))
    start = ("--model", STUDENT, "--epochs", str(args.epochs), "--initial-checkpoint", pretrained[STUDENT])
    with_teacher = ("--teacher-ckpt", teacher)
    # In this order the students that need no teacher fill the second process while the teacher trains.
    methods = {
        "baseline": ("train.py", ()),
        "cal": ("train.py", ("--cal",)),
        "kd": ("distill.py", (*with_teacher, "--method", "kd")),
        "ud-noatt": ("distill.py", (*with_teacher, "--method", "ud", "--att-weight", "0")),
        **{ud_method(variant): ("distill.py", (*with_teacher, "--method", "ud", "--att-variant", variant))
           for variant in args.att_variants},
        # As in the paper (80 epochs against 20 or 40), self-distillation trains twice as long: its first half is
        # the baseline's schedule, its second half distils from the best checkpoint of the first.
        f"self-{ud_method(args.self_att_variant)}": ("distill.py", ("--self-distill", "--att-variant",
                                                                     args.self_att_variant, "--epochs",
                                                                     str(2 * args.epochs))),
    }
    for method, (name, flags) in methods.items():
        for seed in args.seeds:
            experiment = f"{method}-seed{seed}"
            needs = (f"pretrain-{STUDENT}", *(("teacher",) if "--teacher-ckpt" in flags else ()))
            jobs.append(Job(experiment, script(name, out, experiment, *start, "--seed", str(seed), *flags, *args.extra),
                            os.path.join(out, experiment), needs))
    return jobs


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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    minutes = run_in(out, jobs, args.jobs)
    # Pretraining scores its own test split (digits seed 1): a table of its own, never grouped with the students.
    pretraining = [job.run_dir for job in jobs if job.name.startswith("pretrain-")]
    report = ""
    for title, run_dirs in (("Pretraining (`--digits-seed 1`)", pretraining),
                            ("Teacher and students (the default digits set)",
                             [job.run_dir for job in jobs if job.run_dir not in pretraining])):
        table = subprocess.run([sys.executable, "-m", "udtimm.report", *run_dirs], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
        report += f"## {title}\n\n{table}\n"
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(report)
    student_dirs = [job.run_dir for job in jobs if job.name.endswith(tuple(f"-seed{seed}" for seed in args.seeds))]
    claims = subprocess.run([sys.executable, "-m", "udtimm.claims", *student_dirs, "--model", STUDENT, "--out",
                             os.path.join(out, "claims.md")], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
