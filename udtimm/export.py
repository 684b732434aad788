"""Export a checkpoint's inference model (backbone and classifier; the calibration branch is dropped) for use
outside udtimm.

    python -m udtimm.export --checkpoint output/<run>/best.safetensors --out DIR --format timm
    python -m udtimm.export --checkpoint best.safetensors --out DIR --format onnx         # DIR/model.onnx
    python -m udtimm.export --checkpoint best.safetensors --out DIR --format torchscript  # DIR/model.pt
    python -m udtimm.export --checkpoint best.safetensors --out DIR --push-to-hub USER/NAME

Every format writes DIR/config.json in timm's Hugging Face layout: architecture, num_classes, label_names,
model_args (the checkpoint's --model-kwargs and --global-pool) and pretrained_cfg (input_size, mean, std, and the
eval resize: crop_pct 1, crop_mode squash, bilinear), plus `udtimm` (version, source checkpoint, and the record of
per-class thresholds, temperatures and biases that `validate.py --tune-thresholds` / `--calibrate` stored beside the
checkpoint when there is one). `timm` adds DIR/model.safetensors, which plain timm loads:
timm.create_model("local-dir:DIR", pretrained=True); it gives logits, so its calibration lives in config.json only
(udtimm.calibration_in_graph false: divide the logits by the temperatures and add the biases, which only
`--calibrate platt` stores, before the sigmoid, as udtimm.Predictor does). `onnx` and `torchscript` take normalised
images [N, 3, S, S] (any N) and return sigmoid scores [N, C], calibrated in the graph (sigmoid(logits / T + b),
udtimm.calibration_in_graph true) when there are temperatures. Each export is checked
against udtimm's model before its files are moved into DIR (the largest difference is printed); --push-to-hub
uploads the timm format through timm's push_to_hf_hub.

A checkpoint with a spatial head (--head ml-decoder or csra) exports as onnx or torchscript: plain timm cannot build
the head, and --format timm refuses it. Its config.json describes the backbone without timm's classifier
(num_classes 0), and `udtimm` names the head and its options (head, head_kwargs), as for every checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import timm
import torch
from timm.models._hub import push_to_hf_hub, save_config_for_hf, save_for_hf
from torch import Tensor, nn

import udtimm
from udtimm import checkpoint, cli
from udtimm.calibration import ScoreCalibration, calibrated_scores, fitted_name
from udtimm.errors import ConfigError
from udtimm.io import current_umask
from udtimm.predictions import MANY_CLASSES
from udtimm.predictor import CONFIG_FILE, WEIGHTS_FILE
from udtimm.tuning import read_tuning, tuning_path, tuning_tensors

FORMATS = ("timm", "onnx", "torchscript")
CALIBRATED_GRAPHS = ("onnx", "torchscript")  # formats whose graph calibrates the logits: sigmoid(logits / T + b)
FILES = {"timm": WEIGHTS_FILE, "onnx": "model.onnx", "torchscript": "model.pt"}
# What each format needs beyond udtimm's requirements: onnxscript drives torch's ONNX exporter, onnxruntime checks.
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime")}
TOLERANCE = 1e-4  # the largest difference in probability accepted between an export and udtimm's model
CHECK_BATCH = 2
ARCHITECTURE_CFG = ("architecture", "first_conv", "classifier", "fixed_input_size")


class MissingDependencyError(ConfigError):
    """An optional package that the asked format needs is not installed; the message says what to pip install."""


class ExportMismatchError(RuntimeError):
    """An exported model whose scores differ from udtimm's by more than TOLERANCE."""


@dataclass
class Exportable:
    """A checkpoint's inference model and what its config.json says about it."""

    model: nn.Module  # images to logits: the timm backbone, or the backbone and its spatial head (--head)
    reference: nn.Module  # udtimm's model, calibration branch included, to check the export against
    img_size: int
    model_config: dict  # timm's model_config: label_names and udtimm's own entries
    model_args: dict  # timm.create_model arguments that rebuild the architecture
    calibration: ScoreCalibration | None  # temperatures and biases [C] for the graph; None: the plain sigmoid
    backbone: nn.Module  # the timm backbone, its pretrained_cfg set to the checkpoint's preprocessing (config.json)


def require(fmt: str) -> None:
    """MissingDependencyError naming every package `fmt` needs that cannot be imported."""
    missing = []
    for name in NEEDS.get(fmt, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"--format {fmt} needs {', '.join(missing)}, which is not installed: "
                                     f"pip install {' '.join(missing)}")


