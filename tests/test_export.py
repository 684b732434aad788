"""udtimm.export: the digits checkpoint through plain timm, onnxruntime and TorchScript gives udtimm's scores;
model_args, thresholds, temperatures and biases (calibrated in the ONNX and TorchScript graphs) and the hub upload;
missing optional packages."""

import json
import os
import shutil
import sys

import onnxruntime
import pytest
import timm
import torch
from conftest import OPENIMAGES_CLASSES, copy_with_thresholds, model_labelled_csv
from safetensors.torch import load_file

import validate
from udtimm import Predictor, checkpoint, export, thresholds, tuning
from udtimm.calibration import FittedCalibration, ScoreCalibration
from udtimm.config import ConfigError
from udtimm.data.base import read_image
from udtimm.model import create_model
from udtimm.settings import ModelSettings


@pytest.fixture(scope="module")
def digit_pixels(tiny_checkpoint: str, tiny_digits: str) -> torch.Tensor:
    """Five digits test images resized as validate.py and Predictor do: uint8 [5, 3, 32, 32]."""
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    folder = os.path.join(tiny_digits, "VOC2007", "JPEGImages")
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))[-5:]]
    return torch.stack([predictor.pixels(read_image(path)) for path in paths])


@pytest.fixture(scope="module")
def digit_batch(tiny_checkpoint: str, digit_pixels: torch.Tensor) -> torch.Tensor:
    """The five images normalised as validate.py and Predictor do: [5, 3, 32, 32]."""
    return Predictor.from_checkpoint(tiny_checkpoint).normalize(digit_pixels)


@pytest.fixture(scope="module")
def udtimm_scores(tiny_checkpoint: str, digit_batch: torch.Tensor) -> torch.Tensor:
    model, _ = checkpoint.model_from_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        return torch.sigmoid(model.eval()(digit_batch).logits)


def export_to(tiny_checkpoint: str, directory: str, fmt: str) -> list[str]:
    return export.main(["--checkpoint", tiny_checkpoint, "--out", directory, "--format", fmt])


