import torch
from PIL import Image

from udtimm import plots
from udtimm.metrics import expected_calibration_error
from udtimm.plots import reliability_diagram, reliability_figure, save_figure


def test_reliability_diagram_is_a_png_of_the_expected_size(tmp_path) -> None:
    torch.manual_seed(0)
    probs = torch.rand(50, 4)
    target = (torch.rand(50, 4) < probs).float()
    path = str(tmp_path / "r.png")
    reliability_diagram(probs, target, None, path, title="model")
    assert Image.open(path).size == (500, 500)
    two = str(tmp_path / "two.png")
    save_figure(reliability_figure([("a", probs, target, None), ("b", probs * 0.5, target, None)], "t"), two)
    assert Image.open(two).size == (500, 500)


def test_reliability_diagram_shows_the_calibrated_scores_beside_the_raw_ones(tmp_path, monkeypatch) -> None:
    torch.manual_seed(1)
    probs = torch.rand(80, 3)
    target = (torch.rand(80, 3) < probs).float()
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure))
    reliability_diagram(probs ** 3, target, None, str(tmp_path / "r.png"), title="m", calibrated=probs)
    (axis,) = figures[0].axes
    before, after = (expected_calibration_error(p, target) for p in (probs ** 3, probs))
    assert axis.get_title() == f"m — classwise ECE {before:.2f}% -> {after:.2f}%"
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert [label.split(" (")[0] for label in labels if "pooled ECE" in label] == ["uncalibrated", "calibrated"]
