"""Compressed learning: bit packing, exact 1-bit ReLU, the fused BN → ReLU → conv unit against its
reference formulas, module swapping and restoring, saved-bytes measurement on a small WRN."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.errors import ConfigError, ShapeError
from onebit.layers import QuantConv2d
from onebit.memory import (
    CompressedReLU,
    LeanAvgPool2d,
    bn_relu_conv,
    compressed_activations,
    compressed_relu,
    fusable,
    pack_bits,
    saved_activation_bytes,
    training_step_peak_rss,
    unpack_bits,
)
from onebit.models import create_model


def saved(fn, *inputs) -> list[torch.Tensor]:
    """The tensors autograd saves for backward while running ``fn(*inputs)``."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return kept, out


# --------------------------------------------------------------------------- bit packing
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (2, 3, 5, 5), (4, 16, 3, 3)])
def test_pack_unpack_roundtrip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    n = mask.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(unpack_bits(packed, shape), mask)
    as_floats = unpack_bits(packed, shape, torch.float32)
    assert as_floats.dtype == torch.float32 and torch.equal(as_floats, mask.float())


def test_pack_bits_is_least_significant_bit_first():
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [1 + 4 + 8 + 128, 1 + 2]
    assert pack_bits(torch.tensor([0.0, 2.0, -1.0])).tolist() == [2 + 4]  # nonzero counts as set
    with pytest.raises(ShapeError):
        unpack_bits(pack_bits(mask), (4, 5))  # 20 bits do not fit in 2 bytes


# --------------------------------------------------------------------------- exact layers
def test_compressed_relu_forward_and_backward_are_exactly_relu():
    x = torch.tensor([[-2.0, -0.0, 0.0, 1e-30, 3.0], [0.5, -1e-30, 0.0, -7.0, 2.0]])
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept, out = saved(CompressedReLU(), a)
    assert torch.equal(out, torch.relu(b))
    out.backward(g)
    torch.relu(b).backward(g)
    assert torch.equal(a.grad, b.grad)  # including 0 at x = 0, as torch's ReLU
    assert [t.dtype for t in kept] == [torch.uint8] and kept[0].numel() == 2  # 10 bits → 2 bytes
    big = torch.randn(3, 4, 9, 9, requires_grad=True)
    ref = big.detach().clone().requires_grad_()
    grad = torch.randn(3, 4, 9, 9)
    compressed_relu(big).backward(grad)
    torch.relu(ref).backward(grad)
    assert torch.equal(big.grad, ref.grad)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=True),
    dict(kernel_size=2, stride=None, padding=0, ceil_mode=True),
])
def test_lean_avg_pool_is_exact_and_saves_nothing(kwargs):
    pool = nn.AvgPool2d(**kwargs)
    lean = LeanAvgPool2d(pool)
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    kept, out = saved(lean, x)
    assert kept == []
    expected = pool(ref)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    assert torch.equal(x.grad, ref.grad)


