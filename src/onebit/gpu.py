"""Binary GEMM and convolution inside PyTorch: XNOR + popcount on bit-packed words, as a
``torch.library`` custom op with a Triton kernel on CUDA and a pure-torch fallback elsewhere.

Conventions are those of the engine (docs/design.md): bit 1 ↔ −1, bit 0 ↔ +1; words along the
reduction axis K, least significant bit first (element k in word k // W, bit k % W, W = 32 for
``torch.int32`` words, 64 for ``torch.int64``); K padded to a multiple of W with bit 0;
dot = K − 2·popcount(a XOR w). int64 words hold the same bits as the engine's uint64 words
(``torch.from_numpy(bits.view(np.int64))``)::

    import torch
    from onebit.gpu import binary_matmul, last_backend, pack_signs_torch

    x = torch.randn(64, 784, device="cuda")          # activations (signs are taken)
    w = torch.randn(4096, 784, device="cuda")        # weights
    a_bits = pack_signs_torch(x)                     # int64[64, 13]: bit 1 iff x < 0
    w_bits = pack_signs_torch(w)                     # int64[4096, 13]
    dot = binary_matmul(a_bits, w_bits, 784)         # int32[64, 4096] = sign(x) @ sign(w).T
    last_backend()                                   # 'triton' (CUDA + triton), else 'torch'

``binary_matmul`` is the op ``torch.ops.onebit.binary_matmul``: it has a fake (meta) impl, so
``torch.compile`` and ``torch.export`` trace through it; its CUDA impl runs the Triton kernel
when triton is importable, every other device (and CUDA without triton) runs
:func:`binary_matmul_torch`. Padding bits beyond K are ignored in both operands.

Other entry points:

* :func:`binary_matmul_triton` — the Triton kernel itself, with ``popcount="hw"`` (libdevice
  ``popc``/``popcll``, CUDA/ROCm only) or ``"swar"`` (shift-and-add popcount that Triton's
  interpreter can run). Set ``TRITON_INTERPRET=1`` before the first call to run it on CPU
  tensors in the interpreter (slow; for tests of the indexing logic).
* :func:`binary_conv2d` — conv on float NCHW input via bit-packed im2col (``F.unfold`` of the
  input, pack its signs along K = C·kh·kw, then ``binary_matmul``); ``pad_value`` ±1 pads with
  ±1, 0 is the exact zero-padded convolution of the ±1 values.
* :func:`to_binary_inference` — replaces each ``QuantLinear`` / ``QuantConv2d`` with
  sign-quantized input and weight by :class:`BinaryInferenceLinear` /
  :class:`BinaryInferenceConv2d` (packed weights, same outputs up to float rounding of the
  integer dot; inputs that are NaN count as +1 here and as −1 in the quantizers).

``import onebit.gpu`` never imports triton; :func:`triton_available` says whether it can.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, ShapeError
from .layers import QuantConv2d, QuantLinear
from .quantizers import ApproxSign, SteSign, StochasticSign, SwishSign

__all__ = [
    "BinaryInferenceConv2d",
    "BinaryInferenceLinear",
    "binary_conv2d",
    "binary_matmul",
    "binary_matmul_torch",
    "binary_matmul_triton",
    "default_block",
    "last_backend",
    "pack_signs_torch",
    "to_binary_inference",
    "triton_available",
    "unpack_signs_torch",
]

WORD_BITS = {torch.int32: 32, torch.int64: 64}
#: quantizers whose eval-mode forward is exactly sign (0 → +1)
_SIGN_QUANTIZERS = (SteSign, ApproxSign, SwishSign, StochasticSign)
_INDEX_LIMIT = 2**31  # Triton computes offsets in int32
_last_backend: str | None = None


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (it is imported on the first Triton call, not here)."""
    return importlib.util.find_spec("triton") is not None


def last_backend() -> str | None:
    """The backend of the last binary GEMM in this process: ``"triton"``, ``"torch"`` or None."""
    return _last_backend


def _word_bits(dtype: torch.dtype, name: str) -> int:
    if dtype not in WORD_BITS:
        raise ShapeError(f"{name} must have dtype torch.int32 or torch.int64, got {dtype}")
    return WORD_BITS[dtype]


