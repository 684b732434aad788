"""Look inside a model: uncertainty attention over images (paper Fig. 4), reliability diagrams compared (Fig. 3).

    python -m udtimm.visualize --checkpoint student.safetensors --teacher-ckpt teacher.safetensors \\
        --images photos/ --out vis/
    python -m udtimm.visualize --compare base/best.safetensors cal/best.safetensors --labels baseline cal \\
        --out reliability_compare.png

--checkpoint writes OUT/<image stem>.png per image: the image, the model's uncertainty attention map (Eq. 15-16)
over it (and the teacher's beside it), and the top labels with their probability and uncertainty. A model
without the calibration branch has no uncertainty: it shows the Grad-CAM of its top label instead, and says so.
--compare evaluates the checkpoints on one split and draws their reliability diagrams on the same axes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from matplotlib.figure import Figure
from torch import Tensor, nn

from udtimm import checkpoint, cli, plots
from udtimm.attention import ATTENTION_VARIANTS, check_attention_support, uncertainty_per_class
from udtimm.calibration import calibrated_scores
from udtimm.config import ConfigError
from udtimm.data import DataSource
from udtimm.data.base import read_image
from udtimm.data.images import list_images
from udtimm.data.loader import make_loader
from udtimm.data.transforms import eval_transform
from udtimm.data_flags import add_dataset_args, add_workers_arg, data_source
from udtimm.engine import predict
from udtimm.flags import HelpFormatter
from udtimm.model import CalibratedModel, ModelOutput
from udtimm.tuning import read_tuning, tuning_path, tuning_tensors


@dataclass
class LoadedModel:
    model: CalibratedModel  # in eval mode, on its device
    class_names: list[str]
    transform: nn.Module
    method: str  # the method column of results.csv, or the file name when the checkpoint has none


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", metavar="FILE", help="draw this model's attention maps over --images")
    mode.add_argument("--compare", nargs="+", metavar="FILE", help="draw these checkpoints' reliability diagrams")
    parser.add_argument("--out", required=True, help="--checkpoint: folder of PNGs; --compare: the PNG file")
    maps = parser.add_argument_group("attention maps (--checkpoint)")
    maps.add_argument("--images", nargs="+", metavar="DIR_OR_FILE", help="folders (their image files) or image files")
    maps.add_argument("--teacher-ckpt", metavar="FILE", help="also draw this model's map (the teacher's)")
    maps.add_argument("--topk", type=int, default=5, help="how many of the most probable labels to list")
    compare = parser.add_argument_group("reliability comparison (--compare)")
    compare.add_argument("--labels", nargs="+", default=None, help="legend names (default: each run's method)")
    add_dataset_args(compare, None, "default: the first checkpoint's dataset")
    compare.add_argument("-b", "--batch-size", type=int, default=64, help="images per process and step")
    add_workers_arg(compare)
    args = parser.parse_args(argv)
    if args.checkpoint and not args.images:
        raise ConfigError("--checkpoint draws attention maps of images: give --images DIR_OR_FILE")
    if args.compare and len(args.compare) < 2:
        raise ConfigError("--compare needs two or more checkpoints")
    if args.compare and args.labels and len(args.labels) != len(args.compare):
        raise ConfigError(f"--labels: {len(args.labels)} name(s) for {len(args.compare)} checkpoints")
    if args.topk < 1:
        raise ConfigError("--topk must be at least 1")
    return args


def load_model(path: str, device: torch.device) -> LoadedModel:
    """The model rebuilt from its checkpoint, with the eval transform its metadata describes."""
    loaded = checkpoint.load_for_inference(path, device)
    method = loaded.metadata.get("method") or os.path.splitext(os.path.basename(path))[0]
    return LoadedModel(loaded.model, loaded.class_names, eval_transform(loaded.img_size, loaded.mean, loaded.std),
                       method)


def check_map_support(model: CalibratedModel, path: str) -> None:
    """Refuse a model whose map would be identically zero or misread, naming the checkpoint."""
    # The top-label Grad-CAM drawn for a model without the branch has the same needs (the head sees the patch
    # tokens, NCHW maps), so such a backbone is checked as if it had the branch.
    candidate = model if model.has_cal else CalibratedModel(model.backbone, model.num_classes, cal=True,
                                                            head=model.head)
    try:
        check_attention_support(candidate)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from err


def label_gradcam(model: CalibratedModel, features: Tensor, labels: Tensor) -> Tensor:
    """Grad-CAM of the classification logit of `labels` [B], through the head only like Eq. 16; [B, H, W]."""
    with torch.enable_grad():
        z = features.detach().requires_grad_(True)
        logits, _ = model.forward_head(z)
        (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), z)
    weights = model.feature_grid(grad).float().sum(dim=(2, 3), keepdim=True)
    return (weights * model.feature_grid(z.detach()).float()).sum(dim=1)


def look(loaded: LoadedModel, image: Tensor, role: str) -> tuple[ModelOutput, Tensor, str]:
    """One image through the model: its outputs, its map at the image's size and the map's title."""
    model = loaded.model
    batch = loaded.transform(image)[None].to(next(model.parameters()).device)
    with torch.no_grad():  # uncertainty_attention then takes create_graph=False: a detached map
        # Eq. 16 as written keeps the sign (the ReLU of --att-variant gradcam would hide where the features lower the
        # divergence), and a forward map does not depend on whether the weights are held as constants.
        output = model(batch, with_attention=model.has_cal, attention_form=ATTENTION_VARIANTS["paper"])
    if output.attention is not None:
        attention, title = output.attention, f"{role}: uncertainty attention"
    else:
        top = output.logits.argmax(dim=1)
        attention = label_gradcam(model, output.features, top)
        title = f"{role}: Grad-CAM of {loaded.class_names[top.item()]!r}"
    attention = F.interpolate(attention[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False)
    return output, attention[0, 0].cpu(), title


def image_figure(path: str, loaded: LoadedModel, teacher: LoadedModel | None, topk: int) -> Figure:
    """The attention figure of one image: the model's map, the teacher's, and the model's top labels."""
    image = read_image(path)
    output, attention, title = look(loaded, image, f"{'student' if teacher else 'model'} ({loaded.method})")
    maps = [(title, attention)]
    if teacher is not None:
        _, teacher_map, teacher_title = look(teacher, image, f"teacher ({teacher.method})")
        maps.append((teacher_title, teacher_map))
    probs = torch.sigmoid(output.logits.float())[0].cpu()
    top = probs.topk(min(topk, probs.numel())).indices
    labels = [loaded.class_names[index] for index in top.tolist()]
    if output.cal_logits is None:
        uncertainty = None
        panel_title = f"top {len(labels)} labels\n(no calibration branch: Grad-CAM\nof the top label, no uncertainty)"
    else:
        uncertainty = uncertainty_per_class(output.logits, output.cal_logits)[0].cpu()[top]
        panel_title = f"top {len(labels)} labels"
    return plots.attention_figure(image, maps, labels, probs[top], uncertainty, panel_title,
                                  title=os.path.basename(path))


