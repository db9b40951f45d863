"""Run a ``.onebit`` model: a sequential graph executor over :mod:`onebit.engine.kernels`.

    from onebit.engine import load
    model = load("model.onebit")            # weights packed into kernel panels once, here
    logits = model.predict(x)               # x: float32 [N, *model.input_shape], NCHW like PyTorch
    labels = model.classify(x)              # int64 [N]

Activations flow in the engine's layout: NHWC for images (channels packed into uint64 words
for bits), flat vectors otherwise. Each op of the file's graph becomes one prepared step;
a binary ``dense``/``conv`` followed by ``threshold`` (or by a plain ``affine``) runs as one
fused kernel call (``gemm_threshold`` / ``conv_threshold`` / ``*_affine``), which computes
exactly what the two steps compute one after the other (:meth:`Model.trace` runs them apart).

A :class:`Model` holds no mutable state after loading: :meth:`Model.predict` may be called
from many threads at once. This module never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ShapeError
from . import kernels
from .format import Value, check_graph, read_model, words

__all__ = ["Model", "TraceEntry", "load"]

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
def _pack_bool(negative: np.ndarray) -> np.ndarray:
    """bool[..., K] (True ↔ −1) → uint64[..., ceil(K/64)]."""
    k = negative.shape[-1]
    padded = np.zeros(negative.shape[:-1] + (words(k) * 64,), dtype=bool)
    padded[..., :k] = negative
    return np.packbits(padded, axis=-1, bitorder="little").view("<u8").astype(np.uint64, copy=False)


def _unpack(bits: np.ndarray, k: int) -> np.ndarray:
    """uint64[..., ceil(k/64)] → bool[..., k] (True ↔ bit 1 ↔ −1)."""
    raw = np.ascontiguousarray(bits).astype("<u8", copy=False).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")[..., :k].astype(bool)


def _keep_mask(k: int) -> np.ndarray:
    mask = np.full(words(k), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    if k % 64:
        mask[-1] = np.uint64((1 << (k % 64)) - 1)
    return mask


def _im2col(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, pad_value: float) -> np.ndarray:
    """float32 NHWC [B, H, W, C] → [B·Ho·Wo, kh·kw·C], K ordered (kh, kw, C)."""
    b, h, w, c = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = np.full((b, h + 2 * ph, w + 2 * pw, c), pad_value, dtype=np.float32)
    xp[:, ph:ph + h, pw:pw + w] = x
    cols = np.empty((b, ho, wo, kh, kw, c), dtype=np.float32)
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


def _to_torch_layout(value: np.ndarray, v: Value) -> np.ndarray:
    return value.transpose(0, 3, 1, 2) if v.spatial else value


# --------------------------------------------------------------------------- steps
@dataclass
class _Step:
    """A prepared op: ``run(x, beta) -> (y, beta)`` on batched arrays in the engine layout."""

    index: int
    op: str
    name: str
    inp: Value
    out: Value
    run: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]
    nbytes: int = 0  # bytes of the op's tensors in the file (for summaries)
    kernel: Any = None  # BinaryMatrix / BinaryConv2d of a binary dense/conv (for fusion)
    scale: np.ndarray | None = None  # threshold: direction s
    thresh: np.ndarray | None = None  # threshold: t
    mul: np.ndarray | None = None  # affine
    add: np.ndarray | None = None


class Model:
    """A loaded ``.onebit`` model (see :func:`load`).

    Attributes: ``input_shape`` (per sample, PyTorch layout, e.g. (1, 28, 28)),
    ``num_classes``, ``metadata`` (the file's metadata), ``source_model``.
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
        shape = self.input_shape
        value = Value("float", (shape[1], shape[2], shape[0]) if len(shape) == 3 else (shape[0],))
        self._steps: list[_Step] = []
        for index, (layer, out) in enumerate(zip(metadata["layers"], values)):
            self._steps.append(self._prepare(index, layer, value, out, tensors))
            value = out
        self._plan = self._fuse()

    # ---- preparation
    def _prepare(self, index: int, layer: dict, inp: Value, out: Value, tensors: dict[str, np.ndarray]) -> _Step:
        op = layer["op"]
        params = layer.get("params", {})
        t = {role: tensors[name] for role, name in layer.get("tensors", {}).items()}
        threads = self.threads
        step = _Step(index, op, str(layer.get("name", "")), inp, out, None,  # type: ignore[arg-type]
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
            if inp.kind == "bits":
                c = inp.channels
                pad_word = _keep_mask(c)  # all −1 (the neutral element of max) on valid bits

                def run(x, beta):
                    if ph or pw:
                        b, h, w, cw = x.shape
                        xp = np.empty((b, h + 2 * ph, w + 2 * pw, cw), dtype=np.uint64)
                        xp[...] = pad_word
                        xp[:, ph:ph + h, pw:pw + w] = x & pad_word
                        x = xp
                    return kernels.maxpool_bits(np.ascontiguousarray(x), (kh, kw), (sh, sw), threads), beta
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
            dense = _pack_bool(_unpack(weight, c).reshape(o, kh * kw * c))
            matrix = kernels.BinaryMatrix(dense, kh * kw * c)
            step.kernel = matrix
            pad_value = float(params["pad_value"])

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

    def _fuse(self) -> list[Callable]:
        """The steps of predict: binary dense/conv + threshold / plain affine as one kernel call."""
        plan: list[Callable] = []
        steps = self._steps
        i = 0
        threads = self.threads
        while i < len(steps):
            step = steps[i]
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            kernel = step.kernel
            binary = step.op in ("dense", "conv") and step.inp.kind == "bits" and kernel is not None
            if binary and nxt is not None and nxt.op == "threshold":
                plan.append(_fused_threshold(kernel, step.op, nxt.scale, nxt.thresh, threads))
                i += 2
                continue
            if binary and nxt is not None and nxt.op == "affine" and not step.inp.scaled:
                plan.append(_fused_affine(kernel, step.op, nxt.mul, nxt.add, threads))
                i += 2
                continue
            plan.append(step.run)
            i += 1
        return plan

    # ---- inference
    def _input(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if array.dtype.kind not in "fiu":
            raise ShapeError(f"input must be a real-valued array (float32), got dtype {array.dtype}")
        expected = ("N", *self.input_shape)
        if array.ndim != len(expected) or tuple(array.shape[1:]) != self.input_shape:
            raise ShapeError(f"input must have shape {expected}, got {tuple(array.shape)}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if len(self.input_shape) == 3:  # NCHW (PyTorch) → NHWC (engine)
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
        return array

    def predict(self, x: Any) -> np.ndarray:
        """Logits float32 [N, num_classes] for inputs ``x`` [N, *input_shape] (cast to float32).

        Raises :class:`~onebit.errors.ShapeError` for a wrong shape or a non-real dtype.
        """
        value, beta = self._input(x), None
        if value.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        for run in self._plan:
            value, beta = run(value, beta)
        return value

    def classify(self, x: Any) -> np.ndarray:
        """Predicted labels int64 [N] (argmax of the logits, the lowest index on ties)."""
        return self.predict(x).argmax(axis=1).astype(np.int64)

    def trace(self, x: Any) -> list[TraceEntry]:
        """Every op's output for inputs ``x``, unfused, in PyTorch's layout (see :class:`TraceEntry`)."""
        value, beta = self._input(x), None
        entries = []
        for step in self._steps:
            value, beta = step.run(value, beta)
            shown = _unpack(value, step.out.channels).astype(np.int8) * -2 + 1 if step.out.kind == "bits" else value
            entries.append(TraceEntry(step.index, step.op, step.name, _to_torch_layout(shown, step.out)))
        return entries

    # ---- description
    def summary(self) -> str:
        """A table of the ops: name, output (kind and per-sample shape), bytes of stored tensors."""
        rows = [("#", "op", "name", "output", "stored bytes")]
        for s in self._steps:
            rows.append((str(s.index), s.op, s.name, s.out.describe(), f"{s.nbytes:,}"))
        total = sum(s.nbytes for s in self._steps)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        source = self.source_model.get("name") if isinstance(self.source_model, dict) else None
        head = f"onebit model{f' ({source})' if source else ''}: input {list(self.input_shape)}, {self.num_classes} classes"
        return "\n".join([head, *lines, f"total stored: {total:,} bytes; kernel path {kernels.current_path()}"])

    def __repr__(self) -> str:
        return f"Model(input_shape={self.input_shape}, num_classes={self.num_classes}, ops={len(self._steps)})"


def _fused_threshold(kernel, op: str, scale: np.ndarray, thresh: np.ndarray, threads: int) -> Callable:
    call = kernel.gemm_threshold if op == "dense" else kernel.conv_threshold

    def run(x, beta):
        return call(np.ascontiguousarray(x), scale, thresh, threads), None
    return run


def _fused_affine(kernel, op: str, mul: np.ndarray, add: np.ndarray, threads: int) -> Callable:
    call = kernel.gemm_affine if op == "dense" else kernel.conv_affine

    def run(x, beta):
        return call(np.ascontiguousarray(x), mul, add, threads), None
    return run
