"""The classification heads (udtimm/heads/): shapes, gradients, CNN and ViT inputs, references from the papers."""

import math

import pytest
import torch
import torch.nn.functional as F

from udtimm.heads import HEADS, HeadConfigError, create_head, head_options, spatial_tokens
from udtimm.heads.csra import TEMPERATURES, CSRAHead
from udtimm.heads.ml_decoder import MLDecoderHead
from udtimm.model import create_model
from udtimm.settings import ModelSettings

# Small widths, so that a head builds and runs in milliseconds; the papers' constants are checked apart.
SMALL = {"ml-decoder": {"embed_dim": 16, "num_heads": 2, "ff_dim": 32}, "csra": {"num_heads": 2}}
BACKBONES = {"cnn": ("test_resnet", 64), "vit": ("test_vit", 32)}  # a 2 x 2 map and 2 x 2 patch tokens


def small_model(head: str, backbone: str, num_classes: int, cal: bool = False) -> torch.nn.Module:
    name, img_size = BACKBONES[backbone]
    return create_model(ModelSettings(name, head=head, head_kwargs=SMALL[head]), num_classes, cal=cal,
                        img_size=img_size)


def images(backbone: str, count: int = 2) -> torch.Tensor:
    size = BACKBONES[backbone][1]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_every_registered_head_has_small_options_here() -> None:
    assert set(SMALL) == set(HEADS)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("num_classes", [1, 1000])
