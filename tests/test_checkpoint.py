import json
import os
import pickle

import pytest
import torch
from conftest import OPENIMAGES_CLASSES

from udtimm import checkpoint
from udtimm.checkpoint import CheckpointError
from udtimm.model import create_model
from udtimm.settings import ModelSettings


def save_tiny(path: str, classes: list[str], cal: bool = True) -> torch.nn.Module:
    model = create_model(ModelSettings("test_resnet"), len(classes), cal=cal)
    metadata = checkpoint.model_metadata("test_resnet", model, classes, None, 32, [0.5] * 3, [0.25] * 3,
                                         dataset="digits", epoch=3)
    checkpoint.save_checkpoint(path, model, metadata)
    return model


def test_roundtrip_rebuilds_the_model_from_metadata_alone(tmp_path) -> None:
    path = str(tmp_path / "m.safetensors")
    model = save_tiny(path, ["a", "b", "c"]).eval()
    loaded, metadata = checkpoint.model_from_checkpoint(path)
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    torch.testing.assert_close(loaded(x).cal_logits, model(x).cal_logits)
    assert checkpoint.class_names(metadata) == ["a", "b", "c"] and metadata["epoch"] == "3"
    assert json.loads(metadata["std"]) == [0.25] * 3 and metadata["cal_width"] == "512"


def test_a_spatial_head_and_its_options_come_back_from_the_metadata(tmp_path) -> None:
    """The head and every option (defaults included) are stored; a checkpoint written before the heads existed
    (no `head` entries) is a linear one."""
    model = create_model(ModelSettings("test_resnet", head="csra", head_kwargs={"num_heads": 2, "lam": 0.5}), 3).eval()
    metadata = checkpoint.model_metadata("test_resnet", model, ["a", "b", "c"], None, 64, [0.5] * 3, [0.25] * 3)
    assert (metadata["head"], json.loads(metadata["head_kwargs"])) == \
        ("csra", {"lam": 0.5, "num_heads": 2, "temperatures": None})
    path = str(tmp_path / "csra.safetensors")
    checkpoint.save_checkpoint(path, model, metadata)
    loaded = checkpoint.load_for_inference(path).model
    x = torch.randn(2, 3, 64, 64)
    assert loaded.head_name == "csra" and loaded.head.temperatures == (1.0, float("inf"))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    old = str(tmp_path / "old.safetensors")
    linear = save_tiny(old, ["a", "b"])
    checkpoint.save_checkpoint(old, linear, {key: value for key, value in checkpoint.read_metadata(old).items()
                                             if not key.startswith("head")})
    assert checkpoint.load_for_inference(old).model.head_name == "linear"


def test_load_for_inference_gives_the_model_in_eval_mode_with_its_input(tmp_path) -> None:
    path = str(tmp_path / "m.safetensors")
    model = save_tiny(path, ["a", "b", "c"]).eval()
    loaded = checkpoint.load_for_inference(path, "cpu")
    assert not loaded.model.training and next(loaded.model.parameters()).device == torch.device("cpu")
    assert (loaded.class_names, loaded.img_size, loaded.mean, loaded.std) == (["a", "b", "c"], 32, [0.5] * 3,
                                                                               [0.25] * 3)
    assert loaded.metadata["dataset"] == "digits" and loaded.metadata["epoch"] == "3"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x).logits, model(x).logits)


def test_load_for_inference_refuses_a_checkpoint_without_its_preprocessing(tmp_path) -> None:
    model = create_model(ModelSettings("test_resnet"), 2)
    metadata = checkpoint.model_metadata("test_resnet", model, ["a", "b"], None, 32, [0.5] * 3, [0.25] * 3)
    path = str(tmp_path / "old.safetensors")
    checkpoint.save_checkpoint(path, model, {key: value for key, value in metadata.items() if key != "mean"})
    with pytest.raises(CheckpointError, match=r"old\.safetensors lacks the metadata \['mean'\]"):
        checkpoint.load_for_inference(path)


def test_check_classes_names_the_file_the_dataset_and_what_differs() -> None:
    checkpoint.check_classes("m.safetensors", ["a", "b"], ["a", "b"], "digits")
    with pytest.raises(CheckpointError, match=r"^m\.safetensors was trained on other classes than digits \(only in "
                                              r"the checkpoint: \['c'\]; only in the dataset: \['d'\]\)$"):
        checkpoint.check_classes("m.safetensors", ["a", "c"], ["a", "d"], "digits")
    with pytest.raises(CheckpointError, match="same names in another order"):
        checkpoint.check_classes("m.safetensors", ["b", "a"], ["a", "b"], "digits")


def test_check_classes_of_ten_thousand_classes_says_what_differs_in_one_short_line() -> None:
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    renamed = [name.upper() if index % 2 else name for index, name in enumerate(names)]
    with pytest.raises(CheckpointError) as refused:
        checkpoint.check_classes("m.safetensors", names, renamed, "openimages")
    message = str(refused.value)
    assert message.startswith("m.safetensors was trained on other classes than openimages (only in the checkpoint: "
                              "['class00001', 'class00003', ") and len(message) < 600
    assert message.count("... 4,990 more]") == 2


