"""python -m udtimm.visualize: attention figures per image, reliability comparisons, refusals."""

import glob
import os
import shutil

import pytest
import torch
from conftest import TINY_DIGITS
from PIL import Image

import validate
from udtimm import Predictor, checkpoint, plots, visualize
from udtimm.config import ConfigError
from udtimm.data.digits import DIGIT_CLASSES
from udtimm.model import create_model
from udtimm.settings import ModelSettings

IMG_SIZE = 32


def save_random(path: str, cal: bool = True, name: str = "test_resnet", method: str = "cal") -> str:
    """A random-init checkpoint on the digits classes: enough to draw, no training needed."""
    torch.manual_seed(0)
    model = create_model(ModelSettings(name), len(DIGIT_CLASSES), cal=cal, img_size=IMG_SIZE)
    metadata = checkpoint.model_metadata(name, model, list(DIGIT_CLASSES), None, IMG_SIZE, [0.5] * 3, [0.25] * 3,
                                         dataset="digits", method=method)
    checkpoint.save_checkpoint(path, model, metadata)
    return path


def pixel_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def attention_size(num_maps: int, charts: int) -> tuple[int, int]:
    inches = plots.MAP_INCHES * (1 + num_maps) + plots.BAR_INCHES * charts
    return round(inches * plots.DPI), round(plots.ROW_INCHES * plots.DPI)


@pytest.fixture(scope="module")
def digit_images(tiny_digits: str) -> list[str]:
    return sorted(glob.glob(os.path.join(tiny_digits, "**", "*.jpg"), recursive=True))[:2]


@pytest.mark.slow
def test_attention_with_teacher_has_both_maps_and_the_uncertainty_chart(tmp_path, digit_images) -> None:
    student = save_random(str(tmp_path / "student.safetensors"))
    teacher = save_random(str(tmp_path / "teacher.safetensors"))
    written = visualize.main(["--checkpoint", student, "--teacher-ckpt", teacher, "--images", *digit_images,
                              "--out", str(tmp_path / "vis"), "--topk", "3"])
    stems = [os.path.splitext(os.path.basename(path))[0] for path in digit_images]
    assert written == [str(tmp_path / "vis" / f"{stem}.png") for stem in stems]
    assert all(pixel_size(path) == attention_size(num_maps=2, charts=2) for path in written)


def test_attention_without_teacher_from_a_folder(tmp_path, digit_images) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in digit_images:
        shutil.copy(path, folder)
    student = save_random(str(tmp_path / "student.safetensors"))
    written = visualize.main(["--checkpoint", student, "--images", str(folder), "--out", str(tmp_path / "vis")])
    assert len(written) == len(digit_images)
    assert all(pixel_size(path) == attention_size(num_maps=1, charts=2) for path in written)


def test_attention_figure_lists_the_top_labels_with_their_uncertainty(tmp_path, digit_images) -> None:
    loaded = visualize.load_model(save_random(str(tmp_path / "m.safetensors")), torch.device("cpu"))
    figure = visualize.image_figure(digit_images[0], loaded, loaded, topk=4)
    titles = [axis.get_title() for axis in figure.axes]
    assert {"student (cal): uncertainty attention", "teacher (cal): uncertainty attention"} <= set(titles)
    assert "per-label uncertainty" in titles
    labels = [tick.get_text() for tick in figure.axes[-2].get_yticklabels()]
    assert len(labels) == 4 and set(labels) <= set(DIGIT_CLASSES)


def test_a_checkpoint_without_calibration_branch_draws_the_top_label_gradcam_and_says_so(tmp_path,
                                                                                       digit_images) -> None:
    path = save_random(str(tmp_path / "base.safetensors"), cal=False, method="baseline")
    written = visualize.main(["--checkpoint", path, "--images", digit_images[0], "--out", str(tmp_path / "vis")])
    assert pixel_size(written[0]) == attention_size(num_maps=1, charts=1)
    figure = visualize.image_figure(digit_images[0], visualize.load_model(path, torch.device("cpu")), None, 5)
    titles = " | ".join(axis.get_title() for axis in figure.axes)
    assert "model (baseline): Grad-CAM of '" in titles and "no calibration branch" in titles
    assert "uncertainty attention" not in titles


