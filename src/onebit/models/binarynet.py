"""BinaryNet (Courbariaux, Hubara, Soudry, El-Yaniv, Bengio 2016, "Binarized Neural Networks:
Training Deep Neural Networks with Weights and Activations Constrained to +1 or −1") and the
two architectures every family here shares: :func:`mlp` and :func:`cnn`.

The builders take the quantizer choices; the registered models (here, in ``binaryconnect.py``
and ``xnor.py``) are thin wrappers that fix them. Architecture details follow the authors'
Theano/Lasagne code (``Train-time/mnist.py``, ``cifar10.py``, ``binary_net.py`` in
github.com/MatthieuCourbariaux/BinaryNet):

* **Block order.** ``layer → [MaxPool] → BatchNorm → binary activation → next layer``;
  BinaryNet pools *before* BN. The binary activation is the ``input_quantizer`` of the next
  layer (Larq's convention), so it does not appear as a module of its own. The first layer
  sees the real-valued input but has binary weights; the last layer is followed by a
  BatchNorm whose output is the logits (the L2-SVM output of the paper).
* **No bias.** Lasagne's DenseLayer/Conv2DLayer in BinaryNet do carry a bias (b=0), but the
  BatchNorm right after absorbs it (β), so layers here use ``bias=False``.
* **BatchNorm.** ε = 1e-4 and Lasagne's ``alpha = 0.1``. Lasagne updates
  ``running = (1 − alpha)·running + alpha·batch``, which is torch's ``momentum`` convention, so
  ``bn_momentum=0.1`` is the same moving average of the mean (Lasagne averages the inverse
  std where torch averages the unbiased variance; the difference is immaterial here).
* **Dropout** (MLP only, as in the paper's MNIST setup: 0.2 on the input, 0.5 hidden; default
  0 here) sits after each hidden BatchNorm, *before* the next layer's binarization. BinaryNet
  applied it to the ±1 activations themselves, which makes the next layer's input ternary
  ({−2, 0, +2}) in training; here a dropped unit reads sign(0) = +1, so every binary layer
  sees strictly ±1 inputs in training and inference alike.
* **Padding** of the CNN's convolutions is 1; Theano pads with zeros, the default
  ``pad_value=0.0``. ``pad_value=-1.0`` or ``1.0`` ("one-padding") keeps the input of binary
  convolutions strictly ±1, as a packed XNOR/popcount kernel computes it; it applies to the
  convolutions with binary input (the first convolution pads its real input with zeros).
* **Latent weights** are clipped to [−1, 1] (``weight_clip=1.0``; BinaryNet's H = 1).
"""
from __future__ import annotations

import inspect
import operator
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError, OnebitError, ShapeError
from ..layers import QuantConv2d, QuantLinear, check_weight_clip, finite_number
from ..quantizers import get_quantizer
from . import MODELS

