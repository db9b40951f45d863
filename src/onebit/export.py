"""Export a trained model: to a ``.onebit`` file for the engine (integer thresholds, packed
bits), or to ONNX (the float simulation of the binarized network).

    from onebit.export import export_checkpoint, export_model, export_onnx

    export_model(model, "model.onebit", source={"name": "binarynet_mlp", "kwargs": {...}})
    export_checkpoint("runs/mnist/best.pt", "model.onebit")
    export_onnx(model, "model.onnx")

The model is walked as a flat list of leaf modules (nested ``nn.Sequential`` are flattened).
Each quantized layer becomes a ``dense``/``conv`` op; what follows it up to the next
binarization (bias, XNOR α, a ``he_sign`` layer's fixed scale, max-pool, BatchNorm, Hardtanh,
ReLU, dropout) is folded either into a per-channel ``threshold`` (the next layer binarizes:
sign(BN(...)) becomes ``s·d ≥ t``) or into ``affine``/``clamp`` ops (the value stays real:
logits, real activations, XNOR-Net's per-sample scale). The residual blocks of
:mod:`onebit.models.wrn` (:class:`~onebit.models.wrn.PreActBlock`: ``unit2(unit1(x)) +
shortcut(x)``) become both branches, each reading the real-valued x, and an ``add``;
average pooling and a :class:`~onebit.models.wrn.Downsample` shortcut become ``avgpool``
(and ``pad_channels``). Thresholds are decided by evaluating the model's own modules (in torch
float32, eval mode) at candidate pre-activations, so the engine's bits are those PyTorch
computes. ``input_levels`` (the dataset's pixel range, from a checkpoint's training config)
lets the engine run the first layer exactly on integer pixels. The derivation, the
conventions and what is exact are in docs/export.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .engine import kernels
from .engine.format import MODEL_INPUT, read_model, write_model
from .errors import OnebitError
from .files import atomic_write
from .layers import QuantAct, QuantConv2d, QuantLinear
from .models.wrn import Downsample, PreActBlock
from .quantizers import (
    ApproxSign,
    HeSign,
    IdentityQuantizer,
    KBit,
    ScaledSign,
    SteSign,
    StochasticSign,
    SwishSign,
    he_constant,
)

__all__ = [
    "ExportError",
    "build_graph",
    "derive_thresholds",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "pack_bits",
]

#: quantizers whose eval-mode forward is exactly sign (0 → +1)
SIGN_QUANTIZERS = (SteSign, ApproxSign, SwishSign, StochasticSign)
_ELEMENTWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Hardtanh)
_PASS = (nn.Identity, nn.Dropout)
#: modules with children that the builder takes whole
_UNITS = (QuantLinear, QuantConv2d, QuantAct, PreActBlock, Downsample)


class ExportError(OnebitError, ValueError):
    """A model holds a layer or a pattern of layers the exporter cannot translate."""


# --------------------------------------------------------------------------- bits
def pack_bits(negative: np.ndarray) -> np.ndarray:
    """Pack booleans (True ↔ −1 ↔ bit 1) along the last axis into little-endian uint64 words,
    element k in word k // 64 at bit k % 64, zero padding (docs/design.md)."""
    return kernels._pack_bool(np.asarray(negative, dtype=bool))


def _sign_negative(w: torch.Tensor) -> np.ndarray:
    """Where sign(w) = −1 with sign(0) = +1, exactly as the quantizers compute it (NaN → −1)."""
    return (~(w >= 0)).cpu().numpy()


# --------------------------------------------------------------------------- module walk
def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers of ``model`` in order; the builder walks a residual block's
    branches itself."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                walk(f"{prefix}.{name}" if prefix else name, child)
        elif isinstance(module, _UNITS) or not list(module.children()):
            out.append((prefix or type(module).__name__, module))
        else:
            raise ExportError(
                f"cannot export {prefix or 'the model'} ({type(module).__name__}): only nn.Sequential "
                "containers of layers are understood"
            )

    walk(prefix, model)
    return out


def _activation_mode(quantizer: nn.Module | None, where: str) -> str:
    """'float' (no quantization), 'sign' (±1) or 'scaled' (β·sign, β = mean |x| per sample)."""
    if quantizer is None or isinstance(quantizer, IdentityQuantizer):
        return "float"
    if isinstance(quantizer, SIGN_QUANTIZERS):
        return "sign"
    if isinstance(quantizer, ScaledSign):
        return "scaled"
    name = getattr(quantizer, "name", type(quantizer).__name__)
    raise ExportError(f"{where}: activation quantizer {name!r} cannot run on the binary engine (sign-like only)")


