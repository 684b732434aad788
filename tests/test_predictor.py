"""udtimm.Predictor: the same scores from paths, PIL images and tensors (and validate.py's: test_validate.py),
stored thresholds, temperatures and biases, bad inputs named before any work."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OPENIMAGES_CLASSES, TINY_DIGITS, copy_with_thresholds
from PIL import Image

import udtimm
from udtimm import Predictor, checkpoint, thresholds, tuning
from udtimm import predictor as predictor_module
from udtimm.calibration import FittedCalibration, ScoreCalibration
from udtimm.checkpoint import CheckpointError
from udtimm.data import build_dataset
from udtimm.data.base import CorruptImageError, DatasetError, read_image
from udtimm.metrics import predicted_labels


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: str) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def png_images(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five test scenes cropped to 64 x 64 and saved losslessly: every decoder reads the same pixels."""
    folder = tmp_path_factory.mktemp("pngs")
    dataset = build_dataset("digits", tiny_digits, "test", **TINY_DIGITS)
    paths = []
    for i, sample in enumerate(dataset.samples[:5]):
        path = str(folder / f"{i}.png")
        Image.open(sample.path).convert("RGB").crop((0, 0, 64, 64)).save(path)
        paths.append(path)
    return paths


def scores_of(table: pd.DataFrame, predictor: Predictor) -> torch.Tensor:
    return torch.tensor(table[predictor.class_names].to_numpy())


def test_paths_pil_images_and_tensors_give_the_same_scores(predictor: Predictor, png_images: list[str]) -> None:
    from_paths = predictor.predict(png_images, batch_size=2)
    assert list(from_paths.columns) == ["image", "labels", *predictor.class_names]
    assert from_paths["image"].tolist() == png_images
    scores = scores_of(from_paths, predictor)
    assert scores.dtype == torch.float32 and ((scores > 0) & (scores < 1)).all()
    expected_labels = [";".join(name for name, on in zip(predictor.class_names, row, strict=True) if on)
                       for row in (scores >= 0.5).tolist()]
    assert from_paths["labels"].tolist() == expected_labels

    from_pil = predictor.predict([Image.open(path) for path in png_images], batch_size=3)
    from_tensor = predictor.predict(torch.stack([read_image(path) for path in png_images]), batch_size=4)
    assert from_pil["image"].tolist() == from_tensor["image"].tolist() == [f"#{i}" for i in range(5)]
    for other in (from_pil, from_tensor):  # float32 noise of other batch compositions at most
        torch.testing.assert_close(scores_of(other, predictor), scores, rtol=0, atol=1e-6)
    one = predictor.predict(png_images[0])  # a single path, and a single PIL image
    assert len(one) == 1 and len(predictor.predict(Image.open(png_images[0]))) == 1
    torch.testing.assert_close(scores_of(one, predictor)[0], scores[0], rtol=0, atol=1e-6)


def test_a_sixteen_bit_pil_image_scores_as_its_file(predictor: Predictor, tmp_path) -> None:
    image = Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 34)  # mode I;16, up to 65246
    image.save(tmp_path / "gray16.png")
    from_file = scores_of(predictor.predict(str(tmp_path / "gray16.png")), predictor)
    torch.testing.assert_close(scores_of(predictor.predict(image), predictor), from_file)  # float32's tolerance