def load_exportable(path: str, fmt: str = "timm") -> Exportable:
    """The checkpoint's model, with the thresholds, temperatures and biases stored beside it (validate.py
    --tune-thresholds, --calibrate) if any; the temperatures and biases go into `fmt`'s graph if it is a
    CALIBRATED_GRAPHS."""
    loaded = checkpoint.load_for_inference(path)
    if fmt == "timm" and loaded.model.head is not None:
        others = " or ".join(f"--format {name}" for name in FORMATS if name != "timm")
        raise ConfigError(f"{path} has the {loaded.model.head_name} head, which plain timm cannot build: export it "
                          f"with {others} (--format timm and --push-to-hub need the linear head)")
    backbone, metadata, img_size = loaded.model.backbone, loaded.metadata, loaded.img_size
    # timm writes config.json's pretrained_cfg from the model's own. Of the architecture's defaults only what
    # describes the network stays: the tag, license and pool size of timm's ImageNet weights do not apply, and
    # udtimm's eval preprocessing (resize straight to img_size, the checkpoint's normalisation) replaces theirs.
    backbone.pretrained_cfg = {
        **{key: backbone.pretrained_cfg[key] for key in ARCHITECTURE_CFG if key in backbone.pretrained_cfg},
        "input_size": (3, img_size, img_size), "mean": tuple(loaded.mean), "std": tuple(loaded.std),
        "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear", "num_classes": len(loaded.class_names),
        "label_names": loaded.class_names,
    }
    model_args = json.loads(metadata.get("model_kwargs") or "{}")
    if metadata.get("global_pool"):
        model_args["global_pool"] = metadata["global_pool"]
    # udtimm gives img_size to the models that take it (transformers fix their position embeddings with it).
    if "img_size" in inspect.signature(type(backbone).__init__).parameters:
        model_args["img_size"] = img_size
    udtimm_entries: dict[str, object] = {"version": udtimm.__version__, "checkpoint": os.path.basename(path),
                                         "dataset": metadata.get("dataset", ""), "method": metadata.get("method", ""),
                                         "head": loaded.model.head_name, "head_kwargs": loaded.model.head_kwargs}
    record = read_tuning(path)
    calibration = tuning_tensors(record, loaded.class_names, tuning_path(path))[1]
    if record:
        udtimm_entries["thresholds"] = record
    if calibration is not None:
        udtimm_entries["calibration_in_graph"] = fmt in CALIBRATED_GRAPHS
    return Exportable(loaded.model.classifier_only(), loaded.model, img_size,
                      {"label_names": loaded.class_names, "udtimm": udtimm_entries}, model_args,
                      calibration if fmt in CALIBRATED_GRAPHS else None, backbone)


class ScoresModel(nn.Module):
    """The classifier with its sigmoid: normalised images [N, 3, S, S] to probabilities [N, C], sigmoid(logits / T + b)
    with per-class temperatures T and biases b [C] (udtimm.calibration.calibrated_scores)."""

    def __init__(self, model: nn.Module, calibration: ScoreCalibration | None = None) -> None:
        super().__init__()
        self.model = model
        self.calibrated = calibration is not None
        if calibration is not None:
            self.register_buffer("temperatures", calibration.temperatures.to(torch.float32))
            self.register_buffer("biases", calibration.biases.to(torch.float32))

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        return torch.sigmoid(logits / self.temperatures + self.biases if self.calibrated else logits)


def write_timm(item: Exportable, directory: str) -> None:
    save_for_hf(item.backbone, directory, model_config=item.model_config, model_args=item.model_args,
                safe_serialization=True)


def write_onnx(item: Exportable, directory: str) -> None:
    write_config(item, directory)
    example = check_images(item.img_size)
    batch = torch.export.Dim("batch")
    # The dynamo exporter (torch's default; the TorchScript-based one is deprecated), one file with the weights.
    scores_model = ScoresModel(item.model, item.calibration).eval()
    torch.onnx.export(scores_model, (example,), os.path.join(directory, FILES["onnx"]),
                      input_names=["images"], output_names=["scores"], dynamic_shapes={"images": {0: batch}},
                      dynamo=True, external_data=False, verbose=False)


def write_torchscript(item: Exportable, directory: str) -> None:
    write_config(item, directory)
    with torch.no_grad(), torchscript_without_deprecation_warnings():
        # check_trace=False: export() compares the saved file with udtimm's model itself.
        traced = torch.jit.trace(ScoresModel(item.model, item.calibration).eval(), check_images(item.img_size),
                                 check_trace=False)
        torch.jit.save(traced, os.path.join(directory, FILES["torchscript"]))


