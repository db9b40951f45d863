"""Compressed learning: train with 1 bit per activation saved for the backward pass instead of 32.

Backpropagation keeps, between the forward and the backward pass, the tensors each operation
needs for its gradient; for a convolutional network that is almost all of its training
memory. In a pre-activation unit ``BN → ReLU → conv`` PyTorch saves the BN input (32 bits per
element, for the BN gradient) and the ReLU output (32 bits, shared by the ReLU gradient and the
convolution's weight gradient). This module stores 1 or 2 bits instead::

    from onebit.memory import compressed_activations, saved_activation_bytes
    with compressed_activations(model):              # swaps modules, restores them on exit
        loss = loss_fn(model(x), y)
        loss.backward()                               # exact where stated below, approximate elsewhere

What is swapped, and what is exact:

* :class:`CompressedReLU` replaces every ``nn.ReLU``: forward ``max(x, 0)``, saved for backward
  only the bit-packed mask ``x > 0`` (``uint8``, 8 values per byte, :func:`pack_bits`). ReLU's
  gradient is ``grad · 1[x > 0]``, so its backward is **exact** (identical to ``torch.relu``'s,
  including 0 at x = 0). On its own it saves little: the next layer still saves its float input.
* :class:`LeanAvgPool2d` replaces every ``nn.AvgPool2d``: average pooling's gradient depends on
  the input's shape only, but autograd saves the whole input; this saves the shape. **Exact.**
* With ``fuse=True`` (default), every run ``BatchNorm2d → ReLU → Conv2d`` inside an
  ``nn.Sequential`` (the pre-activation unit of :mod:`onebit.models.wrn`) runs as one autograd
  function, :func:`bn_relu_conv`, that saves only the packed mask ``m = 1[y > 0]`` of the BN
  output ``y = γ·x̂ + β`` (x̂ = (x − μ)·σ⁻¹, batch statistics), plus per-channel numbers:
  σ⁻¹, the level of the weight-gradient code (below) and the conditional means of x̂ given the bit, ``h_c = mean(x̂ | m = 1)`` and
  ``l_c = mean(x̂ | m = 0)``. In the backward pass, with g the gradient of the conv output and
  M = N·H·W elements per channel:

  - conv **input** gradient ``∂a = convᵀ(g, Ŵ)``: **exact** (needs the weight only; the quantized
    weight Ŵ = q(W) is recomputed from the latent weight, which is resident anyway);
  - ReLU gradient ``∂y = ∂a · m``: **exact**;
  - conv **weight** gradient ``∂Ŵ = corr(â, g)``: **approximate**, computed from a reconstruction
    â of the ReLU output a. ``code="mean"``: ``â = m · q_c`` with ``q_c = mean(a | m = 1)``
    (= γ·h_c + β), the least-squares reconstruction from the mask bit alone, so **1 bit per
    element in all**. ``code="stochastic"``: a second bit-plane ``b ~ Bernoulli(a / max_c a)``
    drawn in the forward pass and ``â = b · max_c a``, so E[â] = a and the weight gradient is
    *unbiased* (for a given g), at the price of variance; **2 bits per element**.
    ``code="rounded"``: x̂ itself, stochastically rounded to 4 evenly spaced points spanning
    the values of its channel on its side of the threshold (2 bits: ``q``; the points' lowest
    value and spacing are 4 numbers per channel), so ``x̃ = low + q·step`` with E[x̃] = x̂, and
    ``â = m · (γ·x̃ + β)``: unbiased, with far less variance than one bit spanning [0, max];
    **3 bits per element**;
  - BN gradient, with x̂ replaced by its reconstruction x̃ (**approximate**)::

        ∂β = Σ ∂y,   ∂γ = Σ ∂y·x̃,   ∂x = γ·σ⁻¹·(∂y − ∂β / M − x̃·∂γ / M)

    (the exact formula has x̂ in place of x̃). σ⁻¹ is exact. For ``"mean"`` and
    ``"stochastic"``, ``x̃ = h_c`` where m = 1 and ``l_c`` where m = 0 (biased); for
    ``"rounded"``, the element's own unbiased x̃ above. Where x̂ takes one value
    per channel on each side of the ReLU threshold, x̃ = x̂ and â = a with ``"mean"`` and
    ``"rounded"``: then every gradient is exactly autograd's (a test checks this).

  Under autocast the conv, and so the backward's full-size work, runs in bfloat16 (or float16)
  while the per-channel counts, sums and statistics stay float32; every gradient comes back in
  the dtype of its tensor.

  Eval mode, ``torch.no_grad()`` and units that do not qualify (a BN that is not training or not
  ``BatchNorm2d``, a conv with an input quantizer, a nonzero ``pad_value``, a string or
  non-zero padding mode, a stochastic weight quantizer) run the ordinary modules. The fused
  path calls the BN and conv parameters directly, so forward hooks on those two modules do not
  fire inside it. Running statistics are updated exactly as ``nn.BatchNorm2d`` does.

Sources. McDonnell's ICLR 2018 paper on 1-bit weights does *not* describe compressed
activations; its reference list cites McDonnell, Wang & van Schaik, "Reduced-memory training
and deployment of deep residual networks by stochastic binary quantization" (NICE 2017
abstract, src.org/calendar/e006125/mcdonnell-abstract), which "introduces stochastic
binarization of hidden-unit activations for use in the backward pass, after they are no longer
used in the forward pass", reports up to 32× less training memory with imprecise gradients
(CIFAR-10 error 5.43 % vs 4.53 %) and says that "without stochastic binarization the method is
far less effective". The abstract gives no formula. ``code="stochastic"`` is this module's
reading of it (unbiased Bernoulli binarization with a per-channel max scale); ``code="mean"``,
``code="rounded"`` and the BN reconstructions are this module's own choices, stated above. None
is a reproduction of the abstract's exact scheme. ``"rounded"`` is the default: in a 14-epoch
1-bit WRN-8-2 run on Fashion-MNIST (docs/results.md) it cost 0.14 points of test accuracy
against exact gradients (89.70 % vs 89.84 %), where ``"stochastic"`` cost 2.82.

Measured (``onebit memory --width 4 --batch 128``: WRN-20-4 with 1-bit weights, batch 128,
3×32×32 random input, 1 thread): saved for backward 754.2 MiB with float autograd, 13.4 MiB
with ``code="mean"`` (1/56), 24.9 MiB with ``"stochastic"`` (1/30), 36.4 MiB with ``"rounded"``
(1/21), 765.7 MiB with only the ReLUs swapped; peak RSS of a training step 791 → 304 / 309 /
346 MiB (×0.38 / ×0.39 / ×0.44): the forward and backward working set of the widest stage
remains (the backward multiplies by the mask as 0/1 floats, a full-size temporary, because
that is ~7× faster than ``torch.where`` on CPU), so at small sizes (WRN-20-1, batch 32) the
compressed step peaks no lower. A training step took 1.33× (mean), 1.79× (stochastic) and 1.99×
(rounded) the 5.4 s of float autograd: packing, unpacking and the random draws are extra passes
over every activation. Cosine similarity of the compressed to the exact gradient, per
parameter, min/median: 0.67/0.69 (mean), 0.44/0.48 (stochastic), 0.80/0.83 (rounded). In a
short training run (WRN-20-1, 5000 Fashion-MNIST images, 4 epochs, SGD 0.1, one seed) the
training loss ended at 0.81 (float), 0.85 (stochastic) and 1.14 (mean, with a rise in epoch 3):
the unbiased code trains close to exact gradients, the biased one does not; evidence from one
small run only. Full runs are in docs/results.md.

Measuring: :func:`saved_activation_bytes` sums the distinct storages saved for backward during
one forward (``torch.autograd.graph.saved_tensors_hooks``), :func:`training_step_peak_rss` the
peak-RSS growth of one training step (Linux ``VmHWM``, reset before the step; else
``resource.getrusage``); :func:`measure_memory` (behind ``onebit memory``
command) reports both for WRN-20-4 at batch 128, float autograd vs compressed, each RSS figure
from a fresh process (with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` unless ``malloc_default``:
by default glibc keeps large freed blocks resident after the first few, so RSS would measure
its cache rather than live tensors).
Saved activations are not the whole of training memory: once they are compressed, the peak is
set by the full-size gradients and per-layer temporaries of the backward pass, so the RSS ratio
is far above the saved-bytes ratio.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
import types
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, ShapeError

__all__ = [
    "CODES",
    "MODES",
    "CompressedReLU",
    "CompressionPlan",
    "LeanAvgPool2d",
    "MemoryRow",
    "SavedBytes",
    "bn_relu_conv",
    "compressed_activations",
    "compressed_relu",
    "format_memory_table",
    "fusable",
    "measure_memory",
    "pack_bits",
    "peak_rss",
    "saved_activation_bytes",
    "training_step_peak_rss",
    "unpack_bits",
]

#: The activation codes of the fused BN → ReLU → conv unit (see the module docstring).
CODES = ("mean", "stochastic", "rounded")


# --------------------------------------------------------------------------- bit packing
def _shifts(device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as ``uint8[ceil(n / 8)]``: element k of ``mask.flatten()`` is bit ``k % 8``
    (least significant first, as in the engine's packing) of byte ``k // 8``; the tail is padded with 0."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    return (bits << _shifts(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape, dtype: torch.dtype = torch.bool) -> Tensor:
    """The tensor of ``shape`` that :func:`pack_bits` packed into ``packed``: booleans, or 0/1 of ``dtype``."""
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (n + 7) // 8:
        raise ShapeError(f"{tuple(packed.shape)} {packed.dtype} bytes cannot hold {n} bits of shape {shape}")
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.view(-1)[:n].view(shape).to(dtype)


# --------------------------------------------------------------------------- exact, cheap-to-save layers
class _CompressedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(x > 0))
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape, grad.dtype)


def compressed_relu(x: Tensor) -> Tensor:
    """``relu(x)`` that saves only the packed mask ``x > 0`` for backward; the gradient is exactly ReLU's."""
    return _CompressedReLU.apply(x)