@pytest.mark.parametrize("head", HEADS)
def test_logits_have_one_column_per_class_and_inference_gives_the_same(head: str, num_classes: int,
                                                                       backbone: str) -> None:
    model = small_model(head, backbone, num_classes, cal=True).eval()
    batch = images(backbone)
    with torch.no_grad():
        out = model(batch)
        alone = model.classifier_only()(batch)
    assert out.logits.shape == out.cal_logits.shape == (2, num_classes)
    assert model.backbone.num_classes == 0  # timm's classifier is replaced, not kept beside the head
    torch.testing.assert_close(alone, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", HEADS)
def test_the_gradient_reaches_every_parameter(head: str, backbone: str) -> None:
    model = small_model(head, backbone, 5, cal=True).train()
    out = model(images(backbone, 4))
    target = (torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    (F.binary_cross_entropy_with_logits(out.logits, target) + out.cal_logits.logsumexp(dim=1).mean()).backward()
    assert not [name for name, parameter in model.named_parameters() if parameter.grad is None]
    # test_resnet zero-initialises its blocks' last BatchNorm, which zeroes some backbone gradients at the start;
    # the head's own parameters all move.
    assert all(parameter.grad.abs().sum() > 0 for parameter in model.head.parameters())


@pytest.mark.parametrize("head", HEADS)
def test_channels_last_gives_the_same_logits(head: str) -> None:
    model = small_model(head, "cnn", 5).eval()
    batch = images("cnn")
    with torch.no_grad():
        expected = model(batch).logits
        model.to(memory_format=torch.channels_last)
        got = model(batch.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_spatial_tokens_of_a_cnn_map_an_nhwc_map_and_vit_tokens() -> None:
    grid = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)  # [B, C, H, W]
    cnn = create_model(ModelSettings("test_resnet"), 2).backbone
    tokens = spatial_tokens(cnn, grid)
    assert tokens.shape == (2, 8, 3)
    torch.testing.assert_close(tokens[1, 1 * 4 + 3], grid[1, :, 1, 3])  # row 1 of width 4, column 3
    nhwc = torch.nn.Module()
    nhwc.output_fmt = "NHWC"
    torch.testing.assert_close(spatial_tokens(nhwc, grid.permute(0, 2, 3, 1)), tokens)
    vit = create_model(ModelSettings("test_vit"), 2, img_size=32).backbone
    with_prefix = torch.randn(2, vit.num_prefix_tokens + 4, 64)
    torch.testing.assert_close(spatial_tokens(vit, with_prefix), with_prefix[:, vit.num_prefix_tokens:])


def test_ml_decoder_takes_the_constants_of_its_paper_and_code() -> None:
    head = MLDecoderHead(32, 1000)
    (layer,) = head.layers
    assert head.embed.out_features == 768 and layer.cross_attention.num_heads == 8
    assert layer.linear1.out_features == 2048 and layer.dropout.p == layer.cross_attention.dropout == 0.1
    assert head.queries.shape == (100, 768) and head.group_weight.shape == (100, 768, 10)
    assert head_options("ml-decoder") == {"embed_dim": 768, "num_layers": 1, "num_heads": 8, "ff_dim": 2048,
                                          "dropout": 0.1, "num_groups": 100}
    # Fixed queries: a buffer the checkpoint keeps, not a parameter an optimizer moves.
    assert "queries" in head.state_dict() and "queries" not in dict(head.named_parameters())
    assert not [module for module in head.modules() if "Self" in type(module).__name__]


def test_ml_decoder_group_decoding_and_no_self_attention() -> None:
    """5 classes over 2 queries: query k decodes classes 3k .. 3k + 2 (the last group cut to 2) with its own weights,
    and a query's classes do not move when the other query changes (no self-attention between them)."""
    head = MLDecoderHead(6, 5, embed_dim=8, num_heads=2, ff_dim=16, num_groups=2).eval()
    tokens = torch.randn(3, 4, 6)
    decoded = {}
    head.layers[-1].register_forward_hook(lambda module, args, output: decoded.update(value=output))
    with torch.no_grad():
        logits = head(tokens)
        for c in range(5):
            expected = decoded["value"][:, c // 3] @ head.group_weight[c // 3, :, c % 3] + head.bias[c]
            torch.testing.assert_close(logits[:, c], expected)
        head.queries[1] = torch.randn(8)
        moved = head(tokens)
    torch.testing.assert_close(moved[:, :3], logits[:, :3], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 3:], logits[:, 3:])


def csra_reference(grid: torch.Tensor, weight: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """One CSRA head from the paper, by loops: a 1x1 convolution of the NCHW map with the normalised class weights,
    then for each class the mean of its scores plus lam times their softmax(T s)-weighted sum (T = inf: their max)."""
    scores = F.conv2d(grid, (weight / weight.norm(dim=1, keepdim=True))[:, :, None, None]).flatten(2)  # [B, K, HW]
    logits = torch.empty(scores.shape[:2])
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            attended = s.max() if math.isinf(temperature) else sum(
                math.exp(temperature * value) / sum(math.exp(temperature * other) for other in s.tolist()) * value
                for value in s.tolist())
            logits[b, c] = s.mean() + lam * attended
    return logits


@pytest.mark.parametrize("num_heads", [1, 4])
def test_csra_against_the_papers_formula(num_heads: int) -> None:
    head = CSRAHead(6, 3, lam=0.3, num_heads=num_heads)
    assert head.temperatures == TEMPERATURES[num_heads]
    grid = torch.randn(2, 6, 3, 2)
    with torch.no_grad():
        got = head(spatial_tokens(torch.nn.Module(), grid))
    expected = sum(csra_reference(grid, classifier.weight, 0.3, temperature)
                   for classifier, temperature in zip(head.classifiers, head.temperatures, strict=True))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_csra_defaults_are_the_official_voc_settings() -> None:
    assert head_options("csra") == {"lam": 0.1, "num_heads": 1, "temperatures": None}
    head = create_head("csra", 8, 2, **head_options("csra", {"temperatures": [math.inf]}))
    assert head.temperatures == (math.inf,) and head.lam == 0.1


@pytest.mark.parametrize(("name", "options", "message"), [
    ("linear", {"lam": 1}, "the linear head .* takes none"),
    ("csra", {"heads": 2}, r"\['heads'\]: the csra head takes lam, num_heads, temperatures"),
    ("csra", {"num_heads": 3}, "code sets the temperatures of 1, 2, 4, 6, 8 heads, not 3"),
    ("csra", {"num_heads": 2, "temperatures": [1]}, "must be 2 .num_heads. positive numbers"),
    ("ml-decoder", {"embed_dim": 10, "num_heads": 4}, "embed_dim 10 is not divisible by num_heads 4"),
    ("ml-decoder", {"num_groups": 0}, "at least 1"),
    ("mlp", {}, "unknown --head 'mlp': choose one of linear, ml-decoder, csra"),
])
def test_options_that_do_not_fit_are_refused_naming_them(name: str, options: dict, message: str) -> None:
    with pytest.raises(HeadConfigError, match=message):
        create_model(ModelSettings("test_resnet", head=name, head_kwargs=options), 3)
