"""Uncertainty attention (Eq. 15-16) against a naive whole-network Grad-CAM and a hand computation."""

import pytest
import torch
from torch import nn

from udtimm.attention import (
    ATTENTION_VARIANTS,
    branch_divergence,
    check_attention_support,
    uncertainty_attention,
    uncertainty_per_class,
)
from udtimm.heads import HEADS
from udtimm.losses import attention_distillation_loss
from udtimm.model import create_model
from udtimm.settings import ModelSettings

NUM_CLASSES = 4
PAPER = ATTENTION_VARIANTS["paper"]  # Eq. 16 as written, which the hand computations follow


def _model(name, img_size=None, **options):
    torch.manual_seed(0)
    return create_model(ModelSettings(name, **options), NUM_CLASSES, cal=True, img_size=img_size)


def _images(size=64, batch=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _naive_gradcam(model, z_module, x):
    """Grad-CAM as usually written: hook the module that outputs Z, backpropagate D through the whole network."""
    captured = {}

    def hook(module, inputs, output):
        output.retain_grad()
        captured["z"] = output

    handle = z_module.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    branch_divergence(out.logits, out.cal_logits).sum().backward()
    z, grad = captured["z"], captured["z"].grad
    if z.ndim == 3:  # tokens [B, N, D]: drop the prefix tokens, lay the patches out row by row
        side = round((z.shape[1] - model.num_prefix_tokens) ** 0.5)
        z, grad = (
            t[:, model.num_prefix_tokens :].reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2) for t in (z, grad)
        )
    weights = grad.sum(dim=(2, 3), keepdim=True)
    return (weights * z).sum(dim=1).detach(), out.features.detach()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_head_only_gradients_equal_whole_network_gradcam(arch, train):
    if arch == "cnn":
        model = _model("test_resnet")
        z_module = model.backbone.layer4
    else:
        model = _model("test_vit", global_pool="avg", img_size=64)
        z_module = model.backbone.norm
    model.train(train)
    expected, features = _naive_gradcam(model, z_module, _images())
    maps = uncertainty_attention(model, features, create_graph=False, form=PAPER)
    assert maps.shape == expected.shape == ((3, 4, 4) if arch == "vit" else (3, 2, 2))
    assert expected.abs().max() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_student_path_trains_the_backbone_through_w_and_z():
    model = _model("test_resnet").train()
    out = model(_images())
    maps = uncertainty_attention(model, out.features, create_graph=True, head_outputs=(out.logits, out.cal_logits),
                                 form=PAPER)
    assert maps.requires_grad
    loss = attention_distillation_loss(maps, torch.randn(3, 2, 2))
    stem, cal_head = next(model.backbone.parameters()), model.cal_head[0].weight
    grad_stem, grad_cal = torch.autograd.grad(loss, (stem, cal_head))
    assert grad_stem.abs().sum() > 0  # through Z and through w
    assert grad_cal.abs().sum() > 0  # the head only reaches the map through w = dD/dZ: needs create_graph


def test_reusing_head_outputs_equals_a_second_head_forward():
    model = _model("test_resnet").eval()
    out = model(_images())
    reused = uncertainty_attention(model, out.features, create_graph=True, head_outputs=(out.logits, out.cal_logits),
                                   form=PAPER)
    recomputed = uncertainty_attention(model, out.features, create_graph=True, form=PAPER)
    teacher = uncertainty_attention(model, out.features, create_graph=False, form=PAPER)
    torch.testing.assert_close(reused, recomputed)
    torch.testing.assert_close(teacher, recomputed.detach())


def test_teacher_path_builds_no_graph():
    model = _model("test_resnet").eval().requires_grad_(False)
    with torch.no_grad():
        out = model(_images())
        maps = uncertainty_attention(model, out.features, create_graph=False, form=PAPER)
    assert not maps.requires_grad and maps.grad_fn is None and maps.abs().sum() > 0
    # Features that do carry a graph (a teacher run with grad enabled) still give a detached map.
    trainable = _model("test_resnet").eval()
    out = trainable(_images())
    assert not uncertainty_attention(trainable, out.features, create_graph=False, form=PAPER).requires_grad
    assert all(p.grad is None for p in trainable.parameters())


def test_check_attention_support():
    with pytest.raises(ValueError, match="--cal"):
        check_attention_support(create_model(ModelSettings("test_resnet"), NUM_CLASSES, cal=False))
    token_vit = _model("test_vit", img_size=32)  # timm's default pool for ViT is the class token
    with pytest.raises(ValueError, match="--global-pool avg"):
        check_attention_support(token_vit)
    with torch.no_grad():
        features = token_vit.eval().forward_features(_images(32))
    # Why it is refused: the head never sees the patch tokens.
    assert uncertainty_attention(token_vit, features, create_graph=False, form=PAPER).abs().max() == 0
    with pytest.raises(ValueError, match="NHWC"):
        check_attention_support(_model("test_mambaout"))
    for pool in ("avg", "map"):
        vit = _model("test_vit", img_size=32, global_pool=pool).eval()
        check_attention_support(vit)
        with torch.no_grad():
            maps = uncertainty_attention(vit, vit.forward_features(_images(32)), create_graph=False, form=PAPER)
        assert maps.shape == (3, 2, 2) and maps.abs().min() > 0
    check_attention_support(_model("test_resnet"))


