"""Checkpoints: safetensors weights with the metadata to rebuild the model, and the resume state of a run."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import udtimm
from udtimm.errors import CheckpointError, shortened
from udtimm.heads import LINEAR
from udtimm.io import atomic_write, atomic_write_text
from udtimm.model import CAL_WIDTH, CalibratedModel, create_model
from udtimm.settings import ModelSettings

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"  # --model-ema: the EMA weights in state/
REBUILD_METADATA = ("model", "num_classes", "class_names", "cal")
INPUT_METADATA = ("img_size", "mean", "std")  # what inference needs besides the model: the eval preprocessing


def model_metadata(
    model_name: str,
    model: CalibratedModel,
    class_names: list[str],
    global_pool: str | None,
    img_size: int,
    mean: list[float],
    std: list[float],
    **extra: object,
) -> dict[str, str]:
    """The safetensors header entries (str -> str) that are enough to rebuild and evaluate the model."""
    cal_width = model.cal_head[0].out_features if model.cal_head is not None else 0
    metadata = {
        "model": model_name,
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(class_names),
        "cal": str(model.has_cal).lower(),
        "cal_width": str(cal_width),
        "head": model.head_name,
        "head_kwargs": json.dumps(model.head_kwargs),
        "global_pool": global_pool or "",
        "img_size": str(img_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "udtimm_version": udtimm.__version__,
    }
    metadata.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()})
    return metadata


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage; contiguous copies on the CPU are always accepted.
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}


def save_checkpoint(path: str, model: nn.Module, metadata: Mapping[str, str]) -> None:
    """Write the weights to a temporary file and rename it, so `path` is never a partial file."""
    tensors = state_dict_for_saving(model)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata)))


def read_metadata(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata; only safetensors, so loading never runs code from the file."""
    metadata = read_metadata(path)
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt: {err}") from err
    return tensors, metadata


def class_names(metadata: Mapping[str, str]) -> list[str]:
    return json.loads(metadata["class_names"])


def class_difference(checkpoint_classes: list[str], dataset_classes: list[str]) -> str | None:
    """None when the class lists are equal, else what differs, for an error message."""
    if list(checkpoint_classes) == list(dataset_classes):
        return None
    # Sets, not lists: 10,000 classes against 10,000 would take 10^8 comparisons.
    in_checkpoint, in_dataset = set(checkpoint_classes), set(dataset_classes)
    only_checkpoint = [name for name in checkpoint_classes if name not in in_dataset]
    only_dataset = [name for name in dataset_classes if name not in in_checkpoint]
    if not only_checkpoint and not only_dataset:
        return "same names in another order"
    return f"only in the checkpoint: {shortened(only_checkpoint)}; only in the dataset: {shortened(only_dataset)}"


def check_classes(source: str, checkpoint_classes: Sequence[str], dataset_classes: Sequence[str],
                  dataset: str) -> None:
    """CheckpointError naming `source` (the file, as the message should call it), `dataset` and the classes that
    differ, unless the checkpoint was trained on `dataset_classes` in this order."""
    difference = class_difference(list(checkpoint_classes), list(dataset_classes))
    if difference:
        raise CheckpointError(f"{source} was trained on other classes than {dataset} ({difference})")


def require_metadata(path: str, metadata: Mapping[str, str], keys: Sequence[str]) -> None:
    missing = [key for key in keys if not metadata.get(key)]
    if missing:
        raise CheckpointError(f"{path} lacks the metadata {missing}: it was not written by udtimm")


def model_from_checkpoint(path: str) -> tuple[CalibratedModel, dict[str, str]]:
    """Rebuild the model from the checkpoint's metadata alone and load its weights."""
    tensors, metadata = load_checkpoint(path)
    require_metadata(path, metadata, REBUILD_METADATA)
    settings = ModelSettings(
        metadata["model"], global_pool=metadata.get("global_pool") or None,
        model_kwargs=json.loads(metadata.get("model_kwargs") or "{}"),
        # Checkpoints written before the heads existed have timm's classifier: the linear head.
        head=metadata.get("head") or LINEAR, head_kwargs=json.loads(metadata.get("head_kwargs") or "{}"))
    model = create_model(settings, int(metadata["num_classes"]), cal=metadata["cal"] == "true",
                         img_size=int(metadata["img_size"]) if metadata.get("img_size") else None,
                         cal_width=int(metadata.get("cal_width") or CAL_WIDTH))
    load_weights(model, tensors, path)
    return model, metadata


@dataclass
class InferenceModel:
    """A checkpoint's model, in eval mode on its device, with its classes and the input it expects."""

    model: CalibratedModel
    metadata: dict[str, str]
    class_names: list[str]
    img_size: int  # the eval preprocessing: resize to img_size, normalise with mean and std
    mean: list[float]
    std: list[float]