# --------------------------------------------------------------------------- fused unit
def reference_unit(x, bn, conv, g, code, u=None):
    """The documented approximate backward of BN → ReLU → conv, written out directly (float64)."""
    x, g = x.double(), g.double()
    dims, m = (0, 2, 3), x.numel() // x.shape[1]
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    invstd = (var + bn.eps).rsqrt()
    xhat = (x - v(mean)) * v(invstd)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones(x.shape[1], dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros(x.shape[1], dtype=torch.float64)
    y = xhat * v(gamma) + v(beta)
    mask = y > 0
    a = y.clamp_min(0)
    count = mask.sum(dims)
    hi = (xhat * mask).sum(dims) / count.clamp_min(1)
    lo = (xhat * ~mask).sum(dims) / (m - count).clamp_min(1)
    x_tilde = torch.where(mask, v(hi), v(lo))
    if code == "mean":
        a_hat = mask * v((a * mask).sum(dims) / count.clamp_min(1))
    elif code == "stochastic":
        amax = a.amax(dims)
        a_hat = (u.double() < a / v(amax)) * v(amax)
    else:  # "rounded": x̂ stochastically rounded to 4 evenly spaced points, on each side from the threshold on
        t = torch.minimum(torch.maximum(-beta / gamma, xhat.amin(dims)), xhat.amax(dims))
        rising = v(gamma > 0)
        on_low, on_high = torch.where(rising, v(t), v(xhat.amin(dims))), torch.where(rising, v(xhat.amax(dims)), v(t))
        off_low, off_high = torch.where(rising, v(xhat.amin(dims)), v(t)), torch.where(rising, v(t), v(xhat.amax(dims)))
        low, step = torch.where(mask, on_low, off_low), torch.where(mask, on_high - on_low, off_high - off_low) / 3
        q = torch.floor((xhat - low) / step + u.double()).clamp(0, 3)
        x_tilde = low + q * step
        a_hat = mask * (v(gamma) * x_tilde + v(beta))
    w = conv.weight_quantizer(conv.weight.detach()).double() if conv.weight_quantizer else conv.weight.detach().double()
    a_var = a_hat.clone().requires_grad_()
    w_var = w.clone().requires_grad_()
    out = F.conv2d(a_var, w_var, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out.backward(g)
    dy = a_var.grad * mask
    dbeta, dgamma = dy.sum(dims), (dy * x_tilde).sum(dims)
    dx = v(gamma * invstd) * (dy - v(dbeta) / m - x_tilde * v(dgamma) / m)
    return dx, w_var.grad, dgamma, dbeta


@pytest.mark.parametrize("code", ["mean", "stochastic", "rounded"])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_backward_equals_the_reference_formula(code, affine):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4, affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.7, 1.3, -0.8, 2.0]))
            bn.bias.copy_(torch.tensor([0.2, -0.5, 0.1, 0.0]))
    bn_ref = copy.deepcopy(bn)
    conv = QuantConv2d(4, 5, 3, stride=2, padding=1, bias=False, weight_quantizer="he_sign")
    x = (torch.randn(3, 4, 6, 6) * 2 + 0.5).requires_grad_()
    gen = torch.Generator().manual_seed(7)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))  # the draw the unit makes
    out = bn_relu_conv(x, bn, conv, code=code, generator=gen)
    g = torch.randn_like(out)
    out.backward(g)
    dx, dw, dgamma, dbeta = reference_unit(x.detach(), bn, conv, g, code, u)
    assert torch.allclose(x.grad.double(), dx, atol=1e-5, rtol=1e-4)
    assert torch.allclose(conv.weight.grad.double(), dw, atol=1e-4, rtol=1e-4)  # he_sign: straight through
    if affine:
        assert torch.allclose(bn.weight.grad.double(), dgamma, atol=1e-5, rtol=1e-4)
        assert torch.allclose(bn.bias.grad.double(), dbeta, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the forward is exact
        assert torch.allclose(out, conv(torch.relu(bn_ref(x))), atol=1e-6)


@pytest.mark.parametrize("code", ["mean", "rounded"])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_unit_is_exact_when_activations_are_two_valued_per_channel(code, affine):
    """Where x̂ takes one value per channel on each side of the threshold, x̃ = x̂ and â = a:
    every gradient and the running statistics equal plain autograd's."""
    torch.manual_seed(2)
    bn, bn_ref = nn.BatchNorm2d(3, affine=affine), nn.BatchNorm2d(3, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn_ref.load_state_dict(bn.state_dict())
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    conv_ref = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    conv_ref.load_state_dict(conv.state_dict())
    high, low = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1), torch.tensor([-1.0, 0.5, -3.0]).view(1, 3, 1, 1)
    x = torch.where(torch.rand(4, 3, 6, 6) > 0.4, high, low).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):  # twice: running statistics and num_batches_tracked
        out = bn_relu_conv(x, bn, conv, code=code)
        out_ref = conv_ref(torch.relu(bn_ref(x_ref)))
        g = torch.randn_like(out)
        out.backward(g)
        out_ref.backward(g)
    assert torch.equal(out, out_ref)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(conv.weight.grad, conv_ref.weight.grad, atol=1e-5)
    assert torch.allclose(conv.bias.grad, conv_ref.bias.grad, atol=1e-6)
    if affine:
        assert torch.allclose(bn.weight.grad, bn_ref.weight.grad, atol=1e-5)
        assert torch.allclose(bn.bias.grad, bn_ref.bias.grad, atol=1e-6)
    for key, value in bn_ref.state_dict().items():
        assert torch.allclose(bn.state_dict()[key].float(), value.float()), key


