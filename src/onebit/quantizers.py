"""Quantizers: the functions that turn latent float tensors into low-bit ones, with the
surrogate gradients that make them trainable (after Larq's ``larq.quantizers``).

Each quantizer exists twice: a pure function (``sign(x)``, ``kbit(x, bits=2)``) and a thin
:class:`Quantizer` module that carries its ``name``, its ``precision`` in bits and its
arguments, so that layers, summaries and export can read them. The modules are registered in
:data:`QUANTIZERS` and built with :func:`get_quantizer`::

    from onebit.quantizers import get_quantizer, sign

    y = sign(x)                              # ±1 forward, saturated straight-through backward
    q = get_quantizer("kbit", bits=2)        # KBit(bits=2, mode='activation'), q.precision == 2
    q = get_quantizer("sign")                # SteSign(), q.precision == 1
    get_quantizer(None)                      # None: no quantization, the float tensor is used

``None`` is the one spelling of "no quantization" in layers: a layer stores ``None`` and skips
the call, and summaries count it as 32 bits. The registered ``"identity"`` quantizer is an
explicit module with the same effect, for configurations that need a name.

The forward pass of every sign-like quantizer maps 0 to +1, so its output is exactly ±1
(bit 0 ↔ +1, bit 1 ↔ −1, see docs/design.md); they differ only in their backward pass:

=================  =====================================================================
``sign``           grad · 1[|x| ≤ 1] (straight-through estimator, saturated; BinaryNet)
``approx_sign``    grad · max(0, 2 − 2|x|) (Bi-Real Net's piecewise-polynomial surrogate)
``swish_sign``     grad · β(2 − βx·tanh(βx/2)) / (1 + cosh βx) (SignSwish, Darabi et al.)
=================  =====================================================================

Two weight quantizers scale the ±1 values: ``scaled_sign`` by the data-dependent statistic
α = mean |W| per filter (XNOR-Net), and ``he_sign`` by a fixed constant per layer, the He
initialisation standard deviation sqrt(2 / fan_in) (McDonnell 2018), with the gradient passed
straight through unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError
from .registry import Registry

__all__ = [
    "QUANTIZERS",
    "ApproxSign",
    "HeSign",
    "IdentityQuantizer",
    "KBit",
    "Quantizer",
    "ScaledSign",
    "SteSign",
    "StochasticSign",
    "SwishSign",
    "Ternary",
    "approx_sign",
    "get_quantizer",
    "he_constant",
    "he_sign",
    "identity",
    "kbit",
    "scaled_sign",
    "sign",
    "stochastic_sign",
    "swish_sign",
    "ternary",
]

QUANTIZERS = Registry("quantizer")


# --------------------------------------------------------------------------- autograd
class _Surrogate(torch.autograd.Function):
    """Forward ``quantize(x)``, backward ``grad · derivative(x)``.

    The quantized forward is piecewise constant, so its true gradient is zero almost
    everywhere; training uses the derivative of a smooth stand-in instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor], derivative: Callable[[Tensor], Tensor]):
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * ctx.derivative(x), None, None


class _SaturatedSign(torch.autograd.Function):
    """sign with the saturated straight-through gradient: ``grad · 1[|x| ≤ 1]``.

    When every |x| ≤ 1 — always the case for latent weights clipped to [−1, 1], the largest
    tensors of a BinaryNet step — the mask is all ones and the gradient passes unchanged; one
    min/max reduction finds that out without building the mask (a full-size tensor).
    """

    @staticmethod
    def forward(ctx, x: Tensor):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        if x.numel() == 0:
            return grad
        low, high = torch.aminmax(x)
        if low >= -1 and high <= 1:
            return grad
        return grad * _saturated(x)


class _StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``, backward ``grad`` unchanged (no clip, no scale); saves nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]):
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# Quantizers run on every weight at every step: the helpers below allocate one tensor each and
# work in place after that (a fresh 64 MB tensor costs more in page faults than the arithmetic).
def _sign(x: Tensor) -> Tensor:
    # not torch.sign: that maps 0 to 0, and binary networks need exactly two values
    return (x >= 0).to(x.dtype).mul_(2).sub_(1)


def _saturated(x: Tensor) -> Tensor:
    """|x| ≤ 1 as a bool mask (``grad * mask`` is the masked gradient)."""
    return (x <= 1) & (x >= -1)


