"""Starting weights: --initial-checkpoint (load, partial load, refusal) and --pretrained-path (loads or refuses)."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from udtimm.checkpoint import model_metadata, save_checkpoint
from udtimm.model import ModelConfigError, create_model
from udtimm.settings import ModelSettings
from udtimm.weights import WeightsError, load_initial_checkpoint, read_weights

CLASSES = ["a", "b", "c", "d"]


def _trained(seed: int = 1, cal: bool = True):
    torch.manual_seed(seed)
    return create_model(ModelSettings("test_resnet"), len(CLASSES), cal=cal)


def _save_udtimm(path, model, classes=CLASSES) -> str:
    save_checkpoint(str(path), model, model_metadata("test_resnet", model, classes, None, 32, [0.5] * 3, [0.5] * 3))
    return str(path)


def _equal(a: torch.nn.Module, b: torch.nn.Module, prefix: str) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[key], sb[key]) for key in sa if key.startswith(prefix))


def test_a_checkpoint_of_the_same_classes_loads_whole(tmp_path) -> None:
    source = _trained()
    path = _save_udtimm(tmp_path / "same.safetensors", source)
    model = _trained(seed=2)
    message = load_initial_checkpoint(model, path, CLASSES)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in model.state_dict().items())
    assert "the classifier" in message and "the calibration branch" in message and "left at random: nothing" in message


def test_another_class_list_loads_the_backbone_and_leaves_the_heads(tmp_path) -> None:
    source = _trained()
    path = _save_udtimm(tmp_path / "other.safetensors", source, classes=["a", "b", "c", "zebra"])
    model = _trained(seed=2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    message = load_initial_checkpoint(model, path, CLASSES)
    state = model.state_dict()
    head = ("backbone.fc.", "cal_head.")
    assert all(torch.equal(state[key], source.state_dict()[key]) for key in state if not key.startswith(head))
    assert all(torch.equal(state[key], before[key]) for key in state if key.startswith(head))
    assert "left at random: the classifier (the file was trained on other classes)" in message


def test_the_backbone_passes_between_a_linear_and_a_spatial_head(tmp_path) -> None:
    """A linear checkpoint starts a CSRA model (backbone and calibration branch; the head stays at random), a CSRA
    checkpoint starts another CSRA model whole, and a linear one from its backbone."""
    linear = _trained()
    csra = create_model(ModelSettings("test_resnet", head="csra"), len(CLASSES), cal=True)
    message = load_initial_checkpoint(csra, _save_udtimm(tmp_path / "linear.safetensors", linear), CLASSES)
    assert _equal(csra, linear, "backbone.") and _equal(csra, linear, "cal_head.")
    assert "loaded the backbone" in message and "left at random: the csra head (not in the file)" in message
    whole = create_model(ModelSettings("test_resnet", head="csra"), len(CLASSES), cal=True)
    message = load_initial_checkpoint(whole, _save_udtimm(tmp_path / "csra.safetensors", csra), CLASSES)
    assert _equal(whole, csra, "") and "the csra head" in message and "left at random: nothing" in message
    back = _trained(seed=2)
    message = load_initial_checkpoint(back, str(tmp_path / "csra.safetensors"), CLASSES)
    assert _equal(back, csra, "backbone.layer") and "left at random: the classifier (not in the file)" in message


def test_plain_timm_weights_load_into_the_backbone(tmp_path) -> None:
    torch.manual_seed(3)
    plain = timm.create_model("test_resnet", num_classes=1000)
    for name, write in (("w.safetensors", lambda p: save_file(plain.state_dict(), p)),
                        ("w.pth", lambda p: torch.save({"state_dict": plain.state_dict()}, p))):
        write(str(tmp_path / name))
        model = _trained(seed=2)
        message = load_initial_checkpoint(model, str(tmp_path / name), CLASSES)
        assert _equal(model.backbone, plain, "layer4.") and _equal(model.backbone, plain, "conv1.")
        assert "the classifier (the file has no class list)" in message


def test_a_model_without_calibration_branch_takes_a_calibrated_checkpoint(tmp_path) -> None:
    path = _save_udtimm(tmp_path / "cal.safetensors", _trained())
    message = load_initial_checkpoint(_trained(seed=2, cal=False), path, CLASSES)
    assert "loaded the backbone" in message and "the classifier" in message


def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path) -> None:
    other = timm.create_model("resnet10t", num_classes=4)
    save_file(other.state_dict(), str(tmp_path / "r10.safetensors"))
    with pytest.raises(WeightsError, match=r"r10.safetensors does not fit ResNet.s backbone: missing .*shape .*conv1"):
        load_initial_checkpoint(_trained(), str(tmp_path / "r10.safetensors"), CLASSES)
    wide = create_model(ModelSettings("test_resnet"), len(CLASSES), cal=True, cal_width=16)
    path = _save_udtimm(tmp_path / "wide.safetensors", wide)
    with pytest.raises(WeightsError, match=r"calibration branch: shape \['cal_head.0.weight: file \(16, "):
        load_initial_checkpoint(_trained(), path, CLASSES)


def test_unreadable_files_are_named(tmp_path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(WeightsError, match="bad.safetensors is not a readable safetensors file"):
        read_weights(str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(str(tmp_path / "missing.pth"))
    torch.save({"epoch": 3}, str(tmp_path / "empty.pth"))
    with pytest.raises(WeightsError, match="holds no tensors"):
        read_weights(str(tmp_path / "empty.pth"))


def test_pretrained_path_takes_a_udtimm_checkpoint_it_used_to_skip(tmp_path) -> None:
    source = _trained()
    path = _save_udtimm(tmp_path / "best.safetensors", source)
    assert json.loads(read_weights(path)[1]["class_names"]) == CLASSES
    model = create_model(ModelSettings("test_resnet", pretrained_path=path), 7)
    assert _equal(model.backbone, source.backbone, "layer1.") and _equal(model.backbone, source.backbone, "conv1.")


def test_pretrained_path_refuses_weights_that_name_nothing_in_the_model(tmp_path) -> None:
    other = timm.create_model("resnet10t", num_classes=4)
    save_file(other.state_dict(), str(tmp_path / "r10.safetensors"))
    with pytest.raises(ModelConfigError, match="r10.safetensors"):
        create_model(ModelSettings("test_resnet", pretrained_path=str(tmp_path / "r10.safetensors")), 4)
    renamed = {f"encoder.{key}": value for key, value in timm.create_model("test_resnet").state_dict().items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises((WeightsError, ModelConfigError), match="missing \\['conv1"):
        create_model(ModelSettings("test_resnet", pretrained_path=str(tmp_path / "renamed.safetensors")), 4)


def test_pretrained_path_lets_timm_resample_a_position_embedding(tmp_path) -> None:
    source = timm.create_model("test_vit", img_size=64)
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(tmp_path / "v.safetensors"))
    model = create_model(ModelSettings("test_vit", pretrained_path=str(tmp_path / "v.safetensors")), 4, img_size=32)
    assert model.backbone.pos_embed.shape != source.pos_embed.shape  # resampled by timm's filter, not refused
    assert _equal(model.backbone, source, "blocks.0.")