__all__ = ["build", "cnn", "mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "hardtanh": nn.Hardtanh}


# --------------------------------------------------------------------------- helpers
#: The most weights (the parameters of the QuantLinear/QuantConv2d layers) a model may have:
#: 2^31, 8 GiB as float32, far beyond the paper models (BinaryNet's MLP has 37 M, WRN-20-10
#: 27 M). Checked before anything is allocated, so that a mistyped size is an error at once.
MAX_WEIGHTS = 2**31
#: The largest single size (an ``in_shape`` dimension, ``hidden``, a channel count, ``num_classes``).
MAX_SIZE = 2**31
#: The most layers of one kind (MLP ``depth``, CNN convolutions or FC layers, WRN ``depth``).
MAX_LAYERS = 1000


class _ModelError(ConfigError):
    """A user error about the model as a whole; :func:`build` names the model in it."""


def _check_shape(in_shape) -> tuple[int, int, int]:
    if isinstance(in_shape, (str, bytes)):
        raise ShapeError(f"in_shape must be (channels, height, width), got {in_shape!r}")
    try:
        dims = list(in_shape)
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        shape = tuple(operator.index(d) for d in dims)
    except TypeError:
        raise ShapeError(f"in_shape must be (channels, height, width) as integers, got {in_shape!r}"[:300]) from None
    if len(shape) != 3 or min(shape) < 1 or max(shape) > MAX_SIZE:
        raise ShapeError(
            f"in_shape must be three sizes in 1..{MAX_SIZE} (channels, height, width), got {in_shape!r}"[:300]
        )
    return shape  # type: ignore[return-value]


def _check_positive(name: str, value, *, allow_zero: bool = False, maximum: int = MAX_SIZE) -> int:
    low = 0 if allow_zero else 1
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or not low <= number <= maximum:
        raise OnebitError(f"{name} must be an integer in {low}..{maximum}, got {value!r}"[:300])
    return number


def _check_rate(name: str, p: float) -> float:
    if not (finite_number(p) and 0.0 <= p < 1.0):
        raise OnebitError(f"{name} must be in [0, 1), got {p!r}")
    return float(p)


def _check_flag(name: str, flag) -> bool:
    if not isinstance(flag, bool):
        raise OnebitError(f"{name} must be true or false, got {flag!r}")
    return flag


def _check_width(width) -> float:
    if not (finite_number(width) and width > 0):
        raise OnebitError(f"width must be a positive finite number, got {width!r}")
    return float(width)


def _check_batchnorm(bn_eps, bn_momentum) -> None:
    if not (finite_number(bn_eps) and bn_eps > 0):
        raise OnebitError(f"bn_eps must be a positive finite number, got {bn_eps!r}")
    if bn_momentum is not None and not (finite_number(bn_momentum) and 0 <= bn_momentum <= 1):
        raise OnebitError(f"bn_momentum must be a number in [0, 1] or None (a cumulative average), got {bn_momentum!r}")


def _activation(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    try:
        return _ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise OnebitError(f"unknown activation {name!r}; valid: {', '.join(sorted(_ACTIVATIONS))} or None") from None


def _scaled(width: float, n: int, what: str = "size") -> int:
    size = n * width
    if not size <= MAX_SIZE:
        raise OnebitError(f"width={width:g} makes a {what} of {size:g}, more than {MAX_SIZE}")
    return max(1, int(round(size)))


def _check_weights(layers: list[tuple[str, int]]) -> int:
    """The total weight count of ``layers`` (name, count), a :class:`_ModelError` beyond :data:`MAX_WEIGHTS`."""
    total = sum(n for _, n in layers)
    if total > MAX_WEIGHTS:
        name, n = max(layers, key=lambda layer: layer[1])
        raise _ModelError(
            f"{total:,} weights are more than the limit of {MAX_WEIGHTS:,} (2^31) per model "
            f"(the largest layer, {name}, has {n:,})"
        )
    return total


@contextmanager
def _allocating(weights: int):
    """Turn an allocation failure while the model's layers are built into a one-line :class:`_ModelError`."""
    try:
        yield
    except MemoryError:
        raise _ModelError(f"not enough memory for its {weights:,} weights ({weights * 4 / 2**30:.1f} GiB as float32)") \
            from None
    except RuntimeError as exc:
        text = str(exc)
        if not (isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in text
                or "out of memory" in text):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise _ModelError(
            f"not enough memory for its {weights:,} weights ({weights * 4 / 2**30:.1f} GiB as float32): {first}"[:300]
        ) from None


def _finish(model: nn.Sequential, in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    # plain attributes, read by summaries and checkpoints; they are not part of the state dict
    model.in_shape = in_shape
    model.num_classes = num_classes
    return model


def _quantizer(spec, args: dict | None, what: str):
    """``spec`` for one layer: with ``args`` (``{"bits": 2}``) a fresh module ``get_quantizer(spec, **args)``.

    Arguments the quantizer does not take (a TypeError or ValueError of its constructor) are a
    :class:`_ModelError` naming ``{what}_args``.
    """
    if args is None:
        return spec
    if not isinstance(args, dict):
        raise OnebitError(f"{what}_args must be a dict of quantizer arguments, got {args!r}"[:300])
    if not args:
        return spec
    if spec is None:
        raise OnebitError(f"{what}_args {args!r} given without a {what}"[:300])
    if not all(isinstance(key, str) for key in args):
        raise OnebitError(f"{what}_args must map argument names to values, got {args!r}"[:300])
    try:
        return get_quantizer(spec, **args)
    except OnebitError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _ModelError(f"{what}_args {args!r} do not fit the {spec!r} quantizer: {reason}"[:300]) from None


def build(builder, name: str, kwargs: dict, **defaults) -> nn.Sequential:
    """``builder(**{**defaults, **kwargs})``, with an unknown keyword a one-line user error.

    Errors about the model as a whole (too many weights, not enough memory, quantizer
    arguments that do not fit) name the model.
    """
    valid = [p for p in inspect.signature(builder).parameters]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise OnebitError(f"model {name} takes no argument {unknown[0]!r}; valid: {', '.join(valid)}")
    try:
        return builder(**{**defaults, **kwargs})
    except _ModelError as exc:
        raise ConfigError(f"model {name}: {exc}") from None


# --------------------------------------------------------------------------- architectures
def mlp(
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    hidden: int = 4096,
    depth: int = 3,
    dropout_in: float = 0.0,
    dropout_hidden: float = 0.0,
    weight_quantizer: str | None = "sign",
    input_quantizer: str | None = "sign",
    activation: str | None = None,
    weight_clip: float | None = 1.0,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-4,
    float_first_last: bool = False,
    weight_quantizer_args: dict | None = None,
    input_quantizer_args: dict | None = None,
) -> nn.Sequential:
    """Fully connected net: Flatten → [Dropout] → depth × (Linear → BN → [act] → [Dropout]) → Linear → BN.

    ``weight_quantizer`` binarizes every layer's weights, ``input_quantizer`` every layer's
    input except the first (the image); ``activation`` (``"relu"``, ``"hardtanh"`` or None)
    is a real nonlinearity after each hidden BN, for networks with real activations.
    ``float_first_last`` keeps the first layer's weights and the last layer's input and
    weights in full precision (XNOR-Net's and most later papers' practice). Children are
    named ``flatten``, ``dropout_in``, ``fc1`` … ``fc{depth}``, ``out``; each block is an
    ``nn.Sequential`` of ``linear``, ``bn``, ``act``, ``dropout``.
    """
    in_shape = _check_shape(in_shape)
    num_classes = _check_positive("num_classes", num_classes)
    hidden = _check_positive("hidden", hidden)
    depth = _check_positive("depth", depth, allow_zero=True, maximum=MAX_LAYERS)
    dropout_in = _check_rate("dropout_in", dropout_in)
    dropout_hidden = _check_rate("dropout_hidden", dropout_hidden)
    weight_clip = check_weight_clip(weight_clip)
    _check_batchnorm(bn_eps, bn_momentum)
    _check_flag("float_first_last", float_first_last)
    _activation(activation)  # validate early
    wq = lambda: _quantizer(weight_quantizer, weight_quantizer_args, "weight_quantizer")  # noqa: E731
    iq = lambda: _quantizer(input_quantizer, input_quantizer_args, "input_quantizer")  # noqa: E731
    wq(), iq()  # validate early
    features = in_shape[0] * in_shape[1] * in_shape[2]
    weights = _check_weights(
        [("fc1", features * hidden)] * min(depth, 1)
        + [(f"fc{k + 1}", hidden * hidden) for k in range(1, depth)]
        + [("out", (hidden if depth else features) * num_classes)]
    )
    with _allocating(weights):
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        if dropout_in:
            layers.append(("dropout_in", nn.Dropout(dropout_in)))
        width = features
        for k in range(depth):
            first = k == 0
            block: list[tuple[str, nn.Module]] = [
                (
                    "linear",
                    QuantLinear(
                        width,
                        hidden,
                        bias=False,
                        input_quantizer=None if first else iq(),
                        weight_quantizer=None if first and float_first_last else wq(),
                        weight_clip=None if first and float_first_last else weight_clip,
                    ),
                ),
                ("bn", nn.BatchNorm1d(hidden, eps=bn_eps, momentum=bn_momentum)),
            ]
            act = _activation(activation)
            if act is not None:
                block.append(("act", act))
            if dropout_hidden:
                block.append(("dropout", nn.Dropout(dropout_hidden)))
            layers.append((f"fc{k + 1}", nn.Sequential(OrderedDict(block))))
            width = hidden
        last_input = None if depth == 0 or float_first_last else iq()
        layers.append(
            (
                "out",
                nn.Sequential(
                    OrderedDict(
                        linear=QuantLinear(
                            width,
                            num_classes,
                            bias=False,
                            input_quantizer=last_input,
                            weight_quantizer=None if float_first_last else wq(),
                            weight_clip=None if float_first_last else weight_clip,
                        ),
                        bn=nn.BatchNorm1d(num_classes, eps=bn_eps, momentum=bn_momentum),
                    )
                ),
            )
        )
        return _finish(nn.Sequential(OrderedDict(layers)), in_shape, num_classes)


def cnn(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    width: float = 1.0,
    channels: Sequence[int] = (128, 256, 512),
    convs_per_stage: int = 2,
    fc_units: int = 1024,
    fc_layers: int = 2,
    weight_quantizer: str | None = "sign",
    input_quantizer: str | None = "sign",
    activation: str | None = None,
    weight_clip: float | None = 1.0,
    pad_value: float = 0.0,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-4,
    float_first_last: bool = False,
    weight_quantizer_args: dict | None = None,
    input_quantizer_args: dict | None = None,
) -> nn.Sequential:
    """VGG-style conv net, BinaryNet's CIFAR-10 net by default: (2×128C3)–MP2–(2×256C3)–MP2–(2×512C3)–MP2–(2×1024FC)–10.

    Each stage of ``convs_per_stage`` 3×3 convolutions (padding 1) ends with a 2×2 max-pool,
    placed before the BN (conv → pool → BN). ``width`` multiplies every channel count and
    ``fc_units`` (rounded, at least 1). The flattened size is computed from ``in_shape``, so
    (1, 28, 28) inputs work (28 → 14 → 7 → 3). Quantizer arguments as in :func:`mlp`;
    ``pad_value`` pads the convolutions with binary input (see the module docstring).
    Children: ``conv1`` … ``conv{n}`` (``conv``, [``pool``], ``bn``, [``act``]), ``flatten``,
    ``fc1`` … ``fc{fc_layers}`` (``linear``, ``bn``, [``act``]), ``out`` (``linear``, ``bn``).
    """
    in_shape = _check_shape(in_shape)
    num_classes = _check_positive("num_classes", num_classes)
    convs_per_stage = _check_positive("convs_per_stage", convs_per_stage, maximum=MAX_LAYERS)
    fc_units = _check_positive("fc_units", fc_units)
    fc_layers = _check_positive("fc_layers", fc_layers, allow_zero=True, maximum=MAX_LAYERS)
    width = _check_width(width)
    if isinstance(channels, (str, bytes, dict)) or not isinstance(channels, Iterable):
        raise OnebitError(f"channels must be a list of channel counts, one per stage, got {channels!r}"[:300])
    channels = list(channels)
    if not channels:
        raise OnebitError("channels must list at least one stage")
    if len(channels) * convs_per_stage > MAX_LAYERS:
        raise OnebitError(
            f"{len(channels)} stages × convs_per_stage={convs_per_stage} make {len(channels) * convs_per_stage} "
            f"convolutions, more than {MAX_LAYERS}"
        )
    stage_channels = [_scaled(width, _check_positive("channels", c), "channel count") for c in channels]
    units = _scaled(width, fc_units, "fc_units")
    weight_clip = check_weight_clip(weight_clip)
    if not finite_number(pad_value):
        raise OnebitError(f"pad_value must be a finite number (0, -1 or 1), got {pad_value!r}")
    _check_batchnorm(bn_eps, bn_momentum)
    _check_flag("float_first_last", float_first_last)
    _activation(activation)
    wq = lambda: _quantizer(weight_quantizer, weight_quantizer_args, "weight_quantizer")  # noqa: E731
    iq = lambda: _quantizer(input_quantizer, input_quantizer_args, "input_quantizer")  # noqa: E731
    wq(), iq()  # validate early
    c, h, w = in_shape
    pools = len(stage_channels)
    if h >> pools < 1 or w >> pools < 1:
        side = f"{1 << pools}x{1 << pools}" if pools < 64 else f"2^{pools} x 2^{pools}"
        raise ShapeError(f"input {h}x{w} is too small for {pools} 2x2 max-pools; it needs at least {side}")

    sizes: list[tuple[str, int]] = []  # the weight count of every layer, checked before any is built
    c_in = c
    for out_channels in stage_channels:
        for _ in range(convs_per_stage):
            sizes.append((f"conv{len(sizes) + 1}", c_in * out_channels * 9))
            c_in = out_channels
    features = c_in * (h >> pools) * (w >> pools)
    for k in range(fc_layers):
        sizes.append((f"fc{k + 1}", features * units))
        features = units
    sizes.append(("out", features * num_classes))
    weights = _check_weights(sizes)

    def block(name: str, module: nn.Module, norm: nn.Module, pool: bool) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = [(name, module)]
        if pool:
            parts.append(("pool", nn.MaxPool2d(2)))
        parts.append(("bn", norm))
        act = _activation(activation)
        if act is not None:
            parts.append(("act", act))
        return nn.Sequential(OrderedDict(parts))

    with _allocating(weights):
        layers: list[tuple[str, nn.Module]] = []
        index = 0
        for out_channels in stage_channels:
            for j in range(convs_per_stage):
                first = index == 0
                index += 1
                conv = QuantConv2d(
                    c,
                    out_channels,
                    3,
                    padding=1,
                    bias=False,
                    input_quantizer=None if first else iq(),
                    weight_quantizer=None if first and float_first_last else wq(),
                    weight_clip=None if first and float_first_last else weight_clip,
                    pad_value=pad_value if (not first and input_quantizer is not None) else 0.0,
                )
                norm = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
                layers.append((f"conv{index}", block("conv", conv, norm, pool=j == convs_per_stage - 1)))
                c = out_channels
            h, w = h // 2, w // 2
        layers.append(("flatten", nn.Flatten()))
        features = c * h * w
        for k in range(fc_layers):
            linear = QuantLinear(
                features, units, bias=False, input_quantizer=iq(),
                weight_quantizer=wq(), weight_clip=weight_clip,
            )
            norm = nn.BatchNorm1d(units, eps=bn_eps, momentum=bn_momentum)
            layers.append((f"fc{k + 1}", block("linear", linear, norm, pool=False)))
            features = units
        out = QuantLinear(
            features,
            num_classes,
            bias=False,
            input_quantizer=None if float_first_last else iq(),
            weight_quantizer=None if float_first_last else wq(),
            weight_clip=None if float_first_last else weight_clip,
        )
        out_norm = nn.BatchNorm1d(num_classes, eps=bn_eps, momentum=bn_momentum)
        layers.append(("out", nn.Sequential(OrderedDict(linear=out, bn=out_norm))))
        return _finish(nn.Sequential(OrderedDict(layers)), in_shape, num_classes)


# --------------------------------------------------------------------------- registered models
@MODELS.register
def binarynet_mlp(**kwargs) -> nn.Sequential:
    """BinaryNet MLP (Courbariaux et al. 2016, Table 1, MNIST): 3×4096 binary weights and activations.

    784–4096–4096–4096–10 by default, every layer with sign weights (latent weights clipped to
    [−1, 1]), every layer but the first with sign inputs, BN after each layer, the last BN's
    output the logits (train it with ``square_hinge`` as the paper does, or cross-entropy).
    The paper's MNIST run adds ``dropout_in=0.2, dropout_hidden=0.5``. Keywords: see
    :func:`onebit.models.binarynet.mlp`.
    """
    return build(mlp, "binarynet_mlp", kwargs, weight_quantizer="sign", input_quantizer="sign", weight_clip=1.0)


@MODELS.register
def binarynet_cnn(**kwargs) -> nn.Sequential:
    """BinaryNet CNN (Courbariaux et al. 2016, Table 1, CIFAR-10/SVHN): (2×128C3)–MP2–(2×256C3)–MP2–(2×512C3)–MP2–(2×1024FC)–10.

    Sign weights and sign activations everywhere but the first layer's input; conv → pool →
    BN → sign. ``width`` scales channels and FC units (SVHN used half the widths). Keywords:
    see :func:`onebit.models.binarynet.cnn`.
    """
    return build(cnn, "binarynet_cnn", kwargs, weight_quantizer="sign", input_quantizer="sign", weight_clip=1.0)


@MODELS.register
def float_mlp(**kwargs) -> nn.Sequential:
    """Full-precision twin of binarynet_mlp (ReLU after each hidden BN): the float baseline.

    Same layers, no quantizers (None), no weight clip, ``activation="relu"`` (pass
    ``activation="hardtanh"`` for the function whose derivative BinaryNet's STE uses).
    """
    return build(mlp, "float_mlp", kwargs, weight_quantizer=None, input_quantizer=None, weight_clip=None,
                 activation="relu")


@MODELS.register
def float_cnn(**kwargs) -> nn.Sequential:
    """Full-precision twin of binarynet_cnn (ReLU after each BN): the float baseline."""
    return build(cnn, "float_cnn", kwargs, weight_quantizer=None, input_quantizer=None, weight_clip=None,
                 activation="relu")
