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
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks.common import ROOT, Job, report_table, run_in  # noqa: E402
from udtimm.attention import ATTENTION_VARIANTS, DEFAULT_VARIANT  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402
from udtimm.objectives import ud_method  # noqa: E402

STUDENT, TEACHER = "test_resnet", "resnet10t"
# Shared by every run: 64 px at stride 16 (4 x 4 attention maps), one process without loader workers.
COMMON = ("--dataset", "digits", "--img-size", "64", "--model-kwargs", "output_stride=16", "--workers", "0",
          "--no-progress")
PRETRAIN_DATA = ("--digits-seed", "1", "--digits-trainval", "3000", "--digits-test", "500")


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
        report += f"## {title}\n\n{report_table(run_dirs)}\n"
    atomic_write_text(os.path.join(out, "report.md"), report)
    student_dirs = [job.run_dir for job in jobs if job.name.endswith(tuple(f"-seed{seed}" for seed in args.seeds))]
    claims = subprocess.run([sys.executable, "-m", "udtimm.claims", *student_dirs, "--model", STUDENT, "--out",
                             os.path.join(out, "claims.md")], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    print(f"\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); tables in {out}")


if __name__ == "__main__":
    main()