def _channel_dims(x: Tensor) -> tuple[int, ...]:
    """The dims reduced for one statistic per entry of dim 0 (output channel or sample)."""
    if x.ndim < 2:
        raise ShapeError(f"a per-channel quantizer needs a tensor of at least 2 dims, got shape {tuple(x.shape)}")
    return tuple(range(1, x.ndim))


# --------------------------------------------------------------------------- functions
def sign(x: Tensor) -> Tensor:
    """±1 with sign(0) = +1; gradient passed straight through where |x| ≤ 1, zero outside."""
    return _SaturatedSign.apply(x)


def stochastic_sign(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """+1 with probability hard_sigmoid(x) = clip((x + 1) / 2, 0, 1), else −1; gradient as :func:`sign`.

    Draws from ``generator``, or from the global torch RNG when it is None.
    """

    def quantize(x: Tensor) -> Tensor:
        device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
        # P(u < p) = p for u uniform on [0, 1): always −1 at x ≤ −1, always +1 at x ≥ 1
        return (u < ((x + 1) / 2).clamp(0, 1)).to(x.dtype) * 2 - 1

    return _Surrogate.apply(x, quantize, _saturated)


def scaled_sign(x: Tensor) -> Tensor:
    """α·sign(x), α = mean |x| over all dims but the first (XNOR-Net).

    For a weight, dim 0 is the output channel, so α is XNOR-Net's per-filter scale; for a
    batch of activations, dim 0 is the sample, so α is a per-sample scale (a simplification
    of XNOR-Net's K map, which averages |x| over channels and then over each receptive field).
    The gradient follows XNOR-Net's eq. 7: α is *not* detached, so
    ∂/∂x_i = α·1[|x_i| ≤ 1]·g_i + sign(x_i)/n · Σ_j g_j·sign(x_j).
    """
    alpha = x.abs().mean(_channel_dims(x), keepdim=True)
    return alpha * sign(x)


def approx_sign(x: Tensor) -> Tensor:
    """±1 with sign(0) = +1; gradient max(0, 2 − 2|x|) (Bi-Real Net's ApproxSign)."""
    return _Surrogate.apply(x, _sign, lambda x: (2 - 2 * x.abs()).clamp_min(0))


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """±1 with sign(0) = +1; gradient of SignSwish 2σ(βx)(1 + βx(1 − σ(βx))) − 1 (Darabi et al. 2018)."""

    def derivative(x: Tensor) -> Tensor:
        # In float32 at least: in float16 βx overflows from |x| = 65504/β on, and the quotient is then
        # inf/inf = NaN where the derivative is 0. Clamping βx to ±1000, past where cosh overflows even in
        # float64 (so the quotient is already ∓0 there), does the same for |x| near the float32 or bfloat16
        # max and leaves every other value of the formula unchanged.
        bx = (x.to(torch.promote_types(x.dtype, torch.float32)) * beta).clamp_(-1000, 1000)
        return (beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))).to(x.dtype)

    return _Surrogate.apply(x, _sign, derivative)


