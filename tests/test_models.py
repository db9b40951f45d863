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


@pytest.mark.parametrize("name", sorted(n for n in MODELS.names() if not n.endswith("mlp")))
def test_channels_last_computes_the_same_network(name):
    """onebit.train runs convolutional models in NHWC on a CPU: every quantizer and layer must give
    the same outputs, batch-norm statistics and gradients in both memory layouts (up to rounding)."""
    # a random projection of the logits: their mean square is ~1 whatever the weights (the last
    # layer is a batch norm), so its gradient would be rounding noise
    projection = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = create_model(name, in_shape=(3, 12, 12), num_classes=5, width=1 / 8).to(memory_format=layout)
        x = torch.randn(6, 3, 12, 12).contiguous(memory_format=layout)
        out = model(x)
        (out * projection).sum().backward()
        stats = [b.clone() for b in model.buffers()]
        model.eval()
        with torch.no_grad():
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()], stats, model(x)))
    (out_a, grads_a, stats_a, eval_a), (out_b, grads_b, stats_b, eval_b) = results

    def assert_equal_up_to_rounding(b, a):  # relative to the tensor's scale: eval logits reach ~1e4
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))

    assert_equal_up_to_rounding(out_b, out_a)
    assert_equal_up_to_rounding(eval_b, eval_a)
    for a, b in zip(stats_a, stats_b):
        assert_equal_up_to_rounding(b, a)
    if name == "xnor_cnn":
        # α·β-scaled convolutions round differently in the two layouts, so values that tie exactly
        # in one max-pool window differ by an ulp in the other and the gradient goes to another,
        # equally maximal, input (BinaryNet's ±1 sums are exact integers in either order: no such
        # ties). The forward pass and the statistics above are what must agree.
        return
    for a, b in zip(grads_a, grads_b):
        assert_equal_up_to_rounding(b, a)


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


# --------------------------------------------------------------------------- user errors: one line, an OnebitError
def one_line_error(name: str, **kwargs) -> str:
    """The message of the OnebitError that ``create_model(name, **kwargs)`` raises, checked to be one line."""
    with pytest.raises(OnebitError) as info:
        create_model(name, **kwargs)
    text = str(info.value)
    assert text and "\n" not in text and len(text) <= 300, text
    return text


@pytest.mark.parametrize("name", ["binarynet_cnn", "xnor_cnn", "wrn_1bit", "float_wrn"])
@pytest.mark.parametrize("width", [float("inf"), float("-inf"), float("nan"), 0, -1.0, "inf", "x", True, None])
def test_width_must_be_positive_and_finite(name, width):
    assert "width" in one_line_error(name, width=width)


@pytest.mark.parametrize("name", ["binarynet_cnn", "wrn_1bit"])
def test_huge_width_is_refused_before_allocating(name):
    assert "width" in one_line_error(name, width=1e300)  # 16 * 1e300 channels: no int overflow, no allocation
    text = one_line_error(name, width=1e5)  # channels fit in an int, weights do not: the per-model limit
    assert f"model {name}" in text and "2,147,483,648" in text


@pytest.mark.parametrize("name", ["binarynet_mlp", "binarynet_cnn"])
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(weight_clip="x"), "weight_clip"),
        (dict(weight_clip=float("inf")), "weight_clip"),
        (dict(weight_clip=float("nan")), "weight_clip"),
        (dict(weight_clip=0), "weight_clip"),
        (dict(weight_clip=True), "weight_clip"),
        (dict(bn_eps=-1), "bn_eps"),
        (dict(bn_eps=0), "bn_eps"),
        (dict(bn_eps="x"), "bn_eps"),
        (dict(bn_eps=float("nan")), "bn_eps"),
        (dict(bn_momentum="x"), "bn_momentum"),
        (dict(bn_momentum=-0.1), "bn_momentum"),
        (dict(bn_momentum=1.5), "bn_momentum"),
        (dict(bn_momentum=float("nan")), "bn_momentum"),
        (dict(float_first_last="x"), "float_first_last"),
        (dict(dropout_in=True), "dropout_in"),
        (dict(num_classes=True), "num_classes"),
        (dict(weight_quantizer_args=0), "weight_quantizer_args"),
        (dict(weight_quantizer_args={1: 2}), "weight_quantizer_args"),
        (dict(weight_quantizer_args={"bits": 2}, weight_quantizer=None), "weight_quantizer_args"),
    ],
)
def test_invalid_layer_arguments(name, kwargs, word):
    assert word in one_line_error(name, **small(name), **kwargs)