@pytest.mark.slow
def test_timm_format_loads_in_plain_timm_with_udtimm_scores(tiny_checkpoint: str, tmp_path,
                                                             digit_batch: torch.Tensor,
                                                             udtimm_scores: torch.Tensor) -> None:
    out = str(tmp_path / "timm")
    assert export_to(tiny_checkpoint, out, "timm") == [os.path.join(out, "config.json"),
                                                      os.path.join(out, "model.safetensors")]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no staging folder left
    metadata = checkpoint.read_metadata(tiny_checkpoint)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["label_names"] == checkpoint.class_names(metadata)
    data = config["pretrained_cfg"]
    assert data["input_size"] == [3, 32, 32] and (data["crop_pct"], data["crop_mode"]) == (1.0, "squash")
    assert data["mean"] == json.loads(metadata["mean"]) and data["std"] == json.loads(metadata["std"])
    assert config["udtimm"]["checkpoint"] == "best.safetensors" and "thresholds" not in config["udtimm"]
    # The inference model only: timm's own keys, no calibration branch, no `backbone.` prefix.
    assert set(load_file(os.path.join(out, "model.safetensors"))) == set(
        timm.create_model("test_resnet", num_classes=10).state_dict())

    by_directory = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # The overlay names the file's num_classes too: otherwise timm takes it for a 1000-class ImageNet file and
    # leaves the classifier at random (docs/deployment.md says so).
    by_file = timm.create_model("test_resnet", pretrained=True, num_classes=10, pretrained_cfg_overlay={
        "file": os.path.join(out, "model.safetensors"), "num_classes": 10}).eval()
    with torch.no_grad():
        for model in (by_directory, by_file):
            torch.testing.assert_close(torch.sigmoid(model(digit_batch)), udtimm_scores, rtol=0, atol=1e-6)
    # Predictor loads the export directory as it loads the checkpoint.
    from_export = Predictor.from_checkpoint(out)
    assert (from_export.class_names, from_export.img_size, from_export.mean) == (
        checkpoint.class_names(metadata), 32, json.loads(metadata["mean"]))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_onnx_and_torchscript_give_udtimm_scores_at_any_batch_size(fmt: str, tiny_checkpoint: str, tmp_path,
                                                                   digit_batch: torch.Tensor,
                                                                   udtimm_scores: torch.Tensor, capsys) -> None:
    out = str(tmp_path / fmt)
    written = export_to(tiny_checkpoint, out, fmt)
    assert sorted(os.path.basename(path) for path in written) == sorted(["config.json", export.FILES[fmt]])
    assert "largest difference from udtimm's scores" in capsys.readouterr().out
    for batch in (digit_batch[:1], digit_batch):  # exported with a batch of 2: the batch axis is free
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(written[1], providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["images"]
            found = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
        else:
            with export.torchscript_without_deprecation_warnings(), torch.no_grad():
                found = torch.jit.load(written[1])(batch)
        assert found.shape == (len(batch), 10)
        assert (found - udtimm_scores[:len(batch)]).abs().max() < 1e-4


def test_model_kwargs_and_thresholds_travel_in_config_json(tmp_path) -> None:
    # A checkpoint with --model-kwargs output_stride=16: the same weights in a network with other strides.
    model = create_model(ModelSettings("test_resnet", model_kwargs={"output_stride": 16}), 3, cal=True).eval()
    path = str(tmp_path / "best.safetensors")
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata(
        "test_resnet", model, ["a", "b", "c"], None, 32, [0.5] * 3, [0.25] * 3, model_kwargs={"output_stride": 16}))
    values = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    tuned = thresholds.TunedThresholds(values, torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    entries = tuning.thresholds_entries(["a", "b", "c"], tuned, thresholds.parse_objective("f1"), "csv:val", 9)
    record = tuning.tuning_record(path, entries)
    tuning.save_tuning(path, record)
    out = str(tmp_path / "export")
    export.export(path, out, "timm")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_args"]["output_stride"] == 16 and config["udtimm"]["thresholds"] == record
    images = torch.randn(2, 3, 32, 32)
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images).logits, rtol=0, atol=1e-5)
        plain_stride = timm.create_model("test_resnet", num_classes=3).eval()
        plain_stride.load_state_dict(rebuilt.state_dict())
        assert (plain_stride(images) - model(images).logits).abs().max() > 1e-3  # the kwargs matter
    assert torch.equal(Predictor.from_checkpoint(out).thresholds, values)
    assert Predictor.from_checkpoint(out, stored_tuning=False).thresholds is None


def test_push_to_hub_uploads_the_timm_format(tiny_checkpoint: str, tmp_path, monkeypatch,
                                             digit_batch: torch.Tensor, udtimm_scores: torch.Tensor) -> None:
    calls = {}

    class FakeApi:  # huggingface_hub.HfApi without the network
        def __init__(self, **kwargs: object) -> None:
            calls["api"] = kwargs

        def create_repo(self, repo_id: str, private: bool, exist_ok: bool) -> object:
            calls["create_repo"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def file_exists(self, repo_id: str, filename: str, revision: object = None) -> bool:
            return False

        def upload_folder(self, repo_id: str, folder_path: str, **kwargs: object) -> str:
            calls["files"] = sorted(os.listdir(folder_path))
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(timm.models._hub, "HfApi", FakeApi)
    export.main(["--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "local"), "--push-to-hub", "me/digits",
                 "--private"])
    assert calls["create_repo"] == ("me/digits", True, True)
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]  # no pickled weights
    uploaded = tmp_path / "uploaded"
    assert json.load(open(uploaded / "config.json")) == json.load(open(tmp_path / "local" / "config.json"))
    readme = (uploaded / "README.md").read_text()
    assert "hf-hub:me/digits" in readme and "zero, one, two" in readme
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{uploaded}", pretrained=True).eval()
        torch.testing.assert_close(torch.sigmoid(model(digit_batch)), udtimm_scores, rtol=0, atol=1e-6)