class CompressedReLU(nn.Module):
    """ReLU whose backward keeps 1 bit per element (the mask ``x > 0``); exact gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return compressed_relu(x)


class _LeanAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, args: tuple) -> Tensor:
        ctx.shape, ctx.args = x.shape, args
        ctx.dtype = x.dtype
        return F.avg_pool2d(x, *args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.args
        # avg_pool2d_backward reads only the shape of its `self` argument, never its values
        like = grad.new_empty(ctx.shape)
        out = torch.ops.aten.avg_pool2d_backward(
            grad, like, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )
        return out, None


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


class LeanAvgPool2d(nn.Module):
    """``nn.AvgPool2d`` that saves only its input's shape for backward (exact: the gradient needs nothing else)."""

    def __init__(self, pool: nn.AvgPool2d) -> None:
        super().__init__()
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        self.args = (
            _pair(pool.kernel_size), _pair(stride), _pair(pool.padding),
            bool(pool.ceil_mode), bool(pool.count_include_pad), pool.divisor_override,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or not torch.is_grad_enabled():
            return F.avg_pool2d(x, *self.args)
        return _LeanAvgPool.apply(x, self.args)

    def extra_repr(self) -> str:
        return f"kernel_size={self.args[0]}, stride={self.args[1]}, padding={self.args[2]}"


# --------------------------------------------------------------------------- fused BN → ReLU → conv
@dataclasses.dataclass
class _Spec:
    running_mean: Tensor | None
    running_var: Tensor | None
    factor: float
    eps: float
    quantizer: Callable[[Tensor], Tensor] | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    code: str
    generator: torch.Generator | None


#: Grid points per side of the ReLU threshold of the ``"rounded"`` code (2 bits).
_LEVELS = 4


def _side_grids(xhat: Tensor, gamma: Tensor | None, beta: Tensor | None, dims: tuple) -> Tensor:
    """Per channel, the lowest point and the spacing of the ``"rounded"`` grid on each side of
    the ReLU threshold t = −β/γ of x̂, stacked as ``[low_on, step_on, low_off, step_off]``.

    The "on" side (y = γ·x̂ + β > 0) spans [t, max x̂] for γ > 0 and [min x̂, t] for γ < 0,
    the "off" side the rest; with γ = 0 the whole channel is on one side, [min x̂, max x̂].
    Only the channel's extremes are needed, not a reduction per side.
    """
    low, high = xhat.amin(dims), xhat.amax(dims)
    if gamma is None:
        gamma = torch.ones_like(low)
    if beta is None:
        beta = torch.zeros_like(low)
    t = torch.minimum(torch.maximum(-beta / gamma, low), high)
    rising, falling = gamma > 0, gamma < 0
    on_low = torch.where(rising, t, low)
    on_high = torch.where(falling, t, high)
    off_low = torch.where(falling, t, low)
    off_high = torch.where(rising, t, high)
    return torch.stack([on_low, (on_high - on_low) / (_LEVELS - 1), off_low, (off_high - off_low) / (_LEVELS - 1)])


def _grid_at(grid: Tensor, on: Tensor) -> tuple[Tensor, Tensor]:
    """Each element's grid low and step, by its side of the threshold (``on``: the mask as 0/1 floats)."""
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    # arithmetic, not torch.where: on CPU a broadcasting where is ~7× slower than a multiply-add
    return (torch.addcmul(view(grid[2]), on, view(grid[0] - grid[2])),
            torch.addcmul(view(grid[3]), on, view(grid[1] - grid[3])))


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, conv_bias, spec: _Spec):
        if x.ndim != 4:
            raise ShapeError(f"a fused BN → ReLU → conv unit needs N×C×H×W input, got shape {tuple(x.shape)}")
        y, mean, invstd = torch.native_batch_norm(
            x, bn_weight, bn_bias, spec.running_mean, spec.running_var, True, spec.factor, spec.eps
        )
        dims = (0, 2, 3)
        view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        mask = y > 0
        a = y.clamp_min_(0)
        # counts, sums and random draws in float32 at least, also when autocast hands in bfloat16/float16:
        # a bfloat16 count is exact only up to 256 and a float16 sum overflows past 65504, and an 8-bit
        # uniform draw would bias the stochastic rounding by up to 2⁻⁹
        stat = torch.promote_types(x.dtype, torch.float32)
        random = lambda: torch.rand(  # noqa: E731
            a.shape, generator=spec.generator, dtype=stat,
            device=spec.generator.device if spec.generator is not None else a.device).to(a.device)
        hi = lo = extra = None
        if spec.code == "rounded":
            xhat = (x - view(mean)).mul_(view(invstd))
            level = _side_grids(xhat, bn_weight, bn_bias, dims)
            low, step = _grid_at(level, mask.to(x.dtype))
            # stochastic rounding to the grid: E[q] = (x̂ − low) / step, so E[x̃] = x̂
            q = xhat.sub_(low).div_(step.clamp_min_(torch.finfo(step.dtype).tiny)).clamp_(0, _LEVELS - 1)
            del low, step
            q = q.add_(random()).floor_().clamp_(max=_LEVELS - 1).to(torch.uint8)
            extra = torch.cat([pack_bits(q & 1), pack_bits(q >> 1)])
            del xhat, q
        else:
            m_count = x.numel() // x.shape[1]
            count = mask.sum(dims, dtype=stat)
            sum_a = a.sum(dims, dtype=stat)  # = Σ y over the mask
            # conditional means of x̂ = (x − μ)·σ⁻¹ on each side of the threshold (0 for an empty side)
            if bn_weight is None or bool((bn_weight != 0).all()):
                # Σ_{m=1} x̂ = (Σ_{m=1} y − count·β) / γ, and Σ x̂ = 0, so Σ_{m=0} x̂ = −Σ_{m=1} x̂
                sum_hi = sum_a if bn_bias is None else sum_a - count * bn_bias
                sum_hi = sum_hi if bn_weight is None else sum_hi / bn_weight
            else:  # a zero γ: take the sums from x itself
                sum_hi = ((x * mask).sum(dims, dtype=stat) - count * mean) * invstd
            hi = torch.where(count > 0, sum_hi / count.clamp_min(1), 0)
            lo = torch.where(count < m_count, -sum_hi / (m_count - count).clamp_min(1), 0)
            if spec.code == "stochastic":
                level = a.amax(dims).to(stat)
                extra = pack_bits(random() < a / view(level.clamp_min(torch.finfo(stat).tiny)))
            else:
                level = torch.where(count > 0, sum_a / count.clamp_min(1), 0)  # q_c = mean(a | m = 1)
        w = spec.quantizer(weight) if spec.quantizer is not None else weight
        out = F.conv2d(a, w, conv_bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        ctx.shape = x.shape
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.conv_bias_dtype = conv_bias.dtype if conv_bias is not None else None
        ctx.save_for_backward(pack_bits(mask), extra, invstd, hi, lo, level, weight, bn_weight, bn_bias)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        packed, extra, invstd, hi, lo, level, weight, gamma, beta = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_x, need_w, need_g, need_b, need_cb = ctx.needs_input_grad[:5]
        shape = ctx.shape
        view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        # Full-size work in the dtype the conv ran in, grad's: under autocast that is bfloat16 while the
        # weights, the BN parameters and the per-channel statistics are float32, and convolution_backward
        # takes one dtype. Per-channel sums accumulate in float32 at least; each gradient is returned
        # in the dtype of the tensor it belongs to.
        dtype = grad.dtype
        stat = torch.promote_types(dtype, torch.float32)
        on = unpack_bits(packed, shape, dtype)  # the mask as 0/1: multiplies are cheaper than where
        if spec.code == "rounded":
            half = extra.numel() // 2
            low, step = _grid_at(level.to(dtype), on)
            x_tilde = unpack_bits(extra[half:], shape, dtype).mul_(2).add_(unpack_bits(extra[:half], shape, dtype))
            x_tilde = x_tilde.mul_(step).add_(low)
            del low, step
            a_hat = x_tilde * on if gamma is None else x_tilde * view(gamma.to(dtype))
            if gamma is not None or beta is not None:
                a_hat = (a_hat if beta is None else a_hat.add_(view(beta))).mul_(on)
        else:
            x_tilde = None
            a_hat = (unpack_bits(extra, shape, dtype) if extra is not None else on.clone()).mul_(view(level))

        w_leaf = None
        if spec.quantizer is not None:
            with torch.enable_grad():  # recompute q(W) from the latent weight, keeping q's own backward
                w_leaf = weight.detach().requires_grad_(need_w)
                w = spec.quantizer(w_leaf)
        else:
            w = weight
        need_a = need_x or need_g or need_b
        has_bias = ctx.conv_bias_dtype is not None
        grad_a, grad_w, grad_cb = torch.ops.aten.convolution_backward(
            grad, a_hat, w.detach().to(dtype), [w.shape[0]] if has_bias else None,
            spec.stride, spec.padding, spec.dilation, False, [0, 0], spec.groups, [need_a, need_w, need_cb],
        )
        del a_hat
        if need_w:
            grad_w = grad_w.to(w.dtype)
            if w_leaf is not None:  # w_leaf is the weight detached, so this grad is in the weight's dtype
                (grad_w,) = torch.autograd.grad(w, w_leaf, grad_w)

        grad_x = grad_gamma = grad_beta = None
        if need_a:
            m_count = grad_a.numel() // grad_a.shape[1]
            dy = grad_a.mul_(on)  # ReLU: exact
            dbeta = dy.sum((0, 2, 3), dtype=stat)
            scale = invstd if gamma is None else gamma * invstd
            # ∂x = γσ⁻¹(∂y − ∂β/M − x̃·∂γ/M)
            if x_tilde is not None:  # x̃ per element
                dgamma = (dy * x_tilde).sum((0, 2, 3), dtype=stat)
                if need_x:
                    grad_x = x_tilde.mul_(view(-dgamma / m_count)).add_(dy).sub_(view(dbeta / m_count))
            else:  # x̃ = h_c or l_c by the bit, written without full-size temporaries
                dgamma = hi * dbeta  # = Σ ∂y·x̃, as ∂y = 0 where m = 0 and x̃ = h_c where m = 1
                if need_x:
                    shift_on, shift_off = -(dbeta + hi * dgamma) / m_count, -(dbeta + lo * dgamma) / m_count
                    grad_x = dy.add_(view(shift_off)).addcmul_(on, view(shift_on - shift_off))
            del dy, grad_a, x_tilde
            if need_x:
                grad_x = grad_x.mul_(view(scale)).to(ctx.x_dtype)
            grad_gamma = dgamma.to(gamma.dtype) if need_g else None
            grad_beta = dbeta.to(beta.dtype) if need_b else None
        grad_cb = grad_cb.to(ctx.conv_bias_dtype) if need_cb else None
        return grad_x, grad_w if need_w else None, grad_gamma, grad_beta, grad_cb, None


def _unfusable(bn: nn.Module, conv: nn.Module) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not BatchNorm2d"
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or getattr(conv, "pad_value", 0.0) != 0:
        return "the conv pads with something other than explicit zeros"
    if getattr(conv, "input_quantizer", None) is not None:
        return "the conv quantizes its input"
    quantizer = getattr(conv, "weight_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "StochasticSign":
        return "the conv's weight quantizer is stochastic (it cannot be recomputed in backward)"
    return None


def fusable(bn: nn.Module, relu: nn.Module, conv: nn.Module) -> str | None:
    """Why ``bn → relu → conv`` cannot run as one compressed unit, or None if it can (in training)."""
    if not isinstance(relu, (nn.ReLU, CompressedReLU)):
        return f"{type(relu).__name__} is not ReLU"
    return _unfusable(bn, conv)


def bn_relu_conv(x: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, code: str = "rounded",
                 generator: torch.Generator | None = None) -> Tensor:
    """``conv(relu(bn(x)))`` in training mode, saving for backward 2 bits per element of ``x``
    with ``code="stochastic"``, 1 with ``code="mean"``, 3 with ``code="rounded"`` (the default), plus a few numbers per
    channel; see the module docstring for which gradients are exact.

    Outside training (``bn.training`` False or grad disabled) it is the three modules in a row.
    """
    if code not in CODES:
        raise ConfigError(f"activation code must be one of {', '.join(CODES)}, got {code!r}")
    reason = _unfusable(bn, conv)
    if reason is not None:
        raise ConfigError(f"cannot fuse BN → ReLU → conv: {reason}")
    if not (bn.training and torch.is_grad_enabled()):
        return conv(torch.relu(bn(x)))
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    spec = _Spec(
        running_mean=bn.running_mean if bn.track_running_stats else None,
        running_var=bn.running_var if bn.track_running_stats else None,
        factor=factor,
        eps=bn.eps,
        quantizer=getattr(conv, "weight_quantizer", None),
        stride=_pair(conv.stride),
        padding=_pair(conv.padding),
        dilation=_pair(conv.dilation),
        groups=conv.groups,
        code=code,
        generator=generator,
    )
    return _BNReLUConv.apply(x, conv.weight, bn.weight, bn.bias, conv.bias, spec)


# --------------------------------------------------------------------------- swapping modules in and out
@dataclasses.dataclass
class CompressionPlan:
    """What :func:`compressed_activations` changed: module paths of the fused units, ReLUs and pools swapped."""

    fused: list[str] = dataclasses.field(default_factory=list)
    relus: list[str] = dataclasses.field(default_factory=list)
    pools: list[str] = dataclasses.field(default_factory=list)


def _fused_forward(self: nn.Sequential, x: Tensor) -> Tensor:
    modules = list(self._modules.values())
    starts, code, generator = self._onebit_fused
    i = 0
    while i < len(modules):
        if i in starts and modules[i].training and torch.is_grad_enabled():
            x = bn_relu_conv(x, modules[i], modules[i + 2], code, generator)
            i += 3
        else:
            x = modules[i](x)
            i += 1
    return x


@contextlib.contextmanager
def compressed_activations(model: nn.Module, *, fuse: bool = True, code: str = "rounded",
                           generator: torch.Generator | None = None) -> Iterator[CompressionPlan]:
    """Within the block, ``model`` trains with compressed saved activations; on exit it is restored.

    Swaps every ``nn.ReLU`` child for :class:`CompressedReLU` and every ``nn.AvgPool2d`` for
    :class:`LeanAvgPool2d` (both exact), and with ``fuse`` runs each ``BatchNorm2d → ReLU →
    Conv2d`` run of an ``nn.Sequential`` through :func:`bn_relu_conv` with ``code``
    (``"stochastic"`` or ``"rounded"``, drawing from ``generator`` or the global RNG, or ``"mean"``). Parameters, buffers and
    the state dict are untouched (the swapped modules have no state), so an optimizer built
    before keeps working. Yields the :class:`CompressionPlan`.
    """
    if code not in CODES:
        raise ConfigError(f"activation code must be one of {', '.join(CODES)}, got {code!r}")
    plan = CompressionPlan()
    patched: list[nn.Sequential] = []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    names = {id(m): name for name, m in model.named_modules()}
    try:
        if fuse:
            for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
                children = list(seq._modules.items())
                starts = set()
                for i in range(len(children) - 2):
                    if i - 1 in starts or i - 2 in starts:
                        continue
                    if fusable(children[i][1], children[i + 1][1], children[i + 2][1]) is None:
                        starts.add(i)
                        plan.fused.append(names[id(children[i + 2][1])])
                if starts:
                    if hasattr(seq, "_onebit_fused"):
                        raise ConfigError("compressed_activations is already active on this model")
                    seq._onebit_fused = (frozenset(starts), code, generator)
                    seq.forward = types.MethodType(_fused_forward, seq)
                    patched.append(seq)
        for parent in list(model.modules()):
            for child_name, child in list(parent._modules.items()):
                path = ".".join(p for p in (names.get(id(parent), ""), child_name) if p)
                if isinstance(child, nn.ReLU):
                    swapped.append((parent, child_name, child))
                    parent._modules[child_name] = CompressedReLU()
                    plan.relus.append(path)
                elif isinstance(child, nn.AvgPool2d):
                    swapped.append((parent, child_name, child))
                    parent._modules[child_name] = LeanAvgPool2d(child)
                    plan.pools.append(path)
        yield plan
    finally:
        for parent, child_name, child in reversed(swapped):
            parent._modules[child_name] = child
        for seq in patched:
            del seq.forward
            del seq._onebit_fused


# --------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class SavedBytes:
    """Bytes saved for backward by one forward pass, distinct storages counted once.

    ``activations``: storages created during the forward (what compressed learning shrinks);
    ``resident``: saved storages that exist anyway, the model's parameters and buffers and the
    input batch (they cost nothing extra); ``tensors``: how many tensors were saved in all.
    """

    activations: int
    resident: int
    tensors: int

    def __truediv__(self, other: "SavedBytes") -> float:
        return self.activations / other.activations if other.activations else math.inf


def saved_activation_bytes(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor] | None = None) -> SavedBytes:
    """The :class:`SavedBytes` of one forward pass of ``model`` on ``x`` and ``loss_fn(output)``
    (default: the output's sum). Nothing is backpropagated; the graph is freed on return.

    Counts every tensor autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``),
    by its whole storage (a saved view keeps its base alive), each storage once (a ReLU's output
    saved again by the next conv costs nothing more).
    """
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers(), [x])}
    storages: dict[int, int] = {}
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = loss_fn(out) if loss_fn is not None else out.sum()
    del out, loss
    activations = sum(n for ptr, n in storages.items() if ptr not in own)
    resident = sum(n for ptr, n in storages.items() if ptr in own)
    return SavedBytes(activations=activations, resident=resident, tensors=count)


