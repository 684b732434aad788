#!/usr/bin/env python3
"""The heads benchmark: linear, ML-Decoder and CSRA heads on train.py's digits, in two settings.

    python benchmarks/heads_digits.py                                  # pretrained, seeds 0-4, about 40 minutes
    python benchmarks/heads_digits.py --setting scratch --seeds 0 1 2  # the first design, about 60 minutes
    python benchmarks/heads_digits.py --print-commands

`--setting pretrained` (the heads as users meet them): every run starts from the committed pretrained student
backbone of benchmarks/pretrain_digits.py (the head at random), 56 px, 8 epochs on 1,500 trainval images, BCE; each
head at `--head-lr-mult` 1 and 10 (CSRA's recipe trains its classifier at 10x the backbone's rate), and at 10 also
with Mixup/CutMix at half the probability switched off for the last two epochs (`+mix`) and on a schedule twice as
long (`-long`). `--setting scratch` (the first design, kept as history): resnet10t from scratch, 48 px, 15 epochs
on the default digits set, each head with and without Mixup/CutMix.

Every run is a train.py process with one thread, `--jobs` at once; best.safetensors is chosen on `val`, results
are on `test`. A finished run is skipped and an interrupted one resumed (benchmarks/common.py). It first times one
training step of each head against the linear head, in this one process (`step_times.md`), then writes `report.md`
(every arm, mean ± std over seeds), `claims.md` (paired differences over seeds, udtimm.claims) and the long table
(`--results`, default benchmarks/results/heads_digits_<setting>.csv). The designs, registered before their runs:
docs/recipe.md#heads-and-mixing-measured and docs/recipe.md#heads-on-a-pretrained-backbone-measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
from accelerate.utils import set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

import train  # noqa: E402
from benchmarks.common import RESULTS_DIR, ROOT, Job, add_run_args, run_in, write_long_table  # noqa: E402
from benchmarks.distill_digits import arm_results, arm_table  # noqa: E402
from benchmarks.pretrain_digits import ARCHITECTURES, pretrained_flags  # noqa: E402
from udtimm import config, devices, optimization  # noqa: E402
from udtimm.claims import Claim, claims_table, to_markdown  # noqa: E402
from udtimm.data.digits import DIGIT_CLASSES  # noqa: E402
from udtimm.engine import train_one_epoch  # noqa: E402
from udtimm.io import atomic_write_text  # noqa: E402
from udtimm.objectives import LossOptions, SupervisedObjective  # noqa: E402

# The scratch setting: train.py's digits defaults when the design was registered, named so that a later default
# cannot move an arm.
COMMON = ("--dataset", "digits", "--model", "resnet10t", "--img-size", "48", "--epochs", "15", "--loss", "bce",
          "--workers", "0", "--no-progress")
HEADS = {
    "linear": ("--head", "linear"),
    "ml-decoder": ("--head", "ml-decoder"),
    "csra": ("--head", "csra"),
}
MIXING = ("--mixup", "0.8", "--cutmix", "1.0")  # timm's ImageNet recipe: both on, switched half the time
NO_MIXING = ("--mixup", "0", "--cutmix", "0")
CLAIMS = (
    *(Claim(f"`--head {head}` beats the linear head", head, "linear", metric)
      for head in HEADS if head != "linear" for metric in ("map", "map_difficult")),
    *(Claim(f"Mixup/CutMix helps the {head} head", f"{head}+mix", head, "map") for head in HEADS),
    *(Claim(f"Mixup/CutMix lowers the {head} head's classwise ECE", f"{head}+mix", head, "ece",
            lower_is_better=True) for head in HEADS),
)
# The pretrained setting.
PRETRAINED = ("--dataset", "digits", "--digits-trainval", "1500", "--digits-test", "1000", *ARCHITECTURES["student"],
              "--img-size", "56", "--epochs", "8", "--loss", "bce", "--workers", "0", "--no-progress",
              *pretrained_flags("student"))
GENTLE_MIXING = ("--mixup", "0.8", "--cutmix", "1.0", "--mixup-prob", "0.5", "--mixup-off-epoch", "6")
PRETRAINED_CLAIMS = (
    *(Claim(f"`--head {head}` beats the linear head (`--head-lr-mult {mult}`)", f"{head}{suffix}",
            f"linear{suffix}", "map")
      for head in HEADS if head != "linear" for mult, suffix in ((1, ""), (10, "-lr10"))),
    *(Claim(f"`--head-lr-mult 10` helps the {head} head", f"{head}-lr10", head, "map") for head in HEADS),
    *(Claim(f"gentle Mixup/CutMix helps the {head} head", f"{head}-lr10+mix", f"{head}-lr10", "map")
      for head in HEADS),
    *(Claim(f"twice the epochs help the {head} head", f"{head}-lr10-long", f"{head}-lr10", "map") for head in HEADS),
)
SETTINGS = ("pretrained", "scratch")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="pretrained", choices=SETTINGS, help="the design to run")
    parser.add_argument("--out", default=None, help="folder of the runs and the tables (default: "
                                                  "output/heads-digits-<setting>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one run of every arm each (default: 0-4 pretrained, 0-2 scratch)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per head (after 3 untimed)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every run, last on the command line (e.g. --extra --epochs 5)")
    add_run_args(parser, None)
    args = parser.parse_args(argv)
    args.out = args.out or f"output/heads-digits-{args.setting}"
    args.seeds = args.seeds if args.seeds is not None else list(range(5 if args.setting == "pretrained" else 3))
    args.results = args.results or os.path.join(RESULTS_DIR, f"heads_digits_{args.setting}.csv")
    return args


def arms(setting: str) -> dict[str, tuple[str, ...]]:
    """The setting's arms by name: scratch, every head alone and with MIXING; pretrained, every head at
    --head-lr-mult 1 and 10, and at 10 with GENTLE_MIXING and with twice the epochs."""
    if setting == "scratch":
        return {name: flags for head, head_flags in HEADS.items()
                for name, flags in ((head, (*head_flags, *NO_MIXING)), (f"{head}+mix", (*head_flags, *MIXING)))}
    fast = ("--head-lr-mult", "10")
    return {name: (*head_flags, *flags) for head, head_flags in HEADS.items() for name, flags in (
        (head, ("--head-lr-mult", "1", *NO_MIXING)), (f"{head}-lr10", (*fast, *NO_MIXING)),
        (f"{head}-lr10+mix", (*fast, *GENTLE_MIXING)), (f"{head}-lr10-long", (*fast, *NO_MIXING, "--epochs", "16")))}


def common_flags(setting: str) -> tuple[str, ...]:
    return COMMON if setting == "scratch" else PRETRAINED


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run, seed by seed, so that the first seeds' comparisons are complete first."""
    out = os.path.abspath(args.out)
    jobs = []
    for seed in args.seeds:
        for arm, flags in arms(args.setting).items():
            experiment = f"{arm}-seed{seed}"
            command = [sys.executable, os.path.join(ROOT, "train.py"), *common_flags(args.setting), "--output", out,
                       "--experiment",
                       experiment, "--seed", str(seed), *flags, *args.extra]
            jobs.append(Job(experiment, command, os.path.join(out, experiment), labels={"arm": arm, "seed": seed}))
    return jobs