@pytest.mark.parametrize("name", ["wrn_1bit", "float_wrn"])
@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(bn_eps=-1), "bn_eps"), (dict(bn_eps="x"), "bn_eps"), (dict(bn_momentum="x"), "bn_momentum"),
     (dict(bn_momentum=2), "bn_momentum"), (dict(bn_affine="x"), "bn_affine")],
)
def test_invalid_wrn_arguments(name, kwargs, word):
    assert word in one_line_error(name, width=1 / 16, **kwargs)


def test_valid_batchnorm_and_clip_arguments_still_build():
    model = create_model("binarynet_mlp", hidden=8, bn_momentum=None, bn_eps=1e-3, weight_clip=2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(b.momentum is None and b.eps == 1e-3 for b in bns)
    assert all(m.weight_clip == 2 for m in quant_layers(model))
    model = create_model("binarynet_cnn", width=1 / 16, bn_momentum=0, channels=[8, 8], pad_value=1)
    assert [m.out_channels for m in quant_layers(model)[:4]] == [1, 1, 1, 1]  # width scales the channels too
    import numpy as np
    assert create_model("binarynet_mlp", hidden=np.int64(8), num_classes=np.int32(3)).out.linear.out_features == 3


@pytest.mark.parametrize("name", ["binarynet_mlp", "xnor_cnn"])
def test_quantizer_arguments_that_do_not_fit_name_model_and_argument(name):
    text = one_line_error(name, **small(name), weight_quantizer_args={"x": 1})
    assert f"model {name}" in text and "weight_quantizer_args" in text and "'x'" in text
    text = one_line_error(name, **small(name), input_quantizer_args={"x": 1})
    assert f"model {name}" in text and "input_quantizer_args" in text
    # the quantizer's own one-line errors pass through unchanged
    assert "bits" in one_line_error(name, **small(name), weight_quantizer="kbit", weight_quantizer_args={"bits": 99})
    model = create_model(name, **small(name), weight_quantizer="kbit", weight_quantizer_args={"bits": 2, "mode": "weight"})
    assert all(m.weight_quantizer.bits == 2 for m in quant_layers(model))


def test_sizes_beyond_the_weight_limit_are_refused_without_allocating():
    assert "hidden" in one_line_error("binarynet_mlp", hidden=1e8)  # a float is not a size
    text = one_line_error("binarynet_mlp", hidden=10**8)
    assert "model binarynet_mlp" in text and "weights" in text and "fc2" in text and "2,147,483,648" in text
    assert "hidden" in one_line_error("binarynet_mlp", hidden=2**40)  # beyond any single size
    assert "2,147,483,648" in one_line_error("binarynet_mlp", hidden=46_000)  # 2.1e9 weights per hidden layer
    assert "fc1" in one_line_error("binarynet_mlp", in_shape=(1, 100_000, 100_000))
    assert "num_classes" in one_line_error("float_mlp", num_classes=2**40)
    assert "out" in one_line_error("float_mlp", depth=0, in_shape=(1, 2**15, 2**10), num_classes=2**12)
    assert "fc_units" in one_line_error("binarynet_cnn", fc_units=2**40)
    assert "channels" in one_line_error("binarynet_cnn", channels=(2**40,))
    assert "fc1" in one_line_error("binarynet_cnn", in_shape=(3, 2**20, 2**20), width=1 / 16)
    assert "head" in one_line_error("wrn_1bit", width=1 / 16, num_classes=2**30)


@pytest.mark.parametrize(
    "name, kwargs, word",
    [
        ("binarynet_mlp", dict(depth=100_000), "depth"),
        ("binarynet_mlp", dict(depth=1001), "depth"),
        ("binarynet_mlp", dict(depth=-1), "depth"),
        ("binarynet_mlp", dict(depth=2.0), "depth"),
        ("binarynet_cnn", dict(convs_per_stage=100_000), "convs_per_stage"),
        ("binarynet_cnn", dict(convs_per_stage=500), "convolutions"),  # 3 stages × 500 > 1000
        ("binarynet_cnn", dict(fc_layers=100_000), "fc_layers"),
        ("binarynet_cnn", dict(channels=(1,) * 100_000), "convolutions"),
        ("binarynet_cnn", dict(channels=(1,) * 100, in_shape=(1, 4, 4)), "too small"),
        ("binarynet_cnn", dict(channels=5), "channels"),
        ("binarynet_cnn", dict(channels="128"), "channels"),
        ("binarynet_cnn", dict(channels=()), "channels"),
        ("binarynet_cnn", dict(channels=(8, 1.5)), "channels"),
        ("binarynet_cnn", dict(pad_value="x"), "pad_value"),
        ("binarynet_cnn", dict(pad_value=float("nan")), "pad_value"),
        ("wrn_1bit", dict(depth=100_000), "depth"),
        ("wrn_1bit", dict(depth=1004), "depth"),  # 6n + 2, beyond the layer limit
        ("wrn_1bit", dict(depth=21), "6n + 2"),
    ],
)
def test_depth_and_structure_limits(name, kwargs, word):
    kwargs = {**small(name), **kwargs}
    assert word in one_line_error(name, **kwargs)


def test_allocation_failure_is_a_one_line_error_naming_model_and_size(monkeypatch):
    from onebit.models import binarynet, wrn

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 67108864 bytes. Error code 12 (Cannot allocate memory)\nmore detail"
        )

    monkeypatch.setattr(binarynet, "QuantLinear", no_memory)
    text = one_line_error("binarynet_mlp", hidden=64)
    assert "model binarynet_mlp" in text and "memory" in text and f"{784 * 64 + 64 * 64 * 2 + 640:,} weights" in text

    def memory_error(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(wrn, "QuantConv2d", memory_error)
    text = one_line_error("wrn_1bit", width=1 / 16)
    assert "model wrn_1bit" in text and "memory" in text and "weights" in text

    def bug(*args, **kwargs):
        raise RuntimeError("a programming error, not the user's")

    monkeypatch.setattr(binarynet, "QuantConv2d", bug)
    with pytest.raises(RuntimeError, match="programming error") as info:
        create_model("binarynet_cnn", width=1 / 16)
    assert not isinstance(info.value, OnebitError)


@pytest.mark.parametrize("name", ["binarynet_mlp", "binarynet_cnn", "wrn_1bit"])
@pytest.mark.parametrize(
    "in_shape",
    [5, "abc", None, (28, 28), (1, 2, 3, 4), (1.5, 28, 28), (True, 28, 28), (1, float("inf"), 28),
     (0, 28, 28), (1, 2**40, 28), ("1", 28, 28)],
)
def test_in_shape_of_wrong_type_or_rank(name, in_shape):
    assert "in_shape" in one_line_error(name, **small(name), in_shape=in_shape)


@pytest.mark.parametrize("name", ["binarynet_mlp", "binarynet_cnn", "wrn_1bit"])
@pytest.mark.parametrize("num_classes", ["x", 1.5, 0, -3, True, None, (10,), float("inf")])
def test_num_classes_of_wrong_type(name, num_classes):
    assert "num_classes" in one_line_error(name, **small(name), num_classes=num_classes)


def test_layers_refuse_bad_clip_and_pad_value():
    from onebit.errors import ConfigError

    for clip in ("x", float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match="weight_clip"):
            QuantLinear(3, 2, weight_clip=clip)
        with pytest.raises(ConfigError, match="weight_clip"):
            QuantConv2d(3, 2, 3, weight_clip=clip)
    for pad in ("x", float("inf"), None):
        with pytest.raises(ConfigError, match="pad_value"):
            QuantConv2d(3, 2, 3, padding=1, pad_value=pad)
