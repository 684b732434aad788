import torch
from PIL import Image

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
