"""Export to .onebit and the engine: bit-exact against PyTorch on every kernel path, thresholds on
adversarial BatchNorm statistics, bad inputs, checkpoints, no torch in the engine, ONNX."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import onebit
from onebit.data import load_dataset, to_float
from onebit.engine import kernels, load
from onebit.engine import format as fmt
from onebit.engine.executor import pixels_to_inputs
from onebit.errors import CheckpointError, ConfigError, FormatError, OnebitError, ShapeError
from onebit.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from onebit.export import ExportError, derive_thresholds, export_checkpoint, export_model, export_onnx
from onebit.layers import QuantAct, QuantConv2d, QuantLinear
from onebit.models import create_model

PATHS = kernels.available_paths()

pytestmark = pytest.mark.usefixtures("restore_kernel_path")


# --------------------------------------------------------------------------- helpers
def grid_input(n: int, shape, seed: int = 0) -> torch.Tensor:
    """Inputs in [−1, 1] on a 1/64 grid: every float32 sum of them is exact, in any order, so
    the first (real-input) layer agrees with PyTorch bit for bit whatever order each sums in."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, (n, *shape), generator=g).float() / 64


def randomize_bn(model: nn.Module, shape, seed: int = 0, ties: bool = True) -> nn.Module:
    """Adversarial BatchNorm statistics around the real pre-activations: γ < 0 and γ = 0
    channels, running variances over 14 orders of magnitude, and (``ties``) channels whose
    threshold falls exactly on a reachable pre-activation (integer mean, β = 0: BN output 0,
    sign +1)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(grid_input(64, shape, seed=seed + 1))  # running stats = this batch's
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            n = bn.num_features
            bn.running_mean += torch.randn(n, generator=g) * bn.running_var.sqrt() * 0.5
            bn.running_var *= torch.exp(torch.empty(n).uniform_(-7, 7, generator=g))
            gamma = torch.randn(n, generator=g)
            gamma[torch.rand(n, generator=g) < 0.15] = 0.0
            bn.weight.copy_(gamma)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
            if ties:
                tie = torch.rand(n, generator=g) < 0.3
                bn.running_mean[tie] = torch.round(bn.running_mean[tie])
                bn.bias[tie] = 0.0
    return model.eval()


def forward_capturing(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the output of every module of one of ``kinds``, by module name."""
    outputs: dict[str, np.ndarray] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().numpy()))
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    ]
    try:
        with torch.no_grad():
            logits = model(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outputs


def torch_preactivations(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the output of every quantized layer (before pooling and BN), by module name."""
    return forward_capturing(model, x, (QuantLinear, QuantConv2d))


def assert_logits_close(engine: np.ndarray, reference: np.ndarray, rtol: float = 1e-4) -> None:
    scale = max(float(np.abs(reference).max()), 1e-30)
    np.testing.assert_allclose(engine, reference, rtol=rtol, atol=rtol * scale)


MODELS = {
    "mlp-mnist": ("binarynet_mlp", dict(in_shape=(1, 28, 28), hidden=96, depth=2)),
    "mlp-cifar": ("binarynet_mlp", dict(in_shape=(3, 32, 32), hidden=70, depth=3)),
    "cnn-mnist": ("binarynet_cnn", dict(in_shape=(1, 28, 28), width=0.15, fc_units=200)),
    "cnn-cifar": ("binarynet_cnn", dict(in_shape=(3, 32, 32), width=0.1, fc_units=100)),
    "cnn-mnist-pad-1": ("binarynet_cnn", dict(in_shape=(1, 28, 28), width=0.2, fc_units=64, pad_value=-1.0)),
    "cnn-cifar-pad+1": ("binarynet_cnn", dict(in_shape=(3, 32, 32), width=0.55, channels=(128, 256), fc_units=64, pad_value=1.0)),
}
_exported: dict[str, tuple] = {}


def exported(key: str, tmp_path_factory) -> tuple[nn.Module, Path]:
    if key not in _exported:
        name, kwargs = MODELS[key]
        torch.manual_seed(hash(key) % 1000)
        model = randomize_bn(create_model(name, **kwargs), kwargs["in_shape"], seed=len(key))
        path = tmp_path_factory.mktemp("models") / f"{key}.onebit"
        export_model(model, path, source={"name": name, "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}})
        _exported[key] = (model, path)
    return _exported[key]


# --------------------------------------------------------------------------- bit exactness
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", sorted(MODELS))
def test_engine_is_bit_exact(key, path, tmp_path_factory):
    model, file = exported(key, tmp_path_factory)
    kernels.set_path(path)
    engine = load(file)
    shape = MODELS[key][1]["in_shape"]
    assert engine.input_shape == tuple(shape) and engine.num_classes == 10
    for n in (1, 3, 64):
        x = grid_input(n, shape, seed=100 + n)
        logits, pre = torch_preactivations(model, x)
        traced = [t for t in engine.trace(x.numpy()) if t.op in ("dense", "conv")]
        assert [t.name for t in traced] == list(pre)
        for entry in traced:
            # binary layers: integer dot products, identical; the first layer: exact float sums
            np.testing.assert_array_equal(entry.value.astype(np.float32), pre[entry.name], err_msg=entry.name)
            if entry.name != traced[0].name:
                assert entry.value.dtype == np.int32
        predicted = engine.predict(x.numpy())
        assert predicted.dtype == np.float32 and predicted.shape == (n, 10)
        assert_logits_close(predicted, logits)
        np.testing.assert_array_equal(engine.classify(x.numpy()), logits.argmax(1))
        np.testing.assert_array_equal(predicted, engine.trace(x.numpy())[-1].value)  # fused == unfused


def assert_every_path_predicts_the_same(file, x: np.ndarray) -> None:
    """Every kernel path of this CPU gives bit-identical logits for ``x``."""
    results = []
    for path in PATHS:
        kernels.set_path(path)
        results.append(load(file).predict(x))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_all_paths_agree_exactly(tmp_path_factory):
    _, file = exported("cnn-cifar", tmp_path_factory)
    assert_every_path_predicts_the_same(file, grid_input(5, (3, 32, 32), seed=9).numpy())


def test_real_valued_inputs_agree(tmp_path_factory):
    """Off the grid the first layer sums in another order than PyTorch; bits may differ only
    where a pre-activation is within rounding of its threshold, so predictions agree."""
    model, file = exported("cnn-cifar", tmp_path_factory)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    logits, _ = torch_preactivations(model, x)
    assert (load(file).classify(x.numpy()) == logits.argmax(1)).mean() >= 0.95


# --------------------------------------------------------------------------- thresholds
def bn_module(n: int, seed: int, two_d: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(n, eps=1e-4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g) * 20)
        bn.running_var.copy_(torch.exp(torch.empty(n).uniform_(-16, 16, generator=g)))
        gamma = torch.randn(n, generator=g)
        gamma[: n // 5] = 0.0
        gamma[n // 5: n // 3] *= torch.tensor(1e-30)  # tiny γ: BN scale underflows
        bn.weight.copy_(gamma)
        bias = torch.randn(n, generator=g) * 3
        ties = torch.rand(n, generator=g) < 0.3
        bn.running_mean[ties] = torch.round(bn.running_mean[ties])
        bias[ties] = 0.0
        bn.bias.copy_(bias)
    return bn


@pytest.mark.parametrize("seed", range(5))
def test_integer_thresholds_reproduce_torch_everywhere(seed):
    n, k = 300, 75
    bn = bn_module(n, seed)
    hard = nn.Hardtanh()

    def positive(values: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (hard(bn(torch.from_numpy(values).view(1, n))) >= 0).numpy().reshape(n)

    s, t = derive_thresholds(positive, n, "int", k)
    assert s.dtype == np.int8 and t.dtype == np.int32
    assert {-1, 0, 1} <= set(s.tolist())
    d = torch.arange(-k, k + 1, dtype=torch.float32)
    with torch.no_grad():
        truth = (bn(d[:, None].expand(-1, n).contiguous()) >= 0).numpy()  # [2k+1, n]
    rule = s[None, :].astype(np.int64) * np.arange(-k, k + 1)[:, None] >= t[None, :]
    np.testing.assert_array_equal(rule, truth)
    # γ = 0: constant, by the sign of β (0 → +1)
    zero = (bn.weight == 0).numpy()
    assert (s[zero] == 0).all()
    np.testing.assert_array_equal(t[zero] <= 0, (bn.bias[zero] >= 0).numpy())


@pytest.mark.parametrize("seed", range(3))
def test_float_thresholds_reproduce_torch(seed):
    n = 200
    bn = bn_module(n, seed, two_d=True)

    def positive(values: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (bn(torch.from_numpy(values).view(1, n, 1, 1)) >= 0).numpy().reshape(n)

    s, t = derive_thresholds(positive, n, "float")
    assert t.dtype == np.float32 and np.isfinite(t).all()
    rng = np.random.default_rng(seed)
    # at the threshold, one float below and above, and far away
    near = np.stack([np.nextafter(np.abs(t) * np.sign(s), -np.inf), np.abs(t) * np.sign(s),
                     np.nextafter(np.abs(t) * np.sign(s), np.inf)]).astype(np.float32)
    far = rng.normal(size=(50, n)).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 6, size=(50, 1))
    x = np.concatenate([near, far, np.zeros((1, n), np.float32)]).astype(np.float32)
    with torch.no_grad():
        truth = (bn(torch.from_numpy(x)[:, :, None, None]) >= 0).numpy().reshape(x.shape)
    rule = np.where(s > 0, x >= t, np.where(s < 0, -x >= t, np.float32(0) >= t))
    np.testing.assert_array_equal(rule, truth)


# --------------------------------------------------------------------------- other layouts
def custom_model() -> nn.Sequential:
    """What the built-in models do not have: biases, Hardtanh, QuantAct, strided and padded
    pooling of bits and of integers, 70 channels (not a multiple of 64) before a flatten,
    conv → flatten → BN1d → sign (a per-feature threshold in NHWC order), one-padding."""
    sign = dict(weight_quantizer="sign")
    model = nn.Sequential(OrderedDict(
        conv1=QuantConv2d(3, 8, 3, stride=2, padding=1, bias=True, **sign),
        bn1=nn.BatchNorm2d(8),
        act1=nn.Hardtanh(),
        pool1=nn.MaxPool2d(3, stride=2, padding=1),  # after BN: threshold, then pool bits
        conv2=QuantConv2d(8, 70, 3, padding=1, bias=True, input_quantizer="sign", pad_value=1.0, **sign),
        pool2=nn.MaxPool2d(2, stride=2, padding=1),  # before BN: pool integers
        bn2=nn.BatchNorm2d(70),
        sign2=QuantAct("sign"),
        conv3=QuantConv2d(70, 6, 2, bias=False, **sign),  # input_quantizer None on ±1 values
        flatten=nn.Flatten(),
        bn3=nn.BatchNorm1d(6 * 2 * 2),
        drop=nn.Dropout(0.3),
        fc=QuantLinear(24, 5, bias=True, input_quantizer="approx_sign", **sign),
        bn4=nn.BatchNorm1d(5),
    ))
    model.in_shape = (3, 16, 16)
    return model


@pytest.mark.parametrize("path", PATHS)
def test_custom_layouts_are_bit_exact(path, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(custom_model(), (3, 16, 16), seed=4, ties=False)
    export_model(model, tmp_path / "custom.onebit")
    kernels.set_path(path)
    engine = load(tmp_path / "custom.onebit")
    ops = [layer["op"] for layer in engine.metadata["layers"]]
    assert ops == ["conv", "threshold", "maxpool", "conv", "maxpool", "threshold", "conv", "flatten",
                   "threshold", "dense", "affine"]
    x = grid_input(20, (3, 16, 16), seed=1)
    logits, pre = torch_preactivations(model, x)
    checked = []
    for entry in engine.trace(x.numpy()):
        if entry.name in pre and entry.name != "conv1":  # binary layers: integer dot products
            layer = dict(model.named_modules())[entry.name]
            bias = 0 if layer.bias is None else layer.bias.detach().numpy().reshape((-1,) + (1,) * (entry.value.ndim - 2))
            assert entry.value.dtype == np.int32
            np.testing.assert_array_equal(entry.value, np.round(pre[entry.name] - bias), err_msg=entry.name)
            checked.append(entry.name)
    assert checked == ["conv2", "conv3", "fc"]
    assert_logits_close(engine.predict(x.numpy()), logits)


@pytest.mark.parametrize("path", PATHS)
def test_conv_pool_threshold_runs_fused_and_bit_exact(path, tmp_path, monkeypatch):
    """conv2 → pool2 (integers, padded) → bn2 → sign2 of the custom model — 70 channels with
    γ < 0, γ = 0 and thresholds on reachable dots — runs as conv_threshold + a max-pool of
    bits in predict, with the same logits as the ops run one by one."""
    torch.manual_seed(1)
    model = randomize_bn(custom_model(), (3, 16, 16), seed=5, ties=True)
    export_model(model, tmp_path / "custom.onebit")
    kernels.set_path(path)
    engine = load(tmp_path / "custom.onebit")
    fused_channels = []
    conv_threshold = kernels.BinaryConv2d.conv_threshold

    def spy(self, x, scale, thresh, threads=0):
        fused_channels.append(len(scale))
        return conv_threshold(self, x, scale, thresh, threads)

    monkeypatch.setattr(kernels.BinaryConv2d, "conv_threshold", spy)
    for n in (1, 7, 33):
        x = grid_input(n, (3, 16, 16), seed=n).numpy()
        np.testing.assert_array_equal(engine.predict(x), engine.trace(x)[-1].value)
    assert fused_channels == [70] * 3


def test_xnor_and_binaryconnect_models_follow_pytorch(tmp_path):
    """Real-valued parts (XNOR's α and β, BinaryConnect's ReLU activations) run in float: close, not bit-exact."""
    cases = [("xnor_mlp", dict(hidden=64)), ("xnor_cnn", dict(in_shape=(1, 28, 28), width=0.2, fc_units=64)),
             ("xnor_mlp", dict(hidden=64, float_first_last=True)), ("binaryconnect_mlp", dict(hidden=64)),
             ("binaryconnect_cnn", dict(in_shape=(3, 32, 32), width=0.1, fc_units=64))]
    for name, kwargs in cases:
        torch.manual_seed(0)
        shape = kwargs.get("in_shape", (1, 28, 28))
        model = randomize_bn(create_model(name, **kwargs), shape, seed=2, ties=False)
        export_model(model, tmp_path / f"{name}.onebit")
        x = grid_input(64, shape, seed=7)
        logits, _ = torch_preactivations(model, x)
        out = load(tmp_path / f"{name}.onebit").predict(x.numpy())
        assert (out.argmax(1) == logits.argmax(1)).mean() >= 0.9, name
        close = np.isclose(out, logits, rtol=1e-3, atol=1e-3 * np.abs(logits).max()).all(axis=1)
        assert close.mean() >= 0.9, name


@pytest.mark.parametrize("pad_value", [1.0, -1.0])
def test_xnor_conv_padded_with_ones_is_refused(pad_value, tmp_path):
    """PyTorch pads XNOR's β·sign(x) with a raw ±1; the engine would scale the padding by β too."""
    torch.manual_seed(0)
    model = create_model("xnor_cnn", in_shape=(1, 16, 16), width=0.1, fc_units=16, pad_value=pad_value).eval()
    with pytest.raises(ExportError, match=r"conv2\.conv: an XNOR convolution \(scaled input\) padded with"):
        export_model(model, tmp_path / "x.onebit")
    assert not (tmp_path / "x.onebit").exists()


def test_xnor_conv_padded_with_zeros_is_exact(tmp_path):
    """With pad_value = 0 every XNOR convolution's output, borders included, is β·α·(the engine's integer sum)."""
    torch.manual_seed(0)
    model = create_model("xnor_cnn", in_shape=(1, 16, 16), width=0.1, fc_units=16, pad_value=0.0)
    model = randomize_bn(model, (1, 16, 16), seed=3, ties=False)
    export_model(model, tmp_path / "x.onebit")
    x = grid_input(8, (1, 16, 16), seed=5)
    _, pre = torch_preactivations(model, x)
    trace = load(tmp_path / "x.onebit").trace(x.numpy())
    modules = dict(model.named_modules())
    checked = []
    for k, entry in enumerate(trace):
        if entry.op != "conv" or not [t for t in trace[:k] if t.op == "binarize"]:
            continue
        binarize = max(j for j in range(k) if trace[j].op == "binarize")
        source = trace[binarize - 1].value
        beta = np.abs(source.reshape(len(source), -1)).mean(1, dtype=np.float64)
        weight = modules[entry.name].weight.detach().double()
        alpha = weight.abs().mean((1, 2, 3)).numpy()
        expected = entry.value * beta[:, None, None, None] * alpha[None, :, None, None]
        scale = np.abs(pre[entry.name]).max()
        np.testing.assert_allclose(expected, pre[entry.name], rtol=1e-5, atol=1e-5 * scale, err_msg=entry.name)
        checked.append(entry.name)
    assert len(checked) >= 2  # every padded binary convolution of the model


def overflow_model(alpha: float) -> nn.Sequential:
    """The reviewer's case: a real-input layer with α = ``alpha`` (scaled_sign, no weight clip),
    BN with γ = 0 on channels 0 and 1, then a sign. For |v| near FLT_MAX, v·α = inf and
    inf·0 = NaN: PyTorch's sign there is −1, though +1 (β = 0.5) for every finite z."""
    model = nn.Sequential(OrderedDict(
        fc1=QuantLinear(8, 4, bias=False, weight_quantizer="scaled_sign"),
        bn1=nn.BatchNorm1d(4),
        fc2=QuantLinear(4, 3, bias=False, input_quantizer="sign", weight_quantizer="sign"),
    ))
    with torch.no_grad():
        model.fc1.weight.fill_(alpha)
        model.bn1.weight.copy_(torch.tensor([0.0, 0.0, 1.0, -1.0]))
        model.bn1.bias.copy_(torch.tensor([0.5, -0.5, 0.1, 0.1]))
    model.in_shape = (8,)
    return model.eval()


def test_thresholds_ignore_where_torch_overflows_to_nan(tmp_path):
    model = overflow_model(2.0)
    meta = export_model(model, tmp_path / "nan.onebit")
    engine = load(tmp_path / "nan.onebit")
    index = [layer["op"] for layer in meta["layers"]].index("threshold")
    x = torch.cat([torch.rand(64, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                   torch.full((1, 8), 1e30), torch.full((1, 8), -1e30), torch.zeros(1, 8)])
    with torch.no_grad():
        truth = (model.bn1(model.fc1(x)) >= 0).numpy()
    assert truth[:, 0].all() and not truth[:, 1].any()  # γ = 0: constant by the sign of β
    bits = engine.trace(x.numpy())[index].value > 0
    np.testing.assert_array_equal(bits, truth)
    _, tensors = fmt.read_model(tmp_path / "nan.onebit")
    np.testing.assert_array_equal(tensors[meta["layers"][index]["tensors"]["direction"]], [0, 0, 1, -1])


def test_nan_at_reachable_preactivations_is_an_export_error(tmp_path):
    """On binary inputs every |v| <= fan-in is reachable: BN γ = 1e38 overflows to ±inf for |v| >= 4,
    a second BN's γ = 0 then makes PyTorch's sign −1 there and +1 near 0: no threshold reproduces it."""
    sign = dict(input_quantizer="sign", weight_quantizer="sign")
    model = nn.Sequential(OrderedDict(
        fc1=QuantLinear(8, 2, bias=False, **sign), bn1=nn.BatchNorm1d(2), bn2=nn.BatchNorm1d(2),
        fc2=QuantLinear(2, 3, bias=False, **sign),
    ))
    with torch.no_grad():
        model.bn1.weight.fill_(1e38)
        model.bn2.weight.copy_(torch.tensor([1.0, 0.0]))
        model.bn2.bias.fill_(0.5)
    with pytest.raises(ExportError, match=r"^bn1,bn2: features \[1\] are NaN at reachable pre-activations"):
        export_model(model.eval(), tmp_path / "nan.onebit", input_shape=(8,))
    assert not (tmp_path / "nan.onebit").exists()


def test_non_finite_weights_are_an_export_error(tmp_path):
    model = overflow_model(2.0)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match=r"^fc1: the weights, their scale α or the bias hold non-finite values"):
        export_model(model, tmp_path / "inf.onebit")
    assert not (tmp_path / "inf.onebit").exists()


@pytest.mark.parametrize("position", ["hidden", "last"])
def test_negative_running_var_names_the_batchnorm(position, tmp_path):
    """sqrt(running_var + eps) of a negative is NaN: the exporter says which BN, not the file check."""
    model = overflow_model(0.5)
    bn = model.bn1 if position == "hidden" else nn.BatchNorm1d(3)
    if position == "last":
        model.add_module("bn2", bn)
    with torch.no_grad():
        bn.running_var[1] = -1.0
    name = "bn1" if position == "hidden" else "bn2"
    with pytest.raises(ExportError, match=rf"^{name}: BatchNorm running_var \+ eps must be positive \(channel 1"):
        export_model(model.eval(), tmp_path / "var.onebit")
    assert not (tmp_path / "var.onebit").exists()


def test_unsupported_layers_raise_export_errors(tmp_path):
    bad = [
        nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
        nn.Sequential(nn.Flatten(), QuantLinear(4, 2, weight_quantizer="ternary")),
        nn.Sequential(nn.Flatten(), QuantLinear(4, 3, weight_quantizer="sign"), nn.BatchNorm1d(3),
                      QuantLinear(3, 2, input_quantizer="kbit", weight_quantizer="sign")),
        nn.Sequential(QuantConv2d(1, 2, 2, dilation=2, weight_quantizer="sign"), nn.Flatten()),
        nn.Sequential(nn.Flatten(), QuantLinear(4, 3, weight_quantizer="sign"), nn.Sigmoid()),
    ]
    for model in bad:
        with pytest.raises(ExportError) as info:
            export_model(model, tmp_path / "bad.onebit", input_shape=(1, 2, 2))
        assert isinstance(info.value, OnebitError)
    assert not (tmp_path / "bad.onebit").exists()
    with pytest.raises(ExportError, match="input shape is unknown"):
        export_model(nn.Sequential(nn.Flatten(), QuantLinear(4, 2, weight_quantizer="sign")), tmp_path / "x.onebit")


# --------------------------------------------------------------------------- the engine's API
def test_bad_inputs(tmp_path_factory):
    model, file = exported("mlp-mnist", tmp_path_factory)
    engine = load(file)
    x = grid_input(3, (1, 28, 28)).numpy()
    with pytest.raises(ShapeError, match=r"expected|must have shape \('N', 1, 28, 28\), got \(3, 28, 28\)"):
        engine.predict(x[:, 0])
    with pytest.raises(ShapeError, match=r"got \(3, 1, 28, 27\)"):
        engine.predict(x[..., :27])
    with pytest.raises(ShapeError, match="dtype"):
        engine.predict(x.astype(str))
    with pytest.raises(ShapeError, match="dtype"):
        engine.predict(x.astype(np.complex64))
    np.testing.assert_array_equal(engine.predict(x.astype(np.float64)), engine.predict(x))  # real dtypes are cast
    assert engine.predict(x.tolist()).shape == (3, 10)
    assert engine.predict(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    with pytest.raises(ShapeError, match="threads"):
        load(file, threads=-1)


def test_format_errors_from_load(tmp_path_factory, tmp_path):
    _, file = exported("mlp-mnist", tmp_path_factory)
    data = file.read_bytes()
    (tmp_path / "cut.onebit").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        load(tmp_path / "cut.onebit")
    meta, tensors = fmt.read_model(file)
    fmt._write_raw(tmp_path / "v9.onebit", dict(meta, format_version=9), tensors)
    with pytest.raises(FormatError, match="version 9; this onebit reads version 1"):
        load(tmp_path / "v9.onebit")
    with pytest.raises(FormatError):
        load(tmp_path / "missing.onebit")


def test_metadata_and_summary(tmp_path_factory):
    _, file = exported("cnn-cifar", tmp_path_factory)
    engine = load(file)
    meta = engine.metadata
    assert meta["source_model"]["name"] == "binarynet_cnn"
    assert meta["source_model"]["kwargs"]["in_shape"] == [3, 32, 32]
    assert meta["onebit_version"] == onebit.__version__
    text = engine.summary()
    assert "binarynet_cnn" in text and "threshold" in text and "conv2.pool" in text


@pytest.mark.parametrize("threads", [None, 1])
def test_concurrent_predictions_match_serial(tmp_path_factory, threads):
    _, file = exported("cnn-mnist", tmp_path_factory)
    engine = load(file, threads=threads)
    batches = [grid_input(n % 5 + 1, (1, 28, 28), seed=n).numpy() for n in range(24)]
    serial = [engine.predict(b) for b in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(engine.predict, batches), serial):
                np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_shape": [1, 28, 28], "num_classes": 10, "hidden": 64, "depth": 2}
    model = randomize_bn(create_model("binarynet_mlp", **kwargs), (1, 28, 28))
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": {}}
    torch.save({**header, "model_name": "binarynet_mlp", "model_kwargs": kwargs,
                "model_state": model.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    meta = export_checkpoint(tmp_path / "best.pt", tmp_path / "model.onebit")
    assert meta["source_model"] == {"name": "binarynet_mlp", "kwargs": kwargs}
    x = grid_input(16, (1, 28, 28), seed=2)
    logits, _ = torch_preactivations(model, x)
    engine = load(tmp_path / "model.onebit")
    assert_logits_close(engine.predict(x.numpy()), logits)
    np.testing.assert_array_equal(engine.classify(x.numpy()), logits.argmax(1))

    torch.save({**header, "model_name": "binarynet_mlp", "model_kwargs": kwargs}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="model_state"):
        export_checkpoint(tmp_path / "partial.pt", tmp_path / "x.onebit")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        export_checkpoint(tmp_path / "junk.pt", tmp_path / "x.onebit")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "none.pt", tmp_path / "x.onebit")


# --------------------------------------------------------------------------- pixel inputs (input_levels)
def pixel_batch(n: int, shape, levels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, levels + 1, size=(n, *shape), dtype=np.uint8)


def first_conv_model(channels: int, pad_value: float, stride: int = 1) -> nn.Sequential:
    """A real-input first conv with any pad value (the built-in CNNs pad theirs with 0), then a
    binary conv, pooling and a dense layer; input (channels, 9, 11)."""
    sign = dict(weight_quantizer="sign")
    h, w = (9, 11) if stride == 1 else (5, 6)
    model = nn.Sequential(OrderedDict(
        conv1=QuantConv2d(channels, 12, 3, stride=stride, padding=1, pad_value=pad_value, bias=False, **sign),
        bn1=nn.BatchNorm2d(12),
        conv2=QuantConv2d(12, 8, 3, padding=1, bias=False, input_quantizer="sign", **sign),
        pool2=nn.MaxPool2d(2),
        bn2=nn.BatchNorm2d(8),
        flatten=nn.Flatten(),
        fc=QuantLinear(8 * (h // 2) * (w // 2), 10, bias=False, input_quantizer="sign", **sign),
        bn3=nn.BatchNorm1d(10),
    ))
    model.in_shape = (channels, 9, 11)
    return model


#: first layers on pixels: odd fan-ins K on both sides of the bit-plane / float-kernel switch
#: (K ≤ 32 sums pixel values with the float32 kernel), every conv pad value and a stride
PIXEL_MODELS = {
    "mlp-K65": lambda: create_model("binarynet_mlp", in_shape=(1, 5, 13), hidden=96, depth=2),
    "mlp-K21": lambda: create_model("binarynet_mlp", in_shape=(1, 3, 7), hidden=40, depth=1),
    "cnn-digits-K9": lambda: create_model("binarynet_cnn", in_shape=(1, 8, 8), width=0.15, fc_units=64),
    "conv-K45-pad0": lambda: first_conv_model(5, 0.0),
    "conv-K45-pad-1": lambda: first_conv_model(5, -1.0),
    "conv-K27-pad+1-stride2": lambda: first_conv_model(3, 1.0, stride=2),
    "conv-K45-pad0.5": lambda: first_conv_model(5, 0.5),
}
_pixel_exported: dict[str, tuple] = {}


def pixel_exported(key: str, tmp_path_factory, levels: int = 16) -> tuple[nn.Module, Path, Path]:
    """(model, its file with input_levels, the same model's file without)."""
    if (key, levels) not in _pixel_exported:
        torch.manual_seed(len(key))
        model = PIXEL_MODELS[key]()
        model = randomize_bn(model, model.in_shape, seed=len(key))
        folder = tmp_path_factory.mktemp("pixels")
        export_model(model, folder / "levels.onebit", input_levels=levels)
        export_model(model, folder / "plain.onebit")
        _pixel_exported[(key, levels)] = (model, folder / "levels.onebit", folder / "plain.onebit")
    return _pixel_exported[(key, levels)]


@pytest.fixture
def first_layer_inputs(monkeypatch) -> list[str]:
    """What the real-input first layer was computed on, call by call: "pixels" (bit planes, or
    the float kernel on integer pixel values) or "floats"."""
    calls: list[str] = []
    bitplane, float_gemm = kernels.bitplane_gemm, kernels.float_gemm_binary

    def spy_bitplane(x, w, threads=0):
        calls.append("pixels")
        return bitplane(x, w, threads)

    def spy_float(x, w, threads=0):
        calls.append("pixels" if x.min() >= 0 and np.all(x == np.rint(x)) and x.max() > 1 else "floats")
        return float_gemm(x, w, threads)

    monkeypatch.setattr(kernels, "bitplane_gemm", spy_bitplane)
    monkeypatch.setattr(kernels, "float_gemm_binary", spy_float)
    return calls


def test_pipeline_inputs_are_the_training_pipelines():
    """pixels_to_inputs is onebit.data.to_float bit for bit, for every level count and pixel."""
    p = np.arange(256, dtype=np.uint8)
    for levels in range(1, 256):
        np.testing.assert_array_equal(pixels_to_inputs(p, levels).view(np.uint32), to_float(p, levels).numpy().view(np.uint32))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", sorted(PIXEL_MODELS))
def test_pixel_path_is_bit_exact(key, path, tmp_path_factory, first_layer_inputs):
    """On a 16-level grid (x multiples of 1/8) every float32 sum is exact, so the pixel path's
    exact pre-activations are PyTorch's bit for bit; ties on thresholds included (randomize_bn)."""
    model, file, _ = pixel_exported(key, tmp_path_factory)
    kernels.set_path(path)
    engine = load(file)
    assert engine.input_levels == 16 and "first layer on pixels" in engine.summary()
    for n in (1, 3, 64):
        p = pixel_batch(n, model.in_shape, 16, seed=n)
        x = pixels_to_inputs(p, 16)
        logits, pre = torch_preactivations(model, torch.from_numpy(x))
        first_layer_inputs.clear()
        traced = [t for t in engine.trace(x) if t.op in ("dense", "conv")]
        assert first_layer_inputs == ["pixels"]
        assert [t.name for t in traced] == list(pre)
        for entry in traced:
            np.testing.assert_array_equal(entry.value.astype(np.float32), pre[entry.name], err_msg=entry.name)
        predicted = engine.predict(x)
        assert_logits_close(predicted, logits)
        np.testing.assert_array_equal(predicted.argmax(1), logits.argmax(1))
        np.testing.assert_array_equal(predicted, engine.trace(x)[-1].value)  # fused bounds == float32 y, thresholded
        np.testing.assert_array_equal(engine.predict_uint8(p), predicted)
        np.testing.assert_array_equal(engine.predict(x.astype(np.float64)), predicted)  # still on the grid
    assert set(first_layer_inputs) == {"pixels"}


def test_pixel_path_off_grid_keeps_the_float_path(tmp_path_factory, first_layer_inputs):
    """A batch with any value off the grid (one ulp, −0.0, NaN, outside [−1, 1], another grid)
    runs the float path, with the results of a file without input_levels."""
    for key in ("mlp-K65", "conv-K45-pad0.5"):
        model, file, plain = pixel_exported(key, tmp_path_factory)
        engine, reference = load(file), load(plain)
        x = pixels_to_inputs(pixel_batch(5, model.in_shape, 16, seed=3), 16)
        flat = x.reshape(-1)
        for change in (lambda v: np.nextafter(v, np.float32(2)), lambda v: np.float32(-0.0),
                       lambda v: np.float32(np.nan), lambda v: np.float32(1.5)):
            bad = x.copy()
            index = int(np.flatnonzero(flat == 0)[0]) if change(np.float32(0)) == 0 else 17
            bad.reshape(-1)[index] = change(bad.reshape(-1)[index])
            first_layer_inputs.clear()
            got = engine.predict(bad)
            assert first_layer_inputs == ["floats"], key
            np.testing.assert_array_equal(got, reference.predict(bad))
            for a, b in zip(engine.trace(bad), reference.trace(bad)):
                np.testing.assert_array_equal(a.value, b.value)
        other_grid = pixels_to_inputs(pixel_batch(5, model.in_shape, 255, seed=4), 255)  # 255 levels, not 16
        first_layer_inputs.clear()
        got = engine.predict(other_grid)
        assert first_layer_inputs == ["floats"]
        np.testing.assert_array_equal(got, reference.predict(other_grid))


def test_pixel_path_concurrent_calls_match_serial(tmp_path_factory):
    _, file, _ = pixel_exported("conv-K45-pad0.5", tmp_path_factory)
    engine = load(file)
    batches = [pixel_batch(n % 5 + 1, (5, 9, 11), 16, seed=n) for n in range(16)]
    serial = [engine.predict_uint8(b) for b in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for got, want in zip(pool.map(engine.predict_uint8, batches), serial):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(pool.map(lambda b: engine.predict(pixels_to_inputs(b, 16)), batches), serial):
            np.testing.assert_array_equal(got, want)


@pytest.fixture
def real_mnist_like(real_data_dir):
    return (load_dataset("fashion_mnist", "train", data_dir=real_data_dir),
            load_dataset("fashion_mnist", "test", data_dir=real_data_dir))


def calibrate_bn(model: nn.Module, images: np.ndarray, levels: int, seed: int) -> nn.Module:
    """BatchNorm running statistics of real images (each threshold at its channel's mean over
    the data: many pre-activations close to it), γ ~ N(0, 1) (negative ones too), β ~ N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for bn in bns:
        bn.momentum = None  # a cumulative average
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(to_float(images, levels))
        for bn in bns:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("name, kwargs", [("binarynet_mlp", dict(hidden=512, depth=2)),
                                          ("binarynet_cnn", dict(width=0.25, fc_units=128))])
def test_pixel_path_on_real_fashion_mnist(name, kwargs, real_mnist_like, tmp_path, capsys):
    """Real 8-bit images: PyTorch's float32 sums of ((p/255)·2)−1 are not exact, the pixel path
    is (rounded once). They may disagree only at a threshold within float rounding: count it."""
    train, test = real_mnist_like
    torch.manual_seed(0)
    model = calibrate_bn(create_model(name, in_shape=(1, 28, 28), **kwargs), train.images[:1000], 255, seed=1)
    export_model(model, tmp_path / "m.onebit", input_levels=train.max_value)
    engine = load(tmp_path / "m.onebit")
    pixels = test.images[:2000]
    first, second = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))][:2]
    seen = {}
    hook = second.register_forward_pre_hook(lambda m, i: seen.__setitem__("bits", (i[0] >= 0).numpy()))
    try:
        with torch.no_grad():
            torch_classes = model(to_float(pixels, 255)).argmax(1).numpy()
    finally:
        hook.remove()
    x = pixels_to_inputs(pixels, 255)
    trace = engine.trace(x)
    threshold = next(t for t in trace if t.op == "threshold")  # the first layer's output bits
    bit_diffs = int(((threshold.value > 0) != seen["bits"]).sum())
    classes = engine.predict_uint8(pixels).argmax(1)
    np.testing.assert_array_equal(classes, engine.classify(x))
    np.testing.assert_array_equal(classes, trace[-1].value.argmax(1))
    agreement = float(np.mean(classes == torch_classes))
    with capsys.disabled():
        print(f"\n{name} on {len(pixels)} Fashion-MNIST test images: first-layer bits differing from "
              f"PyTorch {bit_diffs} of {seen['bits'].size}, classes equal {100 * agreement:.2f}%")
    assert agreement >= 0.999, (bit_diffs, agreement)
    assert bit_diffs <= 1e-6 * seen["bits"].size + 5


def test_predict_uint8_errors_and_fallback(tmp_path_factory, tmp_path):
    model, file, plain = pixel_exported("cnn-digits-K9", tmp_path_factory)
    engine = load(file)
    p = pixel_batch(4, (1, 8, 8), 16)
    for wrong in (p.astype(np.float32), p.astype(np.int16), p.astype(np.int64), p.astype(bool), p.tolist()):
        with pytest.raises(ShapeError, match="uint8"):
            engine.predict_uint8(wrong)
    for wrong in (p[:, 0], p[..., :7], p[None]):
        with pytest.raises(ShapeError, match=r"must have shape \('N', 1, 8, 8\)"):
            engine.predict_uint8(wrong)
    with pytest.raises(ShapeError, match=r"0\.\.16.*found 17"):
        engine.predict_uint8(np.where(p == p.max(), np.uint8(17), p))
    assert engine.predict_uint8(np.zeros((0, 1, 8, 8), np.uint8)).shape == (0, 10)
    with pytest.raises(ConfigError, match="no input_levels"):
        load(plain).predict_uint8(p)
    # with levels but no real-input binary first layer (full-precision first layer): pixels → floats
    torch.manual_seed(0)
    full = randomize_bn(create_model("binarynet_mlp", in_shape=(1, 8, 8), hidden=32, depth=1, float_first_last=True),
                        (1, 8, 8), ties=False)
    export_model(full, tmp_path / "full.onebit", input_levels=16)
    other = load(tmp_path / "full.onebit")
    assert "first layer on pixels" not in other.summary()
    np.testing.assert_array_equal(other.predict_uint8(p), other.predict(pixels_to_inputs(p, 16)))


@pytest.mark.parametrize("levels", [0, 256, 2.0, "16", True])
def test_export_refuses_bad_input_levels(levels, tmp_path):
    model = create_model("binarynet_mlp", in_shape=(1, 8, 8), hidden=16, depth=1)
    with pytest.raises(FormatError, match="input_levels"):
        export_model(model, tmp_path / "m.onebit", input_levels=levels)
    assert not (tmp_path / "m.onebit").exists()


@pytest.mark.parametrize("config, levels", [({"dataset": "fashion_mnist"}, 255), ({"dataset": "digits"}, 16),
                                            ({"dataset": "no_such_dataset"}, None), ({}, None)])
def test_checkpoint_records_the_datasets_pixel_grid(config, levels, tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_shape": [1, 8, 8], "num_classes": 10, "hidden": 32, "depth": 1}
    model = randomize_bn(create_model("binarynet_mlp", **kwargs), (1, 8, 8))
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
                "model_name": "binarynet_mlp", "model_kwargs": kwargs, "model_state": model.state_dict()},
               tmp_path / "best.pt")
    meta = export_checkpoint(tmp_path / "best.pt", tmp_path / "model.onebit")
    assert meta.get("input_levels") == levels
    assert load(tmp_path / "model.onebit").input_levels == levels


# --------------------------------------------------------------------------- no torch in the engine
def test_engine_runs_without_torch(tmp_path_factory, tmp_path):
    model, file = exported("cnn-mnist", tmp_path_factory)
    x = grid_input(4, (1, 28, 28), seed=11)
    np.save(tmp_path / "x.npy", x.numpy())
    expected = load(file).predict(x.numpy())
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
import onebit.engine
from onebit.engine import load
model = load({str(file)!r})
out = model.predict(np.load({str(tmp_path / 'x.npy')!r}))
np.save({str(tmp_path / 'out.npy')!r}, out)
assert not any(name == "torch" or name.startswith("torch.") for name, m in sys.modules.items() if m is not None)
print("ok", model.num_classes)
"""
    src = str(Path(onebit.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "10"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("binarynet_mlp", dict(hidden=64, depth=2)),
        ("binarynet_cnn", dict(in_shape=(3, 32, 32), width=0.1, fc_units=64, pad_value=-1.0)),
        ("xnor_cnn", dict(in_shape=(1, 28, 28), width=0.2, fc_units=64)),
        ("binaryconnect_cnn", dict(in_shape=(3, 32, 32), width=0.1, fc_units=64)),
    ],
)
def test_onnx_matches_pytorch(name, kwargs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    shape = kwargs.get("in_shape", (1, 28, 28))
    model = randomize_bn(create_model(name, **kwargs), shape, seed=1, ties=False)
    export_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert "Sign" not in {n.op_type for n in graph.graph.node}  # Sign(0) = 0: Where is used instead
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = grid_input(n, shape, seed=n)
        logits, _ = torch_preactivations(model, x)
        (out,) = session.run(["logits"], {"input": x.numpy()})
        assert out.shape == (n, 10)
        assert (out.argmax(1) == logits.argmax(1)).mean() >= 0.85
        close = np.isclose(out, logits, rtol=1e-3, atol=1e-3 * np.abs(logits).max()).all(axis=1)
        assert close.mean() >= 0.85


def test_onnx_sign_of_zero_is_plus_one(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Flatten(), QuantLinear(3, 3, bias=False, input_quantizer="sign", weight_quantizer="sign"))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3) - 0.5)  # signs: +1 on the diagonal, −1 elsewhere
    export_onnx(model, tmp_path / "sign.onnx", input_shape=(3,))
    session = ort.InferenceSession(str(tmp_path / "sign.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([[0.0, -0.5, 2.0]], np.float32)  # signs [+1, −1, +1]; ONNX Sign would give [0, −1, 1]
    (out,) = session.run(["logits"], {"input": x})
    np.testing.assert_array_equal(out, [[1.0, -3.0, 1.0]])
    np.testing.assert_array_equal(out, model(torch.from_numpy(x)).detach().numpy())
