"""Does DeviceFeeder's thread give the batches that preparing them in the step's own thread gives?

On CUDA the thread prepares batches on a side stream while the model runs on the main one: a missing wait between
the streams shows up as batches (or predictions) that differ from those prepared inline. For each pipeline (the
workers' uint8 batches; --gpu-decode's nvJPEG batches on CUDA) and each transform (eval, train with the same
random draws), it compares every batch, then the predictions of a model fed both ways. Prints one line per check
and exits non-zero if any differs.

    python benchmarks/feeder_check.py --dataset voc2007 --data-dir /tmp/synthetic-voc --img-size 448
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from any directory

from accelerate import Accelerator  # noqa: E402

from udtimm import loaders  # noqa: E402
from udtimm.data import DataSource  # noqa: E402
from udtimm.data.feed import DeviceFeeder  # noqa: E402
from udtimm.engine import predict  # noqa: E402
from udtimm.metric_statistics import AP_BINS  # noqa: E402
from udtimm.model import create_model  # noqa: E402
from udtimm.settings import DataSettings, ModelSettings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="voc2007")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="resnet50", help="the model fed both ways (random weights)")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="batches compared per check")
    return parser.parse_args(argv)


def data_settings(args: argparse.Namespace, gpu_decode: bool) -> DataSettings:
    """What loaders.build_loaders reads, at the paper's augmentation."""
    options = {"num_trainval": 96, "num_test": 40} if args.dataset == "digits" else {}
    return DataSettings(
        source=DataSource(args.dataset, args.data_dir, options), train_split="train", val_split="test",
        img_size=args.img_size, batch_size=args.batch_size, workers=args.workers, reprob=0.5, hflip=0.5,
        crop_scales=(1.0, 0.875, 0.75, 0.66, 0.5), aa=None, cutout=0.0, difficult="positive", unknown="ignore",
        drop_labels=0.0, drop_labels_seed=0, eval_difficult_negative=False, skip_corrupt=False, gpu_decode=gpu_decode,
        prefetch=None, test_split="test", select_on_test=True, holdout_fraction=0.1, holdout_seed=0,
        min_positives=1, class_groups=None, eval_memory="exact", eval_bins=AP_BINS)


def fed(args: argparse.Namespace, gpu_decode: bool, train: bool, ahead: int, device: torch.device,
        mean: list[float], std: list[float]) -> DeviceFeeder:
    """The first --batches batches of a loader fed to `device`, its random draws seeded the same every time."""
    data = data_settings(args, gpu_decode)
    dataset = data.source.load("test")
    dataset.samples = dataset.samples[:args.batches * args.batch_size]
    train_loader, eval_loader, train_transform, eval_transform = loaders.build_loaders(
        data, dataset, dataset, mean, std, device)
    random.seed(0)
    torch.manual_seed(0)
    train_loader.generator.manual_seed(0)
    loader, transform = (train_loader, train_transform) if train else (eval_loader, eval_transform)
    return DeviceFeeder(loader, transform, device, ahead=ahead)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = Accelerator().device
    torch.manual_seed(0)
    model = create_model(ModelSettings(args.model), len(data_settings(args, False).source.load("test").classes))
    mean, std = loaders.normalisation(model.backbone)
    model = model.to(device).eval()
    failures = 0
    for gpu_decode in (False, True) if device.type == "cuda" else (False,):
        for train in (False, True):
            name = f"{'gpu' if gpu_decode else 'cpu'}-decode {'train' if train else 'eval'}"
            inline = [batch[0].cpu() for batch in fed(args, gpu_decode, train, 0, device, mean, std)]
            ahead = [batch[0].cpu() for batch in fed(args, gpu_decode, train, 2, device, mean, std)]
            same = len(inline) == len(ahead) and all(torch.equal(a, b) for a, b in zip(inline, ahead, strict=True))
            print(f"{name}: {len(ahead)} batches prepared ahead {'equal' if same else 'DIFFER from'} those inline")
            failures += not same
        # The model runs on the main stream while the thread fills the next batches on its side stream.
        expected, got = (predict(model, fed(args, gpu_decode, False, ahead, device, mean, std), Accelerator(),
                                 show_progress=False) for ahead in (0, 2))
        difference = (got.scores - expected.scores).abs().max().item()
        same = torch.equal(got.indices, expected.indices) and difference < 1e-4
        print(f"{'gpu' if gpu_decode else 'cpu'}-decode predict: max |score difference| {difference:.2e} "
              f"({'ok' if same else 'DIFFERENT'})")
        failures += not same
    print("feeder check " + ("passed" if failures == 0 else f"FAILED ({failures})"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