@pytest.mark.parametrize("code", ["mean", "stochastic", "rounded"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantized", [False, True])
def test_fused_unit_under_bfloat16_autocast_matches_plain_autograd(code, x_dtype, quantized):
    """Under autocast the conv runs, and its output gradient arrives, in bfloat16 while the weights, the BN
    parameters and statistics are float32: the backward computes in bfloat16 and returns each gradient in
    its tensor's dtype. Two-valued channels make every code exact (the positive value is the channel's
    max, so even "stochastic" draws it with probability 1), so the reference is plain autograd."""
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    if quantized:  # the latent weight's gradient goes through q's own backward
        conv = QuantConv2d(3, 4, 3, stride=2, padding=1, bias=False, weight_quantizer="he_sign")
    else:
        conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    high, low = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1), torch.tensor([-1.0, 0.5, -3.0]).view(1, 3, 1, 1)
    x = torch.where(torch.rand(4, 3, 6, 6) > 0.4, high, low).to(x_dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn_relu_conv(x, bn, conv, code=code, generator=torch.Generator().manual_seed(0))
        out_ref = conv_ref(torch.relu(bn_ref(x_ref)))
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert torch.equal(out, out_ref)
    g = torch.randn(out.shape).to(out.dtype)
    out.backward(g)
    out_ref.backward(g)
    pairs = [(x, x_ref), *zip([*bn.parameters(), *conv.parameters()], [*bn_ref.parameters(), *conv_ref.parameters()])]
    for mine, ref in pairs:
        assert mine.grad.dtype == ref.grad.dtype == mine.dtype
        assert torch.isfinite(mine.grad).all()
        # bfloat16 keeps 8 significant bits; measured at most 0.8 % of the largest entry
        torch.testing.assert_close(mine.grad.float(), ref.grad.float(), rtol=0, atol=0.03 * float(ref.grad.abs().max()))


@pytest.mark.parametrize("code", ["mean", "stochastic", "rounded"])
def test_fused_unit_in_float16_sums_channels_in_float32(code):
    """A float16 channel sum overflows past 65504: here channel 0 holds ~2500 activations of ~54 (γ = 60).
    The per-channel counts and sums are float32, so the gradients stay finite; with two-valued channels
    every code is exact, so they match float64 autograd (measured within 0.2 % of the largest entry)."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([60.0, 1.0]))
        bn.bias.copy_(torch.tensor([5.0, -0.5]))
    conv = QuantConv2d(2, 3, 3, padding=1, bias=False, weight_quantizer="he_sign")
    bn_ref, conv_ref = copy.deepcopy(bn).double(), copy.deepcopy(conv).double()
    bn, conv = bn.half(), conv.half()
    high, low = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1), torch.tensor([-1.0, -2.0]).view(1, 2, 1, 1)
    x = torch.where(torch.rand(16, 2, 16, 16) > 0.4, high, low).half().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    out = bn_relu_conv(x, bn, conv, code=code, generator=torch.Generator().manual_seed(7))
    out_ref = conv_ref(torch.relu(bn_ref(x_ref)))
    with torch.no_grad():  # the channel sum that overflowed float16
        a = torch.relu(F.batch_norm(x_ref, None, None, bn_ref.weight, bn_ref.bias, training=True))
        assert float(a[:, 0].sum()) > 65504
    g = torch.randn(out.shape).half()
    out.backward(g)
    out_ref.backward(g.double())
    pairs = [(x, x_ref), *zip([*bn.parameters(), *conv.parameters()], [*bn_ref.parameters(), *conv_ref.parameters()])]
    for mine, ref in pairs:
        assert mine.grad.dtype == torch.float16 and torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=0, atol=0.01 * float(ref.grad.abs().max()))


def test_fused_unit_saves_one_bit_per_element_plus_channel_statistics():
    bn, conv = nn.BatchNorm2d(8, affine=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    kept, _ = saved(lambda t: bn_relu_conv(t, bn, conv, code="mean"), x)
    new = [t for t in kept if t is not None and t.untyped_storage().data_ptr() != conv.weight.untyped_storage().data_ptr()]
    assert sum(t.numel() * t.element_size() for t in new) == x.numel() // 8 + 4 * 8 * 4  # mask + 4 per-channel floats
    kept, _ = saved(lambda t: bn_relu_conv(t, bn, conv, code="stochastic"), x)
    new = [t for t in kept if t is not None and t.untyped_storage().data_ptr() != conv.weight.untyped_storage().data_ptr()]
    assert sum(t.numel() * t.element_size() for t in new) == 2 * x.numel() // 8 + 4 * 8 * 4
    kept, _ = saved(lambda t: bn_relu_conv(t, bn, conv, code="rounded"), x)
    new = [t for t in kept if t is not None and t.untyped_storage().data_ptr() != conv.weight.untyped_storage().data_ptr()]
    assert sum(t.numel() * t.element_size() for t in new) == 3 * x.numel() // 8 + 5 * 8 * 4  # σ⁻¹ + 2 grids


def test_fused_unit_outside_training_is_the_plain_modules():
    bn, conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1)
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    bn.eval()
    assert torch.equal(bn_relu_conv(x, bn, conv), conv(torch.relu(bn(x))))
    bn.train()
    with torch.no_grad():
        before = bn.running_mean.clone()
        assert torch.equal(bn_relu_conv(x, bn, conv), conv(torch.relu(bn(x))))
        assert not torch.equal(bn.running_mean, before)
    with pytest.raises(ConfigError, match="activation code"):
        bn_relu_conv(x, bn, conv, code="ternary")


def test_fusable_reasons():
    bn, relu = nn.BatchNorm2d(3), nn.ReLU()
    assert fusable(bn, relu, QuantConv2d(3, 3, 3, padding=1, weight_quantizer="he_sign")) is None
    assert "ReLU" in fusable(bn, nn.Hardtanh(), nn.Conv2d(3, 3, 3))
    assert "BatchNorm2d" in fusable(nn.BatchNorm1d(3), relu, nn.Conv2d(3, 3, 3))
    assert "input" in fusable(bn, relu, QuantConv2d(3, 3, 3, input_quantizer="sign"))
    assert "pads" in fusable(bn, relu, QuantConv2d(3, 3, 3, padding=1, pad_value=-1.0))
    assert "pads" in fusable(bn, relu, nn.Conv2d(3, 3, 3, padding="same"))
    assert "stochastic" in fusable(bn, relu, QuantConv2d(3, 3, 3, weight_quantizer="stochastic_sign"))


# --------------------------------------------------------------------------- the context manager on a WRN
def small_wrn(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("wrn_1bit", width=1, in_shape=(3, 32, 32)).train()


def test_context_swaps_and_restores_the_model():
    model = small_wrn()
    x = torch.randn(4, 3, 32, 32)
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    with compressed_activations(model) as plan:
        assert len(plan.fused) == 19 and plan.fused[0] == "stage1.block1.unit1.conv" and plan.fused[-1] == "head.conv"
        assert len(plan.relus) == 19 and plan.pools == ["stage2.block1.shortcut.pool", "stage3.block1.shortcut.pool"]
        assert isinstance(model.head.relu, CompressedReLU)
        assert list(model.state_dict()) == keys
        with pytest.raises(ConfigError, match="already active"):
            with compressed_activations(model):
                pass
        model.eval()
        with torch.no_grad():
            inside = model(x)
    assert [type(m) for m in model.modules()] == types
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), inside)  # eval mode inside the context runs the plain modules


def test_saved_bytes_ratio_on_a_small_wrn():
    """WRN-20-1, batch 16, 3×32×32: measured 1/40 (code "mean"), 1/25 ("stochastic") and 1/18 ("rounded") of the
    float autograd's saved bytes; swapping ReLUs alone saves nothing (the conv keeps its float input)."""
    model = small_wrn()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    base = saved_activation_bytes(model, x, loss)
    # float: per BN → ReLU → conv unit, the BN input and the ReLU output (shared with the conv), 8 bytes/element
    assert base.activations > 8 * 16 * 16 * 32 * 32 * 6
    with compressed_activations(model, fuse=False):
        relu_only = saved_activation_bytes(model, x, loss)
    with compressed_activations(model, code="mean"):
        mean = saved_activation_bytes(model, x, loss)
    with compressed_activations(model, code="stochastic"):
        stochastic = saved_activation_bytes(model, x, loss)
    with compressed_activations(model, code="rounded"):
        rounded = saved_activation_bytes(model, x, loss)
    assert relu_only / base > 0.95
    assert mean / base < 1 / 32
    assert stochastic / base < 1 / 20
    assert rounded / base < 1 / 16
    assert mean.resident >= sum(p.numel() * 4 for p in model.parameters() if p.ndim == 4)  # latent weights, not copies


def test_saved_bytes_counts_each_storage_once():
    conv = nn.Conv2d(2, 3, 3, bias=False)
    model = nn.Sequential(nn.ReLU(), conv)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    s = saved_activation_bytes(model, x)
    assert s.activations == 2 * 25 * 4  # the ReLU output, saved by ReLU and conv, counted once
    assert s.resident == conv.weight.numel() * 4  # the conv's weight is the model's own
    assert s.tensors == 3


def test_compressed_gradients_stay_close_to_exact():
    """How imprecise the approximate gradients are, on WRN-20-1 at initialisation with random data
    (cosine similarity to the exact gradient, per parameter): measured min 0.66 for "mean"
    (the 1-bit weight-gradient input dominates; the BN approximation alone keeps ≥ 0.99) and
    min 0.43 for "stochastic" (unbiased but noisy)."""
    model = small_wrn()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads():
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [p.grad.flatten() for p in model.parameters()]

    exact = grads()
    for code, bound in (("mean", 0.6), ("stochastic", 0.35), ("rounded", 0.75)):
        with compressed_activations(model, code=code, generator=torch.Generator().manual_seed(0)):
            approx = grads()
        cos = [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(approx, exact)]
        assert min(cos) > bound, (code, cos)
        assert min(cos[:3]) > 0.9, (code, cos)  # input BN γ, β and the stem conv: only BN-approximate


@pytest.mark.parametrize("code", ["mean", "stochastic", "rounded", None])
def test_compressed_wrn_trains_under_bfloat16_autocast(code):
    """Mixed precision with compressed learning (the trainer's --amp --compressed), on CPU: a 1-bit
    WRN-8 under bfloat16 autocast runs forward and backward with every code (None: fuse=False, only
    the exact ReLUs and pools swapped), gives finite gradients of the parameters' dtypes, close to
    the same code without autocast (same draws; measured min cosine 0.98 per parameter) and as
    close to plain autograd under autocast as the code is in float32 (measured min cosine 0.54
    "mean", 0.42 "stochastic", 0.76 "rounded"; 1.0 with fuse=False)."""
    torch.manual_seed(0)
    model = create_model("wrn_1bit", depth=8, width=0.25, in_shape=(1, 28, 28), num_classes=10).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)

    def grads(compressed: bool, amp: bool) -> list[torch.Tensor]:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        if not compressed:
            context = contextlib.nullcontext()
        elif code is None:
            context = compressed_activations(model, fuse=False)
        else:
            context = compressed_activations(model, code=code, generator=torch.Generator().manual_seed(0))
        with context:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    mixed = grads(True, True)
    for p, grad in zip(model.parameters(), mixed):
        assert grad.dtype == p.dtype and torch.isfinite(grad).all()
    plain = grads(False, True)
    if code is None:  # CompressedReLU and LeanAvgPool2d are exact in any dtype
        for grad, ref in zip(mixed, plain):
            torch.testing.assert_close(grad, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
        return

    def cosines(a, b):  # a 1-element gradient's cosine is only its sign: skip the stem BN of 1 channel
        return [float(F.cosine_similarity(u.flatten(), v.flatten(), dim=0)) for u, v in zip(a, b) if u.numel() > 1]

    assert min(cosines(mixed, grads(True, False))) > 0.95
    assert min(cosines(mixed, plain)) > {"mean": 0.45, "stochastic": 0.3, "rounded": 0.65}[code]


def test_training_step_peak_rss_is_a_nonnegative_byte_count():
    model = small_wrn()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with compressed_activations(model):
        delta = training_step_peak_rss(model, x, lambda out: F.cross_entropy(out, y))
    assert isinstance(delta, int) and delta >= 0
    assert all(p.grad is not None for p in model.parameters())


def test_compressed_training_steps_reduce_the_loss():
    torch.manual_seed(3)
    model = create_model("wrn_1bit", width=0.5, in_shape=(1, 12, 12), num_classes=3).train()
    x = torch.randn(24, 1, 12, 12)
    y = torch.randint(0, 3, (24,))
    x += y.view(-1, 1, 1, 1).float()  # learnable: the class shifts the image
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    with compressed_activations(model):
        for _ in range(15):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_measure_memory_table_without_rss():
    from onebit.memory import MODES, format_memory_table, measure_memory

    rows = measure_memory(width=0.25, batch=4, size=16, rss=False)
    assert [r.mode for r in rows] == list(MODES)
    assert rows[0].grad_cos_min == pytest.approx(1.0) and rows[1].grad_cos_min == pytest.approx(1.0)  # exact modes
    assert all(r.peak_rss is None for r in rows)
    assert all(r.step_seconds > 0 for r in rows)
    table = format_memory_table(rows)
    assert table.splitlines()[0].startswith("mode") and "stochastic" in table and "saved 1/" in table
    assert "step s" in table.splitlines()[0]


@pytest.mark.slow
def test_measure_memory_with_peak_rss_in_fresh_processes():
    from onebit.memory import measure_memory

    # at WRN-20-1, batch 32 the float step peaks at ~70 MB and the compressed one at ~75 MB: the
    # working set of a block, not the saved activations, sets the peak there; WRN-20-2, batch 64
    # measured ~222 MB float vs ~126 MB compressed (WRN-20-4, batch 128: 790 vs 284 MiB)
    rows = {r.mode: r for r in measure_memory(width=2, batch=64, rss=True)}
    assert all(r.peak_rss is not None and r.peak_rss > 0 for r in rows.values())
    assert rows["stochastic"].peak_rss < 0.8 * rows["float"].peak_rss
    assert rows["mean"].peak_rss < 0.8 * rows["float"].peak_rss
    assert rows["rounded"].peak_rss < 0.8 * rows["float"].peak_rss