def _weights(layer: QuantLinear | QuantConv2d, where: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(signs or float weights, α per output channel or None, 'binary' | 'float')."""
    weight = layer.weight.detach().float()
    q = layer.weight_quantizer
    if q is None or isinstance(q, IdentityQuantizer):
        return weight, None, "float"
    signs = (weight >= 0).float() * 2 - 1
    if isinstance(q, SIGN_QUANTIZERS):
        return signs, None, "binary"
    if isinstance(q, ScaledSign):  # α = mean |W| per output channel, as scaled_sign computes it
        alpha = weight.abs().mean(tuple(range(1, weight.ndim)), keepdim=True)
        return signs, alpha.reshape(-1), "binary"
    if isinstance(q, KBit) and q.bits == 1 and q.mode == "weight":  # DoReFa 1-bit: E|W|·sign(W)
        return signs, weight.abs().mean().expand(weight.shape[0]).clone(), "binary"
    if isinstance(q, HeSign):  # McDonnell: sign(W)·sqrt(2 / fan_in), as float32 as torch multiplies it
        return signs, torch.full((weight.shape[0],), he_constant(weight.shape)), "binary"
    name = getattr(q, "name", type(q).__name__)
    raise ExportError(f"{where}: weight quantizer {name!r} cannot run on the binary engine")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_padding(layer: QuantConv2d, where: str) -> tuple[int, int]:
    if layer.padding_mode != "zeros":
        raise ExportError(f"{where}: padding_mode {layer.padding_mode!r} is not supported (zeros only)")
    if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
        raise ExportError(f"{where}: grouped or dilated convolutions are not supported")
    if layer.padding == "valid":
        return 0, 0
    if layer.padding == "same":
        totals = [k - 1 for k in layer.kernel_size]
        if any(t % 2 for t in totals):
            raise ExportError(f"{where}: padding='same' with an even kernel pads asymmetrically (not supported)")
        return totals[0] // 2, totals[1] // 2
    return _pair(layer.padding)


# --------------------------------------------------------------------------- thresholds
_F32_MIN_KEY = -0x7F800000  # key of the most negative finite float32
_F32_MAX_KEY = 0x7F7FFFFF  # key of the largest finite float32


def _key_to_f32(keys: np.ndarray) -> np.ndarray:
    """float32 values of order keys: key ↔ float is monotone (−0.0 ↦ −1, +0.0 ↦ 0)."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys >= 0, keys, (-keys - 1) | 0x80000000)
    return bits.astype(np.uint32).view(np.float32)


def _defined_range(defined: Callable[[np.ndarray], np.ndarray], value: Callable[[np.ndarray], np.ndarray],
                   lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the widest [lo', hi'] ⊆ [lo, hi] around 0 on which ``defined`` holds.

    A monotone chain of finite parameters turns NaN only where an intermediate overflows to
    ±inf and meets a 0 (inf·0, inf − inf): on the tails of the domain, so the defined values
    form one interval, found by bisection from 0 towards each end."""
    zero = np.zeros_like(lo)
    if not np.all(defined(value(zero))):
        bad = np.flatnonzero(~defined(value(zero)))
        raise ExportError(f"features {bad[:8].tolist()} are NaN at pre-activation 0")
    ends = []
    for end in (lo, hi):
        inside, outside = zero.copy(), end.copy()  # defined at `inside`; at `outside` maybe not
        ok = defined(value(outside))
        inside[ok] = outside[ok]
        while np.any(np.abs(outside - inside) > 1):
            m = inside + (outside - inside) // 2
            good = defined(value(m))
            inside, outside = np.where(good, m, inside), np.where(good, outside, m)
        ends.append(inside)
    return ends[0], ends[1]


def derive_thresholds(
    positive: Callable[[np.ndarray], np.ndarray], n: int, domain: str, bound: int = 0,
    defined: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the rule ``+1 iff s·x ≥ t`` that reproduces ``positive`` on the domain.

    ``positive(values) -> bool[n]`` tells for one candidate value per feature whether the
    binarized output is +1; it must be monotone in the value (BN, Hardtanh and ReLU are).
    ``domain`` is ``"int"`` (the integers in [−bound, bound]) or ``"float"`` (every finite
    float32). Returns ``(s int8[n], t)`` with t int32 (int domain) or float32: s = +1, t = the
    smallest value giving +1; s = −1, t = −(the largest value giving +1); s = 0 when the output
    is constant, t = 0 for +1, t = 1 for −1. Found by bisection on the domain, so every
    decision is PyTorch's own float32 evaluation.

    ``defined(values) -> bool[n]``, if given, tells where the computation behind ``positive``
    is a number, not NaN (whose sign, −1, breaks monotonicity). On the int domain every value
    must be defined (else :class:`ExportError`); on the float domain the search is confined
    to the values around 0 where it is: the rest are pre-activations at which PyTorch's own
    float32 arithmetic overflows (e.g. v·α = inf, then γ = 0 gives inf·0 = NaN).
    """
    if domain == "int":
        lo, hi = np.full(n, -bound, np.int64), np.full(n, bound, np.int64)
        value = lambda k: np.asarray(k, np.int64).astype(np.float32)  # noqa: E731 (exact: |k| < 2**24)
    else:
        lo, hi = np.full(n, _F32_MIN_KEY, np.int64), np.full(n, _F32_MAX_KEY, np.int64)
        value = _key_to_f32
    if defined is not None:
        inner_lo, inner_hi = _defined_range(defined, value, lo, hi)
        if domain == "int" and (np.any(inner_lo != lo) or np.any(inner_hi != hi)):
            bad = np.flatnonzero((inner_lo != lo) | (inner_hi != hi))
            raise ExportError(f"features {bad[:8].tolist()} are NaN at reachable pre-activations (|v| <= {bound})")
        lo, hi = inner_lo, inner_hi
    f_lo, f_hi = positive(value(lo)), positive(value(hi))
    a, b = lo.copy(), hi.copy()
    while np.any(b - a > 1):
        m = a + (b - a) // 2
        move = positive(value(m)) == f_lo
        a, b = np.where(move, m, a), np.where(move, b, m)
    s = np.where(f_lo == f_hi, 0, np.where(f_hi, 1, -1)).astype(np.int8)
    if domain == "int":
        t = np.where(s == 1, b, np.where(s == -1, -a, np.where(f_lo, 0, 1)))
        return s, t.astype(np.int32)
    t = np.where(s == 1, value(b), np.where(s == -1, -value(a), np.where(f_lo, 0.0, 1.0)))
    return s, t.astype(np.float32)


# --------------------------------------------------------------------------- graph building
@dataclass
class _Pending:
    """A layer's output not yet turned into bits or floats: z = α·v + b, then ``chain``."""

    name: str
    kind: str  # "int" (binary dot products) or "float"
    shape: tuple[int, ...]  # per-sample torch shape of z: (C, H, W) or (F,)
    fan_in: int  # bound of |v| for an int value
    alpha: torch.Tensor | None = None  # per torch feature/channel
    bias: torch.Tensor | None = None
    scaled: bool = False  # v still needs the per-sample scale β
    chain: list[tuple[str, nn.Module]] = field(default_factory=list)


class _Builder:
    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.leaves = _leaves(model)
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) not in (1, 3):
            raise ExportError(f"input shape must be (features,) or (C, H, W), got {self.input_shape}")
        self.layers: list[dict] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.kind = "float"  # engine value: float / int / bits
        self.shape = self.input_shape  # per-sample torch shape
        self.perm: np.ndarray | None = None  # flat values: torch feature index of each engine position
        self.scaled = False
        self.pending: _Pending | None = None
        self.source = MODEL_INPUT  # the value the next op reads: an emitted layer's index

    # ---- emission
    def emit(self, op: str, name: str, params: dict | None = None, inputs: tuple[int, int] | None = None,
             **tensors: np.ndarray) -> None:
        """Append an op reading ``self.source`` (``add``: ``inputs``); it becomes the source."""
        index = len(self.layers)
        names = {}
        for role, array in tensors.items():
            key = f"layers.{index}.{role}"
            self.tensors[key] = array
            names[role] = key
        layer = {"op": op, "name": name, "params": params or {}, "tensors": names}
        if inputs is not None:
            layer["inputs"] = list(inputs)
        elif self.source != index - 1:  # sequential graphs stay as they were: no "input" field
            layer["input"] = self.source
        self.layers.append(layer)
        self.source = index

    def to_engine(self, per_feature: np.ndarray) -> np.ndarray:
        """Per-feature parameters in torch order → the engine's last-axis order."""
        if len(self.shape) == 3 or self.perm is None:
            return per_feature
        return per_feature[self.perm]

    # ---- chains
    def chain_positive(self, pending: _Pending) -> Callable[[np.ndarray], np.ndarray]:
        """values (one per torch feature/channel) → bool: does the next sign give +1?"""
        return self.chain_eval(pending, nan=False)

    def chain_defined(self, pending: _Pending) -> Callable[[np.ndarray], np.ndarray]:
        """values (one per torch feature/channel) → bool: is the chain's output a number (not NaN)?"""
        return self.chain_eval(pending, nan=True)

    def chain_eval(self, pending: _Pending, nan: bool) -> Callable[[np.ndarray], np.ndarray]:
        spatial = len(pending.shape) == 3
        n = pending.shape[0]

        @torch.no_grad()
        def positive(values: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            view = (1, n, 1, 1) if spatial else (1, n)
            z = v.view(view).expand((1, *pending.shape)).contiguous() if spatial else v.view(view).clone()
            if pending.alpha is not None:
                z = z * pending.alpha.view(view)
            if pending.bias is not None:
                z = z + pending.bias.view(view)
            for where, module in pending.chain:
                try:
                    z = module(z)
                except RuntimeError as exc:
                    raise ExportError(f"{where}: does not fit its input {tuple(pending.shape)}: {str(exc)[:120]}") from None
            if nan:  # defined: no position of the feature is NaN
                return ~torch.isnan(z).reshape(n, -1).any(dim=1).numpy()
            plus = (z >= 0).float()  # the quantizers' sign: 0 → +1, NaN → −1
            if spatial:  # every position of a channel holds the same value; take the majority
                plus = plus.mean(dim=(2, 3))
            return (plus.reshape(n) >= 0.5).numpy()

        return positive

    def resolve(self, consumer: str) -> None:
        """Turn the pending value into what ``consumer`` needs: 'sign', 'scaled', 'float', 'end'."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        name = ",".join(w for w, _ in pending.chain) if pending.chain else pending.name
        if consumer == "sign" and not pending.scaled:
            was = [(m, m.training) for _, m in pending.chain]
            for m, _ in was:
                m.eval()
            try:
                s, t = derive_thresholds(self.chain_positive(pending), pending.shape[0], pending.kind, pending.fan_in,
                                         defined=self.chain_defined(pending))
            except ExportError as exc:
                raise ExportError(f"{name}: {exc}") from None
            finally:
                for m, training in was:
                    m.train(training)
            self.emit("threshold", name, threshold=self.to_engine(t), direction=self.to_engine(s))
            self.kind = "bits"
            return
        self.float_path(pending, name)
        if consumer == "sign":
            self.emit("binarize", name, {"scale": "none"})
            self.kind = "bits"
        elif consumer == "scaled":
            self.emit("binarize", name, {"scale": "mean_abs"})
            self.kind, self.scaled = "bits", True

    def float_path(self, pending: _Pending, name: str) -> None:
        """Emit affine/clamp ops computing the chain in float (BN folded into mul/add)."""
        n = pending.shape[0]
        spatial = len(pending.shape) == 3
        mul = np.ones(n) if pending.alpha is None else pending.alpha.double().numpy()
        add = np.zeros(n) if pending.bias is None else pending.bias.double().numpy()
        state = {"mul": mul, "add": add, "dirty": pending.kind == "int" or pending.scaled
                 or pending.alpha is not None or pending.bias is not None, "scaled": pending.scaled}

        def flush() -> None:
            if state["dirty"]:
                self.emit("affine", name, {"sample_scale": state["scaled"]},
                          mul=self.to_engine(state["mul"]).astype(np.float32),
                          add=self.to_engine(state["add"]).astype(np.float32))
            state.update(mul=np.ones(n), add=np.zeros(n), dirty=False, scaled=False)

        for where, module in pending.chain:
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if isinstance(module, nn.BatchNorm2d) != spatial or module.num_features != n:
                    raise ExportError(f"{where}: {type(module).__name__}({module.num_features}) does not fit its input {pending.shape}")
                scale, shift = _bn_affine(module, where)
                state["mul"], state["add"] = state["mul"] * scale, state["add"] * scale + shift
                state["dirty"] = True
            elif isinstance(module, nn.ReLU):
                flush()
                self.emit("clamp", where, {"min": 0.0, "max": None})
            elif isinstance(module, nn.Hardtanh):
                flush()
                self.emit("clamp", where, {"min": float(module.min_val), "max": float(module.max_val)})
            else:  # pragma: no cover - the walker only queues the modules above
                raise ExportError(f"{where}: {type(module).__name__} is not supported")
        flush()
        self.kind, self.scaled = "float", False

    # ---- lookahead
    def next_consumer(self, rest: list[tuple[str, nn.Module]]) -> str:
        """What the first of the following layers ``rest`` that reads the value needs."""
        for where, module in rest:
            if isinstance(module, _PASS + (nn.MaxPool2d, nn.Flatten)):
                continue
            if isinstance(module, (QuantLinear, QuantConv2d)):
                return _activation_mode(module.input_quantizer, where)
            if isinstance(module, QuantAct):
                return _activation_mode(module.quantizer, where)
            return "float"
        return "end"

    # ---- modules
    def binarize_input(self, mode: str, where: str) -> None:
        """Make the current (non-pending) value what a consumer with input ``mode`` reads."""
        if mode == "float":
            if self.kind == "bits" and self.scaled:
                raise ExportError(f"{where}: a full-precision layer on XNOR-scaled activations is not supported")
            return  # float stays float; bits (±1 from a QuantAct) are read as they are
        if self.kind == "float":
            self.emit("binarize", where, {"scale": "none" if mode == "sign" else "mean_abs"})
            self.kind, self.scaled = "bits", mode == "scaled"
        elif self.kind == "bits" and mode == "sign" and not self.scaled:
            return  # sign(±1) = ±1
        else:
            raise ExportError(f"{where}: {mode} activation of an already binarized value is not supported")

    def layer(self, where: str, module: QuantLinear | QuantConv2d) -> None:
        mode = _activation_mode(module.input_quantizer, where)
        if self.pending is not None:
            self.resolve(mode)
        else:
            self.binarize_input(mode, where)
        weight, alpha, weights = _weights(module, where)
        if weights == "float" and self.kind != "float":
            raise ExportError(f"{where}: full-precision weights on binary inputs are not supported")
        bias = None if module.bias is None else module.bias.detach().float().clone()
        # PyTorch's output would be NaN or ±inf for every input: no rule or affine op can follow it
        if not all(bool(torch.isfinite(t).all()) for t in (module.weight, alpha, bias) if t is not None):
            raise ExportError(f"{where}: the weights, their scale α or the bias hold non-finite values")
        if isinstance(module, QuantLinear):
            if len(self.shape) != 1 or self.shape[0] != module.in_features:
                raise ExportError(f"{where}: expects {module.in_features} features, gets {self.shape} (flatten first)")
            w = weight if self.perm is None else weight[:, torch.from_numpy(self.perm)]
            tensor = pack_bits(_sign_negative(w)) if weights == "binary" else w.numpy().astype(np.float32)
            self.emit("dense", where, {"out_features": module.out_features, "weights": weights}, weight=tensor)
            out_shape = (module.out_features,)
            fan_in = module.in_features
            self.perm = None
        else:
            if len(self.shape) != 3 or self.shape[0] != module.in_channels:
                raise ExportError(f"{where}: expects {module.in_channels} channels, gets {self.shape}")
            ph, pw = _conv_padding(module, where)
            kh, kw = module.kernel_size
            sh, sw = module.stride
            pad_value = float(module.pad_value)
            if self.kind == "bits" and pad_value not in (0.0, 1.0, -1.0):
                raise ExportError(f"{where}: binary convolutions pad with 0 or ±1, not {pad_value}")
            if self.scaled and pad_value != 0 and (ph or pw):
                # PyTorch pads β·sign(x) with a raw ±1; the engine pads the bits and scales the whole sum by β
                raise ExportError(f"{where}: an XNOR convolution (scaled input) padded with {pad_value:g} is not "
                                  "supported (pad_value=0 only)")
            w = weight.permute(0, 2, 3, 1)  # [O, kh, kw, C]: K ordered (kh, kw, C) as NHWC packing
            tensor = pack_bits(_sign_negative(w)) if weights == "binary" else w.contiguous().numpy().astype(np.float32)
            params = {"out_channels": module.out_channels, "weights": weights, "kernel": [kh, kw], "stride": [sh, sw],
                      "padding": [ph, pw], "pad_value": int(pad_value) if self.kind == "bits" else pad_value}
            self.emit("conv", where, params, weight=tensor)
            _, h, w_ = self.shape
            out_shape = (module.out_channels, (h + 2 * ph - kh) // sh + 1, (w_ + 2 * pw - kw) // sw + 1)
            fan_in = module.in_channels * kh * kw
        kind = "int" if self.kind == "bits" else "float"
        self.pending = _Pending(where, kind, out_shape, fan_in, alpha, bias, self.scaled)
        self.kind, self.shape = kind, out_shape

    def act(self, where: str, module: QuantAct) -> None:
        mode = _activation_mode(module.quantizer, where)
        if mode == "float":
            return
        if self.pending is not None:
            self.resolve(mode)
        else:
            self.binarize_input(mode, where)

    def elementwise(self, where: str, module: nn.Module) -> None:
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _bn_affine(module, where)  # checks running statistics
        if self.pending is None:
            if self.kind != "float":
                raise ExportError(f"{where}: {type(module).__name__} on binarized values is not supported")
            # a real value: a pending value with nothing to fold yet
            self.pending = _Pending(where, "float", self.shape, 0)  # parameters stay in torch order
        self.pending.chain.append((where, module))

    def maxpool(self, rest: list[tuple[str, nn.Module]], where: str, module: nn.MaxPool2d) -> None:
        if len(self.shape) != 3:
            raise ExportError(f"{where}: max-pooling needs a (C, H, W) input, gets {self.shape}")
        if module.ceil_mode or module.return_indices or _pair(module.dilation) != (1, 1):
            raise ExportError(f"{where}: max-pooling with ceil_mode, indices or dilation is not supported")
        kh, kw = _pair(module.kernel_size)
        sh, sw = _pair(module.stride if module.stride is not None else module.kernel_size)
        ph, pw = _pair(module.padding)
        if self.pending is not None and self.pending.chain:
            consumer = self.next_consumer(rest)
            # sign is monotone, so sign(max(y)) = max(sign(y)): threshold first, pool the bits
            self.resolve("sign" if consumer == "sign" and not self.pending.scaled else "float")
        # an empty chain: pooling z = α·v + b (α ≥ 0, β > 0) is pooling v, exactly
        self.emit("maxpool", where, {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw]})
        c, h, w = self.shape
        self.shape = (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
        if self.pending is not None:
            self.pending.shape = self.shape

    def flatten(self, rest: list[tuple[str, nn.Module]], where: str, module: nn.Flatten) -> None:
        if module.start_dim != 1 or module.end_dim != -1:
            raise ExportError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported")
        if len(self.shape) == 1:
            return
        if self.pending is not None and self.pending.chain:
            consumer = self.next_consumer(rest)
            self.resolve("sign" if consumer == "sign" and not self.pending.scaled else "float")
        self.emit("flatten", where)
        c, h, w = self.shape
        # engine position (h, w, c) holds torch feature c·H·W + h·W + w
        self.perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        self.shape = (c * h * w,)
        pending = self.pending
        if pending is not None:  # per-channel α and bias become per-feature (torch order)
            pending.shape = self.shape
            if pending.alpha is not None:
                pending.alpha = pending.alpha.repeat_interleave(h * w)
            if pending.bias is not None:
                pending.bias = pending.bias.repeat_interleave(h * w)

    def average_pool(self, where: str, kernel: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int]) -> None:
        """An ``avgpool`` (padding not counted) of the real value: what is pending is applied first."""
        if len(self.shape) != 3:
            raise ExportError(f"{where}: average pooling needs a (C, H, W) input, gets {self.shape}")
        self.resolve("float")
        if self.kind != "float" or self.scaled:
            raise ExportError(f"{where}: average pooling of binarized values is not supported")
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        self.emit("avgpool", where, {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw]})
        c, h, w = self.shape
        self.shape = (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def avgpool(self, where: str, module: nn.AvgPool2d) -> None:
        padding = _pair(module.padding)
        if module.ceil_mode or module.divisor_override is not None:
            raise ExportError(f"{where}: average pooling with ceil_mode or divisor_override is not supported")
        if module.count_include_pad and padding != (0, 0):
            raise ExportError(f"{where}: average pooling that counts the padding is not supported "
                              "(count_include_pad=False only)")
        kernel = _pair(module.kernel_size)
        self.average_pool(where, kernel, _pair(module.stride if module.stride is not None else kernel), padding)

    def global_avgpool(self, where: str, module: nn.AdaptiveAvgPool2d) -> None:
        size = module.output_size
        if ((size, size) if isinstance(size, int) else tuple(size)) != (1, 1):
            raise ExportError(f"{where}: adaptive average pooling to {size} is not supported (output size 1 only)")
        if len(self.shape) != 3:
            raise ExportError(f"{where}: average pooling needs a (C, H, W) input, gets {self.shape}")
        self.average_pool(where, self.shape[1:], (1, 1), (0, 0))

    def downsample(self, where: str, module: Downsample) -> None:
        self.avgpool(f"{where}.pool", module.pool)
        if module.extra_channels:
            self.emit("pad_channels", where, {"extra": module.extra_channels})
            c, h, w = self.shape
            self.shape = (c + module.extra_channels, h, w)

    def residual(self, where: str, block: PreActBlock) -> None:
        """``unit2(unit1(x)) + shortcut(x)``: x becomes a real value that both branches read,
        each branch ends real, and an ``add`` joins them."""
        self.resolve("float")
        if self.kind != "float" or self.scaled or len(self.shape) != 3:
            raise ExportError(f"{where}: a residual block needs a real (C, H, W) input, gets a {self.kind} value "
                              f"of shape {self.shape}")
        entry = self.source, self.shape
        units = _leaves(block.unit1, f"{where}.unit1") + _leaves(block.unit2, f"{where}.unit2")
        main, main_shape = self.branch(where, units, *entry)
        shortcut, shortcut_shape = self.branch(where, _leaves(block.shortcut, f"{where}.shortcut"), *entry)
        if main_shape != shortcut_shape:
            raise ExportError(f"{where}: the residual branches end in shapes {main_shape} and {shortcut_shape}")
        self.emit("add", where, inputs=(main, shortcut))

    def branch(self, where: str, leaves: list[tuple[str, nn.Module]], source: int,
               shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """Walk a residual block's branch from the real value ``source``: (its real output, its shape)."""
        self.kind, self.scaled, self.source, self.shape = "float", False, source, shape
        self.walk(leaves)
        self.resolve("float")
        if self.kind != "float" or self.scaled:
            raise ExportError(f"{where}: a residual branch must end in a real value, not in {self.kind}")
        return self.source, self.shape

    def walk(self, leaves: list[tuple[str, nn.Module]]) -> None:
        for position, (where, module) in enumerate(leaves):
            rest = leaves[position + 1:]
            if isinstance(module, _PASS):
                continue
            if isinstance(module, (QuantLinear, QuantConv2d)):
                self.layer(where, module)
            elif isinstance(module, QuantAct):
                self.act(where, module)
            elif isinstance(module, _ELEMENTWISE):
                self.elementwise(where, module)
            elif isinstance(module, nn.MaxPool2d):
                self.maxpool(rest, where, module)
            elif isinstance(module, nn.Flatten):
                self.flatten(rest, where, module)
            elif isinstance(module, nn.AvgPool2d):
                self.avgpool(where, module)
            elif isinstance(module, nn.AdaptiveAvgPool2d):
                self.global_avgpool(where, module)
            elif isinstance(module, Downsample):
                self.downsample(where, module)
            elif isinstance(module, PreActBlock):
                self.residual(where, module)
            else:
                raise ExportError(f"{where}: {type(module).__name__} is not supported by the exporter")

    def build(self) -> tuple[list[dict], int]:
        self.walk(self.leaves)
        self.resolve("end")
        if self.kind != "float" or len(self.shape) != 1:
            raise ExportError(f"the model ends in a {self.kind} value of shape {self.shape}, not logits")
        if not self.layers:
            raise ExportError("the model has no layers to export")
        return self.layers, self.shape[0]


def _bn_affine(module: nn.Module, where: str) -> tuple[np.ndarray, np.ndarray]:
    """BN in eval mode as y = scale·x + shift (float64)."""
    if module.running_mean is None or module.running_var is None:
        raise ExportError(f"{where}: BatchNorm without running statistics cannot be exported")
    mean = module.running_mean.detach().double().numpy()
    var = module.running_var.detach().double().numpy()
    gamma = np.ones_like(mean) if module.weight is None else module.weight.detach().double().numpy()
    beta = np.zeros_like(mean) if module.bias is None else module.bias.detach().double().numpy()
    if not all(np.isfinite(a).all() for a in (mean, var, gamma, beta)):
        raise ExportError(f"{where}: BatchNorm holds non-finite running statistics or parameters")
    if not np.all(var + module.eps > 0):  # sqrt of a negative: PyTorch's output would be NaN
        channel = int(np.flatnonzero(~(var + module.eps > 0))[0])
        raise ExportError(f"{where}: BatchNorm running_var + eps must be positive (channel {channel}: "
                          f"running_var {var[channel]:.3g})")
    scale = gamma / np.sqrt(var + module.eps)
    return scale, beta - mean * scale


def _model_input_shape(model: nn.Module, input_shape, source: dict | None) -> tuple[int, ...]:
    shape = input_shape
    if shape is None:
        shape = getattr(model, "in_shape", None)
    if shape is None and source:
        shape = (source.get("kwargs") or {}).get("in_shape")
    if shape is None:
        raise ExportError("the input shape is unknown: pass input_shape= (the model has no in_shape attribute)")
    return tuple(int(s) for s in shape)


def build_graph(model: nn.Module, input_shape=None, *, source: dict | None = None,
                input_levels: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``.onebit`` metadata and tensors for ``model`` (see :func:`export_model`)."""
    shape = _model_input_shape(model, input_shape, source)
    builder = _Builder(model, shape)
    with torch.no_grad():
        layers, num_classes = builder.build()
    metadata = {"source_model": source, "input_shape": list(shape), "num_classes": num_classes, "layers": layers}
    if input_levels is not None:  # checked with the rest of the metadata by write_model
        metadata["input_levels"] = input_levels
    return metadata, builder.tensors


def export_model(model: nn.Module, path: str | os.PathLike, *, source: dict | None = None, input_shape=None,
                 input_levels: int | None = None) -> dict:
    """Write ``model`` as a ``.onebit`` file at ``path``; return its metadata.

    ``source`` (e.g. ``{"name": "binarynet_mlp", "kwargs": {...}}``) is recorded as the
    file's ``source_model``. The input shape is ``input_shape``, else ``model.in_shape``.
    ``input_levels`` L (an int in 1..255), if given, records that the model was trained on
    inputs ((p / L)·2) − 1 of integer pixels p in 0..L (``onebit.data.to_float``, L the
    dataset's ``max_value``), so that the engine can run the first layer exactly on the
    pixels (``predict_uint8``, and ``predict`` on such inputs); another value is a
    :class:`~onebit.errors.FormatError`. BatchNorm layers contribute their running
    statistics whatever the model's mode.
    """
    metadata, tensors = build_graph(model, input_shape, source=source, input_levels=input_levels)
    write_model(path, metadata, tensors)
    return read_model(path)[0]


# --------------------------------------------------------------------------- checkpoints
def export_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Export a training checkpoint (see :func:`onebit.train.load_checkpoint`) to ``.onebit``.

    The checkpoint is read with ``torch.load(weights_only=True)`` and the model rebuilt from
    the registry with the checkpoint's weights. When its training config names a registered
    dataset, the file records that dataset's ``max_value`` as ``input_levels`` (see
    :func:`export_model`). Returns the written metadata.
    """
    from .data import DATASETS, dataset_info
    from .train import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(state)
    kwargs = state["model_kwargs"]
    source = {"name": state["model_name"],
              "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    config = state["config"] if isinstance(state["config"], dict) else {}
    dataset = config.get("dataset")
    # the pixel grid the model was trained on; unknown (no levels) for a dataset not registered here
    levels = dataset_info(dataset)["max_value"] if isinstance(dataset, str) and dataset in DATASETS else None
    return export_model(model, out_path, source=source, input_levels=levels)


# --------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape=None, *, opset: int = 17) -> None:
    """Write the float simulation of ``model`` (eval mode) as an ONNX graph.

    Binarization is spelled with standard ops: sign(x) = Where(x >= 0, 1, −1) (ONNX's Sign
    maps 0 to 0; the quantizers map it to +1), XNOR's β·sign(x) with ReduceMean(Abs(x));
    quantized weights (α·sign(W)) are constants; BatchNorm uses its running statistics. The
    graph is built with the ``onnx`` helper API (no torch exporter), input ``input``
    [N, *input_shape], output ``logits`` [N, num_classes], batch size dynamic.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:  # pragma: no cover - an optional dependency
        raise ExportError("ONNX export needs the onnx package: pip install 'onebit[onnx]'") from None

    shape = _model_input_shape(model, input_shape, None)
    nodes: list = []
    initializers: list = []
    counter = [0]

    def fresh(base: str) -> str:
        counter[0] += 1
        return f"{base}_{counter[0]}"

    def const(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def const_i64(base: str, array) -> str:
        name = fresh(base)
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.int64), name))
        return name

    def node(op: str, inputs: list[str], base: str, **attrs) -> str:
        out = fresh(base)
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    one, minus_one, zero = const("one", np.array(1.0)), const("minus_one", np.array(-1.0)), const("zero", np.array(0.0))

    def quantize(x: str, quantizer: nn.Module | None, where: str, rank: int) -> str:
        mode = _activation_mode(quantizer, where)
        if mode == "float":
            return x
        sign = node("Where", [node("GreaterOrEqual", [x, zero], f"{where}.ge"), one, minus_one], f"{where}.sign")
        if mode == "scaled":
            beta = node("ReduceMean", [node("Abs", [x], f"{where}.abs")], f"{where}.beta",
                        axes=list(range(1, rank + 1)), keepdims=1)
            sign = node("Mul", [beta, sign], f"{where}.scaled_sign")
        return sign

    def quantized_weight(module, where: str) -> np.ndarray:
        weight, alpha, _ = _weights(module, where)
        if alpha is not None:
            weight = weight * alpha.view(-1, *([1] * (weight.ndim - 1)))
        return weight.numpy()

    x = "input"
    rank = len(shape)  # per-sample rank of the current value
    model_was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for where, module in _leaves(model):
                if isinstance(module, _PASS):
                    continue
                if isinstance(module, QuantAct):
                    x = quantize(x, module.quantizer, where, rank)
                elif isinstance(module, QuantLinear):
                    x = quantize(x, module.input_quantizer, where, rank)
                    inputs = [x, const(f"{where}.weight", quantized_weight(module, where))]
                    if module.bias is not None:
                        inputs.append(const(f"{where}.bias", module.bias.numpy()))
                    x = node("Gemm", inputs, where, transB=1)
                elif isinstance(module, QuantConv2d):
                    x = quantize(x, module.input_quantizer, where, rank)
                    ph, pw = _conv_padding(module, where)
                    if module.pad_value != 0 and (ph or pw):
                        pads = const_i64(f"{where}.pads", [0, 0, ph, pw, 0, 0, ph, pw])
                        x = node("Pad", [x, pads, const(f"{where}.pad_value", np.array(module.pad_value))],
                                 f"{where}.pad", mode="constant")
                        ph = pw = 0
                    inputs = [x, const(f"{where}.weight", quantized_weight(module, where))]
                    if module.bias is not None:
                        inputs.append(const(f"{where}.bias", module.bias.numpy()))
                    x = node("Conv", inputs, where, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                             pads=[ph, pw, ph, pw])
                elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    _bn_affine(module, where)
                    n = module.num_features
                    gamma = np.ones(n) if module.weight is None else module.weight.numpy()
                    beta = np.zeros(n) if module.bias is None else module.bias.numpy()
                    x = node("BatchNormalization", [x, const(f"{where}.scale", gamma), const(f"{where}.bias", beta),
                                                    const(f"{where}.mean", module.running_mean.numpy()),
                                                    const(f"{where}.var", module.running_var.numpy())],
                             where, epsilon=float(module.eps))
                elif isinstance(module, nn.ReLU):
                    x = node("Relu", [x], where)
                elif isinstance(module, nn.Hardtanh):
                    x = node("Clip", [x, const(f"{where}.min", np.array(module.min_val)),
                                      const(f"{where}.max", np.array(module.max_val))], where)
                elif isinstance(module, nn.MaxPool2d):
                    if module.return_indices or _pair(module.dilation) != (1, 1):
                        raise ExportError(f"{where}: max-pooling with indices or dilation is not supported")
                    kh, kw = _pair(module.kernel_size)
                    sh, sw = _pair(module.stride if module.stride is not None else module.kernel_size)
                    ph, pw = _pair(module.padding)
                    x = node("MaxPool", [x], where, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                             ceil_mode=int(module.ceil_mode))
                elif isinstance(module, nn.Flatten):
                    if module.start_dim != 1 or module.end_dim != -1:
                        raise ExportError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported")
                    x = node("Flatten", [x], where, axis=1)
                    rank = 1
                else:
                    raise ExportError(f"{where}: {type(module).__name__} is not supported by the ONNX exporter")
            probe = model(torch.zeros(1, *shape))
    finally:
        model.train(model_was_training)
    if probe.ndim != 2:
        raise ExportError(f"the model's output has shape {tuple(probe.shape)}, not (N, classes)")
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes,
        "onebit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", int(probe.shape[1])])],
        initializers,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onebit")
    onnx_model.ir_version = min(onnx_model.ir_version, 9)
    onnx.checker.check_model(onnx_model)
    with atomic_write(path) as handle:
        handle.write(onnx_model.SerializeToString())
