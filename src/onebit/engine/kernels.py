"""The kernels of the onebit engine: native (``onebit.engine._native``) or pure numpy.

Conventions (docs/design.md): bit 1 ↔ −1, bit 0 ↔ +1; ``uint64`` words along the reduction
axis K, least significant bit first (element k in word k // 64, bit k % 64); K padded to a
multiple of 64 with 0 bits; dot = K − 2·popcount(a XOR w).

Paths: the native extension offers ``avx512`` (VPOPCNTDQ), ``avx2`` (vpshufb nibble popcount)
and ``portable`` (plain C++), chosen at import from cpuid; this module adds ``numpy``, a pure
numpy implementation of every function with the same API, which is the fallback when the
extension is missing and the oracle of the tests. ``ONEBIT_KERNEL=avx512|avx2|portable|numpy``
picks a path at import, :func:`set_path` later. All paths give bit-identical results, including
the float ones (same rounding, same summation order).

Semantics that are easy to get wrong:

* :func:`pack_signs`: bit 1 iff ``x < 0``; ``-0.0`` and NaN give bit 0 (+1).
* ``gemm_threshold`` / ``conv_threshold``: output bit 0 (+1) iff ``scale·dot ≥ thresh``, else 1;
  ``scale`` ∈ {−1, 0, +1} (0: constant +1 if ``thresh ≤ 0`` else −1). Words are padded with 0.
* ``gemm_affine`` / ``conv_affine``: ``float32(dot) * mul`` rounded to float32, then ``+ add``
  rounded to float32 (no fused multiply-add).
* :func:`float_gemm_binary`: each output is one float32 accumulator starting at 0.0 to which
  ``±x[k]`` is added for k = 0, 1, …, K−1 in that order (exact sign flips, one rounding per add).
* :func:`bitplane_gemm`: uint8 × ±1, the exact int32 sum (|sum| ≤ 255·K), from the 8 bit
  planes of x or by int8 multiply-adds: the engine runs a first layer on 8-bit pixels with it;
  :func:`bitplane_gemm_outside` returns bits (1 iff the sum lies outside per-output integer
  bounds) instead of the sums.
* Padding bits beyond K in an activation row (beyond C in each conv pixel) are ignored; weights
  are masked at construction.
* :class:`BinaryConv2d` ``pad_value``: +1 / −1 pad with real ±1 values; 0 pads with zeros
  (the exact zero-padded convolution of the ±1 values).

This module imports numpy and onebit.errors only (never torch).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import ShapeError, UnknownNameError

try:  # the compiled extension; absent in a source checkout without a build
    from . import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _native = None

__all__ = [
    "BinaryConv2d",
    "BinaryMatrix",
    "available_paths",
    "bitplane_gemm",
    "bitplane_gemm_outside",
    "current_path",
    "float_gemm_binary",
    "maxpool_bits",
    "native_available",
    "pack_signs",
    "set_path",
    "unpack_signs",
]

WORD = 64
_NUMPY = "numpy"
_use_numpy = _native is None


def native_available() -> bool:
    """Whether the compiled extension ``onebit.engine._native`` could be imported."""
    return _native is not None


def available_paths() -> list[str]:
    """Kernel paths usable on this machine, fastest first; ``"numpy"`` is always last."""
    paths = list(_native.available_paths()) if _native is not None else []
    return paths + [_NUMPY]


def current_path() -> str:
    """The kernel path used by the next call."""
    return _NUMPY if _use_numpy else str(_native.current_path())


def set_path(name: str) -> None:
    """Use kernel path ``name`` (one of :func:`available_paths`) for all later calls."""
    global _use_numpy
    if name == _NUMPY:
        _use_numpy = True
        return
    if _native is None or name not in _native.available_paths():
        raise UnknownNameError(f"kernel path {name!r} is not available here (available: {', '.join(available_paths())})")
    _native.set_path(name)
    _use_numpy = False


def _init_path() -> None:
    global _use_numpy
    env = os.environ.get("ONEBIT_KERNEL", "").strip()
    if not env:
        return
    if env == _NUMPY:
        _use_numpy = True
    elif env not in available_paths():
        warnings.warn(
            f"ONEBIT_KERNEL={env!r} is not available here (available: {', '.join(available_paths())}); "
            f"using {current_path()!r}",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        set_path(env)


_init_path()


def _native_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ShapeError:
        raise
    except ValueError as exc:
        raise ShapeError(str(exc)) from None


# =========================================================================== numpy helpers
def _words(bits: int) -> int:
    return -(-bits // WORD)


def _array(x: Any, name: str, dtype: str, ndim: int | None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ShapeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise ShapeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _vec(x: Any, name: str, dtype: str, n: int) -> np.ndarray:
    v = _array(x, name, dtype, 1)
    if v.shape[0] != n:
        raise ShapeError(f"{name} must have {n} entries (one per output), got {v.shape[0]}")
    return v


def _scale(x: Any, n: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ShapeError(f"scale must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.dtype(np.int8), np.dtype(np.int32)):
        raise ShapeError(f"scale must have dtype int8 or int32, got {x.dtype}")
    if x.ndim != 1:
        raise ShapeError(f"scale must be 1-D, got shape {x.shape}")
    if x.shape[0] != n:
        raise ShapeError(f"scale must have {n} entries (one per output), got {x.shape[0]}")
    s = x.astype(np.int64)
    bad = np.flatnonzero((s < -1) | (s > 1))
    if bad.size:
        raise ShapeError(f"scale entries must be -1, 0 or +1, got {int(s[bad[0]])} at index {int(bad[0])}")
    return s


def _threads(threads: int) -> int:
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 0:
        raise ShapeError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    return int(threads)


def _pair(v: Any, name: str) -> tuple[int, int]:
    pair = None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        pair = int(v), int(v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v
    ):
        pair = int(v[0]), int(v[1])
    if pair is None:
        raise ShapeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if not all(-(2**31) < e < 2**31 for e in pair):  # the native code holds sizes in 64-bit, products in 32
        raise ShapeError(f"{name} {pair} is out of range")
    return pair


if hasattr(np, "bitwise_count"):
    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)
else:  # numpy < 2.0
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
        return _POP8[b].sum(axis=-1, dtype=np.uint8)


def _keep_mask(K: int) -> np.ndarray:
    """Valid bits of each word of a K-bit row."""
    m = np.full(_words(K), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    if K % WORD:
        m[-1] = np.uint64((1 << (K % WORD)) - 1)
    return m


def _pack_bool(b: np.ndarray) -> np.ndarray:
    """bool[..., K] (True ↔ bit 1 ↔ −1) → uint64[..., ceil(K/64)], LSB first, padding bits 0."""
    K = b.shape[-1]
    pad = np.zeros(b.shape[:-1] + (_words(K) * WORD,), dtype=bool)
    pad[..., :K] = b
    return np.packbits(pad, axis=-1, bitorder="little").view("<u8").astype(np.uint64, copy=False)


def _unpack_bool(bits: np.ndarray, K: int) -> np.ndarray:
    """uint64[..., KW] → bool[..., K] (True = bit 1 = −1)."""
    by = np.ascontiguousarray(bits).astype("<u8", copy=False).view(np.uint8)
    b = np.unpackbits(by.reshape(bits.shape[:-1] + (bits.shape[-1] * 8,)), axis=-1, bitorder="little")
    return b[..., :K].astype(bool)


def _xor_dot(a: np.ndarray, w: np.ndarray, K: int) -> np.ndarray:
    """int32[M, N] = K − 2·popcount(a XOR w), a: uint64[M, KW] (pad bits ignored), w: masked."""
    a = a & _keep_mask(K)
    M, N, KW = a.shape[0], w.shape[0], w.shape[1]
    out = np.empty((M, N), dtype=np.int32)
    step = max(1, (1 << 22) // max(1, N * KW))  # bound the M×N×KW temporary
    for m0 in range(0, M, step):
        x = a[m0 : m0 + step, None, :] ^ w[None, :, :]
        pc = _popcount(x).sum(axis=-1, dtype=np.int64)
        out[m0 : m0 + step] = K - 2 * pc
    return out


def _outside_tap_sums(tap_sums: np.ndarray, H: int, W: int, stride: tuple[int, int],
                      padding: tuple[int, int]) -> np.ndarray:
    """int64[Ho, Wo, O]: per output pixel of a conv on an H×W image, the sum of
    ``tap_sums[o, ky, kx]`` over the kernel taps that fall into the padding (for border
    corrections: a tap's contribution computed with one pad value, replaced by another's)."""
    _, kh, kw = tap_sums.shape
    (sh, sw), (ph, pw) = stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    iy = np.arange(Ho)[:, None] * sh - ph + np.arange(kh)[None, :]  # [Ho, kh]
    ix = np.arange(Wo)[:, None] * sw - pw + np.arange(kw)[None, :]  # [Wo, kw]
    vy = (iy >= 0) & (iy < H)
    vx = (ix >= 0) & (ix < W)
    outside = ~(vy[:, None, :, None] & vx[None, :, None, :])  # [Ho, Wo, kh, kw]
    return np.einsum("yxij,oij->yxo", outside.astype(np.int64), tap_sums.astype(np.int64))


def _threshold_bits(dot: np.ndarray, scale: np.ndarray, thresh: np.ndarray) -> np.ndarray:
    neg = scale.astype(np.int64) * dot.astype(np.int64) < thresh.astype(np.int64)
    return _pack_bool(neg)


def _affine(dot: np.ndarray, mul: np.ndarray, add: np.ndarray) -> np.ndarray:
    prod = dot.astype(np.float32) * mul  # float32 product, rounded
    return (prod + add).astype(np.float32, copy=False)


# =========================================================================== free functions
def pack_signs(x: np.ndarray, threads: int = 0) -> np.ndarray:
    """float32[..., K] → uint64[..., ceil(K/64)]: bit 1 iff x < 0 (−0.0 and NaN → bit 0, i.e. +1)."""
    threads = _threads(threads)
    if not _use_numpy:
        return _native_call(_native.pack_signs, x, threads)
    x = _array(x, "x", "float32", None)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ShapeError(f"x must have a non-empty last axis (K >= 1), got shape {x.shape}")
    return _pack_bool(x < 0)


def unpack_signs(bits: np.ndarray, K: int) -> np.ndarray:
    """uint64[..., ceil(K/64)] → float32[..., K] of ±1 (bit 1 → −1.0, bit 0 → +1.0)."""
    bits = _array(bits, "bits", "uint64", None)
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise ShapeError(f"K must be an int >= 1, got {K!r}")
    K = int(K)
    if bits.ndim < 1 or bits.shape[-1] != _words(K):
        raise ShapeError(f"bits must have {_words(K)} words along the last axis for K={K}, got shape {bits.shape}")
    return np.where(_unpack_bool(bits, K), np.float32(-1.0), np.float32(1.0))


def maxpool_bits(x: np.ndarray, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 threads: int = 0) -> np.ndarray:
    """Max pool of packed NHWC ±1 activations uint64[B, H, W, CW] (floor mode, no padding).

    max over ±1 is +1 iff any +1, so with bit 0 = +1 the output bit is the AND of the window.
    ``stride`` defaults to ``kernel`` (as in torch).
    """
    threads = _threads(threads)
    kh, kw = _pair(kernel, "kernel")  # numpy integers too, on every path
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride")
    if not _use_numpy:
        return _native_call(_native.maxpool_bits, x, (kh, kw), (sh, sw), threads)
    x = _array(x, "x", "uint64", 4)
    if kh < 1 or kw < 1:
        raise ShapeError("kernel must be >= 1")
    if sh < 1 or sw < 1:
        raise ShapeError("stride must be >= 1")
    B, H, W, CW = x.shape
    if H < kh or W < kw:
        raise ShapeError(f"input of {H}x{W} pixels is smaller than the {kh}x{kw} pooling window")
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    out = np.full((B, Ho, Wo, CW), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    for ky in range(kh):
        for kx in range(kw):
            out &= x[:, ky : ky + sh * (Ho - 1) + 1 : sh, kx : kx + sw * (Wo - 1) + 1 : sw, :]
    return out


def _native_matrix(w: Any) -> bool:
    """Whether ``w`` (which must be a BinaryMatrix) runs on the native path."""
    if not isinstance(w, BinaryMatrix):
        raise ShapeError(f"w must be a BinaryMatrix, got {type(w).__name__}")
    return not _use_numpy and w._nat is not None


def _matrix_input(x: Any, w: "BinaryMatrix", dtype: str) -> np.ndarray:
    """``x`` as a 2-D ``dtype`` array with the matrix's K columns (the numpy path's checks)."""
    x = _array(x, "x", dtype, 2)
    if x.shape[1] != w.K:
        raise ShapeError(f"x has {x.shape[1]} features, the matrix expects K={w.K}")
    return x


def bitplane_gemm(x: np.ndarray, w: "BinaryMatrix", threads: int = 0) -> np.ndarray:
    """uint8[M, K] × BinaryMatrix → int32[M, N] = Σ_k x[m,k]·w[n,k] exactly (w ∈ ±1).

    Native: one row by bit planes, Σ_k bit_b(x_k)·w_k = popcount(x_b XOR w) − popcount(w) for
    b = 0 … 7, on the packed weights; more rows by uint8 × int8 multiply-adds on an int8 copy of
    the weights, made on the first such call and kept with the matrix (8 bits per weight).
    """
    threads = _threads(threads)
    if _native_matrix(w):
        return _native_call(_native.bitplane_gemm, x, w._nat, threads)
    x = _matrix_input(x, w, "uint8")
    if 255 * w.K >= 2**31:  # |sum| <= 255·K must fit int32
        raise ShapeError(f"bitplane_gemm needs 255*K < 2^31, got K={w.K}")
    wpm = np.where(_unpack_bool(w._bits(), w.K), -1.0, 1.0)  # float64: exact below 2^53
    return (x.astype(np.float64) @ wpm.T).astype(np.int32)


def float_gemm_binary(x: np.ndarray, w: "BinaryMatrix", threads: int = 0) -> np.ndarray:
    """float32[M, K] × BinaryMatrix → float32[M, N].

    Summation order (all paths, bit-identical): per output one float32 accumulator, starting
    at 0.0, adds ``x[m,k]`` (weight bit 0) or ``-x[m,k]`` (weight bit 1) for k = 0 … K−1.
    """
    threads = _threads(threads)
    if _native_matrix(w):
        return _native_call(_native.float_gemm_binary, x, w._nat, threads)
    x = _matrix_input(x, w, "float32")
    neg = _unpack_bool(w._bits(), w.K)  # [N, K]
    acc = np.zeros((x.shape[0], w.N), dtype=np.float32)
    for k in range(w.K):  # strictly sequential in k: the documented order
        xk = x[:, k : k + 1]
        acc += np.where(neg[None, :, k], -xk, xk)
    return acc


def bitplane_gemm_outside(x: np.ndarray, w: "BinaryMatrix", lo: np.ndarray, hi: np.ndarray,
                          threads: int = 0) -> np.ndarray:
    """uint8[M, K] × BinaryMatrix, int32 ``lo``/``hi`` [P, N] → uint64[M, ceil(N/64)]: bit n of
    row m is 1 iff the exact sum of :func:`bitplane_gemm` lies outside [lo[r, n], hi[r, n]],
    r = m mod P (a conv's im2col rows cycle through its P output pixels). The sums never
    leave the kernel: the engine's first layer on pixels with its threshold folded into bounds.
    """
    threads = _threads(threads)
    if _native_matrix(w):
        return _native_call(_native.bitplane_gemm_outside, x, w._nat, lo, hi, threads)
    sums = bitplane_gemm(x, w, threads)
    M, N = sums.shape
    lo, hi = _array(lo, "lo", "int32", 2), _array(hi, "hi", "int32", 2)
    if lo.shape[1] != N or hi.shape != lo.shape:
        raise ShapeError(f"lo and hi must both have shape (P, {N}), got {lo.shape} and {hi.shape}")
    P = lo.shape[0]
    if P < 1 or M % P:
        raise ShapeError(f"lo and hi must have a number of rows P >= 1 that divides the {M} rows of x, got P={P}")
    rows = np.arange(M) % P
    return _pack_bool((sums < lo[rows]) | (sums > hi[rows]))


#: the largest K: dot products are int32, and K − 2·popcount must not overflow (as in the native code)
MAX_K = 2**30 - 1


def _check_max_k(K: int) -> None:
    if K > MAX_K:
        raise ShapeError(f"K = {K} exceeds the engine's limit of 2^30 - 1 (int32 sums)")


# =========================================================================== BinaryMatrix
class BinaryMatrix:
    """Prepared ±1 weight matrix ``w_bits: uint64[N, ceil(K/64)]`` for binary GEMMs.

    The native object re-packs the weights into 64-row groups of 8-row panels (word k of 64
    rows side by side), the layout its register-blocked kernel streams; padding bits beyond K
    are cleared. ``threads=0`` uses all cores (OpenMP).
    """

    def __init__(self, w_bits: np.ndarray, K: int):
        if not isinstance(K, (int, np.integer)) or isinstance(K, bool):
            raise ShapeError(f"K must be an int, got {K!r}")
        self.K = int(K)
        self._np_bits: np.ndarray | None = None
        if _native is not None:
            self._nat = _native_call(_native.BinaryMatrix, w_bits, self.K)
            self.N = int(self._nat.N)
        else:
            self._nat = None
            self._np_bits = self._check_bits(w_bits)
            self.N = int(self._np_bits.shape[0])
        self.KW = _words(self.K)

    def _check_bits(self, w_bits: Any) -> np.ndarray:
        w = _array(w_bits, "w_bits", "uint64", 2)
        if self.K < 1:
            raise ShapeError(f"K must be >= 1, got {self.K}")
        _check_max_k(self.K)
        if w.shape[0] < 1:
            raise ShapeError(f"w_bits must have at least one row (output), got shape {w.shape}")
        if w.shape[1] != _words(self.K):
            raise ShapeError(
                f"w_bits has {w.shape[1]} words per row but K={self.K} needs ceil(K/64)={_words(self.K)}"
            )
        return w & _keep_mask(self.K)

    def _bits(self) -> np.ndarray:
        if self._np_bits is None:
            self._np_bits = self._nat.to_bits()
        return self._np_bits

    def to_bits(self) -> np.ndarray:
        """The weight bits as uint64[N, KW] (padding bits cleared)."""
        return self._bits().copy()

    def _act(self, a: Any) -> np.ndarray:
        a = _array(a, "a", "uint64", 2)
        if a.shape[1] != self.KW:
            raise ShapeError(f"a has {a.shape[1]} words per row, the matrix expects {self.KW} (K={self.K})")
        return a

    def _native(self) -> bool:
        return not _use_numpy and self._nat is not None

    def gemm(self, a: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[M, KW] → int32[M, N] exact dot products K − 2·popcount(a XOR w)."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.gemm, a, threads)
        return _xor_dot(self._act(a), self._bits(), self.K)

    def gemm_threshold(self, a: np.ndarray, scale: np.ndarray, thresh: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[M, KW] → uint64[M, ceil(N/64)]: bit 0 (+1) iff scale·dot ≥ thresh."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.gemm_threshold, a, scale, thresh, threads)
        a = self._act(a)
        s = _scale(scale, self.N)
        t = _vec(thresh, "thresh", "int32", self.N)
        return _threshold_bits(_xor_dot(a, self._bits(), self.K), s, t)

    def gemm_affine(self, a: np.ndarray, mul: np.ndarray, add: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[M, KW] → float32[M, N] = float32(dot)·mul + add."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.gemm_affine, a, mul, add, threads)
        a = self._act(a)
        mul = _vec(mul, "mul", "float32", self.N)
        add = _vec(add, "add", "float32", self.N)
        return _affine(_xor_dot(a, self._bits(), self.K), mul, add)

    def __repr__(self) -> str:
        return f"BinaryMatrix(N={self.N}, K={self.K})"


# =========================================================================== BinaryConv2d
class BinaryConv2d:
    """Prepared binary convolution on packed NHWC activations.

    ``w_bits: uint64[O, kh, kw, ceil(C/64)]``; activations ``uint64[B, H, W, ceil(C/64)]``;
    reduction length K = kh·kw·C. ``pad_value`` +1 / −1 pads with real ±1 pixels, 0 gives the
    exact zero-padded convolution (native: pads computed as +1, then the weight sums of the
    padded taps are subtracted per border pattern). Native: bit-packed im2col into per-call
    scratch, then the BinaryMatrix kernel.
    """

    def __init__(self, w_bits: np.ndarray, C: int, kh: int, kw: int, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, pad_value: int = 1):
        for name, v in (("C", C), ("kh", kh), ("kw", kw), ("pad_value", pad_value)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ShapeError(f"{name} must be an int, got {v!r}")
        self.C, self.kh, self.kw, self.pad_value = int(C), int(kh), int(kw), int(pad_value)
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self._np_bits: np.ndarray | None = None
        if _native is not None:
            self._nat = _native_call(_native.BinaryConv2d, w_bits, self.C, self.kh, self.kw,
                                     self.stride, self.padding, self.pad_value)
            self.O = int(self._nat.O)
        else:
            self._nat = None
            self._np_bits = self._check(w_bits)
            self.O = int(self._np_bits.shape[0])
        self.CW = _words(self.C)
        self.K = self.kh * self.kw * self.C

    def _check(self, w_bits: Any) -> np.ndarray:
        w = _array(w_bits, "w_bits", "uint64", 4)
        if self.C < 1:
            raise ShapeError(f"C must be >= 1, got {self.C}")
        if self.kh < 1 or self.kw < 1:
            raise ShapeError(f"kernel size must be >= 1, got {self.kh}x{self.kw}")
        _check_max_k(self.kh * self.kw * self.C)
        if min(self.stride) < 1:
            raise ShapeError("stride must be >= 1")
        if min(self.padding) < 0:
            raise ShapeError("padding must be >= 0")
        if self.pad_value not in (1, -1, 0):
            raise ShapeError(f"pad_value must be +1, -1 or 0, got {self.pad_value}")
        CW = _words(self.C)
        if w.shape[1:] != (self.kh, self.kw, CW):
            raise ShapeError(f"w_bits must have shape (O, {self.kh}, {self.kw}, {CW}) for C={self.C}, got {w.shape}")
        if w.shape[0] < 1:
            raise ShapeError(f"w_bits must have at least one output channel, got shape {w.shape}")
        return w & _keep_mask(self.C)

    def _bits(self) -> np.ndarray:
        if self._np_bits is None:  # numpy path after a native construction
            self._np_bits = self._nat.to_bits()
        return self._np_bits

    def to_bits(self) -> np.ndarray:
        """The weight bits as uint64[O, kh, kw, CW] (channel padding bits cleared)."""
        return self._bits().copy()

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """(Ho, Wo) for an H×W input."""
        (sh, sw), (ph, pw) = self.stride, self.padding
        eh, ew = H + 2 * ph - self.kh, W + 2 * pw - self.kw
        if H < 1 or W < 1 or eh < 0 or ew < 0:
            raise ShapeError(f"input of {H}x{W} pixels is smaller than the {self.kh}x{self.kw} kernel "
                             f"with padding {ph}x{pw}")
        return eh // sh + 1, ew // sw + 1

    def _native(self) -> bool:
        return not _use_numpy and self._nat is not None

    # ---- numpy reference
    def _dots(self, x: Any) -> np.ndarray:
        x = _array(x, "x", "uint64", 4)
        if x.shape[3] != self.CW:
            raise ShapeError(f"x has {x.shape[3]} words per pixel, the conv expects {self.CW} (C={self.C})")
        B, H, W, CW = x.shape
        Ho, Wo = self.output_size(H, W)
        (sh, sw), (ph, pw) = self.stride, self.padding
        cmask = _keep_mask(self.C)
        x = x & cmask
        padword = cmask if self.pad_value == -1 else np.zeros(CW, dtype=np.uint64)
        xp = np.empty((B, H + 2 * ph, W + 2 * pw, CW), dtype=np.uint64)
        xp[...] = padword
        xp[:, ph : ph + H, pw : pw + W, :] = x
        cols = np.empty((B, Ho, Wo, self.kh, self.kw, CW), dtype=np.uint64)
        for ky in range(self.kh):
            for kx in range(self.kw):
                cols[:, :, :, ky, kx, :] = xp[:, ky : ky + sh * (Ho - 1) + 1 : sh, kx : kx + sw * (Wo - 1) + 1 : sw, :]
        w = self._bits()
        a = cols.reshape(B * Ho * Wo, self.kh * self.kw * CW)
        wf = w.reshape(self.O, self.kh * self.kw * CW)
        # all words are already masked, so K_eff bits = kh*kw*C; _xor_dot masks with the last
        # word's mask only, so compute the popcount directly here
        dot = np.empty((a.shape[0], self.O), dtype=np.int64)
        step = max(1, (1 << 22) // max(1, self.O * wf.shape[1]))
        for m0 in range(0, a.shape[0], step):
            pc = _popcount(a[m0 : m0 + step, None, :] ^ wf[None, :, :]).sum(axis=-1, dtype=np.int64)
            dot[m0 : m0 + step] = self.K - 2 * pc
        dot = dot.reshape(B, Ho, Wo, self.O)
        if self.pad_value == 0 and (ph or pw):
            # taps outside the image were computed as +1: subtract their weight sums
            wsum = self.C - 2 * _popcount(w).sum(axis=-1, dtype=np.int64)  # [O, kh, kw]
            dot = dot - _outside_tap_sums(wsum, H, W, self.stride, self.padding)[None]
        return dot.astype(np.int32)

    # ---- public
    def conv(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[B, H, W, CW] → int32[B, Ho, Wo, O] exact ±1 convolution."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.conv, x, threads)
        return self._dots(x)

    def conv_threshold(self, x: np.ndarray, scale: np.ndarray, thresh: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[B, H, W, CW] → uint64[B, Ho, Wo, ceil(O/64)]: bit 0 (+1) iff scale·dot ≥ thresh."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.conv_threshold, x, scale, thresh, threads)
        s = _scale(scale, self.O)
        t = _vec(thresh, "thresh", "int32", self.O)
        return _threshold_bits(self._dots(x), s, t)

    def conv_affine(self, x: np.ndarray, mul: np.ndarray, add: np.ndarray, threads: int = 0) -> np.ndarray:
        """uint64[B, H, W, CW] → float32[B, Ho, Wo, O] = float32(dot)·mul + add."""
        threads = _threads(threads)
        if self._native():
            return _native_call(self._nat.conv_affine, x, mul, add, threads)
        mul = _vec(mul, "mul", "float32", self.O)
        add = _vec(add, "add", "float32", self.O)
        return _affine(self._dots(x), mul, add)

    def __repr__(self) -> str:
        return (f"BinaryConv2d(O={self.O}, C={self.C}, kernel=({self.kh}, {self.kw}), stride={self.stride}, "
                f"padding={self.padding}, pad_value={self.pad_value})")