def step_seconds(common: Sequence[str], flags: Sequence[str], steps: int, extra: Sequence[str]) -> float:
    """Seconds per training step of train.py's model and objective for `common` and `flags` (its defaults
    otherwise), on one random batch of its digits shape, in this process."""
    run = train.parse_args([*common, *flags, *extra])
    settings = config.training_settings(run)
    accelerator = devices.make_accelerator("no", cpu=True)
    img_size = settings.data.img_size or 48
    set_seed(0)
    model = devices.build_model(settings.model, img_size, list(DIGIT_CLASSES), False, accelerator)
    optimizer, scheduler = optimization.build_optimization(settings.optim, model, steps + 3)
    objective = SupervisedObjective(run.loss, False, run.cal_weight, settings.data.difficult,
                                    config.settings_from(LossOptions, run, class_counts=None), settings.data.unknown)
    generator = torch.Generator().manual_seed(0)
    size = settings.data.batch_size
    images = torch.randn(size, 3, img_size, img_size, generator=generator)
    target = (torch.rand(size, len(DIGIT_CLASSES), generator=generator) < 0.2).float()
    batch = (images, target, torch.zeros_like(target, dtype=torch.bool), torch.arange(size))

    def train_steps(count: int) -> None:
        train_one_epoch(model, [batch] * count, optimizer, scheduler, accelerator, objective, epoch=0, num_updates=0,
                        optim=settings.optim, runtime=settings.runtime)

    train_steps(3)
    begin = time.perf_counter()
    train_steps(steps)
    return (time.perf_counter() - begin) / steps


def step_time_table(args: argparse.Namespace) -> str:
    """Markdown: ms per training step of each head, and its ratio to the linear head timed in the same run."""
    threads = torch.get_num_threads()
    seconds = {head: step_seconds(common_flags(args.setting), flags, args.steps, args.extra)
               for head, flags in HEADS.items()}
    lines = [f"One process, {threads} thread(s), CPU; the {args.setting} setting's runs, one batch, {args.steps} "
             "steps.\n",
             "| head | ms / step | vs linear |", "|---|---|---|"]
    lines += [f"| {head} | {value * 1e3:.1f} | {value / seconds['linear']:.2f}x |" for head, value in seconds.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    jobs = plan(args)
    if args.print_commands:
        run_in(out, jobs, args)
    os.makedirs(out, exist_ok=True)
    step_times = step_time_table(args)
    atomic_write_text(os.path.join(out, "step_times.md"), step_times)
    print(step_times)
    minutes = run_in(out, jobs, args)
    runs = arm_results(write_long_table(args.results, jobs))
    report = f"## Heads, {args.setting} (test split; val mAP chose the checkpoint)\n\n{arm_table(runs)}"
    atomic_write_text(os.path.join(out, "report.md"), report)
    claims = to_markdown(claims_table(runs, CLAIMS if args.setting == "scratch" else PRETRAINED_CLAIMS))
    atomic_write_text(os.path.join(out, "claims.md"), claims)
    print(f"\n{step_times}\n{report}\n{claims}\nbenchmark: {minutes:.1f} min of runs (finished runs skipped); "
          f"tables in {out}")


if __name__ == "__main__":
    main()