def test_missing_optional_packages_name_what_to_install(tiny_checkpoint: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "onnx"
    with pytest.raises(export.MissingDependencyError, match="--format onnx needs onnxscript, onnxruntime, which is "
                                                            "not installed: pip install onnxscript onnxruntime"):
        export.main(["--checkpoint", tiny_checkpoint, "--out", str(out), "--format", "onnx"])
    assert not out.exists()


def test_an_export_that_differs_is_refused_and_nothing_is_written(tiny_checkpoint: str, tmp_path,
                                                                  monkeypatch) -> None:
    found = export.exported_scores
    monkeypatch.setattr(export, "exported_scores", lambda *args: found(*args) + 1e-3)
    out = tmp_path / "timm"
    with pytest.raises(export.ExportMismatchError, match="up to 0.001 away from udtimm's"):
        export.export(tiny_checkpoint, str(out), "timm")
    assert os.listdir(out) == []


def test_flags_that_do_not_fit_are_refused(tiny_checkpoint: str) -> None:
    for flags, message in ((["--format", "onnx", "--push-to-hub", "me/x"], "uploads the timm format"),
                           (["--private"], "give --push-to-hub")):
        with pytest.raises(ConfigError, match=message):
            export.main(["--checkpoint", tiny_checkpoint, "--out", "x", *flags])


@pytest.mark.slow
@pytest.mark.parametrize(("head", "options", "backbone", "img_size"), [
    ("ml-decoder", {"embed_dim": 16, "num_heads": 2, "ff_dim": 32}, "test_vit", 32),
    ("csra", {"num_heads": 2}, "test_resnet", 64),  # T = 1 and T = inf (max pooling) on a 2 x 2 map
])
def test_a_spatial_head_exports_to_onnx_and_torchscript_and_timm_refuses_it(head: str, options: dict, backbone: str,
                                                                            img_size: int, tmp_path) -> None:
    model = create_model(ModelSettings(backbone, head=head, head_kwargs=options), 3, cal=True, img_size=img_size).eval()
    path = str(tmp_path / "best.safetensors")
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata(backbone, model, ["a", "b", "c"], None,
                                                                      img_size, [0.5] * 3, [0.25] * 3))
    images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.sigmoid(model(images).logits)
    for fmt in ("onnx", "torchscript"):
        out = str(tmp_path / fmt)
        difference = export.export(path, out, fmt)[1]
        assert difference < export.TOLERANCE
        for batch in (1, 3):  # exported with a batch of 2: the batch axis is free
            assert (export.exported_scores(fmt, out, images[:batch]) - expected[:batch]).abs().max() < 1e-4
        config = json.load(open(os.path.join(out, "config.json")))
        assert (config["udtimm"]["head"], config["udtimm"]["head_kwargs"]) == (head, model.head_kwargs)
    with pytest.raises(ConfigError, match=f"has the {head} head, which plain timm cannot build: export it with "
                                          "--format onnx or --format torchscript"):
        export.export(path, str(tmp_path / "timm"), "timm")
    assert not os.path.exists(tmp_path / "timm")


@pytest.mark.slow
def test_calibrated_checkpoint_round_trip_gives_predictor_scores_in_every_format(
        tiny_checkpoint: str, tiny_digits: str, tmp_path, digit_pixels: torch.Tensor,
        digit_batch: torch.Tensor) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(tiny_checkpoint, checkpoint_copy)
    # Labels that Platt scaling fits on the tiny model (the digits ones it ranks backwards: conftest says why).
    (tmp_path / "csv").mkdir()
    data_flags = model_labelled_csv(tiny_checkpoint, tiny_digits, str(tmp_path / "csv"))
    validate.main(["--checkpoint", checkpoint_copy, *data_flags, "--calibrate", "platt"])
    predictor = Predictor.from_checkpoint(checkpoint_copy)
    temperatures, biases = predictor.calibration.temperatures, predictor.calibration.biases
    assert not torch.allclose(temperatures, torch.ones_like(temperatures), atol=1e-3) and biases.abs().max() > 1e-3
    expected = predictor.scores(digit_pixels)
    with torch.no_grad():
        logits = Predictor.from_checkpoint(checkpoint_copy, stored_tuning=False).model(digit_batch)
    torch.testing.assert_close(expected, torch.sigmoid(logits.double() / temperatures + biases).float(), rtol=0,
                               atol=1e-6)
    card = export.model_card(export.load_exportable(checkpoint_copy))
    assert card["details"]["Calibration"].startswith("platt temperatures and biases fitted on csv:val")
    assert card["details"]["Calibration"].endswith("(logits / T + b)")
    assert "scores = torch.sigmoid(model(images) / T + b)" in card["usage"]  # the scores its thresholds were tuned on
    for fmt in export.FORMATS:
        out = str(tmp_path / fmt)
        export.export(checkpoint_copy, out, fmt)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["udtimm"]["thresholds"]["calibration"]["method"] == "platt"
        assert config["udtimm"]["calibration_in_graph"] is (fmt != "timm")
        if fmt == "timm":  # logits in the weights: Predictor applies config.json's temperatures and biases
            from_export = Predictor.from_checkpoint(out)
            assert torch.equal(from_export.calibration.temperatures, temperatures)
            assert torch.equal(from_export.calibration.biases, biases)
            found = from_export.scores(digit_pixels)
        else:
            found = export.exported_scores(fmt, out, digit_batch)
        assert (found - expected).abs().max() < 1e-5, fmt