def load_for_inference(path: str, device: str | torch.device = "cpu") -> InferenceModel:
    """The model of `path` rebuilt from its metadata, in eval mode on `device`, with what its metadata says about
    its classes and input; every script and module that runs a checkpoint loads it here."""
    model, metadata = model_from_checkpoint(path)
    require_metadata(path, metadata, INPUT_METADATA)
    return InferenceModel(model.eval().to(device), metadata, class_names(metadata), int(metadata["img_size"]),
                          json.loads(metadata["mean"]), json.loads(metadata["std"]))


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with a message that names the keys and shapes that differ."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in tensors and tensors[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
            if items
        )
        raise CheckpointError(f"{source} does not fit this model: {details}")
    model.load_state_dict(tensors)


def save_training_state(
    run_dir: str,
    model: nn.Module,
    metadata: Mapping[str, str],
    optimizer_state: dict,
    progress: Mapping[str, object],
    weights_also_at: Sequence[str] = (),
    ema: tuple[nn.Module, Mapping[str, str]] | None = None,
    ema_also_at: Sequence[str] = (),
) -> None:
    """state/: weights, optimizer/scaler state and progress.json (the epoch, and the optimizer steps: the
    schedule's position), replaced as a whole.

    The new state is written to state.tmp/ (progress.json last, marking it complete) and swapped in by
    renames, so a kill at any moment leaves at least one complete state directory. The paths in
    `weights_also_at` (last.safetensors, best.safetensors) get the same weights file before the state is complete:
    a kill in between repeats the epoch, which writes them again. With --model-ema, `ema` (the EMA model and its
    metadata) is written as ema.safetensors the same way, and linked at `ema_also_at` (best.safetensors when the
    EMA weights are the better ones).
    """
    final = os.path.join(run_dir, STATE_DIR)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = [(model, metadata, "weights.safetensors", weights_also_at)]
    if ema is not None:
        files.append((*ema, EMA_FILE, ema_also_at))
    for module, module_metadata, name, also_at in files:
        weights = os.path.join(tmp, name)
        save_checkpoint(weights, module, module_metadata)
        for path in also_at:
            atomic_write(path, lambda target, source=weights: link_or_copy(source, target))
    atomic_write(os.path.join(tmp, "optimizer.pt"), lambda path: torch.save(optimizer_state, path))
    atomic_write_text(os.path.join(tmp, PROGRESS_FILE), json.dumps(dict(progress), indent=2))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def link_or_copy(source: str, target: str) -> None:
    """`target` becomes `source`'s file: a hard link (no second copy on disk), or a copy where links fail."""
    if os.path.exists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links, or another device
        shutil.copyfile(source, target)


def find_training_state(run_dir: str) -> str | None:
    """The newest complete state directory of a run (state, or what a kill mid-swap left)."""
    candidates = []
    for name in (STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old"):
        progress_path = os.path.join(run_dir, name, PROGRESS_FILE)
        if os.path.isfile(progress_path):
            with open(progress_path) as handle:
                candidates.append((int(json.load(handle)["epoch"]), os.path.join(run_dir, name)))
    return max(candidates)[1] if candidates else None


def recover_training_state(run_dir: str) -> None:
    """Tidy what a kill left in a run directory: the newest complete state becomes state/, the rest goes.

    Every step keeps the newest complete state findable (it is renamed only after the others are removed), so a
    kill during recovery is recovered next time. Partial files of atomic writes (.<name>.*.tmp) are removed.
    """
    newest = find_training_state(run_dir)
    final = os.path.join(run_dir, STATE_DIR)
    for name in (STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old"):
        path = os.path.join(run_dir, name)
        if path != newest and os.path.isdir(path):
            shutil.rmtree(path)
    if newest is not None and newest != final:
        os.rename(newest, final)
    for name in os.listdir(run_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(run_dir, name))


def load_training_state(state_dir: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, optimizer/scaler state, progress); torch.load with weights_only=True refuses pickled code."""
    tensors, _ = load_checkpoint(os.path.join(state_dir, "weights.safetensors"))
    optimizer_state = torch.load(os.path.join(state_dir, "optimizer.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(state_dir, PROGRESS_FILE)) as handle:
        progress = json.load(handle)
    return tensors, optimizer_state, progress


def load_ema_state(state_dir: str, ema_model: nn.Module) -> None:
    """--model-ema: the EMA weights of the state into `ema_model`; a state without them is refused, naming it."""
    path = os.path.join(state_dir, EMA_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{state_dir} has no {EMA_FILE}: the run was not trained with --model-ema")
    tensors, _ = load_checkpoint(path)
    load_weights(ema_model, tensors, path)
