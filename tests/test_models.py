"""The model zoo: shapes for every registered model, gradients, module set, paper sizes, options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from onebit.errors import OnebitError, ShapeError, UnknownNameError
from onebit.layers import QuantAct, QuantConv2d, QuantLinear
from onebit.models import MODELS, create_model, list_models
from onebit.models.wrn import Downsample, PreActBlock

ALLOWED = (
    nn.Sequential, nn.Flatten, nn.Dropout, QuantLinear, QuantConv2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.MaxPool2d, QuantAct, nn.Hardtanh, nn.ReLU, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    PreActBlock, Downsample,
)
SHAPES = [(1, 28, 28), (3, 32, 32)]


def small(name: str) -> dict:
    """Tiny widths so every model runs in milliseconds."""
    return {"hidden": 24} if name.endswith("mlp") else {"width": 1 / 16}


def quant_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def bits(quantizer) -> int:
    return 32 if quantizer is None else quantizer.precision


def test_expected_models_are_registered():
    expected = {f"{family}_{kind}" for family in ("binarynet", "binaryconnect", "xnor", "float") for kind in ("mlp", "cnn")}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(MODELS.names()))
@pytest.mark.parametrize("in_shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_forward_shape_and_backward(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, in_shape=in_shape, num_classes=7, **small(name))
    assert model.in_shape == in_shape and model.num_classes == 7
    x = torch.randn(4, *in_shape)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_default_shapes_and_docs(name):
    model = create_model(name, **small(name))
    assert model.in_shape == ((1, 28, 28) if name.endswith("_mlp") else (3, 32, 32))
    assert model.num_classes == 10
    summary = MODELS.describe(name)
    assert summary and len(summary.split()) >= 3


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_only_exportable_module_types(name):
    model = create_model(name, **small(name))
    if getattr(model, "exportable", True) is False:
        pytest.skip(f"{name} is declared not exportable (residual connections)")
    assert isinstance(model, nn.Sequential)

    def walk(module: nn.Module, path: str) -> None:
        for child_name, child in module.named_children():
            assert isinstance(child, ALLOWED), f"{path}.{child_name}: {type(child).__name__}"
            if isinstance(child, (nn.Sequential, PreActBlock, Downsample)):
                walk(child, f"{path}.{child_name}")

    walk(model, name)


def test_unknown_name_and_argument():
    with pytest.raises(UnknownNameError, match="binarynet_cnn, binarynet_mlp"):
        create_model("binarynet")
    with pytest.raises(OnebitError, match="no_such_arg"):
        create_model("binarynet_mlp", no_such_arg=3)
    with pytest.raises(OnebitError, match="width"):
        create_model("binarynet_mlp", width=0.5)  # MLPs are sized by hidden
    with pytest.raises(OnebitError, match="activation"):
        create_model("binarynet_mlp", activation="gelu")
    with pytest.raises(OnebitError, match="dropout_in"):
        create_model("binarynet_mlp", dropout_in=1.0)
    with pytest.raises(ShapeError, match="too small"):
        create_model("binarynet_cnn", in_shape=(3, 4, 4), width=1 / 16)
    with pytest.raises(ShapeError):
        create_model("binarynet_mlp", in_shape=(28, 28))


def test_binarynet_mlp_paper_size():
    model = create_model("binarynet_mlp")  # 784–4096–4096–4096–10, no biases (BN follows)
    weights = 784 * 4096 + 2 * 4096 * 4096 + 4096 * 10
    bn = 2 * (3 * 4096 + 10)
    assert sum(p.numel() for p in model.parameters()) == weights + bn == 36_831_252
    assert [tuple(m.weight.shape) for m in quant_layers(model)] == [(4096, 784), (4096, 4096), (4096, 4096), (10, 4096)]
    assert all(m.bias is None for m in quant_layers(model))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(b.eps == 1e-4 and b.momentum == 0.1 for b in bns)
    assert isinstance(model[-1][-1], nn.BatchNorm1d)  # the logits are the last BN's output


def test_binarynet_cnn_paper_size_and_order():
    model = create_model("binarynet_cnn")
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert [m.out_channels for m in convs] == [128, 128, 256, 256, 512, 512]
    assert all(m.padding == (1, 1) and m.kernel_size == (3, 3) and m.pad_value == 0.0 for m in convs)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 4 * 4, 1024), (1024, 1024), (1024, 10)]
    # conv → pool → BN in the second conv of each pair
    assert [type(m).__name__ for m in model.conv2] == ["QuantConv2d", "MaxPool2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in model.conv1] == ["QuantConv2d", "BatchNorm2d"]
    fashion = create_model("binarynet_cnn", in_shape=(1, 28, 28), width=1 / 16)
    assert fashion.fc1.linear.in_features == 32 * 3 * 3  # 28 → 14 → 7 → 3


def test_width_multiplier():
    half = create_model("binarynet_cnn", width=0.5)
    assert [m.out_channels for m in half.modules() if isinstance(m, QuantConv2d)] == [64, 64, 128, 128, 256, 256]
    assert half.fc1.linear.out_features == 512 and half.fc1.linear.in_features == 256 * 16
    tiny = create_model("binarynet_cnn", width=0.001)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, QuantConv2d))
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_quantizer_placement(kind):
    def layers(family):
        return quant_layers(create_model(f"{family}_{kind}", **small(kind)))

    bnn = layers("binarynet")
    assert bits(bnn[0].input_quantizer) == 32 and bits(bnn[0].weight_quantizer) == 1  # real image, binary weights
    assert all(bits(m.input_quantizer) == 1 and m.input_quantizer.name == "sign" for m in bnn[1:])
    assert all(m.weight_quantizer.name == "sign" and m.weight_clip == 1.0 for m in bnn)
    bc = layers("binaryconnect")
    assert all(m.input_quantizer is None and m.weight_quantizer.name == "sign" for m in bc)
    xnor = layers("xnor")
    assert all(m.weight_quantizer.name == "scaled_sign" for m in xnor)
    assert all(m.input_quantizer.name == "scaled_sign" for m in xnor[1:])
    flt = layers("float")
    assert all(m.input_quantizer is None and m.weight_quantizer is None and m.weight_clip is None for m in flt)
    xnor_ffl = quant_layers(create_model(f"xnor_{kind}", float_first_last=True, **small(kind)))
    assert xnor_ffl[0].weight_quantizer is None and xnor_ffl[-1].weight_quantizer is None
    assert xnor_ffl[-1].input_quantizer is None and xnor_ffl[1].weight_quantizer.name == "scaled_sign"


def test_real_activations_follow_batchnorm():
    bc = create_model("binaryconnect_mlp", hidden=16)
    assert [type(m).__name__ for m in bc.fc1] == ["QuantLinear", "BatchNorm1d", "ReLU"]
    assert create_model("binaryconnect_mlp").fc1.linear.out_features == 2048
    flt = create_model("float_cnn", width=1 / 16, activation="hardtanh")
    assert [type(m).__name__ for m in flt.conv2] == ["QuantConv2d", "MaxPool2d", "BatchNorm2d", "Hardtanh"]
    assert not any(isinstance(m, (nn.ReLU, nn.Hardtanh)) for m in create_model("binarynet_mlp", hidden=16).modules())


def test_dropout_placement():
    model = create_model("binarynet_mlp", hidden=16, depth=2, dropout_in=0.2, dropout_hidden=0.5)
    assert list(model._modules) == ["flatten", "dropout_in", "fc1", "fc2", "out"]
    assert model.dropout_in.p == 0.2
    assert [type(m).__name__ for m in model.fc2] == ["QuantLinear", "BatchNorm1d", "Dropout"]
    assert model.fc2.dropout.p == 0.5
    assert not any(isinstance(m, nn.Dropout) for m in create_model("binarynet_mlp", hidden=16).modules())


def test_pad_value_only_on_binary_input_convs():
    model = create_model("binarynet_cnn", width=1 / 16, pad_value=-1.0)
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert convs[0].pad_value == 0.0 and all(m.pad_value == -1.0 for m in convs[1:])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_depth_and_rebuild_loads_state():
    linear = create_model("binarynet_mlp", depth=0)
    assert len(quant_layers(linear)) == 1 and linear.out.linear.input_quantizer is None
    torch.manual_seed(3)
    a = create_model("xnor_cnn", width=1 / 16, in_shape=(1, 28, 28))
    b = create_model("xnor_cnn", width=1 / 16, in_shape=(1, 28, 28))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(a.eval()(x), b.eval()(x))
