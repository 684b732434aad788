"""The distillation losses (Eq. 13, 14 and 17) against slow float64 references written from the equations."""

import pytest
import torch
import torch.nn.functional as F
from conftest import value_and_grad
from test_losses import ref_binary_kl

from udtimm.losses import attention_distillation_loss, binary_kd_loss, softmax_kd_loss

# --- references: explicit loops over samples and classes, float64 --------------------------------------------------


def ref_binary_kd(s, t, temperature=3.0):
    terms = [
        ref_binary_kl(t[b, c] / temperature, s[b, c] / temperature)
        for b in range(s.shape[0])
        for c in range(s.shape[1])
    ]
    return sum(terms) / len(terms) * temperature**2


def ref_softmax_kd(s, t, temperature=3.0):
    total = 0
    for b in range(s.shape[0]):
        p_t = torch.softmax(t[b] / temperature, dim=0)
        p_s = torch.softmax(s[b] / temperature, dim=0)
        total = total + sum(p_t[k] * torch.log(p_t[k] / p_s[k]) for k in range(s.shape[1]))
    return total / s.shape[0] * temperature**2


def ref_attention(a_s, a_t, distance="squared"):
    total = 0
    for b in range(a_s.shape[0]):
        s = a_s[b].flatten()
        t = a_t[b].flatten()
        s = s / torch.sqrt(sum(v * v for v in s))
        t = t / torch.sqrt(sum(v * v for v in t))
        squared = sum((t[k] - s[k]) ** 2 for k in range(len(s)))
        total = total + (squared if distance == "squared" else torch.sqrt(squared))
    return total / a_s.shape[0]


# --- tests ---------------------------------------------------------------------------------------------------------


def check_kd_loss(loss_fn, reference_fn, s: torch.Tensor, t: torch.Tensor) -> None:
    """float32 value and gradient against the float64 reference, zero (and no gradient) at the teacher, float32
    output from bfloat16 inputs."""
    loss, grad = value_and_grad(loss_fn, s.float(), t.float(), temperature=3.0)
    ref_loss, ref_grad = value_and_grad(reference_fn, s, t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    same, same_grad = value_and_grad(loss_fn, t.float(), t.float())
    assert same.item() == pytest.approx(0.0, abs=1e-6) and same_grad.abs().max() < 1e-6
    loss16, _ = value_and_grad(loss_fn, s.bfloat16(), t.bfloat16())
    assert loss16.dtype == torch.float32
    # bfloat16 inputs are exact in float32, where the loss is computed: float32's tolerance applies
    torch.testing.assert_close(loss16, reference_fn(s.bfloat16().double(), t.bfloat16().double()).float())


def test_binary_kd_matches_reference_and_is_zero_at_teacher():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    t = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    t[0, :3] = torch.tensor([50.0, -50.0, 50.0])
    s[0, :3] = torch.tensor([-50.0, 50.0, 50.0])
    check_kd_loss(binary_kd_loss, ref_binary_kd, s, t)


def test_softmax_kd_matches_reference_and_is_zero_at_teacher():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    t = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    t[1] = torch.tensor([50.0, -50.0, 0.0, 10.0, -10.0, 50.0])
    check_kd_loss(softmax_kd_loss, ref_softmax_kd, s, t)


@pytest.mark.parametrize("fn", [binary_kd_loss, softmax_kd_loss])
def test_kd_teacher_gets_no_gradient(fn):
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    grad_s, grad_t = torch.autograd.grad(fn(s, t), (s, t), allow_unused=True)
    assert grad_s is not None and grad_t is None


def test_attention_loss_matches_reference():
    g = torch.Generator().manual_seed(6)
    a_s = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    a_t = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    loss, grad = value_and_grad(attention_distillation_loss, a_s.float(), a_t.float())
    ref_loss, ref_grad = value_and_grad(ref_attention, a_s, a_t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    loss16, _ = value_and_grad(attention_distillation_loss, a_s.bfloat16(), a_t.bfloat16())
    assert loss16.dtype == torch.float32
    # bfloat16 inputs are exact in float32, where the loss is computed: float32's tolerance applies
    torch.testing.assert_close(loss16, ref_attention(a_s.bfloat16().double(), a_t.bfloat16().double()).float())


def test_attention_loss_norm_matches_reference():
    g = torch.Generator().manual_seed(7)
    a_s = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    a_t = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    loss, grad = value_and_grad(lambda s, t: attention_distillation_loss(s, t, "norm"), a_s.float(), a_t.float())
    ref_loss, ref_grad = value_and_grad(lambda s, t: ref_attention(s, t, "norm"), a_s, a_t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # Equal maps: loss 0 and a finite (zero) gradient, not the NaN of the norm's derivative at 0.
    same, same_grad = value_and_grad(lambda s, t: attention_distillation_loss(s, t, "norm"), a_t.float(),
                                      a_t.float())
    assert same.item() == pytest.approx(0.0, abs=1e-5) and torch.isfinite(same_grad).all()
    with pytest.raises(ValueError, match="unknown attention distance 'cube'"):
        attention_distillation_loss(a_s, a_t, "cube")


def test_attention_loss_zero_for_identical_maps_and_scale_invariant():
    a_s, a_t = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    assert attention_distillation_loss(a_t, a_t).item() == pytest.approx(0.0, abs=1e-6)
    base = attention_distillation_loss(a_s, a_t).item()
    assert attention_distillation_loss(a_s * 40.0, a_t * 1e-3).item() == pytest.approx(base, rel=1e-5)


def test_attention_loss_resizes_student_to_teacher_grid():
    a_s, a_t = torch.randn(2, 2, 2), torch.randn(2, 4, 4)
    resized = F.interpolate(a_s[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(attention_distillation_loss(a_s, a_t), ref_attention(resized, a_t).float())
    # A constant student map stays constant on any grid, so it matches a constant teacher exactly.
    assert attention_distillation_loss(torch.full((1, 2, 2), 3.0), torch.ones(1, 7, 7)).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_attention_loss_teacher_detached_and_zero_map_finite():
    a_s = torch.zeros(2, 3, 3, requires_grad=True)
    a_t = torch.randn(2, 3, 3, requires_grad=True)
    grad_s, grad_t = torch.autograd.grad(attention_distillation_loss(a_s, a_t), (a_s, a_t), allow_unused=True)
    assert grad_t is None and torch.isfinite(grad_s).all()
    # An all-zero student map normalises to zero: the loss is the teacher's squared unit norm, 1 per sample.
    assert attention_distillation_loss(a_s, a_t).item() == pytest.approx(1.0, abs=1e-6)