@pytest.mark.slow
def test_ten_thousand_classes_export_to_onnx_with_their_thresholds_and_calibration_in_the_graph(
        many_classes_checkpoint: str, tmp_path) -> None:
    checkpoint_copy, names, tuned = copy_with_thresholds(many_classes_checkpoint, tmp_path, 0.3, 0.9)
    fitted = FittedCalibration(ScoreCalibration(torch.linspace(0.5, 2.0, len(names), dtype=torch.float64),
                                                torch.linspace(-1.0, 1.0, len(names), dtype=torch.float64)),
                               torch.ones(len(names), dtype=torch.bool), 1.0)
    tuning.save_tuning(checkpoint_copy, tuning.tuning_record(
        checkpoint_copy, tuning.thresholds_entries(names, tuned, thresholds.parse_objective("f1"), "oi:val", 9),
        tuning.calibration_entry(names, fitted, "platt", "oi:val", 9)))
    out = str(tmp_path / "onnx")
    written, difference = export.export(checkpoint_copy, out, "onnx")
    assert difference < export.TOLERANCE
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    predictor = Predictor.from_checkpoint(checkpoint_copy)
    with torch.no_grad():
        expected = torch.sigmoid(predictor.model(images).double() / fitted.calibration.temperatures
                                 + fitted.calibration.biases).float()
    found = export.exported_scores("onnx", out, images)
    assert found.shape == (3, OPENIMAGES_CLASSES) and (found - expected).abs().max() < 1e-5
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["label_names"] == names and config["udtimm"]["calibration_in_graph"] is True
    assert torch.equal(tuning.thresholds_tensor(config["udtimm"]["thresholds"], names, "config.json"), tuned.values)
    # The weights dominate the file (a 512 x 10,000 classifier in float32: 20 MB), and the card names no class.
    assert os.path.getsize(os.path.join(out, "model.onnx")) < 30_000_000
    assert export.model_card(export.load_exportable(checkpoint_copy))["details"]["Classes"] == \
        "10,000 (config.json label_names)"


@pytest.mark.slow
def test_ml_decoder_of_ten_thousand_classes_decodes_100_groups_and_exports_to_onnx(tmp_path) -> None:
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    decoder = ModelSettings("test_vit", head="ml-decoder", head_kwargs={"embed_dim": 16, "num_heads": 2, "ff_dim": 32})
    model = create_model(decoder, len(names), cal=False, img_size=32).eval()
    # 100 queries (num_groups), each decoding 100 classes: the query embedding stays 100 x embed_dim.
    assert model.head.queries.shape == (100, 16) and model.head.group_weight.shape == (100, 16, 100)
    path = str(tmp_path / "best.safetensors")
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata("test_vit", model, names, None, 32, [0.5] * 3,
                                                                      [0.25] * 3))
    out = str(tmp_path / "onnx")
    assert export.export(path, out, "onnx")[1] < export.TOLERANCE
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.sigmoid(model(images).logits)
    found = export.exported_scores("onnx", out, images)
    assert found.shape == (3, OPENIMAGES_CLASSES) and (found - expected).abs().max() < 1e-4
