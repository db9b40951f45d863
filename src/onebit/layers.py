"""Quantized layers: ``nn.Linear`` and ``nn.Conv2d`` that quantize their input and weight
on the fly, trained through latent float weights (BinaryConnect / BinaryNet, Larq's
``QuantDense`` / ``QuantConv2D``).

A quantizer is given as a registered name, a module, or None for full precision (see
:mod:`onebit.quantizers`). Following Larq, the binary activation is the ``input_quantizer``
of the layer that consumes it, so a layer's input precision is a property of the layer::

    from onebit.layers import QuantConv2d, QuantLinear, clip_latent_weights

    model = nn.Sequential(
        QuantConv2d(1, 32, 3, padding=1, bias=False, weight_quantizer="sign", weight_clip=1.0),
        nn.BatchNorm2d(32),
        QuantConv2d(32, 32, 3, padding=1, bias=False, input_quantizer="sign",
                    weight_quantizer="sign", weight_clip=1.0, pad_value=-1.0),
        nn.BatchNorm2d(32),
        nn.Flatten(),
        QuantLinear(32 * 28 * 28, 10, input_quantizer="sign", weight_quantizer="sign", weight_clip=1.0),
    )
    loss.backward()
    optimizer.step()
    clip_latent_weights(model)   # keep latent weights in [−1, 1], where sign's gradient lives

The quantizers are child modules (shown in the repr, ``None`` for full precision), so
``model.train()`` / ``model.eval()`` reach them: a stochastic quantizer draws only in training.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, OnebitError
from .quantizers import Quantizer, get_quantizer

__all__ = [
    "QuantAct",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "check_weight_clip",
    "clip_latent_weights",
    "finite_number",
    "has_stochastic_quantizer",
    "recompute_batchnorm",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def finite_number(value) -> bool:
    """Whether ``value`` is a real, finite number (not a bool, a string or NaN): for user arguments."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_weight_clip(weight_clip) -> float | None:
    """``weight_clip`` if it is a positive finite number or None, else a :class:`ConfigError`."""
    if weight_clip is not None and not (finite_number(weight_clip) and weight_clip > 0):
        raise ConfigError(f"weight_clip must be a positive finite number or None, got {weight_clip!r}"[:300])
    return weight_clip


def _quantize(quantizer: nn.Module | None, x: Tensor) -> Tensor:
    return x if quantizer is None else quantizer(x)


