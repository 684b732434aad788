"""Label images with a trained model from Python: scores per class and the predicted labels, as a DataFrame.

    from udtimm import Predictor
    predictor = Predictor.from_checkpoint("output/<run>/best.safetensors", device="cpu")
    table = predictor.predict(["photo.jpg", "folder/"])      # or PIL images, or a uint8 tensor [N, 3, H, W]

The preprocessing is validate.py's: the image resized straight to the checkpoint's input size (udtimm.data.transforms
eval_pixels), normalised with its mean and std. The probabilities are sigmoid(logit / T + b) with the temperatures
(and, after `--calibrate platt`, biases; else b = 0) stored beside the checkpoint by `validate.py --calibrate` when
there are some (predictor.calibration), else the plain sigmoid. A class is predicted when its probability reaches
its threshold: the per-class thresholds stored beside the checkpoint by `validate.py --tune-thresholds` when there
are some, else one threshold for all (0.5 unless given).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence

import pandas as pd
import timm
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from udtimm import checkpoint
from udtimm.calibration import ScoreCalibration, calibrated_scores
from udtimm.checkpoint import CheckpointError
from udtimm.data.base import pil_pixels
from udtimm.data.images import ImageFolderDataset, list_images
from udtimm.data.loader import make_loader
from udtimm.data.transforms import NormalizeImage, eval_pixels
from udtimm.metrics import predicted_labels
from udtimm.predictions import joined_names
from udtimm.thresholds import DEFAULT_THRESHOLD
from udtimm.tuning import read_tuning, tuning_path, tuning_tensors

ImageInput = str | os.PathLike | Image.Image | Tensor | Sequence[str | os.PathLike | Image.Image]
IMAGE_COLUMN, LABELS_COLUMN, SCORES_COLUMN = "image", "labels", "scores"
# predict()'s `scores`: one probability column per class, or one `scores` column with the predicted classes' only.
SCORES = ("all", "predicted")
# Losses whose sigmoid scores are not probabilities (ASL's shifted negatives sit near 0.5: docs/deployment.md), by
# the first part of a checkpoint's method name.
NOT_PROBABILITIES = ("asl",)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"  # timm's Hugging Face layout (udtimm.export)


class Predictor:
    """A model in eval mode with its classes, preprocessing, calibration and decision thresholds."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], img_size: int, mean: Sequence[float],
                 std: Sequence[float], thresholds: Tensor | None = None, device: str | torch.device = "cpu",
                 metadata: dict[str, str] | None = None, calibration: ScoreCalibration | None = None) -> None:
        """`model` maps normalised images [N, 3, img_size, img_size] to logits [N, C]; `thresholds` [C] per class
        (None: one threshold for all); `calibration`: per-class temperatures and biases, sigmoid(logits / T + b)
        (None: the plain sigmoid)."""
        self.class_names = list(class_names)
        clashes = {IMAGE_COLUMN, LABELS_COLUMN} & set(self.class_names)
        if clashes:
            raise CheckpointError(f"class name(s) {sorted(clashes)} clash with predict()'s columns of the same name")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.img_size, self.mean, self.std = int(img_size), list(mean), list(std)
        self.thresholds = thresholds
        self.calibration = calibration
        self.metadata = dict(metadata or {})
        self.source = self.metadata.get("source", "<checkpoint>")  # the file or directory, for messages
        self.pixels = eval_pixels(self.img_size)
        self.normalize = NormalizeImage(self.mean, self.std).to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu",
                        stored_tuning: bool = True) -> Predictor:
        """From a udtimm checkpoint (.safetensors), or from an export directory in the timm format (udtimm.export).

        The calibration branch is left out: it plays no part in the predictions. `stored_tuning`: use the per-class
        thresholds and calibration (temperatures, biases) stored beside the checkpoint (or in the export's
        config.json) when there are some.
        """
        if os.path.isdir(path):
            return cls.from_export(path, device, stored_tuning)
        loaded = checkpoint.load_for_inference(path, device)
        record = read_tuning(path) if stored_tuning else None
        thresholds, calibration = tuning_tensors(record, loaded.class_names, tuning_path(path))
        predictor = cls(loaded.model.classifier_only(), loaded.class_names, loaded.img_size, loaded.mean, loaded.std,
                        thresholds, device, loaded.metadata, calibration)
        predictor.source = path
        return predictor

    @classmethod
    def from_export(cls, directory: str, device: str | torch.device = "cpu",
                    stored_tuning: bool = True) -> Predictor:
        """From a directory written by `python -m udtimm.export --format timm`, loaded by timm itself (its weights
        give logits: the temperatures and biases in config.json are applied here)."""
        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
            raise CheckpointError(f"{directory} holds no {CONFIG_FILE} and {WEIGHTS_FILE}: not an export in the timm "
                                  "format (python -m udtimm.export --format timm)")
        try:
            with open(config_path) as handle:
                config = json.load(handle)
            class_names, data = config["label_names"], config["pretrained_cfg"]
            img_size, mean, std = data["input_size"][-1], data["mean"], data["std"]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{config_path} lacks what a udtimm export holds ({err!r})") from err
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
        record = config.get("udtimm", {}).get("thresholds") if stored_tuning else None
        thresholds, calibration = tuning_tensors(record, class_names, config_path)
        metadata = {"model": config["architecture"], "source": directory}
        return cls(model, class_names, img_size, mean, std, thresholds, device, metadata, calibration)

    def default_threshold_warning(self, threshold: float | None = None) -> str | None:
        """A line when labels would come from DEFAULT_THRESHOLD on scores that are not probabilities: a model trained
        with a loss of NOT_PROBABILITIES, with neither a stored calibration nor stored thresholds."""
        loss = self.metadata.get("method", "").split("+")[0]
        if threshold is not None or self.thresholds is not None or self.calibration is not None \
                or loss not in NOT_PROBABILITIES:
            return None
        source = self.source
        return (f"{source} was trained with --loss {loss}, whose scores are not probabilities: {DEFAULT_THRESHOLD} "
                f"labels by an arbitrary cut. Calibrate it first (python validate.py --checkpoint {source} "
                "--calibrate platt) or tune thresholds (--tune-thresholds f1), or pass --threshold")

    def decision_thresholds(self, threshold: float | None = None) -> float | Tensor:
        """`threshold` when given, else the stored per-class thresholds, else DEFAULT_THRESHOLD."""
        if threshold is not None:
            return threshold
        return self.thresholds if self.thresholds is not None else DEFAULT_THRESHOLD

    @torch.inference_mode()
    def scores(self, pixels: Tensor) -> Tensor:
        """Probabilities [N, C] (float32, on the CPU) of a batch already resized: uint8 [N, 3, img_size, img_size],
        calibrated (sigmoid(logits / T + b)) when there is a calibration."""
        logits = self.model(self.normalize(pixels.to(self.device)))
        if self.calibration is not None:
            return calibrated_scores(logits, self.calibration).cpu()
        return torch.sigmoid(logits.float()).cpu()

    def predict(self, images: ImageInput, batch_size: int = 32, topk: int | None = None,
                threshold: float | None = None, workers: int = 0, progress: bool = False,
                scores: str = "all") -> pd.DataFrame:
        """One row per image: `image` (its path, or `#i` for the i-th in-memory image), `labels` (the predicted
        classes, ';'-joined, at most `topk` of them), then with `scores` "all" one probability column per class, with
        "predicted" one `scores` column: the probabilities of the predicted classes, ';'-joined in the order of
        `labels`, kept batch by batch (memory for the predicted classes only, not images x classes).

        `images`: a path (file, folder or glob pattern), a PIL image, a list of paths or of PIL images, a uint8 tensor
        [N, 3, H, W]. `workers` loader processes decode files (0: this process). Bad input (a missing file, a file
        that is not an image, an empty folder, a tensor of another type or shape) raises before any image is
        labelled, with a message that names it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        check_scores(scores)
        names, batches, count = self._batches(images, batch_size, workers)
        self._warn_default_threshold(threshold)
        probabilities = (self.scores(pixels) for pixels in tqdm(batches, total=count, desc="predict",
                                                                disable=not progress, dynamic_ncols=True))
        if scores == "all":
            return self._table(names, torch.cat(list(probabilities)), topk, threshold, scores)
        cells = [cell for batch in probabilities for cell in self._predicted_cells(batch, topk, threshold)]
        return self._frame(names, cells)

    def table(self, names: Sequence[str], probabilities: Tensor, topk: int | None = None,
              threshold: float | None = None, scores: str = "all") -> pd.DataFrame:
        """The DataFrame predict() returns, from probabilities [N, C]."""
        check_scores(scores)
        self._warn_default_threshold(threshold)
        return self._table(names, probabilities, topk, threshold, scores)

    def _warn_default_threshold(self, threshold: float | None) -> None:
        line = self.default_threshold_warning(threshold)
        if line:
            warnings.warn(line, UserWarning, stacklevel=3)  # at the caller of predict() or table()

    def _table(self, names: Sequence[str], probabilities: Tensor, topk: int | None, threshold: float | None,
               scores: str) -> pd.DataFrame:
        if scores == "predicted":
            return self._frame(names, self._predicted_cells(probabilities, topk, threshold))
        predicted = predicted_labels(probabilities, self.decision_thresholds(threshold), topk)
        table = pd.DataFrame(probabilities.numpy(), columns=self.class_names)
        table.insert(0, LABELS_COLUMN, [joined_names(row, self.class_names) for row in predicted])
        table.insert(0, IMAGE_COLUMN, list(names))
        return table

    def _predicted_cells(self, probabilities: Tensor, topk: int | None,
                         threshold: float | None) -> list[tuple[str, str]]:
        """Per row of probabilities [N, C]: its predicted classes and their probabilities, each ';'-joined."""
        predicted = predicted_labels(probabilities, self.decision_thresholds(threshold), topk)
        cells = []
        for row, mask in zip(probabilities.numpy(), predicted, strict=True):
            indices = mask.nonzero().flatten().tolist()
            # str() of a float32 is the shortest text that reads back as that float32, as in the "all" columns
            cells.append((";".join(self.class_names[index] for index in indices),
                          ";".join(str(value) for value in row[indices])))
        return cells

    @staticmethod
    def _frame(names: Sequence[str], cells: Sequence[tuple[str, str]]) -> pd.DataFrame:
        return pd.DataFrame({IMAGE_COLUMN: list(names), LABELS_COLUMN: [labels for labels, _ in cells],
                             SCORES_COLUMN: [values for _, values in cells]})

    def _batches(self, images: ImageInput, batch_size: int, workers: int) -> tuple[list[str], Iterator[Tensor], int]:
        """(image names, uint8 batches resized to img_size, number of batches); the inputs are checked first."""
        if isinstance(images, Tensor):
            check_image_batch(images)
            starts = range(0, len(images), batch_size)
            return [f"#{i}" for i in range(len(images))], (self.pixels(images[i:i + batch_size]) for i in starts), \
                len(starts)
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            raise ValueError("images: none given")
        if all(isinstance(item, (str, os.PathLike)) for item in items):
            paths = list_images([os.fspath(item) for item in items])
            loader = make_loader(ImageFolderDataset(paths, self.pixels), batch_size, False, workers)
            return paths, (batch[0] for batch in loader), len(loader)
        if all(isinstance(item, Image.Image) for item in items):
            starts = range(0, len(items), batch_size)
            return [f"#{i}" for i in range(len(items))], (self._pil_batch(items[i:i + batch_size]) for i in starts), \
                len(starts)
        kinds = sorted({type(item).__name__ for item in items})
        raise TypeError(f"images: expected paths, PIL images or a uint8 tensor [N, 3, H, W], got a list of {kinds}")

    def _pil_batch(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self.pixels(pil_pixels(image)) for image in images])


def check_scores(scores: str) -> None:
    """ValueError unless `scores` is one of SCORES."""
    if scores not in SCORES:
        raise ValueError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")


def check_image_batch(images: Tensor) -> None:
    """ValueError unless `images` is a uint8 batch [N, 3, H, W] with N >= 1."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected a uint8 tensor (0-255 pixels), got {images.dtype}; "
                         "convert with (images * 255).round().to(torch.uint8) if it holds 0-1 floats")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        hint = ": add the batch dimension with images.unsqueeze(0)" if images.ndim == 3 else ""
        raise ValueError(f"images: expected a batch [N, 3, H, W] with N >= 1, got shape {list(images.shape)}{hint}")