def _words(k: int, bits: int) -> int:
    return -(-k // bits)


# =========================================================================== packing
def pack_signs_torch(x: Tensor, dim: int = -1, dtype: torch.dtype = torch.int64) -> Tensor:
    """float[..., K, ...] → int32/int64 words with K packed along ``dim`` (bit 1 iff x < 0).

    −0.0 and NaN give bit 0 (+1), as in ``onebit.engine.kernels.pack_signs``; a bool ``x`` is
    taken as "is −1". Padding bits are 0.
    """
    bits = _word_bits(dtype, "dtype")
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.dtype == torch.bool):
        raise ShapeError(f"x must be a float or bool tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim == 0 or not -x.ndim <= dim < x.ndim or x.shape[dim] == 0:
        raise ShapeError(f"x must have a non-empty axis {dim}, got shape {tuple(x.shape)}")
    neg = (x if x.dtype == torch.bool else x < 0).movedim(dim, -1).to(torch.uint8)
    k = neg.shape[-1]
    kw = _words(k, bits)
    neg = F.pad(neg, (0, kw * bits - k))
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
    # bytes in little-endian order, then reinterpreted as words (all torch targets are little-endian)
    packed = (neg.reshape(*neg.shape[:-1], kw * bits // 8, 8) << shifts).sum(-1, dtype=torch.uint8)
    return packed.view(dtype).movedim(-1, dim).contiguous()


def unpack_signs_torch(bits: Tensor, k: int, dim: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """int32/int64 words → ±1 values of ``dtype`` with K = ``k`` along ``dim`` (bit 1 → −1)."""
    word = _word_bits(bits.dtype, "bits")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ShapeError(f"k must be an int >= 1, got {k!r}")
    if bits.ndim == 0 or not -bits.ndim <= dim < bits.ndim or bits.shape[dim] != _words(k, word):
        raise ShapeError(f"bits must have {_words(k, word)} words along axis {dim} for k={k}, "
                         f"got shape {tuple(bits.shape)}")
    by = bits.movedim(dim, -1).contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    b = ((by[..., None] >> shifts) & 1).reshape(*by.shape[:-1], -1)[..., :k]
    return (1 - 2 * b.to(dtype)).movedim(-1, dim)


# =========================================================================== GEMM
def _check(a_bits: Tensor, w_bits: Tensor, k: int) -> int:
    """Validate the GEMM operands; the word size in bits."""
    for name, t in (("a_bits", a_bits), ("w_bits", w_bits)):
        if t.ndim != 2:
            raise ShapeError(f"{name} must be 2-D [rows, words], got shape {tuple(t.shape)}")
        _word_bits(t.dtype, name)
    if a_bits.dtype != w_bits.dtype:
        raise ShapeError(f"a_bits and w_bits must have the same dtype, got {a_bits.dtype} and {w_bits.dtype}")
    if a_bits.device != w_bits.device:
        raise ShapeError(f"a_bits and w_bits must be on the same device, got {a_bits.device} and {w_bits.device}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ShapeError(f"k must be an int >= 1, got {k!r}")
    bits = WORD_BITS[a_bits.dtype]
    kw = _words(k, bits)
    if a_bits.shape[1] != kw or w_bits.shape[1] != kw:
        raise ShapeError(f"k={k} needs {kw} {bits}-bit words per row, got a_bits {tuple(a_bits.shape)} "
                         f"and w_bits {tuple(w_bits.shape)}")
    return bits


def _keep_mask(k: int, bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Valid bits of each word of a k-bit row (all ones but in the last word)."""
    keep = torch.full((_words(k, bits),), -1, dtype=dtype, device=device)
    if k % bits:
        keep[-1] = (1 << (k % bits)) - 1
    return keep


def _popcount_words(x: Tensor) -> Tensor:
    """Per-32-bit-half popcounts of int32/int64 words, as int64 (shift-and-add on values < 2^32)."""
    x = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    return (x + (x >> 16)) & 0x3F


def binary_matmul_torch(a_bits: Tensor, w_bits: Tensor, k: int) -> Tensor:
    """int32[M, N] = k − 2·popcount(a XOR w) in pure torch (any device), M rows at a time."""
    global _last_backend
    bits = _check(a_bits, w_bits, k)
    keep = _keep_mask(k, bits, a_bits.dtype, a_bits.device)
    a, w = a_bits & keep, w_bits & keep
    m, n, kw = a.shape[0], w.shape[0], w.shape[1]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    step = max(1, (1 << 21) // max(1, n * kw))  # bounds the [step, N, KW] temporaries
    for m0 in range(0, m, step):
        pc = _popcount_words(a[m0 : m0 + step, None, :] ^ w[None, :, :]).sum(-1)
        out[m0 : m0 + step] = k - 2 * pc
    _last_backend = "torch"
    return out


def _kernels():
    """The module of Triton kernels (imports triton on the first call)."""
    if not triton_available():
        raise ConfigError("triton is not installed (pip install triton); binary_matmul_torch needs no triton")
    from . import _gpu_kernels

    return _gpu_kernels


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def default_block(m: int, n: int, kw: int) -> tuple[int, int, int]:
    """Tile (BM, BN, BK words) for an M×N output over KW words: untuned defaults (see docs/gpu.md)."""
    bm = min(64, _pow2(m))
    bn = 32 if m <= 16 else 64
    bk = max(1, min(8, _pow2(kw), 4096 // (bm * bn)))
    return bm, bn, bk


def binary_matmul_triton(a_bits: Tensor, w_bits: Tensor, k: int, *, popcount: str = "auto",
                         block: tuple[int, int, int] | None = None, num_warps: int | None = None) -> Tensor:
    """int32[M, N] = k − 2·popcount(a XOR w) by the Triton kernel.

    ``popcount``: ``"hw"`` (libdevice popc, compiled kernels only), ``"swar"`` (shift-and-add,
    runs everywhere), ``"auto"`` (hw when compiled, swar when interpreted). ``block``: tile
    (BM, BN, BK words), powers of two, default :func:`default_block`; ``num_warps`` default 8
    for tiles of 4096 outputs or more, else 4 (no register spills on sm_90 for the defaults).
    """
    global _last_backend
    bits = _check(a_bits, w_bits, k)
    kernels = _kernels()
    interpreted = kernels.INTERPRETED
    if a_bits.device.type != "cuda" and not interpreted:
        raise ConfigError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before the first "
                          f"call), got {a_bits.device}")
    if popcount not in ("auto", "hw", "swar"):
        raise ConfigError(f"popcount must be 'auto', 'hw' or 'swar', got {popcount!r}")
    if popcount == "hw" and interpreted:
        raise ConfigError("popcount='hw' (libdevice popc) cannot run in the Triton interpreter; use 'swar'")
    m, n, kw = a_bits.shape[0], w_bits.shape[0], a_bits.shape[1]
    if max(a_bits.numel(), w_bits.numel(), m * n) >= _INDEX_LIMIT:
        raise ShapeError(f"operands and output must have fewer than 2^31 elements, got M={m}, N={n}, words={kw}")
    bm, bn, bk = block if block is not None else default_block(m, n, kw)
    if not all(isinstance(v, int) and v >= 1 and v & (v - 1) == 0 for v in (bm, bn, bk)):
        raise ConfigError(f"block must be three powers of two (BM, BN, BK), got {block!r}")
    if num_warps is None:
        num_warps = 8 if bm * bn >= 4096 else 4
    swar = popcount == "swar" or (popcount == "auto" and interpreted)
    out = torch.empty((m, n), dtype=torch.int32, device=a_bits.device)
    on_device = torch.cuda.device(a_bits.device) if a_bits.device.type == "cuda" else contextlib.nullcontext()
    if m and n:
        with on_device:
            kernels.binary_matmul_kernel[(math.ceil(m / bm), math.ceil(n / bn))](
                a_bits, w_bits, out, m, n, kw, k, a_bits.stride(0), a_bits.stride(1),
                w_bits.stride(0), w_bits.stride(1), out.stride(0), out.stride(1),
                WORD=bits, BM=bm, BN=bn, BK=bk, SWAR=swar, num_warps=num_warps)
    _last_backend = "triton"
    return out


@torch.library.custom_op("onebit::binary_matmul", mutates_args=())
def binary_matmul(a_bits: Tensor, w_bits: Tensor, k: int) -> Tensor:
    """int32[M, N] = k − 2·popcount(a XOR w): the ±1 dot products of packed rows (any device)."""
    return binary_matmul_torch(a_bits, w_bits, k)


@binary_matmul.register_kernel("cuda")
def _binary_matmul_cuda(a_bits: Tensor, w_bits: Tensor, k: int) -> Tensor:
    if triton_available():
        return binary_matmul_triton(a_bits, w_bits, k)
    return binary_matmul_torch(a_bits, w_bits, k)


@binary_matmul.register_fake
def _binary_matmul_fake(a_bits: Tensor, w_bits: Tensor, k: int) -> Tensor:
    _check(a_bits, w_bits, k)
    return a_bits.new_empty((a_bits.shape[0], w_bits.shape[0]), dtype=torch.int32)


# =========================================================================== conv
def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return int(v[0]), int(v[1])
    raise ConfigError(f"{name} must be an int or a pair of ints, got {v!r}")


def binary_conv2d(x: Tensor, w_bits: Tensor, kernel_size, stride=1, padding=0, dilation=1,
                  pad_value: float = 1.0) -> Tensor:
    """int32[B, O, Ho, Wo]: the convolution of sign(x) (float[B, C, H, W]) with packed ±1 weights.

    ``w_bits``: ``pack_signs_torch(weight.reshape(O, -1))`` of a weight [O, C, kh, kw], i.e.
    K = C·kh·kw ordered (c, ky, kx) as ``F.unfold`` orders it. ``pad_value``: +1 or −1 pads with
    that value, 0 gives the exact zero-padded convolution (the +1-padded one minus the weight sums
    of the taps that fall outside the image). Runs :func:`binary_matmul` (see :func:`last_backend`).
    """
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ShapeError(f"x must be a float tensor [B, C, H, W], got {getattr(x, 'dtype', type(x).__name__)} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    if w_bits.ndim != 2:
        raise ShapeError(f"w_bits must be 2-D [O, words], got shape {tuple(w_bits.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ConfigError(f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got "
                          f"{(kh, kw)}, {(sh, sw)}, {(dh, dw)}, {(ph, pw)}")
    if pad_value not in (1, -1, 0):
        raise ConfigError(f"pad_value must be +1, -1 or 0, got {pad_value!r}")
    b, c, h, w = x.shape
    k = c * kh * kw
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ShapeError(f"input of {h}x{w} pixels is smaller than the {kh}x{kw} kernel (dilation {(dh, dw)}) "
                         f"with padding {(ph, pw)}")
    if pad_value == -1 and (ph or pw):
        x, unfold_padding = F.pad(x, (pw, pw, ph, ph), value=-1.0), 0
    else:
        unfold_padding = (ph, pw)  # unfold pads with 0, whose sign is +1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=unfold_padding, stride=(sh, sw))  # [B, K, L]
    a_bits = pack_signs_torch(cols.transpose(1, 2), dtype=w_bits.dtype)  # [B, L, words]
    dots = binary_matmul(a_bits.reshape(b * ho * wo, -1), w_bits, k).reshape(b, ho * wo, -1)
    if pad_value == 0 and (ph or pw):
        inside = F.unfold(x.new_ones(1, 1, h, w), (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
        tap_sums = unpack_signs_torch(w_bits, k).reshape(-1, c, kh * kw).sum(1)  # [O, kh·kw]
        dots = dots - (tap_sums @ (1 - inside[0].float())).T.round().to(torch.int32)
    return dots.transpose(1, 2).reshape(b, -1, ho, wo)


# =========================================================================== modules
def _sign_quantized(q: nn.Module | None) -> bool:
    return isinstance(q, _SIGN_QUANTIZERS)


class BinaryInferenceLinear(nn.Module):
    """y = sign(x) · sign(W)ᵀ + b on packed weights (``w_bits`` int32/int64 [out, words])."""

    def __init__(self, w_bits: Tensor, in_features: int, bias: Tensor | None = None) -> None:
        super().__init__()
        _check(w_bits, w_bits, in_features)
        self.in_features, self.out_features = in_features, w_bits.shape[0]
        self.register_buffer("w_bits", w_bits)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quant(cls, layer: QuantLinear, word_dtype: torch.dtype = torch.int64) -> "BinaryInferenceLinear":
        """The packed twin of a ``QuantLinear`` with sign-quantized input and weight."""
        if not (_sign_quantized(layer.input_quantizer) and _sign_quantized(layer.weight_quantizer)):
            raise ConfigError("only a QuantLinear with sign-like input and weight quantizers has a packed twin")
        w_bits = pack_signs_torch(~(layer.weight.detach() >= 0), dtype=word_dtype)  # the quantizers' sign
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(w_bits, layer.in_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        a_bits = pack_signs_torch(x.reshape(-1, self.in_features), dtype=self.w_bits.dtype)
        y = binary_matmul(a_bits, self.w_bits, self.in_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BinaryInferenceConv2d(nn.Module):
    """:func:`binary_conv2d` of sign(x) with packed weights, plus bias (float NCHW in and out)."""

    def __init__(self, w_bits: Tensor, in_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 pad_value: float = 1.0, bias: Tensor | None = None) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        _check(w_bits, w_bits, in_channels * self.kernel_size[0] * self.kernel_size[1])
        self.in_channels, self.out_channels = in_channels, w_bits.shape[0]
        self.pad_value = float(pad_value)
        self.register_buffer("w_bits", w_bits)
        self.register_buffer("bias", bias)

    @staticmethod
    def convertible(layer: QuantConv2d) -> bool:
        """Whether ``layer`` has a packed twin: sign-like quantizers, groups 1, numeric zero-mode padding."""
        return (_sign_quantized(layer.input_quantizer) and _sign_quantized(layer.weight_quantizer)
                and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                and layer.pad_value in (0.0, 1.0, -1.0))

    @classmethod
    def from_quant(cls, layer: QuantConv2d, word_dtype: torch.dtype = torch.int64) -> "BinaryInferenceConv2d":
        """The packed twin of a ``QuantConv2d`` (see :meth:`convertible`)."""
        if not cls.convertible(layer):
            raise ConfigError("only a QuantConv2d with sign-like input and weight quantizers, groups=1, "
                              "padding_mode='zeros', numeric padding and pad_value in {0, 1, -1} has a packed twin")
        w = layer.weight.detach()
        w_bits = pack_signs_torch(~(w.reshape(w.shape[0], -1) >= 0), dtype=word_dtype)  # the quantizers' sign
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(w_bits, layer.in_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                   layer.pad_value, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"input must be [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        y = binary_conv2d(x, self.w_bits, self.kernel_size, self.stride, self.padding, self.dilation,
                          self.pad_value).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, pad_value={self.pad_value}, "
                f"bias={self.bias is not None}")


def _packed_twin(module: nn.Module, word_dtype: torch.dtype) -> nn.Module | None:
    if isinstance(module, QuantLinear) and _sign_quantized(module.input_quantizer) \
            and _sign_quantized(module.weight_quantizer):
        return BinaryInferenceLinear.from_quant(module, word_dtype)
    if isinstance(module, QuantConv2d) and BinaryInferenceConv2d.convertible(module):
        return BinaryInferenceConv2d.from_quant(module, word_dtype)
    return None


def to_binary_inference(model: nn.Module, inplace: bool = False, word_dtype: torch.dtype = torch.int64) -> nn.Module:
    """``model`` with every convertible ``QuantLinear`` / ``QuantConv2d`` replaced by its packed twin.

    A layer converts when both its input and weight quantizers are sign-like (sign, approx_sign,
    swish_sign, stochastic_sign — the last as in eval mode); other layers (the float-input first
    layer, scaled or k-bit ones) are kept. Copies the model unless ``inplace``.
    """
    _word_bits(word_dtype, "word_dtype")
    if not inplace:
        model = copy.deepcopy(model)
    twin = _packed_twin(model, word_dtype)
    if twin is not None:
        return twin
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = _packed_twin(child, word_dtype)
            if twin is not None:
                setattr(parent, name, twin)
    return model