def ternary(x: Tensor, threshold_factor: float = 0.7, per_channel: bool = False) -> Tensor:
    """α·{−1, 0, +1} with threshold Δ = threshold_factor · mean |x| (Ternary Weight Networks).

    Entries with |x| ≤ Δ become 0; α is the mean of |x| over the entries above Δ. Both are
    statistics of the whole tensor, or of each entry of dim 0 when ``per_channel``. Like TWN,
    Δ and α are treated as constants in the backward pass, which is the saturated
    straight-through estimator of :func:`sign`: grad · 1[|x| ≤ 1].
    """

    def quantize(x: Tensor) -> Tensor:
        dims = _channel_dims(x) if per_channel else tuple(range(x.ndim))
        magnitude = x.abs()
        keep = magnitude > threshold_factor * magnitude.mean(dims, keepdim=True)
        # an all-zero tensor keeps nothing; clamping the count gives α = 0 rather than 0/0
        alpha = (magnitude * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp_min(1)
        return torch.where(keep, _sign(x), 0) * alpha  # where, not a product with keep: no −0.0

    return _Surrogate.apply(x, quantize, _saturated)


_KBIT_MODES = ("activation", "weight")


def _check_kbit(bits: int, mode: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"kbit quantizer needs bits in 1..8, got {bits!r}")
    if mode not in _KBIT_MODES:
        raise ConfigError(f"kbit quantizer mode must be one of {', '.join(_KBIT_MODES)}, got {mode!r}")


def _uniform(x: Tensor, bits: int) -> Tensor:
    """round(clip(x, 0, 1)·(2^k − 1)) / (2^k − 1), gradient 1 on [0, 1] and 0 outside."""
    levels = 2**bits - 1
    return _Surrogate.apply(
        x,
        lambda x: torch.round(x.clamp(0, 1) * levels) / levels,
        lambda x: ((x >= 0) & (x <= 1)).to(x.dtype),
    )


def kbit(x: Tensor, bits: int = 2, mode: str = "activation") -> Tensor:
    """Uniform k-bit quantization, k = 1..8 (DoReFa-Net, QNN).

    ``mode="activation"``: 2^k levels on [0, 1], ``round(clip(x, 0, 1)·(2^k − 1)) / (2^k − 1)``
    (round half to even), gradient 1 on [0, 1] and 0 outside.

    ``mode="weight"``: DoReFa's weight quantizer, 2^k levels on [−1, 1]:
    ``2·q(tanh(x) / (2·max|tanh(x)|) + 1/2) − 1`` with q the activation rule above; the
    gradient flows through tanh and the max, straight through the rounding. For k = 1 this
    would map x = 0 to −1, so DoReFa's own 1-bit case is used instead: E(|x|)·sign(x), with
    E(|x|) the tensor's mean magnitude taken as a constant and the gradient passed straight
    through unclipped.
    """
    _check_kbit(bits, mode)
    if mode == "activation":
        return _uniform(x, bits)
    if bits == 1:
        return _Surrogate.apply(x, lambda x: x.abs().mean() * _sign(x), torch.ones_like)
    t = torch.tanh(x)
    # an all-zero weight has max 0; tiny keeps it finite (every entry lands mid-range)
    scaled = t / (2 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
    return 2 * _uniform(scaled, bits) - 1


def he_constant(shape) -> float:
    """sqrt(2 / fan_in), the He et al. (2015) initialisation standard deviation of a weight of ``shape``.

    ``shape`` is a weight's shape (or the weight itself): ``(out, in)`` for a linear layer,
    ``(out, in/groups, kh, kw)`` for a convolution, so fan_in = in·kh·kw, the product of all
    dims but the first (McDonnell 2018, Section 2.1.1: sqrt(2 / (F²·C_{i−1}))).
    """
    shape = tuple(shape.shape) if isinstance(shape, Tensor) else tuple(shape)
    if len(shape) < 2:
        raise ShapeError(f"he_constant needs a weight shape of at least 2 dims, got {shape}")
    fan_in = math.prod(shape[1:])
    if fan_in < 1:
        raise ShapeError(f"he_constant needs a nonzero fan-in, got shape {shape}")
    return math.sqrt(2.0 / fan_in)


def he_sign(x: Tensor) -> Tensor:
    """sqrt(2 / fan_in)·sign(x), sign(0) = +1, for a weight ``x`` (fan_in: all dims but the first).

    McDonnell (2018), "Training wide residual networks for deployment using a single bit for each
    weight", eq. 1: the sign of the weight times a *constant, unlearned* per-layer scale equal to
    the He initialisation standard deviation, so that activations and gradients keep the
    variance they have in a freshly initialised full-precision network. The backward pass is the
    plain straight-through estimator: the incoming gradient unchanged, neither clipped at
    |x| > 1 nor multiplied by the scale, as in the authors' Keras ``BinaryConv2D``
    (``kernel + stop_gradient(sign(kernel)·multiplier − kernel)``, github.com/McDonnell-Lab/1-bit-per-weight,
    ResNetModel.py). The paper's networks keep the latent weights unclipped (weight decay bounds them).
    """
    scale = he_constant(x.shape)
    return _StraightThrough.apply(x, lambda w: _sign(w) * scale)


def identity(x: Tensor) -> Tensor:
    """x unchanged, gradient 1: a full-precision placeholder."""
    return x


# --------------------------------------------------------------------------- modules
class Quantizer(nn.Module):
    """Base of the quantizer modules: ``name`` (its registry key), ``precision`` (bits per value) and
    ``stochastic`` (whether it draws random values in training; in eval every quantizer is deterministic)."""

    name: str
    precision: int
    stochastic: bool = False


def _register(cls: type[Quantizer]) -> type[Quantizer]:
    return QUANTIZERS.register(cls, name=cls.name)


@_register
class SteSign(Quantizer):
    """Sign, ±1 with sign(0) = +1; straight-through gradient zeroed where |x| > 1 (BinaryNet)."""

    name = "sign"
    precision = 1

    def forward(self, x: Tensor) -> Tensor:
        return sign(x)


@_register
class StochasticSign(Quantizer):
    """Stochastic sign: +1 with probability clip((x + 1) / 2, 0, 1) in training, sign(x) in eval.

    The network evaluated and exported is therefore the deterministic one, whose batch norms see
    other statistics than the running averages gathered under random draws; the trainer
    re-estimates them before each evaluation (:func:`onebit.layers.recompute_batchnorm`).

    Draws from ``generator`` if given, else from a private generator seeded with ``seed``,
    else from the global torch RNG. Only the last is part of a trainer's saved RNG state, so
    only it makes a resumed run repeat the draws of an uninterrupted one.
    """

    name = "stochastic_sign"
    precision = 1
    stochastic = True

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if seed is not None and generator is not None:
            raise ConfigError("stochastic_sign takes a seed or a generator, not both")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator

    def forward(self, x: Tensor) -> Tensor:
        return stochastic_sign(x, self.generator) if self.training else sign(x)

    def extra_repr(self) -> str:
        return f"seed={self.seed}" if self.seed is not None else ""


@_register
class ScaledSign(Quantizer):
    """XNOR-Net scaled sign: α·sign(x), α = mean |x| per entry of dim 0 (filter or sample)."""

    name = "scaled_sign"
    precision = 1

    def forward(self, x: Tensor) -> Tensor:
        return scaled_sign(x)


@_register
class ApproxSign(Quantizer):
    """Bi-Real Net ApproxSign: sign forward, piecewise-polynomial gradient max(0, 2 − 2|x|)."""

    name = "approx_sign"
    precision = 1

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)


@_register
class SwishSign(Quantizer):
    """SignSwish: sign forward, gradient of 2σ(βx)(1 + βx(1 − σ(βx))) − 1 (Darabi et al. 2018)."""

    name = "swish_sign"
    precision = 1

    def __init__(self, beta: float = 5.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return swish_sign(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@_register
class HeSign(Quantizer):
    """McDonnell 2018 1-bit weights: sign(W)·sqrt(2 / fan_in), a fixed per-layer scale; straight-through gradient."""

    name = "he_sign"
    precision = 1

    def forward(self, x: Tensor) -> Tensor:
        return he_sign(x)


@_register
class Ternary(Quantizer):
    """Ternary Weight Networks: α·{−1, 0, +1}, threshold 0.7·mean |x|; straight-through gradient."""

    name = "ternary"
    precision = 2  # three levels need ⌈log2 3⌉ bits

    def __init__(self, threshold_factor: float = 0.7, per_channel: bool = False) -> None:
        super().__init__()
        self.threshold_factor = threshold_factor
        self.per_channel = per_channel

    def forward(self, x: Tensor) -> Tensor:
        return ternary(x, self.threshold_factor, self.per_channel)

    def extra_repr(self) -> str:
        return f"threshold_factor={self.threshold_factor}, per_channel={self.per_channel}"


@_register
class KBit(Quantizer):
    """Uniform k-bit quantizer, k = 1..8 (DoReFa): activations on [0, 1], weights on [−1, 1]."""

    name = "kbit"

    def __init__(self, bits: int = 2, mode: str = "activation") -> None:
        super().__init__()
        _check_kbit(bits, mode)
        self.bits = bits
        self.mode = mode

    @property
    def precision(self) -> int:
        return self.bits

    def forward(self, x: Tensor) -> Tensor:
        return kbit(x, self.bits, self.mode)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode!r}"


@_register
class IdentityQuantizer(Quantizer):
    """Identity: full precision (32 bits), x unchanged, gradient 1."""

    name = "identity"
    precision = 32

    def forward(self, x: Tensor) -> Tensor:
        return identity(x)


def get_quantizer(spec: str | nn.Module | None, **kwargs) -> nn.Module | None:
    """The quantizer module for ``spec``: a registered name (built with ``kwargs``), a module
    (returned as is), or None (returned as is: no quantization).

    Raises :class:`onebit.errors.UnknownNameError` listing the valid names for an unknown name.
    """
    if isinstance(spec, str):
        return QUANTIZERS.create(spec, **kwargs)
    if spec is not None and not isinstance(spec, nn.Module):
        raise ConfigError(f"a quantizer is a name, a module or None, got {type(spec).__name__}")
    if kwargs:
        raise ConfigError(f"quantizer arguments {sorted(kwargs)} need a quantizer name, got {spec!r}")
    return spec
