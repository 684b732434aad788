#!/usr/bin/env python3
"""The pretrained backbones the digits benchmarks start from: made once, committed, checked by sha256 at load.

    python benchmarks/pretrain_digits.py                # about 7 min on 2 CPU cores; rewrites benchmarks/weights/
    python benchmarks/pretrain_digits.py --print-commands

They play the part of ImageNet weights: a file that every benchmark run downloads, not a run that every machine
repeats (two machines of one kind trained pretraining runs 2 mAP apart, and every seed inherits the difference).
The teacher's and the student's architectures of benchmarks/distill_digits.py are each trained once with
train.py on a digits set of their own (`--digits-seed 1`: other scenes made only of the glyphs that the main set
uses for training, never its test glyphs), 3,000 images, 15 epochs, seed 0. Each best.safetensors (chosen on that
set's val split) is written as timm weights, the backbone's keys without udtimm's prefix and without the
calibration branch, to benchmarks/weights/digits56-<role>.safetensors; weights.json beside them keeps each file's
sha256 and the command that made it. The benchmarks pass both to `--pretrained-path` and `--pretrained-sha256`, which
load the backbone only (the classifier and the calibration branch start at random).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from safetensors.torch import save_file  # noqa: E402

from benchmarks.common import ROOT, Job, add_run_args, run_in  # noqa: E402
from udtimm.checkpoint import load_checkpoint  # noqa: E402
from udtimm.io import atomic_write, atomic_write_text  # noqa: E402
from udtimm.provenance import file_sha256  # noqa: E402
from udtimm.weights import backbone_weights  # noqa: E402

WEIGHTS_DIR = os.path.join("benchmarks", "weights")  # relative to the repository: every run's cwd is its root
MANIFEST = os.path.join(WEIGHTS_DIR, "weights.json")
# resnet10t at half and quarter width (its stem too, for the student): 1.27 M and 0.33 M parameters; 56 px at
# output_stride 8 gives 7 x 7 maps.
ARCHITECTURES = {
    "teacher": ("--model", "resnet10t", "--model-kwargs", "output_stride=8", "channels=[32,64,128,256]"),
    "student": ("--model", "resnet10t", "--model-kwargs", "output_stride=8", "channels=[16,32,64,128]",
                "stem_width=16"),
}
PRETRAIN = ("--img-size", "56", "--dataset", "digits", "--digits-seed", "1", "--digits-trainval", "3000",
            "--digits-test", "500", "--epochs", "15", "--seed", "0", "--workers", "0", "--no-progress")


def weights_path(role: str) -> str:
    return os.path.join(WEIGHTS_DIR, f"digits56-{role}.safetensors")


def pretrained_flags(role: str) -> tuple[str, ...]:
    """--pretrained-path and --pretrained-sha256 of the committed backbone of `role`, from weights.json."""
    with open(os.path.join(ROOT, MANIFEST)) as handle:
        manifest = json.load(handle)
    return "--pretrained-path", weights_path(role), "--pretrained-sha256", manifest[role]["sha256"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/pretrain-digits", help="folder of the two training runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    add_run_args(parser, "pretrain_digits")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[Job]:
    out = os.path.abspath(args.out)
    return [Job(f"pretrain-{role}", [sys.executable, os.path.join(ROOT, "train.py"), *model, *PRETRAIN, "--output",
                                     out, "--experiment", role], os.path.join(out, role), labels={"arm": role})
            for role, model in ARCHITECTURES.items()]


def export(job: Job, role: str) -> dict[str, str]:
    """best.safetensors of `job` as timm weights of the backbone in benchmarks/weights; its manifest entry."""
    tensors, metadata = load_checkpoint(os.path.join(job.run_dir, "best.safetensors"))
    command = shlex.join(["python", "train.py", *ARCHITECTURES[role], *PRETRAIN])
    keep = {"model": metadata["model"], "model_kwargs": metadata.get("model_kwargs", "{}"),
            "epoch": metadata["epoch"], "made_by": command}
    path = os.path.join(ROOT, weights_path(role))
    atomic_write(path, lambda tmp: save_file(backbone_weights(tensors), tmp, metadata=keep))
    return {"file": weights_path(role), "sha256": file_sha256(path), "command": command,
            "epoch": metadata["epoch"], "val_map": metadata.get("metric_value", "")}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = plan(args)
    run_in(os.path.abspath(args.out), jobs, args)
    manifest = {role: export(job, role) for role, job in zip(ARCHITECTURES, jobs, strict=True)}
    atomic_write_text(os.path.join(ROOT, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