def test_no_temporary_files_are_left_behind(tmp_path) -> None:
    save_tiny(str(tmp_path / "m.safetensors"), ["a", "b"])
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "best.safetensors")
    save_tiny(path, ["a", "b"])
    before = open(path, "rb").read()

    def disk_full(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_tiny(path, ["a", "b"])
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["best.safetensors"]


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path) -> None:
    path = str(tmp_path / "m.safetensors")
    save_tiny(path, ["a", "b"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        checkpoint.model_from_checkpoint(path)


def test_missing_and_foreign_checkpoints_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_metadata(str(tmp_path / "none.safetensors"))
    from safetensors.torch import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not written by udtimm"):
        checkpoint.model_from_checkpoint(foreign)


def test_weights_of_another_shape_name_the_keys(tmp_path) -> None:
    path = str(tmp_path / "m.safetensors")
    save_tiny(path, ["a", "b", "c"])
    tensors, _ = checkpoint.load_checkpoint(path)
    other = create_model(ModelSettings("test_resnet"), 5, cal=True)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load_weights(other, tensors, path)


def test_training_state_survives_a_kill_between_the_renames(tmp_path) -> None:
    model = create_model(ModelSettings("test_resnet"), 2)
    metadata = checkpoint.model_metadata("test_resnet", model, ["a", "b"], None, 32, [0.5] * 3, [0.5] * 3)
    for epoch in range(2):
        checkpoint.save_training_state(str(tmp_path), model, metadata, {"optimizer": {}},
                                       {"epoch": epoch, "num_updates": epoch, "best": 0.0})
    # A kill after "state" was moved aside but before "state.tmp" took its place.
    os.rename(tmp_path / "state", tmp_path / "state.old")
    assert checkpoint.find_training_state(str(tmp_path)).endswith("state.old")
    _, _, progress = checkpoint.load_training_state(checkpoint.find_training_state(str(tmp_path)))
    assert progress["epoch"] == 1


@pytest.mark.parametrize("links", [True, False])
def test_last_and_best_share_the_states_weights_file_and_outlive_it(tmp_path, monkeypatch, links: bool) -> None:
    if not links:  # a file system without hard links: copies
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no links here")))
    metadata = checkpoint.model_metadata("test_resnet", create_model(ModelSettings("test_resnet"), 2), ["a", "b"], None,
                                         32, [0.5] * 3, [0.5] * 3)
    last, best = str(tmp_path / "last.safetensors"), str(tmp_path / "best.safetensors")
    saved = []
    for epoch, also_at in enumerate(([last, best], [last])):  # epoch 1 does not improve: best stays epoch 0's
        torch.manual_seed(epoch)
        model = create_model(ModelSettings("test_resnet"), 2)
        saved.append(model.state_dict())
        checkpoint.save_training_state(str(tmp_path), model, {**metadata, "epoch": str(epoch)}, {"optimizer": {}},
                                       {"epoch": epoch, "num_updates": epoch, "best": 0.0}, also_at)
    weights = str(tmp_path / "state" / "weights.safetensors")
    assert os.path.samefile(last, weights) == links
    for path, epoch in ((weights, 1), (last, 1), (best, 0)):
        tensors, meta = checkpoint.load_checkpoint(path)
        assert meta["epoch"] == str(epoch)
        assert all(torch.equal(tensors[key], value) for key, value in saved[epoch].items())


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_optimizer_state_with_a_pickle_payload_is_refused(tmp_path) -> None:
    model = create_model(ModelSettings("test_resnet"), 2)
    metadata = checkpoint.model_metadata("test_resnet", model, ["a", "b"], None, 32, [0.5] * 3, [0.5] * 3)
    checkpoint.save_training_state(str(tmp_path), model, metadata, {"optimizer": {}},
                                   {"epoch": 0, "num_updates": 0, "best": 0.0})
    with open(tmp_path / "state" / "optimizer.pt", "wb") as handle:
        pickle.dump({"optimizer": Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_training_state(str(tmp_path / "state"))


def test_ema_weights_are_part_of_the_state_and_a_state_without_them_is_refused(tmp_path) -> None:
    model, ema = create_model(ModelSettings("test_resnet"), 2), create_model(ModelSettings("test_resnet"), 2)
    metadata = checkpoint.model_metadata("test_resnet", model, ["a", "b"], None, 32, [0.5] * 3, [0.25] * 3)
    best = str(tmp_path / "best.safetensors")
    checkpoint.save_training_state(str(tmp_path), model, metadata, {}, {"epoch": 0}, ema=(ema, metadata),
                                   ema_also_at=[best])
    state = os.path.join(str(tmp_path), "state")
    assert os.path.samefile(best, os.path.join(state, "ema.safetensors"))
    restored = create_model(ModelSettings("test_resnet"), 2)
    checkpoint.load_ema_state(state, restored)
    assert all(torch.equal(value, ema.state_dict()[key]) for key, value in restored.state_dict().items())
    os.remove(os.path.join(state, "ema.safetensors"))
    with pytest.raises(CheckpointError, match="--model-ema"):
        checkpoint.load_ema_state(state, restored)