@contextmanager
def torchscript_without_deprecation_warnings() -> Iterator[None]:
    """torch >= 2.10 warns at every torch.jit call that TorchScript is deprecated (docs/deployment.md says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def write_config(item: Exportable, directory: str) -> None:
    save_config_for_hf(item.backbone, os.path.join(directory, CONFIG_FILE), model_config=item.model_config,
                       model_args=item.model_args)


WRITERS: dict[str, Callable[[Exportable, str], None]] = {
    "timm": write_timm, "onnx": write_onnx, "torchscript": write_torchscript,
}


def check_images(img_size: int, count: int = CHECK_BATCH) -> Tensor:
    """Normalised-looking random images, the same on every call."""
    return torch.randn(count, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))


def exported_scores(fmt: str, directory: str, images: Tensor) -> Tensor:
    """Probabilities of `images` [N, 3, S, S] through the exported files alone, as their users would load them."""
    if fmt == "timm":
        model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
        with torch.no_grad():
            return torch.sigmoid(model(images))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(os.path.join(directory, FILES["onnx"]),
                                               providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["scores"], {"images": images.numpy()})[0])
    with torch.no_grad(), torchscript_without_deprecation_warnings():
        return torch.jit.load(os.path.join(directory, FILES["torchscript"]))(images)


def largest_difference(fmt: str, directory: str, reference: nn.Module, images: Tensor,
                       calibration: ScoreCalibration | None = None) -> float:
    """max |exported - udtimm| over the probabilities of `images` (calibrated by `calibration` when given)."""
    with torch.no_grad():
        logits = reference(images).logits
        expected = torch.sigmoid(logits) if calibration is None else calibrated_scores(logits, calibration)
    return (exported_scores(fmt, directory, images) - expected).abs().max().item()


def export(path: str, out: str, fmt: str) -> tuple[list[str], float]:
    """Write `fmt`'s files into `out`; returns their paths and the largest difference from udtimm's scores.

    The files are written to a hidden folder inside `out`, checked, and only then renamed into place (a rename
    replaces the old version whole): a failed export leaves `out` as it was.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    require(fmt)
    item = load_exportable(path, fmt)
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        WRITERS[fmt](item, staging)
        difference = largest_difference(fmt, staging, item.reference, check_images(item.img_size), item.calibration)
        if not difference <= TOLERANCE:
            raise ExportMismatchError(f"the {fmt} export of {path} gives scores up to {difference:.3g} away from "
                                      f"udtimm's (more than {TOLERANCE:g}); nothing was written to {out}")
        names = sorted(os.listdir(staging))
        for name in names:
            # The staging folder is private (0700) and safetensors writes 0600: give the file a plain open()'s mode.
            os.chmod(os.path.join(staging, name), 0o666 & ~current_umask())
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    return [os.path.join(out, name) for name in names], difference


def model_card(item: Exportable) -> dict:
    """The README that push_to_hf_hub writes when the repository has none."""
    entries = item.model_config["udtimm"]
    record = entries.get("thresholds") or {}
    calibration = record.get("calibration")
    names = item.model_config["label_names"]
    formula = "sigmoid(logits / T + b)" if calibration and "biases" in calibration else "sigmoid(logits / T)"
    return {
        "description": f"Multi-label image classifier trained with udtimm {entries['version']} "
                       f"({entries['method'] or 'baseline'} on {entries['dataset'] or 'an unnamed dataset'}).",
        "details": {
            "Model Type": "Multi-label image classification (sigmoid per class)",
            # A card that lists 10,000 class names is read by no one: config.json has them all.
            "Classes": ", ".join(names) if len(names) <= MANY_CLASSES else f"{len(names):,} (config.json label_names)",
            "Image size": f"{item.img_size} x {item.img_size}",
            "Decision thresholds": (f"per class ({record['objective']}, tuned on {record['split']}), "
                                    "in config.json under udtimm.thresholds") if "thresholds" in record else "0.5",
            "Calibration": (f"{fitted_name(calibration['method'])} fitted on {calibration['split']}, in config.json "
                            f"under udtimm.thresholds.calibration: {formula}") if calibration else "none",
        },
        "usage": "```python\nimport timm, torch\nmodel = timm.create_model('hf-hub:REPO', pretrained=True).eval()\n"
                 f"scores = {usage_scores(calibration)}  # images normalised as pretrained_cfg says\n```",
    }


def usage_scores(calibration: dict | None) -> str:
    """The model card's line that turns logits into the scores the stored thresholds were tuned on."""
    if not calibration:
        return "torch.sigmoid(model(images))"
    bias = " + b" if "biases" in calibration else ""
    return (f"torch.sigmoid(model(images) / T{bias})  # T{', b' if bias else ''}: per class, config.json "
            "udtimm.thresholds.calibration")


def push(path: str, repo: str, private: bool) -> object:
    """Upload the timm format of the checkpoint to the Hugging Face Hub repository `repo` (created if needed)."""
    item = load_exportable(path)
    card = model_card(item)
    card["usage"] = card["usage"].replace("REPO", repo)
    return push_to_hf_hub(item.backbone, repo, model_config=item.model_config, model_args=item.model_args,
                          model_card=card, private=private, safe_serialization=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m udtimm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="a .safetensors file written by udtimm")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the export into")
    parser.add_argument("--format", default="timm", choices=FORMATS, help="default: timm")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="also upload the timm format to this Hugging Face Hub repository (USER/NAME)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    if args.push_to_hub and args.format != "timm":
        raise ConfigError("--push-to-hub uploads the timm format: use it with --format timm")
    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to the repository --push-to-hub creates: give --push-to-hub REPO")
    return args


def main(argv: Sequence[str] | None = None) -> list[str]:
    """The paths written into --out."""
    args = parse_args(argv)
    written, difference = export(args.checkpoint, args.out, args.format)
    print(f"{args.format} export of {args.checkpoint}: {', '.join(written)}")
    print(f"largest difference from udtimm's scores on {CHECK_BATCH} random images: {difference:.3g}")
    if args.push_to_hub:
        print(f"uploaded to {push(args.checkpoint, args.push_to_hub, args.private)}")
    return written


if __name__ == "__main__":
    cli.run_script(main)
