"""Starting weights from a local file: --pretrained-path (a backbone) and --initial-checkpoint (a whole model).

Both read a udtimm checkpoint (keys `backbone.*`, `head.*` with a spatial head, `cal_head.*`, class list in the
metadata) or timm weights (timm's own keys: a hub `model.safetensors`, a `.pth` of `model.state_dict()` or of a timm
training checkpoint). Either the weights load, or the file is refused with the keys at fault: a model is never left
at random without a word.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from udtimm.errors import WeightsError
from udtimm.heads import HEAD_PREFIX

BACKBONE_PREFIX = "backbone."
CAL_PREFIX = "cal_head."
# A timm training checkpoint (.pth.tar) nests its weights under one of these, the EMA first, as timm reads them.
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_LISTED = 5


def read_weights(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or the tensors of a PyTorch file read with weights_only=True."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise WeightsError(f"{path} cannot be read as PyTorch weights (weights_only=True, which refuses pickled "
                           f"code): {err}") from err
    if isinstance(content, dict):
        content = next((content[key] for key in _NESTED_KEYS if isinstance(content.get(key), dict)), content)
    tensors = {key.removeprefix("module."): value for key, value in content.items() if isinstance(value, Tensor)} \
        if isinstance(content, dict) else {}
    if not tensors:
        raise WeightsError(f"{path} holds no tensors (expected a state dict of a timm or udtimm model)")
    return tensors, {}


def is_udtimm_weights(tensors: Mapping[str, Tensor]) -> bool:
    return all(key.startswith((BACKBONE_PREFIX, HEAD_PREFIX, CAL_PREFIX)) for key in tensors)


def backbone_weights(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's tensors under timm's own keys: a udtimm checkpoint loses its prefix, spatial head and
    calibration branch."""
    if not is_udtimm_weights(tensors):
        return dict(tensors)
    return {key.removeprefix(BACKBONE_PREFIX): value for key, value in tensors.items()
            if key.startswith(BACKBONE_PREFIX)}


def classifier_prefix(backbone: nn.Module) -> str:
    """The state-dict prefix of timm's classifier in `backbone` ('fc.', 'head.fc.', ...)."""
    classifier = backbone.get_classifier()
    name = next(name for name, module in backbone.named_modules() if module is classifier)
    return f"{name}."


def _listed(keys: Sequence[str]) -> str:
    return f"{list(keys[:_LISTED])}{f' and {len(keys) - _LISTED} more' if len(keys) > _LISTED else ''}"


def _misfit(path: str, what: str, expected: Mapping[str, Tensor], given: Mapping[str, Tensor],
            keys: Sequence[str], unexpected: Sequence[str] = ()) -> None:
    """Raise WeightsError naming the `keys` of `expected` that `given` lacks or holds in another shape."""
    # A BatchNorm step counter carries no weights; some published files leave it out.
    missing = [key for key in keys if key not in given and not key.endswith("num_batches_tracked")]
    shapes = [f"{key}: file {tuple(given[key].shape)} vs model {tuple(expected[key].shape)}"
              for key in keys if key in given and given[key].shape != expected[key].shape]
    problems = [f"{label} {_listed(items)}" for label, items in
                (("missing", missing), ("unexpected", list(unexpected)), ("shape", shapes)) if items]
    if problems:
        raise WeightsError(f"{path} does not fit {what}: " + "; ".join(problems))


def check_pretrained_loaded(backbone: nn.Module, weights: Mapping[str, Tensor], path: str) -> None:
    """After timm loaded `weights` into `backbone`: every backbone tensor but the classifier came from the file.

    timm leaves its load non-strict when it drops the classifier, so keys that name nothing (a udtimm checkpoint's
    `backbone.` prefix, another architecture) would otherwise be skipped without a word.
    """
    head = classifier_prefix(backbone)
    state = backbone.state_dict()
    keys = [key for key in state if not key.startswith(head)]
    # A tensor of another shape is timm's to adapt (a resampled position embedding) or to refuse, as it does.
    missing = [key for key in keys if key not in weights and not key.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{path} does not fit --pretrained-path for {type(backbone).__name__}: missing "
                           f"{_listed(missing)}")
    # Same name and shape but other values: timm skipped the tensor.
    skipped = [key for key in keys if key in weights and weights[key].shape == state[key].shape
               and not torch.equal(state[key], weights[key].to(state[key]))]
    if skipped:
        raise WeightsError(f"{path}: timm did not load {_listed(skipped)} into {type(backbone).__name__}")


def load_initial_checkpoint(model: nn.Module, path: str, class_names: Sequence[str]) -> str:
    """--initial-checkpoint: the backbone always, the heads when the file's class list is `class_names`.

    `model` is a CalibratedModel. Returns the line that says what was loaded and what was left at random.
    """
    tensors, metadata = read_weights(path)
    if not is_udtimm_weights(tensors):
        tensors = {BACKBONE_PREFIX + key: value for key, value in tensors.items()}
    file_classes = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    expected = model.state_dict()
    timm_classifier = BACKBONE_PREFIX + classifier_prefix(model.backbone)
    classifier = ("the classifier", timm_classifier) if model.head is None else \
        (f"the {model.head_name} head", HEAD_PREFIX)
    heads = dict([classifier, ("the calibration branch", CAL_PREFIX)])
    # timm's classifier and a spatial head are both classifiers, never backbone: the backbone of a checkpoint with
    # either starts a model with the other.
    in_head = (timm_classifier, HEAD_PREFIX, CAL_PREFIX)
    body = [key for key in expected if not key.startswith(in_head)]
    unexpected = sorted(key for key in tensors if key not in expected and not key.startswith(in_head))
    what = f"{type(model.backbone).__name__}'s backbone"
    _misfit(path, what, expected, tensors, body, unexpected)
    chosen = {key: tensors[key] for key in body if key in tensors}
    loaded, left = [f"the backbone ({len(chosen)} tensors)"], []
    for name, prefix in heads.items():
        keys = [key for key in expected if key.startswith(prefix)]
        if not keys:
            continue
        if file_classes is None:
            left.append(f"{name} (the file has no class list)")
        elif list(file_classes) != list(class_names):
            left.append(f"{name} (the file was trained on other classes)")
        elif not any(key in tensors for key in keys):
            left.append(f"{name} (not in the file)")
        else:
            _misfit(path, name, expected, tensors, keys)
            chosen.update((key, tensors[key]) for key in keys if key in tensors)
            loaded.append(name)
    model.load_state_dict(chosen, strict=False)  # what is not chosen keeps its initialisation
    return f"--initial-checkpoint {path}: loaded {', '.join(loaded)}; left at random: {', '.join(left) or 'nothing'}"