def output_paths(images: Sequence[str], out_dir: str) -> list[str]:
    """OUT/<stem>.png for each image; two images of one stem (in different folders) would overwrite each other."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in images]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ConfigError(f"--images holds several images named {', '.join(repeated)}: their PNGs would collide")
    return [os.path.join(out_dir, stem + ".png") for stem in stems]


def draw_attention_maps(checkpoint_path: str, inputs: Sequence[str], out_dir: str, teacher_path: str | None = None,
                        topk: int = 5) -> list[str]:
    """One PNG per image in `out_dir`: the model's (and the teacher's) uncertainty attention maps and top labels."""
    device = Accelerator().device
    loaded = load_model(checkpoint_path, device)
    check_map_support(loaded.model, checkpoint_path)
    teacher = load_model(teacher_path, device) if teacher_path else None
    if teacher is not None:
        check_map_support(teacher.model, teacher_path)
    images = list_images(inputs)
    outputs = output_paths(images, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for image, output in zip(images, outputs, strict=True):
        plots.save_figure(image_figure(image, loaded, teacher, topk), output)
        print(output)
    return outputs


def compare_reliability(paths: Sequence[str], source: DataSource, split: str, out: str,
                        labels: Sequence[str] | None = None, batch_size: int = 64, workers: int = 2) -> list[str]:
    """Every checkpoint evaluated on the same split, one reliability curve each on shared axes, written to `out`;
    a checkpoint with a stored calibration (validate.py --calibrate) is drawn with its calibrated scores."""
    accelerator = Accelerator()
    with accelerator.main_process_first():  # the main process generates digits before the others read it
        dataset = source.load(split)
    curves = []
    for number, path in enumerate(paths):
        loaded = load_model(path, accelerator.device)
        checkpoint.check_classes(path, loaded.class_names, dataset.classes, dataset.name)
        dataset.transform = loaded.transform  # each model at its own input size and normalisation
        loader = accelerator.prepare(make_loader(dataset, batch_size, False, workers))
        predictions = predict(loaded.model, loader, accelerator, show_progress=False)
        label = labels[number] if labels else loaded.method
        # The scores the checkpoint is used with: calibrated when validate.py --calibrate stored a calibration.
        calibration = tuning_tensors(read_tuning(path), loaded.class_names, tuning_path(path))[1]
        scores = predictions.scores if calibration is None else calibrated_scores(predictions.logits, calibration)
        curves.append((label if calibration is None else f"{label} (calibrated)", scores, predictions.target,
                       predictions.difficult))
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        figure = plots.reliability_figure(curves, f"reliability on {dataset.name} ({len(dataset)} images)")
        plots.save_figure(figure, out)
        print(out)
    return [out]


def main(argv: Sequence[str] | None = None) -> list[str]:
    """The PNG files written."""
    args = parse_args(argv)
    if not args.compare:
        return draw_attention_maps(args.checkpoint, args.images, args.out, args.teacher_ckpt, args.topk)
    dataset = args.dataset or checkpoint.read_metadata(args.compare[0]).get("dataset")
    if not dataset:
        raise ConfigError(f"{args.compare[0]} does not name its dataset: give --dataset")
    return compare_reliability(args.compare, data_source(args, dataset), args.split, args.out, args.labels,
                               args.batch_size, args.workers)


if __name__ == "__main__":
    cli.run_script(main)