def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` of ``/proc/self/status`` (its own address space,
    resettable), else ``resource.getrusage``'s ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def training_step_peak_rss(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                           optimizer: torch.optim.Optimizer | None = None) -> int:
    """Peak resident memory of one training step (forward, backward, optional ``optimizer.step()``)
    above the resident memory before it, in bytes.

    On Linux the peak mark is reset before the step (``/proc/self/clear_refs``) and read from
    ``VmHWM``, so the figure is the step's own. Elsewhere it falls back to
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a high-water mark over the process's life
    that Linux even carries across ``exec`` from the forked parent; it is then only meaningful
    when the step's peak is the highest the process has reached (a fresh process that did not
    fork from a big one). Allocator caching counts as resident: see the module docstring.
    """
    gc.collect()
    _reset_peak_rss()
    before = _rss_now()
    if before is None:
        before = peak_rss()
    loss = loss_fn(model(x))
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return max(0, peak_rss() - before)


# --------------------------------------------------------------------------- the measurement (onebit memory)
MODES = ("float", "relu", *CODES)


@dataclasses.dataclass
class MemoryRow:
    """One line of :func:`measure_memory`: a training mode and what it costs.

    ``mode``: ``"float"`` (plain autograd), ``"relu"`` (only ReLUs and pools swapped, fuse=False),
    ``"stochastic"`` / ``"mean"`` / ``"rounded"`` (compressed_activations with that code). ``grad_cos_min`` /
    ``grad_cos_median``: cosine similarity of each parameter's gradient to the float one.
    ``peak_rss``: bytes, from a fresh process, or None when not measured. ``step_seconds``: the
    median wall time of a training step (forward and backward) in this process, after a warm-up step.
    """

    mode: str
    saved: SavedBytes
    grad_cos_min: float
    grad_cos_median: float
    peak_rss: int | None
    step_seconds: float


def _setup(settings: dict) -> tuple[nn.Module, Tensor, Tensor]:
    from .models import create_model

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    model = create_model("float_wrn" if settings["float_weights"] else "wrn_1bit",
                         in_shape=(settings["channels"], settings["size"], settings["size"]), num_classes=10,
                         depth=settings["depth"], width=settings["width"]).train()
    g = torch.Generator().manual_seed(settings["seed"] + 1)
    x = torch.randn(settings["batch"], settings["channels"], settings["size"], settings["size"], generator=g)
    y = torch.randint(0, 10, (settings["batch"],), generator=g)
    return model, x, y


def _mode_context(model: nn.Module, mode: str):
    if mode == "float":
        return contextlib.nullcontext()
    if mode == "relu":
        return compressed_activations(model, fuse=False)
    return compressed_activations(model, code=mode, generator=torch.Generator().manual_seed(0))


def _rss_child() -> None:
    """Entry of the fresh process that measures one mode's training-step peak RSS (argv[1]: JSON settings)."""
    settings = json.loads(sys.argv[1])
    model, x, y = _setup(settings)
    with _mode_context(model, settings["mode"]):
        delta = training_step_peak_rss(model, x, lambda out: F.cross_entropy(out, y))
    print(json.dumps({"rss": delta}))


def measure_memory(depth: int = 20, width: float = 4, batch: int = 128, size: int = 32, channels: int = 3, *,
                   float_weights: bool = False, threads: int = 1, seed: int = 0, rss: bool = True,
                   malloc_default: bool = False, timed_steps: int = 3) -> list[MemoryRow]:
    """Saved-for-backward bytes, gradient fidelity, the time of a training step (median of
    ``timed_steps``) and (``rss``) training-step peak RSS of a WRN (``wrn_1bit``, or ``float_wrn``
    with ``float_weights``) on a random batch, one :class:`MemoryRow` per mode of :data:`MODES`.

    Each RSS figure comes from a fresh Python process running one training step. Unless
    ``malloc_default``, that process runs with glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: by
    default glibc raises its mmap threshold after large frees and keeps later freed blocks
    resident, so RSS would measure its cache rather than live tensors.
    """
    settings = dict(depth=depth, width=width, batch=batch, size=size, channels=channels,
                    float_weights=float_weights, threads=threads, seed=seed)
    model, x, y = _setup(settings)
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows, reference = [], None
    for mode in MODES:
        model.load_state_dict(state)
        with _mode_context(model, mode):
            saved = saved_activation_bytes(model, x, loss)
            model.zero_grad(set_to_none=True)
            loss(model(x)).backward()
            grads = [p.grad.detach().flatten().clone() for p in model.parameters()]
            times = []
            for _ in range(max(timed_steps, 1)):
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                loss(model(x)).backward()
                times.append(time.perf_counter() - started)
            model.load_state_dict(state)  # the timed steps updated the BN running statistics
        reference = grads if reference is None else reference
        cos = sorted(float(F.cosine_similarity(g, r, dim=0)) for g, r in zip(grads, reference))
        peak = None
        if rss:
            env = os.environ.copy()
            if not malloc_default:
                env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
            code = "from onebit.memory import _rss_child; _rss_child()"
            done = subprocess.run([sys.executable, "-c", code, json.dumps({**settings, "mode": mode})],
                                  capture_output=True, text=True, check=True, env=env)
            peak = json.loads(done.stdout.strip().splitlines()[-1])["rss"]
        rows.append(MemoryRow(mode, saved, cos[0], cos[len(cos) // 2], peak, sorted(times)[len(times) // 2]))
    return rows


def format_memory_table(rows: list[MemoryRow]) -> str:
    """:func:`measure_memory`'s rows as a text table, ratios relative to the first (float) row."""
    mib = 2**20
    lines = [f"{'mode':<12}{'saved MiB':>11}{'ratio':>9}{'resident MiB':>14}{'grad cos min/median':>22}"
             f"{'peak RSS MiB':>14}{'ratio':>8}{'step s':>9}{'ratio':>8}"]
    base = rows[0]
    for row in rows:
        ratio = row.saved / base.saved
        if row.peak_rss is not None and base.peak_rss:
            rss = f"{row.peak_rss / mib:14.1f}{row.peak_rss / base.peak_rss:8.3f}"
        else:
            rss = f"{'-':>14}{'-':>8}"
        lines.append(f"{row.mode:<12}{row.saved.activations / mib:11.1f}{ratio:9.4f}{row.saved.resident / mib:14.1f}"
                     f"{row.grad_cos_min:>13.4f} /{row.grad_cos_median:7.4f}{rss}"
                     f"{row.step_seconds:9.3f}{row.step_seconds / base.step_seconds:8.2f}  (saved 1/{1 / ratio:.1f})")
    return "\n".join(lines)