@pytest.mark.parametrize("head", HEADS)
def test_spatial_heads_keep_the_map_on_the_last_feature_map(head):
    """dD/dZ reaches Z through a spatial head (and the calibration branch's pooling) as a whole-network Grad-CAM
    finds it; a token-pooled ViT, refused with the linear head, gets a map from the patch tokens the head reads."""
    options = {"ml-decoder": {"embed_dim": 16, "num_heads": 2, "ff_dim": 32}}.get(head, {})
    model = _model("test_resnet", head=head, head_kwargs=options).eval()
    expected, features = _naive_gradcam(model, model.backbone.layer4, _images())
    maps = uncertainty_attention(model, features, create_graph=False, form=PAPER)
    assert expected.abs().max() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    token_vit = _model("test_vit", img_size=32, head=head, head_kwargs=options).eval()
    check_attention_support(token_vit)
    with torch.no_grad():
        maps = uncertainty_attention(token_vit, token_vit.forward_features(_images(32)), create_graph=False, form=PAPER)
    assert maps.shape == (3, 2, 2) and maps.abs().min() > 0


class _FakeModel(nn.Module):
    """Average pooling then two linear branches, so that dD/dZ can be written out by hand."""

    def __init__(self, w_cls, w_cal):
        super().__init__()
        self.w_cls, self.w_cal = w_cls, w_cal

    def forward_head(self, z):
        pooled = z.mean(dim=(2, 3))
        return pooled @ self.w_cls.T, pooled @ self.w_cal.T

    def feature_grid(self, t):
        return t


def test_eq16_by_hand():
    z = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[0.5, 0.0], [3.0, 1.0]]]], dtype=torch.float64)  # [1, 2, 2, 2]
    w_cls = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], dtype=torch.float64)  # 3 classes, 2 channels
    w_cal = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    maps = uncertainty_attention(_FakeModel(w_cls, w_cal), z, create_graph=False, form=PAPER)

    pooled = z.mean(dim=(2, 3))[0]
    q = torch.softmax(w_cal @ pooled, 0)  # calibration branch
    s = torch.softmax(w_cls @ pooled, 0)  # classification branch
    divergence = (q * (q / s).log()).sum()
    # dKL(q||s)/dz_cls = s - q;  dKL(q||s)/dz_cal = q * (log q - log s - KL);  pooling spreads dD/dp over H*W = 4
    # cells, so w_c = sum_hw dD/dZ_chw = dD/dp_c.
    w = w_cls.T @ (s - q) + w_cal.T @ (q * ((q / s).log() - divergence))
    expected = (w[:, None, None] * z[0]).sum(0)
    torch.testing.assert_close(maps[0].double(), expected, rtol=1e-6, atol=1e-7)


def test_uncertainty_per_class_sums_to_divergence():
    logits, cal_logits = torch.randn(3, 5), torch.randn(3, 5)
    per_class = uncertainty_per_class(logits, cal_logits)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(logits, 1), torch.log_softmax(cal_logits, 1), log_target=True, reduction="none"
    )
    torch.testing.assert_close(per_class, expected)
    torch.testing.assert_close(branch_divergence(logits, cal_logits), expected.sum(1))
    assert branch_divergence(logits.bfloat16(), cal_logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("variant", ["const-weights", "gradcam"])
def test_constant_weight_variants_train_through_z_only(variant):
    """Same map values as Eq. 16 (up to the ReLU), but Eq. 17's gradient reaches the head only through Z."""
    form = ATTENTION_VARIANTS[variant]
    model = _model("test_resnet").train()
    x = _images()
    paper = model(x, with_attention=True, attention_form=PAPER)
    out = model(x, with_attention=True, attention_form=form)
    expected = paper.attention.relu() if form.relu else paper.attention
    torch.testing.assert_close(out.attention, expected.detach())
    teacher = torch.randn_like(out.attention)
    (grad_paper,) = torch.autograd.grad(attention_distillation_loss(paper.attention, teacher),
                                        model.cal_head[0].weight)
    assert grad_paper.abs().max() > 0  # Eq. 16 as written: the loss reaches the head through w_c = sum dD/dZ
    (grad_const,) = torch.autograd.grad(attention_distillation_loss(out.attention, teacher),
                                        model.cal_head[0].weight, allow_unused=True)
    assert grad_const is None or grad_const.abs().max() == 0
    # Held as constants, the weights leave Z's gradient equal to that of sum_c w_c Z_c with w detached by hand.
    features = out.features
    logits, cal_logits = model.forward_head(features)
    (w,) = torch.autograd.grad(branch_divergence(logits, cal_logits).sum(), features, retain_graph=True)
    by_hand = (w.sum(dim=(2, 3), keepdim=True).detach() * features).sum(dim=1)
    by_hand = by_hand.relu() if form.relu else by_hand
    (grad_z,) = torch.autograd.grad(attention_distillation_loss(out.attention, teacher), features, retain_graph=True)
    (grad_z_hand,) = torch.autograd.grad(attention_distillation_loss(by_hand, teacher), features)
    torch.testing.assert_close(grad_z, grad_z_hand)


def test_constant_weights_keep_the_head_graph_for_the_other_losses():
    model = _model("test_resnet").train()
    out = model(_images(), with_attention=True, attention_form=ATTENTION_VARIANTS["const-weights"])
    (out.logits.sum() + out.cal_logits.sum() + out.attention.sum()).backward()  # would fail on a freed graph
    assert model.cal_head[0].weight.grad is not None