def test_stored_thresholds_are_used_unless_a_threshold_is_given(tiny_checkpoint: str, png_images: list[str],
                                                                tmp_path) -> None:
    checkpoint_copy, names, tuned = copy_with_thresholds(tiny_checkpoint, tmp_path, 0.05, 0.95)
    values = tuned.values
    record = tuning.tuning_record(checkpoint_copy, tuning.thresholds_entries(
        names, tuned, thresholds.parse_objective("f1"), "digits:val", 20))
    tuning.save_tuning(checkpoint_copy, record)

    loaded = Predictor.from_checkpoint(checkpoint_copy)
    assert torch.equal(loaded.thresholds, values)
    table = loaded.predict(png_images)
    scores = scores_of(table, loaded)
    assert table["labels"].tolist() == labels_of(scores >= values, names)
    assert loaded.predict(png_images, threshold=0.3)["labels"].tolist() == labels_of(scores >= 0.3, names)
    top1 = loaded.predict(png_images, threshold=0.0, topk=1)["labels"].tolist()
    assert top1 == [names[i] for i in scores.argmax(1).tolist()]
    assert predicted_labels(scores, values, 2).sum(1).max() <= 2
    assert Predictor.from_checkpoint(checkpoint_copy, stored_tuning=False).thresholds is None


def labels_of(mask: torch.Tensor, names: list[str]) -> list[str]:
    return [";".join(name for name, on in zip(names, row, strict=True) if on) for row in mask.tolist()]


def test_bad_inputs_are_named_before_any_image_is_labelled(predictor: Predictor, png_images: list[str], tmp_path,
                                                           monkeypatch) -> None:
    def no_work(*args: object) -> None:
        raise AssertionError("an image was labelled before the bad input was found")

    monkeypatch.setattr(predictor, "scores", no_work)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    cases = [
        ([png_images[0], str(tmp_path / "missing.jpg")], DatasetError, "missing.jpg is neither an image file"),
        ([png_images[0], str(tmp_path / "notes.txt")], CorruptImageError, "notes.txt is not an image"),
        ([png_images[0], str(tmp_path / "empty")], DatasetError, f"no image files in {tmp_path}"),
        (str(tmp_path / "*.jpg"), DatasetError, "no file matches"),
        (torch.rand(2, 3, 32, 32), ValueError, "expected a uint8 tensor"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), ValueError, r"got shape \[3, 32, 32\]: add the batch dimension"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), ValueError, r"\[N, 3, H, W\]"),
        (torch.zeros(0, 3, 32, 32, dtype=torch.uint8), ValueError, "N >= 1"),
        ([png_images[0], Image.open(png_images[0])], TypeError, r"a list of \['PngImageFile', 'str'\]"),
        ([], ValueError, "none given"),
    ]
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            predictor.predict(images)


