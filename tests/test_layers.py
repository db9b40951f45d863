"""Quantized layers: exact agreement with float layers run on signs, one-padding, clipping, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.layers import (
    QuantAct,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    clip_latent_weights,
    has_stochastic_quantizer,
    recompute_batchnorm,
)
from onebit.errors import ConfigError, OnebitError
from onebit.quantizers import KBit, SteSign, StochasticSign


def pm1(x: torch.Tensor) -> torch.Tensor:
    """The reference sign, written independently of onebit: 0 → +1."""
    return torch.where(x >= 0, 1.0, -1.0)


def binary_linear(bias=True, **kwargs) -> QuantLinear:
    return QuantLinear(16, 5, bias, **{"input_quantizer": "sign", "weight_quantizer": "sign", **kwargs})


def binary_conv(*args, **kwargs) -> QuantConv2d:
    return QuantConv2d(3, 4, *args, **{"input_quantizer": "sign", "weight_quantizer": "sign", **kwargs})


# torch's note that an even kernel with padding='same' copies the input; expected here
same_padding_copy = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# --------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("bias", [False, True])
def test_binary_linear_equals_linear_on_signs(bias):
    torch.manual_seed(0)
    layer = binary_linear(bias)
    x = torch.randn(8, 16)
    x[0, :4] = 0.0  # sign(0) = +1
    assert torch.equal(layer(x), F.linear(pm1(x), pm1(layer.weight), layer.bias))


def test_linear_without_quantizers_equals_nn_linear():
    torch.manual_seed(0)
    layer = QuantLinear(16, 5)
    plain = nn.Linear(16, 5)
    plain.load_state_dict(layer.state_dict())  # the quantizers add no state
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), plain(x))
    assert layer.input_quantizer is None and layer.weight_quantizer is None


def test_linear_passes_factory_kwargs():
    layer = QuantLinear(4, 3, weight_quantizer="sign", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_linear_gradients_reach_latent_weights_through_the_saturated_ste():
    layer = binary_linear(bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-2, 2, 80).reshape(5, 16))
    x = torch.linspace(-1.5, 1.5, 32).reshape(2, 16).requires_grad_()
    g = torch.arange(10.0).reshape(2, 5) - 4
    layer(x).backward(g)
    w = layer.weight.detach()
    assert torch.equal(layer.weight.grad, (g.T @ pm1(x.detach())) * (w.abs() <= 1))
    assert torch.equal(x.grad, (g @ pm1(w)) * (x.detach().abs() <= 1))
    assert layer.weight.grad[w.abs() > 1].eq(0).all() and layer.weight.grad.ne(0).any()


def test_quantized_weight_is_detached_forward_weight():
    layer = binary_linear(weight_quantizer=KBit(2, mode="weight"))
    q = layer.quantized_weight()
    assert not q.requires_grad
    assert torch.equal(q, KBit(2, mode="weight")(layer.weight).detach())
    plain = QuantLinear(4, 3).quantized_weight()
    assert not plain.requires_grad


# --------------------------------------------------------------------------- QuantConv2d
CONV_VARIANTS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=(1, 2)),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=2),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, padding="valid", bias=False),
]


@pytest.mark.parametrize("kwargs", CONV_VARIANTS)
def test_binary_conv_equals_conv_on_signs(kwargs):
    torch.manual_seed(0)
    layer = binary_conv(**kwargs)
    x = torch.randn(2, 3, 9, 8)
    ref = F.conv2d(
        pm1(x), pm1(layer.weight), layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )
    assert torch.equal(layer(x), ref)


@same_padding_copy
@pytest.mark.parametrize("pad_value", [1.0, -1.0])
@pytest.mark.parametrize(
    "kwargs, pad",
    [
        (dict(kernel_size=3, padding=1), (1, 1, 1, 1)),
        (dict(kernel_size=3, stride=2, padding=(1, 2)), (2, 2, 1, 1)),
        # 'same' with even kernels: torch puts the odd pixel after, total = dilation·(k − 1)
        (dict(kernel_size=(2, 4), padding="same"), (1, 2, 0, 1)),
        (dict(kernel_size=3, padding="same", dilation=(1, 2)), (2, 2, 1, 1)),
    ],
)
def test_one_padding_equals_explicit_pad_then_conv(kwargs, pad, pad_value):
    torch.manual_seed(0)
    layer = binary_conv(pad_value=pad_value, **kwargs)
    x = torch.randn(2, 3, 7, 8)
    ref = F.conv2d(F.pad(pm1(x), pad, value=pad_value), pm1(layer.weight), layer.bias, layer.stride, 0, layer.dilation)
    out = layer(x)
    assert torch.equal(out, ref)
    zero_padded = binary_conv(**kwargs)
    zero_padded.load_state_dict(layer.state_dict())
    assert out.shape == zero_padded(x).shape and not torch.equal(out, zero_padded(x))


@same_padding_copy
def test_same_padding_split_matches_torch():
    torch.manual_seed(0)
    layer = binary_conv((2, 4), padding="same")
    x = torch.randn(1, 3, 6, 6)
    ref = F.conv2d(F.pad(pm1(x), (1, 2, 0, 1)), pm1(layer.weight), layer.bias)
    assert torch.equal(layer(x), ref)


def test_one_padding_without_padding_is_a_plain_conv():
    torch.manual_seed(0)
    layer = binary_conv(3, pad_value=-1.0)
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(layer(x), F.conv2d(pm1(x), pm1(layer.weight), layer.bias))


def test_pad_value_needs_zeros_padding_mode():
    with pytest.raises(ConfigError, match="padding_mode='zeros'"):
        QuantConv2d(3, 4, 3, padding=1, padding_mode="reflect", pad_value=1.0)


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_other_padding_modes_match_nn_conv2d(mode):
    torch.manual_seed(0)
    layer = QuantConv2d(3, 4, 3, 2, (1, 2), padding_mode=mode)
    plain = nn.Conv2d(3, 4, 3, 2, (1, 2), padding_mode=mode)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 7, 8)
    assert torch.equal(layer(x), plain(x))


def test_conv_gradients_reach_latent_weights_and_inputs():
    torch.manual_seed(0)
    layer = binary_conv(3, padding=1, pad_value=-1.0, bias=False)
    with torch.no_grad():
        layer.weight.mul_(4)  # some latent weights beyond the STE window
    x = (2 * torch.randn(2, 3, 5, 5)).requires_grad_()
    layer(x).square().sum().backward()
    w = layer.weight.detach()
    assert layer.weight.grad[w.abs() > 1].eq(0).all() and layer.weight.grad.ne(0).any()
    assert x.grad[x.detach().abs() > 1].eq(0).all() and x.grad.ne(0).any()


# --------------------------------------------------------------------------- clipping
def test_clip_latent_weights_after_a_big_step():
    torch.manual_seed(0)
    clipped = binary_linear(weight_clip=0.5)
    conv = binary_conv(3, weight_clip=1.0)
    free = binary_linear()
    model = nn.Sequential(nn.Sequential(conv, nn.Flatten()), clipped, free)
    optimizer = torch.optim.SGD(model.parameters(), lr=1000.0)
    for layer in (conv, clipped, free):
        layer.weight.grad = torch.randn_like(layer.weight)
    for layer in (conv, clipped, free):
        layer.bias.grad = torch.ones_like(layer.bias)
    optimizer.step()
    free_before = free.weight.detach().clone()
    bias_before = clipped.bias.detach().clone()
    clip_latent_weights(model)
    assert clipped.weight.abs().max() == 0.5
    assert conv.weight.abs().max() == 1.0
    assert torch.equal(free.weight, free_before)
    assert torch.equal(clipped.bias, bias_before)  # only weights are latent


def test_clip_weights_method_returns_the_layer():
    layer = binary_linear(weight_clip=1.0)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    assert layer.clip_weights_() is layer
    assert torch.equal(layer.weight, torch.ones_like(layer.weight))
    assert isinstance(layer, QuantLayer)


@pytest.mark.parametrize("clip", [0, -1.0])
def test_weight_clip_must_be_positive(clip):
    with pytest.raises(ConfigError, match="weight_clip"):
        QuantLinear(3, 2, weight_clip=clip)


# --------------------------------------------------------------------------- repr, QuantAct, modes
def test_repr_shows_parent_arguments_quantizers_clip_and_pad_value():
    text = repr(binary_conv(3, stride=2, padding=1, weight_clip=1.0, pad_value=-1.0))
    assert "3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), weight_clip=1.0, pad_value=-1.0" in text
    assert "(input_quantizer): SteSign()" in text and "(weight_quantizer): SteSign()" in text
    text = repr(QuantLinear(3, 2, weight_quantizer=KBit(4, mode="weight")))
    assert "in_features=3, out_features=2, bias=True\n" in text
    assert "(input_quantizer): None" in text and "(weight_quantizer): KBit(bits=4, mode='weight')" in text


def test_quant_act():
    x = torch.tensor([-2.0, -0.0, 0.3, 1.0])
    assert torch.equal(QuantAct("sign")(x), pm1(x))
    assert torch.equal(QuantAct("kbit", bits=2)(x), torch.tensor([0.0, 0.0, 1 / 3, 1.0]))
    assert torch.equal(QuantAct(None)(x), x)
    act = SteSign()
    assert QuantAct(act).quantizer is act
    assert "(quantizer): SteSign()" in repr(QuantAct("sign"))


def test_train_and_eval_reach_the_quantizers():
    layer = QuantLinear(64, 4, input_quantizer=StochasticSign(), weight_quantizer="sign")
    x = torch.zeros(16, 64)
    layer.eval()
    assert torch.equal(layer(x), F.linear(torch.ones_like(x), pm1(layer.weight), layer.bias))
    layer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer(x), layer(x))


def test_assigning_a_quantizer_later_registers_it():
    layer = QuantLinear(3, 2)
    layer.weight_quantizer = SteSign()
    assert dict(layer.named_children()) == {"weight_quantizer": layer.weight_quantizer}  # None children are skipped
    assert torch.equal(layer.quantized_weight(), pm1(layer.weight.detach()))


def test_has_stochastic_quantizer():
    deterministic = nn.Sequential(QuantLinear(4, 3, input_quantizer="sign", weight_quantizer="sign"), nn.BatchNorm1d(3))
    stochastic = nn.Sequential(QuantLinear(4, 3, weight_quantizer="stochastic_sign"), nn.BatchNorm1d(3))
    assert not has_stochastic_quantizer(deterministic)
    assert has_stochastic_quantizer(stochastic)


def test_recompute_batchnorm_leaves_out_single_samples_and_keeps_the_statistics_on_failure():
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(16, 8, weight_quantizer="sign"), nn.BatchNorm1d(8))
    norm = model[1]
    norm.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    full = torch.randn(50, 16)
    recompute_batchnorm(model, [full, torch.randn(1, 16)])  # a last batch of one sample, as len(train) % batch == 1
    assert torch.allclose(norm.running_mean, F.linear(full, torch.where(model[0].weight >= 0, 1.0, -1.0),
                                                       model[0].bias).mean(0), atol=1e-5)
    norm.load_state_dict(before)
    with pytest.raises(OnebitError, match="at least 2 samples"):
        recompute_batchnorm(model, [torch.randn(1, 16)])
    with pytest.raises(RuntimeError):
        recompute_batchnorm(model, [full, torch.randn(5, 7)])  # fails after changing the statistics
    for key, value in before.items():
        assert torch.equal(norm.state_dict()[key], value), key


def test_quant_linear_takes_nn_linears_positional_arguments():
    layer = QuantLinear(3, 4, False, "cpu", torch.float64, weight_quantizer="sign")
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.weight.device.type == "cpu"


def test_recompute_batchnorm_measures_the_deterministic_network_and_restores_modes():
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, bias=False, input_quantizer="stochastic_sign", weight_quantizer="stochastic_sign")
    dropout, norm = nn.Dropout(0.5), nn.BatchNorm1d(8, momentum=0.3)
    model = nn.Sequential(dropout, layer, norm)
    model.train()
    batches = [torch.randn(50, 16) for _ in range(3)]
    recompute_batchnorm(model, batches)
    # what eval runs: no dropout, sign of inputs and weights
    outputs = torch.cat([F.linear(torch.where(x >= 0, 1.0, -1.0), torch.where(layer.weight >= 0, 1.0, -1.0))
                         for x in batches])
    expected_var = torch.stack([F.linear(torch.where(x >= 0, 1.0, -1.0),
                                         torch.where(layer.weight >= 0, 1.0, -1.0)).var(0) for x in batches]).mean(0)
    assert torch.allclose(norm.running_mean, outputs.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, expected_var, atol=1e-4)  # the average of the batches' variances
    assert norm.momentum == 0.3 and int(norm.num_batches_tracked) == 3
    assert all(m.training for m in model.modules())  # modes as before
    model.eval()
    recompute_batchnorm(model, batches[:1])
    assert not any(m.training for m in model.modules())