class QuantLayer:
    """What :class:`QuantLinear` and :class:`QuantConv2d` share: the two quantizers, the latent
    weight clip and the quantized weight. Mixed in before the torch layer it extends."""

    weight: nn.Parameter
    input_quantizer: nn.Module | None
    weight_quantizer: nn.Module | None
    weight_clip: float | None

    def _init_quantization(self, input_quantizer, weight_quantizer, weight_clip: float | None) -> None:
        check_weight_clip(weight_clip)
        # registered even when None, so that assigning a quantizer later registers it too
        self.register_module("input_quantizer", get_quantizer(input_quantizer))
        self.register_module("weight_quantizer", get_quantizer(weight_quantizer))
        self.weight_clip = weight_clip

    def quantized_weight(self) -> Tensor:
        """The weight as the forward pass uses it, q_w(weight), detached (for export and summaries)."""
        return _quantize(self.weight_quantizer, self.weight.detach())

    @torch.no_grad()
    def clip_weights_(self):
        """Clamp the latent weight in place to [−weight_clip, weight_clip]; nothing without a clip."""
        if self.weight_clip is not None:
            self.weight.clamp_(-self.weight_clip, self.weight_clip)
        return self

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.weight_clip is None else f"{text}, weight_clip={self.weight_clip}"


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` on quantized input and weight: y = q_in(x)·q_w(W)ᵀ + b.

    Extra keyword arguments beyond ``nn.Linear``'s: ``input_quantizer`` and
    ``weight_quantizer`` (name, module or None), ``weight_clip`` (bound of the latent weight,
    applied by :func:`clip_latent_weights`). The bias stays in full precision.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        input_quantizer: str | nn.Module | None = None,
        weight_quantizer: str | nn.Module | None = None,
        weight_clip: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantization(input_quantizer, weight_quantizer, weight_clip)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_quantize(self.input_quantizer, x), _quantize(self.weight_quantizer, self.weight), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` on quantized input and weight, optionally padded with a constant other than 0.

    Takes ``nn.Conv2d``'s arguments plus the keyword arguments of :class:`QuantLinear` and
    ``pad_value``. Zero padding puts a third value into a binary input; ``pad_value=±1``
    ("one-padding") keeps it strictly ±1, which is what a packed XNOR/popcount kernel computes.
    A nonzero ``pad_value`` pads the quantized input explicitly and needs ``padding_mode="zeros"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *args,
        input_quantizer: str | nn.Module | None = None,
        weight_quantizer: str | nn.Module | None = None,
        weight_clip: float | None = None,
        pad_value: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        self._init_quantization(input_quantizer, weight_quantizer, weight_clip)
        if not finite_number(pad_value):
            raise ConfigError(f"pad_value must be a finite number, got {pad_value!r}"[:300])
        if pad_value != 0 and self.padding_mode != "zeros":
            raise ConfigError(
                f"pad_value={pad_value} needs padding_mode='zeros' (it replaces the zeros), got {self.padding_mode!r}"
            )
        self.pad_value = float(pad_value)

    def _explicit_padding(self) -> tuple[int, ...] | None:
        """``F.pad`` amounts when the input is padded before the convolution rather than by it."""
        if self.pad_value == 0 and self.padding_mode == "zeros":
            return None
        if self.padding == "same":  # nn.Conv2d's split: the odd pixel goes after
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            sides = [(t // 2, t - t // 2) for t in totals]
        elif self.padding == "valid":
            return None
        else:
            sides = [(p, p) for p in self.padding]
        pad = tuple(n for side in reversed(sides) for n in side)  # F.pad lists the last dim first
        return pad if any(pad) else None

    def forward(self, x: Tensor) -> Tensor:
        x = _quantize(self.input_quantizer, x)
        padding = self.padding
        pad = self._explicit_padding()
        if pad is not None:
            if self.padding_mode == "zeros":
                x = F.pad(x, pad, value=self.pad_value)
            else:
                x = F.pad(x, pad, mode=self.padding_mode)
            padding = 0
        weight = _quantize(self.weight_quantizer, self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.pad_value == 0 else f"{text}, pad_value={self.pad_value}"


class QuantAct(nn.Module):
    """An activation quantizer as a layer of its own: ``QuantAct("sign")``, ``QuantAct("kbit", bits=2)``.

    For networks that quantize activations outside the layer that consumes them; takes what
    :func:`onebit.quantizers.get_quantizer` takes.
    """

    def __init__(self, quantizer: str | nn.Module | None, **kwargs) -> None:
        super().__init__()
        self.register_module("quantizer", get_quantizer(quantizer, **kwargs))

    def forward(self, x: Tensor) -> Tensor:
        return _quantize(self.quantizer, x)


def clip_latent_weights(model: nn.Module) -> None:
    """Clamp in place the latent weight of every quantized layer of ``model`` that has a ``weight_clip``.

    Call it after each optimizer step: beyond the clip, sign's straight-through gradient is 0
    and a weight that drifted there would stop learning.
    """
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.clip_weights_()


def has_stochastic_quantizer(model: nn.Module) -> bool:
    """Whether any quantizer of ``model`` draws random values in training (e.g. ``stochastic_sign``)."""
    return any(isinstance(m, Quantizer) and m.stochastic for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Set the running statistics of every batch norm of ``model`` to their average over the
    input ``batches`` (weighted by batch size), every other module in eval mode: deterministic
    quantizers, no dropout.

    These are the statistics of the network that evaluation and export run. Running averages
    gathered in training differ from them when a quantizer is stochastic (its draws change the
    spread of each layer's output) and, slightly, because the weights kept changing (McDonnell
    2018 recomputes them after training). The modes of ``model``'s modules are restored, and so
    are the old statistics if the recompute fails. A batch of one sample is left out (a
    ``BatchNorm1d`` has no variance to take from it); no batch of two or more is an error.
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.train()
    done = False
    try:
        seen = 0
        for x in batches:
            if len(x) < 2:
                continue
            seen += len(x)
            for norm in norms:  # an average weighted by batch size: a short last batch counts for less
                norm.momentum = len(x) / seen
            model(x)
        if not seen:
            raise OnebitError("recomputing batch-norm statistics needs a batch of at least 2 samples; got none")
        done = True
    finally:
        for norm, momentum, state in zip(norms, momenta, saved):
            norm.momentum = momentum
            if not done:
                norm.load_state_dict(state)
        for module, training in modes:
            module.train(training)