def test_api_and_class_names_that_clash_with_the_columns(predictor: Predictor) -> None:
    assert udtimm.Predictor is predictor_module.Predictor and "Predictor" in udtimm.__all__
    with pytest.raises(CheckpointError, match=r"class name\(s\) \['labels'\] clash"):
        Predictor(predictor.model, ["labels", *predictor.class_names[1:]], 32, [0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        predictor.predict(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), batch_size=0)


def test_stored_temperatures_and_biases_calibrate_the_scores(tiny_checkpoint: str, png_images: list[str],
                                                             tmp_path) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(tiny_checkpoint, checkpoint_copy)
    names = checkpoint.class_names(checkpoint.read_metadata(checkpoint_copy))
    temperatures = torch.linspace(0.5, 3.0, len(names), dtype=torch.float64)
    biases = torch.linspace(-2.0, 1.0, len(names), dtype=torch.float64)
    fitted = FittedCalibration(ScoreCalibration(temperatures, biases), torch.ones(len(names), dtype=torch.bool), 1.5)
    entry = tuning.calibration_entry(names, fitted, "platt", "digits:val", 20)
    tuning.save_tuning(checkpoint_copy, tuning.tuning_record(checkpoint_copy, calibration=entry))

    calibrated = Predictor.from_checkpoint(checkpoint_copy)
    plain = Predictor.from_checkpoint(checkpoint_copy, stored_tuning=False)
    assert torch.equal(calibrated.calibration.temperatures, temperatures) and calibrated.thresholds is None
    assert torch.equal(calibrated.calibration.biases, biases) and plain.calibration is None
    found = scores_of(calibrated.predict(png_images), calibrated)
    raw = scores_of(plain.predict(png_images), plain).double()
    # float32 probabilities: the logits recovered from them carry ~1e-7 relative error.
    torch.testing.assert_close(found.double(), torch.sigmoid(torch.logit(raw) / temperatures + biases), rtol=0,
                               atol=1e-5)
    assert (found.double() - raw).abs().max() > 1e-2


def test_asl_scores_cut_at_the_default_threshold_are_warned_about(predictor: Predictor) -> None:
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    asl = Predictor(predictor.model, predictor.class_names, predictor.img_size, predictor.mean, predictor.std,
                    metadata={"method": "asl+cal", "source": "run/best.safetensors"})
    with pytest.warns(UserWarning, match=r"run/best.safetensors was trained with --loss asl, whose scores are not "
                                         r"probabilities: 0.5 labels by an arbitrary cut. Calibrate it first \(python "
                                         r"validate.py --checkpoint run/best.safetensors --calibrate platt\)"):
        asl.predict(images)
    assert asl.default_threshold_warning(threshold=0.7) is None  # a threshold of the user's own
    asl.calibration = ScoreCalibration(torch.ones(len(asl.class_names)), torch.zeros(len(asl.class_names)))
    assert asl.default_threshold_warning() is None  # calibrated: the scores are probabilities again
    assert predictor.default_threshold_warning() is None  # BCE


def test_ten_thousand_classes_keep_the_predicted_ones_with_stored_thresholds_and_calibration(
        many_classes_checkpoint: str, tmp_path) -> None:
    checkpoint_copy, names, tuned = copy_with_thresholds(many_classes_checkpoint, tmp_path, 0.3, 0.99)
    assert len(names) == OPENIMAGES_CLASSES
    values = tuned.values
    temperatures = torch.linspace(0.5, 2.0, len(names), dtype=torch.float64)
    biases = torch.linspace(-1.0, 1.0, len(names), dtype=torch.float64)
    fitted = FittedCalibration(ScoreCalibration(temperatures, biases), torch.ones(len(names), dtype=torch.bool), 1.0)
    tuning.save_tuning(checkpoint_copy, tuning.tuning_record(
        checkpoint_copy, tuning.thresholds_entries(names, tuned, thresholds.parse_objective("f1"), "oi:val", 9),
        tuning.calibration_entry(names, fitted, "platt", "oi:val", 9)))

    predictor = Predictor.from_checkpoint(checkpoint_copy)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    every = predictor.predict(images, batch_size=2)
    assert every.shape == (5, 2 + OPENIMAGES_CLASSES)
    scores = scores_of(every, predictor)
    raw = scores_of(Predictor.from_checkpoint(checkpoint_copy, stored_tuning=False).predict(images), predictor)
    torch.testing.assert_close(scores.double(), torch.sigmoid(torch.logit(raw.double()) / temperatures + biases),
                               rtol=0, atol=1e-5)
    assert every["labels"].tolist() == labels_of(scores >= values, names)
    assert 0 < every["labels"].str.count(";").min()  # several classes per image, not all of them
    assert every["labels"].str.count(";").max() < OPENIMAGES_CLASSES - 1

    predicted = predictor.predict(images, batch_size=2, scores="predicted")
    assert list(predicted.columns) == ["image", "labels", "scores"]
    assert predicted["labels"].tolist() == every["labels"].tolist()
    index = {name: c for c, name in enumerate(names)}
    for labels, cell, row in zip(predicted["labels"], predicted["scores"], scores, strict=True):
        found = np.array(cell.split(";"), dtype=np.float32)  # float32 written exactly, in the order of the labels
        assert np.array_equal(found, row[[index[name] for name in labels.split(";")]].numpy())
    top = predictor.predict(images, threshold=0.0, topk=3, scores="predicted")
    assert top["labels"].tolist() == [";".join(names[c] for c in sorted(row.topk(3).indices.tolist()))
                                      for row in scores]
    with pytest.raises(ValueError, match="scores must be one of all, predicted, got 'some'"):
        predictor.predict(images, scores="some")