def test_label_gradcam_is_the_whole_network_gradcam_of_that_logit() -> None:
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), 3, cal=False).eval()
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    labels = torch.tensor([2, 0])
    features = model.forward_features(x)
    features.retain_grad()
    model.forward_head(features)[0].gather(1, labels[:, None]).sum().backward()
    expected = (features.grad.sum(dim=(2, 3), keepdim=True) * features).sum(dim=1)
    torch.testing.assert_close(visualize.label_gradcam(model, features, labels), expected.detach())


def test_compare_draws_two_reliability_curves_on_one_axes(tmp_path, tiny_digits) -> None:
    base = save_random(str(tmp_path / "base.safetensors"), cal=False, method="baseline")
    cal = save_random(str(tmp_path / "cal.safetensors"))
    out = str(tmp_path / "figs" / "compare.png")
    visualize.main(["--compare", base, cal, "--labels", "baseline", "cal", "--out", out,
                    "--data-dir", tiny_digits, "--digits-trainval", str(TINY_DIGITS["num_trainval"]),
                    "--digits-test", str(TINY_DIGITS["num_test"]), "--workers", "0", "-b", "16"])
    assert pixel_size(out) == (5 * plots.DPI, 5 * plots.DPI)


@pytest.mark.slow
def test_compare_draws_a_calibrated_checkpoint_with_its_calibrated_scores(tmp_path, tiny_digits, monkeypatch) -> None:
    data = ["--data-dir", tiny_digits, "--digits-trainval", str(TINY_DIGITS["num_trainval"]), "--digits-test",
            str(TINY_DIGITS["num_test"]), "--workers", "0"]
    base = save_random(str(tmp_path / "base.safetensors"), cal=False, method="baseline")
    calibrated = shutil.copy(base, tmp_path / "calibrated.safetensors")
    validate.main(["--checkpoint", str(calibrated), *data, "--calibrate", "temperature", "--no-progress"])
    drawn = {}
    real = plots.reliability_figure
    monkeypatch.setattr(plots, "reliability_figure", lambda curves, title: drawn.update(
        (label, scores) for label, scores, *_ in curves) or real(curves, title))
    visualize.main(["--compare", base, str(calibrated), "--labels", "raw", "same", "--out",
                    str(tmp_path / "c.png"), *data])
    temperature = Predictor.from_checkpoint(str(calibrated)).calibration.temperatures
    assert set(drawn) == {"raw", "same (calibrated)"} and not torch.allclose(temperature, torch.ones_like(temperature))
    logits = torch.logit(drawn["raw"].double())
    torch.testing.assert_close(drawn["same (calibrated)"].double(), torch.sigmoid(logits / temperature), rtol=0,
                               atol=1e-4)


def test_a_vit_pooled_by_its_class_token_is_refused(tmp_path, digit_images) -> None:
    path = save_random(str(tmp_path / "vit.safetensors"), name="test_vit")
    with pytest.raises(ConfigError, match=r"vit\.safetensors: .*global_pool='token'.*--global-pool avg"):
        visualize.main(["--checkpoint", path, "--images", digit_images[0], "--out", str(tmp_path / "vis")])
    assert not os.path.exists(tmp_path / "vis")


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "m.safetensors", "--out", "vis"], "give --images"),
    (["--compare", "a.safetensors", "--out", "f.png"], "two or more"),
    (["--compare", "a.safetensors", "b.safetensors", "--labels", "x", "--out", "f.png"], "1 name"),
])
def test_bad_flag_combinations_are_refused(argv, message) -> None:
    with pytest.raises(ConfigError, match=message):
        visualize.parse_args(argv)
