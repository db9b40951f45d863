"""Run a ``.onebit`` model: a graph executor over :mod:`onebit.engine.kernels`.

    from onebit.engine import load
    model = load("model.onebit")            # weights packed into kernel panels once, here
    logits = model.predict(x)               # x: float32 [N, *model.input_shape], NCHW like PyTorch
    labels = model.classify(x)              # int64 [N]
    logits = model.predict_uint8(pixels)    # uint8 [N, *input_shape], files with input_levels

Activations flow in the engine's layout: NHWC for images (channels packed into uint64 words
for bits), flat vectors otherwise. Each op of the file's graph becomes one prepared step that
reads the values the graph names (the previous op's output, or earlier ones: residual
connections); a value is dropped after its last reader. A binary ``dense``/``conv`` followed
by ``threshold`` (or by a plain ``affine``) that alone reads it runs as one fused kernel call
(``gemm_threshold`` / ``conv_threshold`` / ``*_affine``), which computes exactly what the two
steps compute one after the other (:meth:`Model.trace` runs them apart); so does a conv →
max-pool → threshold (BinaryNet's conv → pool → BN → sign), as ``conv_threshold`` and a max-pool
of the bits instead of a max-pool of integers.

**Pixel path.** When the file records ``input_levels`` L (the training pipeline fed
x = ((p / L)·2) − 1 of integer pixels p ∈ [0, L], :func:`pixels_to_inputs`) and the graph
starts (after flattens) with a binary ``dense``/``conv`` on real inputs, that layer also runs
on the pixels: S = Σ_k p_k·s_k exactly with :func:`~onebit.engine.kernels.bitplane_gemm`
(integer multiply-adds of the uint8 pixels, or bit planes for one row, instead of K float
adds per output), on a uint8 im2col for a conv, then y = (2·S − L·Σ_k s_k)/L rounded once to
float32 (plus the contribution of a conv's padding): the correctly rounded real
pre-activation, where the float path sums float32 values with one rounding per add. A
following ``threshold`` becomes integer bounds on S (found at load by bisection over the same
float32 y, so fused and traced results agree), compared inside the kernel. :meth:`Model.predict`
takes this path when every value of the batch is exactly such an x (bit for bit),
:meth:`Model.predict_uint8` always; any other input keeps the float path.

A :class:`Model` holds no mutable state after loading: :meth:`Model.predict` may be called
from many threads at once. This module never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import ConfigError, ShapeError
from . import kernels
from .format import MODEL_INPUT, Value, check_graph, layer_sources, read_model

__all__ = ["Model", "TraceEntry", "load", "pixels_to_inputs"]

_INT_MIN = np.iinfo(np.int32).min


def load(path: str | os.PathLike, threads: int | None = None) -> "Model":
    """Read, validate and prepare the ``.onebit`` model at ``path``.

    ``threads``: threads per kernel call (None or 0: all cores). Raises
    :class:`~onebit.errors.FormatError` for a missing, corrupt or unsupported file.
    """
    metadata, tensors = read_model(path)
    return Model(metadata, tensors, threads=threads)


@dataclass(frozen=True)
class TraceEntry:
    """One op's output in :meth:`Model.trace`, in PyTorch's layout (NCHW / NC).

    ``value``: int32 dot products (binary dense/conv, before any pooling or BN), float32, or
    for bits int8 ±1.
    """

    index: int
    op: str
    name: str
    value: np.ndarray


# --------------------------------------------------------------------------- helpers
_pack_bool = kernels._pack_bool  # bool[..., K] (True ↔ −1) → uint64[..., ceil(K/64)]
_unpack = kernels._unpack_bool  # uint64[..., ceil(k/64)] → bool[..., k] (True ↔ bit 1 ↔ −1)
_keep_mask = kernels._keep_mask  # the valid bits of each word of a k-bit row


def _im2col(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, pad_value: float) -> np.ndarray:
    """NHWC [B, H, W, C] (float32, or uint8 pixels) → [B·Ho·Wo, kh·kw·C] of the same dtype,
    K ordered (kh, kw, C)."""
    b, h, w, c = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = np.full((b, h + 2 * ph, w + 2 * pw, c), pad_value, dtype=x.dtype)
    xp[:, ph:ph + h, pw:pw + w] = x
    cols = np.empty((b, ho, wo, kh, kw, c), dtype=x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            cols[:, :, :, ky, kx] = xp[:, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
    return cols.reshape(b * ho * wo, kh * kw * c)


def _pool(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> np.ndarray:
    """Max-pool NHWC int32/float32 values; padded positions never win (as −inf in PyTorch)."""
    b, h, w, c = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    low = _INT_MIN if x.dtype == np.int32 else -np.inf
    if ph or pw:
        xp = np.full((b, h + 2 * ph, w + 2 * pw, c), low, dtype=x.dtype)
        xp[:, ph:ph + h, pw:pw + w] = x
    else:
        xp = x
    out = None
    for ky in range(kh):
        for kx in range(kw):
            window = xp[:, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
            out = window.copy() if out is None else np.maximum(out, window, out=out)
    return out


def _window_sums(x: np.ndarray, axis: int, k: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums over the windows along ``axis`` of the cells inside the input, the cells counted):
    window o covers [o·s − p, o·s − p + k) clipped to the input. One ``np.add.reduceat`` over
    [start, end) pairs (every other segment discarded), so a non-finite value reaches only
    its own windows and the cost does not grow with the kernel."""
    size = x.shape[axis]
    start = np.arange((size + 2 * p - k) // s + 1) * s - p
    low, high = np.clip(start, 0, size), np.clip(start + k, 0, size)  # low < high: padding <= k / 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)  # a zero cell at index size, where the last segment may start
    sums = np.add.reduceat(np.pad(x, pad), np.stack([low, high], axis=1).ravel(), axis=axis)
    return sums.take(np.arange(0, 2 * len(low), 2), axis=axis), high - low


def _average_pool(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> np.ndarray:
    """Average-pool NHWC float32 values over the window cells inside the input (the padding is
    not counted, PyTorch's ``count_include_pad=False``), summed in float64, rounded once."""
    sums, rows = _window_sums(x.astype(np.float64), 1, kh, sh, ph)
    sums, cols = _window_sums(sums, 2, kw, sw, pw)
    return (sums / (rows[:, None] * cols[None, :])[None, :, :, None]).astype(np.float32)


def _to_torch_layout(value: np.ndarray, v: Value) -> np.ndarray:
    return value.transpose(0, 3, 1, 2) if v.spatial else value


# --------------------------------------------------------------------------- pixels
def pixels_to_inputs(pixels: np.ndarray, levels: int) -> np.ndarray:
    """Pixels 0..``levels`` → float32 inputs ((p / levels)·2) − 1, each operation rounded to
    float32: bit for bit what the training pipeline (``onebit.data.to_float``) feeds the model."""
    return np.asarray(pixels).astype(np.float32) / np.float32(levels) * np.float32(2) - np.float32(1)


def _grid_pixels(x: np.ndarray, levels: int) -> np.ndarray | None:
    """uint8 pixels p with ``pixels_to_inputs(p, levels)`` identical (every bit) to float32 ``x``,
    or None when some value of ``x`` is not one of those L + 1 floats (NaN, −0.0 included)."""
    if not np.all((x >= -1) & (x <= 1)):  # written so that NaN fails too
        return None
    pixels = np.rint((x + np.float32(1)) * np.float32(levels / 2)).astype(np.uint8)  # p, if x is on the grid
    same = pixels_to_inputs(pixels, levels).view(np.uint32) == x.view(np.uint32)
    return pixels if same.all() else None


def _pixel_values(sums: np.ndarray, base: np.ndarray, levels: int) -> np.ndarray:
    """float32 y = (2·S − base)/L: the numerator is an exact integer in float64 (< 2^53; base is
    an integer unless a conv pads with a value other than 0, ±1), so the division rounds once
    there, and rounding that to float32 is the correctly rounded quotient (a quotient of
    integers by L ≤ 255 never lies within 2^-53 of a float32 rounding boundary without being
    on it)."""
    return ((2.0 * sums.astype(np.float64) - base) / levels).astype(np.float32)


_PixelSums = Callable[[np.ndarray], np.ndarray]
_PixelOutside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _pixel_gemm(matrix: kernels.BinaryMatrix, threads: int) -> tuple[_PixelSums, _PixelOutside]:
    """(uint8 [M, K] → S = Σ_k p_k·s_k, int32 [M, N], exactly; (pixels, lo, hi) → the bits of S
    outside [lo, hi], int32 bounds [P, N] as in :func:`~onebit.engine.kernels.bitplane_gemm_outside`)."""
    return (lambda p: kernels.bitplane_gemm(np.ascontiguousarray(p), matrix, threads),
            lambda p, lo, hi: kernels.bitplane_gemm_outside(np.ascontiguousarray(p), matrix, lo, hi, threads))


def _least(pred: Callable[[np.ndarray], np.ndarray], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per element, the least integer n in [low, high) with ``pred(n)`` true, ``high`` if none;
    ``pred`` must be monotone (false, then true). Bisection, vectorized."""
    a, b = low.copy(), high.copy()  # pred is false below a, true at b (or b = high)
    while np.any(active := a < b):
        m = a + (b - a) // 2
        ok = pred(m)
        a, b = np.where(active & ~ok, m + 1, a), np.where(active & ok, m, b)
    return a


def _pixel_bounds(base: np.ndarray, levels: int, scale: np.ndarray, thresh: np.ndarray,
                  reach: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (lo, hi), shaped like ``base`` broadcast with the channels: the threshold rule
    s·y ≥ t on y = :func:`_pixel_values` (S) holds iff lo ≤ S ≤ hi, for every S in
    [−reach, reach]. y is monotone in S, so each rule is an up-set (s = +1), a down-set
    (s = −1) or all/nothing (s = 0) of S; its boundary is found by bisection on y itself."""
    shape = np.broadcast_shapes(base.shape, thresh.shape)
    base = np.broadcast_to(base, shape)
    s, t = np.broadcast_to(scale, shape), np.broadcast_to(thresh, shape)
    low, high = np.full(shape, -reach, np.int64), np.full(shape, reach + 1, np.int64)
    up = _least(lambda n: _pixel_values(n, base, levels) >= t, low, high)  # s = +1: S ≥ up
    down = _least(lambda n: _pixel_values(n, base, levels) > -t, low, high) - 1  # s = −1: −y ≥ t ⇔ S ≤ down
    never, always = reach + 1, -reach - 1
    lo = np.where(s > 0, up, np.where(s < 0, always, np.where(t <= 0, always, never)))
    hi = np.where(s < 0, down, never)
    return lo, hi


# --------------------------------------------------------------------------- steps
@dataclass
class _Step:
    """A prepared op: ``run(x, beta) -> (y, beta)`` on batched arrays in the engine layout
    (``add``: ``run(x1, x2) -> (y, None)``)."""

    index: int
    op: str
    name: str
    sources: tuple[int, ...]  # the values it reads: earlier steps' indices, MODEL_INPUT
    inp: Value
    out: Value
    run: Callable[..., tuple[np.ndarray, np.ndarray | None]]
    nbytes: int = 0  # bytes of the op's tensors in the file (for summaries)
    kernel: Any = None  # BinaryMatrix / BinaryConv2d of a binary dense/conv (for fusion)
    scale: np.ndarray | None = None  # threshold: direction s
    thresh: np.ndarray | None = None  # threshold: t
    mul: np.ndarray | None = None  # affine
    add: np.ndarray | None = None
    pool_bits: Callable[[np.ndarray], np.ndarray] | None = None  # maxpool: its max-pool of bits
    # the pixel path of a real-input binary dense/conv (files with input_levels): pixel_sums maps
    # uint8 pixels (engine layout) to the exact S = Σ_k p_k·s_k in the op's output layout, and
    # the op's float32 output is _pixel_values(S, pixel_base, L)
    pixel_sums: _PixelSums | None = None
    pixel_outside: _PixelOutside | None = None  # (pixels, lo, hi) → the bits of S outside [lo, hi]
    pixel_base: np.ndarray | None = None
    pixel_reach: int = 0  # max |S|: 255·K


@dataclass(frozen=True)
class _Call:
    """One call of a plan: ``run`` on the values ``sources``, its result stored as value
    ``target``; the values in ``release`` are not read again and are dropped after it."""

    run: Callable[..., tuple[np.ndarray, np.ndarray | None]]
    sources: tuple[int, ...]
    target: int
    release: tuple[int, ...] = ()


def _schedule(calls: list[_Call]) -> list[_Call]:
    """``calls`` with ``release`` filled in: each value dropped after its last reader."""
    last = {source: position for position, call in enumerate(calls) for source in call.sources}
    return [replace(call, release=tuple(s for s in dict.fromkeys(call.sources) if last[s] == position))
            for position, call in enumerate(calls)]


def _evaluate(plan: list[_Call], value: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Run ``plan`` on the model input ``value``; yield each call's (output, β)."""
    values = {MODEL_INPUT: (value, None)}
    for call in plan:
        if len(call.sources) == 1:
            out = call.run(*values[call.sources[0]])
        else:
            out = call.run(*(values[source][0] for source in call.sources))
        for source in call.release:
            del values[source]
        values[call.target] = out
        yield out


class Model:
    """A loaded ``.onebit`` model (see :func:`load`).

    Attributes: ``input_shape`` (per sample, PyTorch layout, e.g. (1, 28, 28)),
    ``num_classes``, ``metadata`` (the file's metadata), ``source_model``, ``input_levels``
    (L of the pixel grid x = ((p / L)·2) − 1 the model was trained on, or None).
    """

    def __init__(self, metadata: dict, tensors: dict[str, np.ndarray], *, threads: int | None = None) -> None:
        if threads is None:
            threads = 0
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
            raise ShapeError(f"threads must be None or an int >= 0 (0: all cores), got {threads!r}")
        self.threads = int(threads)
        values = check_graph(metadata, tensors)
        self.metadata = metadata
        self.input_shape: tuple[int, ...] = tuple(metadata["input_shape"])
        self.num_classes: int = int(metadata["num_classes"])
        self.source_model = metadata.get("source_model")
        self.input_levels: int | None = metadata.get("input_levels")
        shape = self.input_shape
        model_input = Value("float", (shape[1], shape[2], shape[0]) if len(shape) == 3 else (shape[0],))
        self._steps: list[_Step] = []
        for index, (layer, out) in enumerate(zip(metadata["layers"], values)):
            sources = layer_sources(layer, index)
            inp = model_input if sources[0] == MODEL_INPUT else values[sources[0]]
            self._steps.append(self._prepare(index, layer, sources, inp, out, tensors))
        self._readers = {MODEL_INPUT: 0, **{step.index: 0 for step in self._steps}}
        for step in self._steps:
            for source in step.sources:
                self._readers[source] += 1
        self._plan = _schedule(self._fuse(0))
        self._trace_plan = _schedule([_Call(step.run, step.sources, step.index) for step in self._steps])
        # the same graph on uint8 pixels (None: no pixel path); see the module docstring
        self._pixel_steps: list[_Step] | None = None
        self._pixel_plan: list[_Call] | None = None
        self._pixel_trace_plan: list[_Call] | None = None
        self._prepare_pixels()

    # ---- preparation
    def _prepare(self, index: int, layer: dict, sources: tuple[int, ...], inp: Value, out: Value,
                 tensors: dict[str, np.ndarray]) -> _Step:
        """The step of op ``index``; ``inp`` is the value it reads (``add``: the first of two alike)."""
        op = layer["op"]
        params = layer.get("params", {})
        t = {role: tensors[name] for role, name in layer.get("tensors", {}).items()}
        threads = self.threads
        step = _Step(index, op, str(layer.get("name", "")), sources, inp, out, None,  # type: ignore[arg-type]
                     nbytes=sum(int(a.nbytes) for a in t.values()))

        if op == "flatten":
            if inp.kind == "bits" and inp.spatial and inp.channels % 64:
                c = inp.channels

                def run(x, beta):  # re-pack densely: each pixel's channel padding goes away
                    flat = _unpack(x, c).reshape(x.shape[0], -1)
                    return _pack_bool(flat), beta
            else:
                def run(x, beta):
                    return x.reshape(x.shape[0], -1), beta

        elif op == "binarize":
            mean_abs = params.get("scale") == "mean_abs"

            def run(x, beta):
                if np.isnan(x).any():  # sign(NaN) is −1 in PyTorch ((x >= 0) is false)
                    x = np.where(np.isnan(x), np.float32(-1), x)
                bits = kernels.pack_signs(np.ascontiguousarray(x, dtype=np.float32), threads)
                if not mean_abs:
                    return bits, None
                flat = x.reshape(x.shape[0], -1)
                scale = np.abs(flat, dtype=np.float64).mean(axis=1) if flat.shape[1] else np.zeros(len(x))
                return bits, scale.astype(np.float32)

        elif op == "dense":
            run = self._prepare_dense(step, params, inp, t["weight"])
        elif op == "conv":
            run = self._prepare_conv(step, params, inp, t["weight"])
        elif op == "maxpool":
            (kh, kw), (sh, sw), (ph, pw) = params["kernel"], params["stride"], params["padding"]
            step.pool_bits = _max_pool_bits(inp.channels, (kh, kw), (sh, sw), (ph, pw), threads)
            if inp.kind == "bits":
                pool_bits = step.pool_bits

                def run(x, beta):
                    return pool_bits(x), beta
            else:
                def run(x, beta):
                    return _pool(x, kh, kw, sh, sw, ph, pw), beta

        elif op == "threshold":
            s = t["direction"].astype(np.int8)
            thr = t["threshold"]
            step.scale, step.thresh = s, thr
            if inp.kind == "int":
                s64, t64 = s.astype(np.int64), thr.astype(np.int64)

                def run(x, beta):
                    return _pack_bool(s64 * x.astype(np.int64) < t64), None
            else:
                def run(x, beta):
                    plus = np.where(s > 0, x >= thr, np.where(s < 0, -x >= thr, np.float32(0) >= thr))
                    return _pack_bool(~plus), None

        elif op == "affine":
            mul, add = t["mul"], t["add"]
            step.mul, step.add = mul, add
            sample_scale = bool(params.get("sample_scale", False))

            def run(x, beta):
                x = x.astype(np.float32)
                if sample_scale:
                    x = x * beta.reshape((-1,) + (1,) * (x.ndim - 1))
                return (x * mul + add).astype(np.float32, copy=False), None

        elif op == "clamp":
            low = -np.inf if params.get("min") is None else np.float32(params["min"])
            high = np.inf if params.get("max") is None else np.float32(params["max"])

            def run(x, beta):
                return np.clip(x, low, high).astype(np.float32, copy=False), beta

        elif op == "avgpool":
            (kh, kw), (sh, sw), (ph, pw) = params["kernel"], params["stride"], params["padding"]

            def run(x, beta):
                return _average_pool(x, kh, kw, sh, sw, ph, pw), beta

        elif op == "pad_channels":
            c, channels = inp.channels, out.channels

            def run(x, beta):
                y = np.zeros(x.shape[:-1] + (channels,), dtype=np.float32)
                y[..., :c] = x
                return y, beta

        elif op == "add":
            def run(x1, x2):
                return x1 + x2, None

        else:  # pragma: no cover - check_graph knows the same ops
            raise AssertionError(op)
        step.run = run
        return step

    def _prepare_dense(self, step: _Step, params: dict, inp: Value, weight: np.ndarray):
        threads = self.threads
        k = inp.shape[0]
        if params.get("weights") == "float":
            wt = np.ascontiguousarray(weight.T)

            def run(x, beta):
                return (x @ wt).astype(np.float32, copy=False), beta
            return run
        matrix = kernels.BinaryMatrix(np.ascontiguousarray(weight), k)
        step.kernel = matrix
        if inp.kind == "float":
            if self._pixels_fit(k):
                step.pixel_sums, step.pixel_outside = _pixel_gemm(matrix, threads)
                weight_sums = k - 2 * _unpack(weight, k).sum(axis=1, dtype=np.int64)  # Σ_k s_k per output
                step.pixel_base = float(self.input_levels) * weight_sums
                step.pixel_reach = 255 * k

            def run(x, beta):
                return kernels.float_gemm_binary(np.ascontiguousarray(x, dtype=np.float32), matrix, threads), beta
        else:
            def run(x, beta):
                return matrix.gemm(np.ascontiguousarray(x), threads), beta
        return run

    def _prepare_conv(self, step: _Step, params: dict, inp: Value, weight: np.ndarray):
        threads = self.threads
        h, w, c = inp.shape
        o = params["out_channels"]
        (kh, kw), (sh, sw), (ph, pw) = params["kernel"], params["stride"], params["padding"]
        ho, wo = step.out.shape[0], step.out.shape[1]
        if params.get("weights") == "float":
            wt = np.ascontiguousarray(weight.reshape(o, kh * kw * c).T)
            pad_value = float(params["pad_value"])

            def run(x, beta):
                y = _im2col(x, kh, kw, sh, sw, ph, pw, pad_value) @ wt
                return y.astype(np.float32, copy=False).reshape(x.shape[0], ho, wo, o), beta
            return run
        if inp.kind == "float":
            # real input: im2col, then the float × binary GEMM on weights packed densely over K
            negative = _unpack(weight, c)  # [O, kh, kw, C]
            k = kh * kw * c
            matrix = kernels.BinaryMatrix(_pack_bool(negative.reshape(o, k)), k)
            step.kernel = matrix
            pad_value = float(params["pad_value"])
            if self._pixels_fit(k):
                levels = float(self.input_levels)
                gemm, gemm_outside = _pixel_gemm(matrix, threads)

                def pixel_sums(p):  # pixel im2col pads with p = 0; the base below accounts for it
                    return gemm(_im2col(p, kh, kw, sh, sw, ph, pw, 0)).reshape(p.shape[0], ho, wo, o)

                def pixel_outside(p, lo, hi):
                    cols = _im2col(p, kh, kw, sh, sw, ph, pw, 0)
                    return gemm_outside(cols, lo, hi).reshape(p.shape[0], ho, wo, -1)

                # y = Σ_inside s_k·x_k + v·Σ_pad s_k with x_k = (2·p_k − L)/L and S = Σ_inside s_k·p_k:
                # y = (2·S − L·Σ_all s_k + L·(1 + v)·Σ_pad s_k)/L. Σ_pad depends on the output pixel.
                taps = c - 2 * negative.sum(axis=3, dtype=np.int64)  # [O, kh, kw]: Σ_C s per tap
                base = levels * taps.sum(axis=(1, 2))
                if (ph or pw) and pad_value != -1.0:
                    outside = kernels._outside_tap_sums(taps, h, w, (sh, sw), (ph, pw))  # [Ho, Wo, O]
                    base = base - levels * (1.0 + pad_value) * outside
                step.pixel_sums, step.pixel_outside = pixel_sums, pixel_outside
                step.pixel_base, step.pixel_reach = base, 255 * k

            def run(x, beta):
                cols = _im2col(x, kh, kw, sh, sw, ph, pw, pad_value)
                y = kernels.float_gemm_binary(cols, matrix, threads)
                return y.reshape(x.shape[0], ho, wo, o), beta
            return run
        conv = kernels.BinaryConv2d(np.ascontiguousarray(weight), c, kh, kw, (sh, sw), (ph, pw), int(params["pad_value"]))
        step.kernel = conv

        def run(x, beta):
            return conv.conv(np.ascontiguousarray(x), threads), beta
        return run

    def _pixels_fit(self, k: int) -> bool:
        """Whether a real-input binary layer of fan-in k gets the pixel path: the file knows its
        pixel grid, and S = Σ p·s (|S| ≤ 255·k, + 1 for the bounds' sentinels) fits int32."""
        return self.input_levels is not None and 255 * k + 1 < 2**31

    def _prepare_pixels(self) -> None:
        """The pixel path: leading flattens (they only reshape), the first layer on pixels, then
        the float path's steps; the layer and a following threshold fuse into integer bounds.
        Only where the pixels reach nothing else: each of these values feeds the next step alone."""
        first = 0
        while first < len(self._steps) and self._steps[first].op == "flatten":
            first += 1
        layer = self._steps[first] if first < len(self._steps) else None
        if layer is None or layer.pixel_sums is None or not all(map(self._feeds_next_only, range(first + 1))):
            return
        sums, base, levels = layer.pixel_sums, layer.pixel_base, self.input_levels

        def run(p, beta):
            return _pixel_values(sums(p), base, levels), beta

        steps = list(self._steps)
        steps[first] = replace(layer, run=run)
        plan = [_Call(s.run, s.sources, s.index) for s in steps[:first]]
        nxt = steps[first + 1] if first + 1 < len(steps) else None
        if nxt is not None and nxt.op == "threshold" and self._feeds_next_only(first + 1):
            # int32 as S (|bounds| ≤ 255·K + 1); [P, N]: one row per output pixel of a conv whose
            # padding makes them differ, else one
            lo, hi = (np.ascontiguousarray(b.astype(np.int32).reshape(-1, b.shape[-1]))
                      for b in _pixel_bounds(base, levels, nxt.scale, nxt.thresh, layer.pixel_reach))
            outside = layer.pixel_outside

            def fused(p, beta):
                return outside(p, lo, hi), None
            plan += [_Call(fused, layer.sources, nxt.index), *self._fuse(first + 2)]
        else:
            plan += [_Call(run, layer.sources, layer.index), *self._fuse(first + 1)]
        self._pixel_steps = steps
        self._pixel_plan = _schedule(plan)
        self._pixel_trace_plan = _schedule([_Call(step.run, step.sources, step.index) for step in steps])

    def _feeds_next_only(self, index: int) -> bool:
        """Whether step ``index`` reads the previous value (the model input for step 0), which
        nothing else reads: the two steps may run as one."""
        return self._steps[index].sources == (index - 1,) and self._readers[index - 1] == 1

    def _fuse(self, start: int) -> list[_Call]:
        """The calls of predict from step ``start`` on: binary dense/conv + threshold / plain
        affine as one kernel call, binary conv + max-pool + threshold as two."""
        plan: list[_Call] = []
        steps = self._steps
        i = start
        threads = self.threads
        while i < len(steps):
            step = steps[i]
            nxt = steps[i + 1] if i + 1 < len(steps) and self._feeds_next_only(i + 1) else None
            kernel = step.kernel
            binary = step.op in ("dense", "conv") and step.inp.kind == "bits" and kernel is not None
            after = steps[i + 2] if nxt is not None and i + 2 < len(steps) and self._feeds_next_only(i + 2) else None
            if binary and step.op == "conv" and after is not None and nxt.op == "maxpool" and after.op == "threshold":
                plan.append(_Call(_fused_pool_threshold(kernel, nxt.pool_bits, after.scale, after.thresh, threads),
                                  step.sources, after.index))
                i += 3
                continue
            if binary and nxt is not None and nxt.op == "threshold":
                plan.append(_Call(_fused_threshold(kernel, step.op, nxt.scale, nxt.thresh, threads),
                                  step.sources, nxt.index))
                i += 2
                continue
            if binary and nxt is not None and nxt.op == "affine" and not step.inp.scaled:
                plan.append(_Call(_fused_affine(kernel, step.op, nxt.mul, nxt.add, threads), step.sources, nxt.index))
                i += 2
                continue
            plan.append(_Call(step.run, step.sources, step.index))
            i += 1
        return plan

    # ---- inference
    def _layout(self, array: np.ndarray, what: str) -> np.ndarray:
        """Check the shape of a batch; NCHW (PyTorch) → NHWC (engine), contiguous."""
        expected = ("N", *self.input_shape)
        if array.ndim != len(expected) or tuple(array.shape[1:]) != self.input_shape:
            raise ShapeError(f"{what} must have shape {expected}, got {tuple(array.shape)}")
        if len(self.input_shape) == 3:
            array = array.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(array)

    def _input(self, x: Any) -> tuple[np.ndarray, bool]:
        """(engine-layout value, whether it holds uint8 pixels for the pixel path) for float inputs."""
        array = np.asarray(x)
        if array.dtype.kind not in "fiu":
            raise ShapeError(f"input must be a real-valued array (float32), got dtype {array.dtype}")
        value = self._layout(array.astype(np.float32, copy=False), "input")
        if self._pixel_plan is not None and value.size:
            pixels = _grid_pixels(value, self.input_levels)
            if pixels is not None:
                return pixels, True
        return value, False

    def _pixels(self, images: Any) -> tuple[np.ndarray, bool]:
        """The same for uint8 pixels: the pixel path, or their float inputs where there is none."""
        levels = self.input_levels
        if levels is None:
            raise ConfigError("this model file records no input_levels (the pixel grid it was trained on); "
                              "use predict() on float inputs")
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise ShapeError(f"pixels must be a uint8 array, got dtype {array.dtype}")
        value = self._layout(array, "pixels")
        if levels < 255 and value.size and int(value.max()) > levels:
            raise ShapeError(f"pixels must lie in 0..{levels} (the model's input_levels), found {int(value.max())}")
        if self._pixel_plan is None:
            return pixels_to_inputs(value, levels), False
        return value, True

    def _run(self, value: np.ndarray, on_pixels: bool) -> np.ndarray:
        if value.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        for out, _ in _evaluate(self._pixel_plan if on_pixels else self._plan, value):
            pass
        return out

    def predict(self, x: Any) -> np.ndarray:
        """Logits float32 [N, num_classes] for inputs ``x`` [N, *input_shape] (cast to float32).

        With ``input_levels`` in the file, a batch whose every value is exactly a pipeline input
        ((p / L)·2) − 1 runs the first layer on the pixels p (exact; see the module docstring).
        Raises :class:`~onebit.errors.ShapeError` for a wrong shape or a non-real dtype.
        """
        return self._run(*self._input(x))

    def predict_uint8(self, images: Any) -> np.ndarray:
        """Logits float32 [N, num_classes] for uint8 pixels ``images`` [N, *input_shape] in
        0..``input_levels``: the model's input is ((p / L)·2) − 1 as in training, and the first
        layer runs on the pixels without :meth:`predict`'s check of the batch.

        Raises :class:`~onebit.errors.ConfigError` if the file records no ``input_levels``,
        :class:`~onebit.errors.ShapeError` for another dtype or shape, or pixels above L.
        """
        return self._run(*self._pixels(images))

    def classify(self, x: Any) -> np.ndarray:
        """Predicted labels int64 [N] (argmax of the logits, the lowest index on ties)."""
        return self.predict(x).argmax(axis=1).astype(np.int64)

    def trace(self, x: Any) -> list[TraceEntry]:
        """Every op's output for inputs ``x``, unfused, in PyTorch's layout (see :class:`TraceEntry`);
        on the pixel path where :meth:`predict` takes it."""
        value, on_pixels = self._input(x)
        entries = []
        steps, plan = (self._pixel_steps, self._pixel_trace_plan) if on_pixels else (self._steps, self._trace_plan)
        for step, (value, _) in zip(steps, _evaluate(plan, value)):
            shown = _unpack(value, step.out.channels).astype(np.int8) * -2 + 1 if step.out.kind == "bits" else value
            entries.append(TraceEntry(step.index, step.op, step.name, _to_torch_layout(shown, step.out)))
        return entries

    # ---- description
    def summary(self) -> str:
        """A table of the ops: name, output (kind and per-sample shape), bytes of stored tensors;
        an op that reads other values than the previous output names them, e.g. ``add(12, 5)``."""
        rows = [("#", "op", "name", "output", "stored bytes")]
        for s in self._steps:
            op = s.op if s.sources == (s.index - 1,) else f"{s.op}({', '.join(map(str, s.sources))})"
            rows.append((str(s.index), op, s.name, s.out.describe(), f"{s.nbytes:,}"))
        total = sum(s.nbytes for s in self._steps)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        source = self.source_model.get("name") if isinstance(self.source_model, dict) else None
        levels = "" if self.input_levels is None else f" (pixels 0..{self.input_levels}" + (
            ", first layer on pixels)" if self._pixel_plan is not None else ")")
        head = (f"onebit model{f' ({source})' if source else ''}: input {list(self.input_shape)}{levels}, "
                f"{self.num_classes} classes")
        return "\n".join([head, *lines, f"total stored: {total:,} bytes; kernel path {kernels.current_path()}"])

    def __repr__(self) -> str:
        return f"Model(input_shape={self.input_shape}, num_classes={self.num_classes}, ops={len(self._steps)})"


def _fused_threshold(kernel, op: str, scale: np.ndarray, thresh: np.ndarray, threads: int) -> Callable:
    call = kernel.gemm_threshold if op == "dense" else kernel.conv_threshold

    def run(x, beta):
        return call(np.ascontiguousarray(x), scale, thresh, threads), None
    return run


def _fused_pool_threshold(conv, pool_bits: Callable[[np.ndarray], np.ndarray], scale: np.ndarray,
                          thresh: np.ndarray, threads: int) -> Callable:
    """conv → max-pool of its integers → threshold, as one ``conv_threshold``, then a max-pool of
    bits. The rule s·dot < t (bit 1 ↔ −1) is monotone in the dot: where s ≥ 0 the bit of the
    maximum is the AND of the window's bits, where s < 0 their OR. Those channels are computed
    with the complementary rule dot < 1 − t (= ¬(−dot < t) on integers), so that one AND — the
    max-pool of bits — serves every channel, and their pooled bits are flipped back."""
    negative = scale < 0
    up_scale = np.abs(scale).astype(np.int8)
    up_thresh = np.where(negative, np.clip(1 - thresh.astype(np.int64), _INT_MIN, np.iinfo(np.int32).max),
                         thresh).astype(np.int32)
    flip = _pack_bool(negative)

    def run(x, beta):
        return pool_bits(conv.conv_threshold(np.ascontiguousarray(x), up_scale, up_thresh, threads)) ^ flip, None
    return run


def _max_pool_bits(channels: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                   threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Max-pool of NHWC bits (``channels`` per pixel, packed in words): the padded cells are −1,
    the neutral element of max."""
    ph, pw = padding
    pad_word = _keep_mask(channels)  # all −1 on the valid bits

    def pool(x: np.ndarray) -> np.ndarray:
        if ph or pw:
            b, h, w, cw = x.shape
            xp = np.empty((b, h + 2 * ph, w + 2 * pw, cw), dtype=np.uint64)
            xp[...] = pad_word
            xp[:, ph:ph + h, pw:pw + w] = x & pad_word
            x = xp
        return kernels.maxpool_bits(np.ascontiguousarray(x), kernel, stride, threads)
    return pool


def _fused_affine(kernel, op: str, mul: np.ndarray, add: np.ndarray, threads: int) -> Callable:
    call = kernel.gemm_affine if op == "dense" else kernel.conv_affine

    def run(x, beta):
        return call(np.ascontiguousarray(x), mul, add, threads), None
    return run
