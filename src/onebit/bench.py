"""The deployment benchmark: the onebit engine against PyTorch float32, side by side, in one run.

    python -m onebit bench --threads 2 --json bench.json --plot bench.png
    onebit bench --quick                      # a few seconds: small shapes (CI smoke)
    onebit bench --cases gemm,e2e --paths avx512,portable

    from onebit.bench import format_table, run_benchmark
    result = run_benchmark(threads=2, cases=["gemm", "e2e"], quick=True)
    print(format_table(result))

Cases (``--cases``, default all but ``wrn``; ``--quick`` shrinks every shape):

* ``gemm``: bare binary GEMM, M ∈ {1, 16, 64, 256} with K = N = 4096, and M ∈ {1, 64} with
  K = 784, N = 4096. Engine: :meth:`BinaryMatrix.gemm` (``int32`` dot products) and
  ``gemm_threshold`` (``threshold``: packed output bits, the op a deployed layer runs), on
  activations packed beforehand. Torch: ``F.linear`` on float32.
* ``conv``: BinaryNet-CIFAR's 256→256 3×3 convolution, pad 1, 16×16 pixels, batch 1 and 64;
  engine ``BinaryConv2d.conv`` / ``conv_threshold`` on packed NHWC bits (zero padding, as
  torch), torch ``F.conv2d``.
* ``e2e``: ``binarynet_mlp`` (784–3×4096–10, ``--mlp-hidden``) and ``binarynet_cnn`` (3×32×32,
  ``--cnn-width``) at batch 1 and 64, random weights and random BatchNorm statistics
  (:func:`randomize_batchnorm`), exported with :func:`onebit.export.export_model` with
  ``input_levels=255``, loaded with :func:`onebit.engine.load`. Input: random uint8 images
  mapped to [−1, 1] by the training pipeline (``onebit.data.to_float``), the same float32
  tensor for both. Engine: ``predict(x)`` on it (the grid check, packing included; the first
  layer runs on the pixels); ``engine_offgrid_ms`` times ``predict`` on the same values moved
  one float32 step up, off the pixel grid, i.e. the float path of the first layer. Torch:
  ``model(x)`` in eval mode with the weights binarized once (``torch_latent_ms`` in the JSON
  times the model as trained, which re-binarizes its latent weights on every call). The
  engine's classes must equal torch's argmax on the timed input (``agreement``).
* ``size``: the float32 ``state_dict`` saved with safetensors against the ``.onebit`` file.
* ``wrn`` (only on request: seconds per call): ``wrn_1bit`` WRN-20-4 on 1×28×28 (quick:
  WRN-8-0.25), McDonnell's 1-bit-weight Wide ResNet, whose activations stay real: every
  convolution is float input × ±1 weights (im2col and ``float_gemm_binary``, one float32 add per
  weight) where torch runs float32 convolutions. BatchNorm statistics measured on random
  pixel images in train mode (:func:`calibrate_batchnorm`). ``predict`` at the ``e2e`` batch
  sizes against ``model(x)`` (weights binarized once), as ``e2e`` times them, and the file
  sizes as ``size`` measures them. GOPS counts 2 float ops per real × ±1 multiply-add (the
  popcount limit and peak do not apply: ``pct_limit`` and ``pct_peak`` are null).

Every engine case runs on every kernel path of ``--paths`` (default: all native paths of
this CPU, e.g. avx512, avx2, portable; ``numpy`` on request). Torch runs under
``torch.inference_mode`` with ``torch.set_num_threads(threads)``, the engine with
``threads=threads``. A time is the median of at least ``--reps`` calls after warm-up, on the
same input every call (cache-warm, as in serving); the JSON also keeps the minima.

Definitions (``wrn`` aside): one bit pair (XNOR + popcount-accumulate of one weight bit with
one activation bit) counts as 2 binary ops, as a multiply-add counts as 2 FLOPs, so GEMM
ops = 2·M·N·K (conv: M = B·Ho·Wo, K = 9·C; end to end: 2 × the binary MACs of
:func:`onebit.summary.summarize`, the first layer's real-input MACs not counted). GOPS =
binary ops / engine time. The limit is ``threads × clock × 512`` bit pairs per second (one
512-bit XOR + VPOPCNTQ per core per cycle; the clock measured by a chain of dependent adds,
AVX-512 VPOPCNTDQ CPUs only); the peak is ``threads ×`` the measured in-register rate of one
core of the best popcount loop the CPU has (``peak_loop``): XOR + VPOPCNTQ + VPADDQ on
AVX-512 VPOPCNTDQ CPUs, else the AVX2 kernel's XOR + nibble lookup + byte add. All paths are
set against the same limit and peak.
docs/benchmarks.md has the details and the measured figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import __version__
from .engine import kernels
from .errors import ConfigError, UnknownNameError
from .files import atomic_write, save_png

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line can build its parser without it
    from torch import nn

__all__ = [
    "CASES",
    "DEFAULT_CASES",
    "FULL",
    "OPS_PER_BIT_PAIR",
    "QUICK",
    "Plan",
    "Timing",
    "add_arguments",
    "calibrate_batchnorm",
    "environment",
    "format_table",
    "median_time",
    "plot_speedups",
    "randomize_batchnorm",
    "run_benchmark",
    "run_from_args",
    "write_json",
]

CASES = ("gemm", "conv", "e2e", "size", "wrn")
#: the cases a run without ``cases`` runs: not ``wrn``, whose float convolutions take seconds per call
DEFAULT_CASES = ("gemm", "conv", "e2e", "size")
_LEVELS = 255  # end-to-end inputs: 8-bit pixels, as the image datasets have
_WRN_SHAPE = (1, 28, 28)
#: binary ops per bit pair: the XNOR and the popcount-accumulate (a float multiply-add is 2 FLOPs)
OPS_PER_BIT_PAIR = 2
BITS_PER_CYCLE = 512  # one 512-bit VPOPCNTQ (and XOR) per core per cycle
# the clock and peak probes: the best of many short ones (~1 ms), as one preempted by another process reads low
_PROBE_REPEATS, _PROBE_ITERS = 30, 20_000


@dataclass(frozen=True)
class Plan:
    """The shapes and repetitions of one benchmark run."""

    gemm: tuple[tuple[int, int, int], ...]  # (M, K, N)
    conv_channels: int
    conv_pixels: int  # height = width
    conv_batches: tuple[int, ...]
    e2e_batches: tuple[int, ...]
    mlp_hidden: int
    cnn_width: float
    wrn_depth: int
    wrn_width: float
    reps: int
    warmup: int
    min_seconds: float  # fast calls repeat until this much time has passed (at most 50 × reps)


FULL = Plan(
    gemm=((1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096), (1, 784, 4096), (64, 784, 4096)),
    conv_channels=256, conv_pixels=16, conv_batches=(1, 64), e2e_batches=(1, 64),
    mlp_hidden=4096, cnn_width=1.0, wrn_depth=20, wrn_width=4.0, reps=15, warmup=2, min_seconds=0.2,
)
QUICK = Plan(
    gemm=((1, 1024, 1024), (64, 1024, 1024), (1, 784, 1024)),
    conv_channels=64, conv_pixels=8, conv_batches=(1, 4), e2e_batches=(1, 8),
    mlp_hidden=256, cnn_width=0.125, wrn_depth=8, wrn_width=0.25, reps=3, warmup=1, min_seconds=0.0,
)


# --------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float


def median_time(fn: Callable[[], Any], reps: int, warmup: int, min_seconds: float = 0.0) -> Timing:
    """Median (and minimum) of at least ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones;
    calls repeat until ``min_seconds`` have passed, at most ``50 × reps`` of them."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 50 * reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(1e3 * statistics.median(times), 1e3 * min(times))


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict:
    """The machine and software a run measures on, with the clock and popcount-peak probes."""
    import torch

    native = kernels._native
    clock = peak = 0.0
    peak_loop = None
    if native is not None:
        clock = max(native._probe_clock_ghz(_PROBE_ITERS) for _ in range(_PROBE_REPEATS))
        for peak_loop in ("avx512", "avx2"):  # the best popcount this CPU has; bit pairs/s/core, 0 if absent
            peak = max(native._probe_popcnt_peak(_PROBE_ITERS, peak_loop) for _ in range(_PROBE_REPEATS))
            if peak:
                break
        else:
            peak_loop = None
    limit = threads * clock * 1e9 * BITS_PER_CYCLE * OPS_PER_BIT_PAIR if peak_loop == "avx512" else 0.0
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "clock_ghz": round(clock, 3) or None,
        "popcnt_bitpairs_per_cycle": round(peak / (clock * 1e9), 1) if peak and clock else None,
        "limit_gops": round(limit / 1e9, 1) or None,
        "peak_gops": round(threads * peak * OPS_PER_BIT_PAIR / 1e9, 1) or None,
        "peak_loop": peak_loop,
        "threads": threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "onebit": __version__,
        "python": platform.python_version(),
        "native": native is not None,
        "kernel_paths": kernels.available_paths(),
        "thread_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "OPENBLAS", "MKL_"))},
        "loadavg_start": _load_average(),
    }


# --------------------------------------------------------------------------- models
def randomize_batchnorm(model: nn.Module, generator=None) -> None:
    """Random running statistics and affine parameters for every BatchNorm of ``model``.

    Scaled to the fan-in F of the layer before each BN (its pre-activations have standard
    deviation about √F): mean ~ N(0, (√F/2)²), std ~ √F·U(0.5, 1.5), |γ| ~ U(0.5, 1.5) with
    10% of the γ negative, β ~ N(0, 0.5²); so the exported thresholds spread over the dot
    products the layer reaches and take both directions.
    """
    import torch
    from torch import nn

    from .layers import QuantConv2d, QuantLinear

    fan_in = 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (QuantLinear, QuantConv2d)):
                fan_in = module.weight[0].numel()
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n, std = module.num_features, math.sqrt(fan_in)
                module.running_mean.copy_(torch.randn(n, generator=generator) * std / 2)
                module.running_var.copy_((std * (torch.rand(n, generator=generator) + 0.5)) ** 2)
                negative = torch.rand(n, generator=generator) < 0.1
                gamma = torch.rand(n, generator=generator) + 0.5
                module.weight.copy_(torch.where(negative, -gamma, gamma))
                module.bias.copy_(torch.randn(n, generator=generator) / 2)


def calibrate_batchnorm(model: nn.Module, generator=None, batches: int = 4, batch_size: int = 32) -> None:
    """Running statistics of every BatchNorm of ``model`` measured on random 8-bit pixel images
    (as the training pipeline maps them): the average over ``batches`` batches
    (:func:`onebit.layers.recompute_batchnorm`). For real-valued activations (the WRN), where each
    BN must follow the scale of the layer before it; the learned scale and offset, if any, stay.
    Leaves ``model`` in eval mode."""
    import torch

    from .data import to_float
    from .layers import recompute_batchnorm

    images = (to_float(torch.randint(0, _LEVELS + 1, (batch_size, *model.in_shape), generator=generator,
                                     dtype=torch.uint8), _LEVELS) for _ in range(batches))
    recompute_batchnorm(model, images)
    model.eval()


def _binarize_weights_once(model: nn.Module) -> None:
    """Replace every quantized layer's latent weight by its quantized value and drop the weight
    quantizer: the same outputs, without re-binarizing the weights on every call."""
    import torch

    from .layers import QuantLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLayer) and module.weight_quantizer is not None:
                module.weight.copy_(module.quantized_weight())
                module.weight_quantizer = None


@dataclass
class _Prepared:
    name: str
    label: str
    kwargs: dict
    model: Any  # nn.Module, eval mode, BN randomized
    onebit: Path
    safetensors: Path
    ops: int  # per sample: 2 per binary MAC (the first layer's real-input ones not counted); wrn: 2 per MAC
    binary: bool  # whether ops are binary ones (the popcount limit and peak apply)


def _prepare_model(name: str, kwargs: dict, folder: Path, seed: int) -> _Prepared:
    import torch
    from safetensors.torch import save_file

    from .export import export_model
    from .models import create_model
    from .summary import summarize

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's generator
        torch.manual_seed(seed)
        model = create_model(name, **kwargs)
    binary = name != "wrn_1bit"
    if binary:
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    else:
        calibrate_batchnorm(model, torch.Generator().manual_seed(seed))
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{name}.safetensors"))
    export_model(model, folder / f"{name}.onebit", source={"name": name, "kwargs": kwargs}, input_levels=_LEVELS)
    shape = "x".join(map(str, model.in_shape))
    if name == "binarynet_mlp":
        label = f"{name} {math.prod(model.in_shape)}-3x{kwargs['hidden']}-{model.num_classes}"
    elif name == "wrn_1bit":
        label = f"{name} WRN-{kwargs['depth']}-{kwargs['width']:g} {shape}"
    else:
        label = f"{name} width={kwargs['width']:g} {shape}"
    summary = summarize(model)
    ops = OPS_PER_BIT_PAIR * summary.binary_macs if binary else 2 * summary.macs  # wrn: a float MAC is 2 ops
    return _Prepared(name, label, kwargs, model, folder / f"{name}.onebit", folder / f"{name}.safetensors",
                     ops, binary)


# --------------------------------------------------------------------------- the run
def _names(values: Sequence[str] | str | None, valid: Sequence[str], what: str) -> list[str] | None:
    if values is None:
        return None
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else [str(v).strip() for v in values]
    items = [v for v in items if v]
    if not items:
        raise ConfigError(f"give at least one {what} (valid: {', '.join(valid)})")
    for item in items:
        if item not in valid:
            raise UnknownNameError(f"unknown {what} {item!r} (valid: {', '.join(valid)})")
    return list(dict.fromkeys(items))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def run_benchmark(
    *,
    threads: int = 2,
    reps: int | None = None,
    cases: Sequence[str] | str | None = None,
    paths: Sequence[str] | str | None = None,
    quick: bool = False,
    cnn_width: float | None = None,
    mlp_hidden: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the benchmark and return its results (JSON-serializable).

    ``cases``: names of :data:`CASES` (list or comma-separated; default :data:`DEFAULT_CASES`,
    all but ``wrn``). ``paths``: kernel paths of :func:`onebit.engine.kernels.available_paths`
    (default: every native one, numpy where there is none). ``quick`` uses :data:`QUICK`'s
    small shapes, otherwise :data:`FULL`; ``reps``, ``cnn_width`` and ``mlp_hidden`` override
    the plan's. ``progress`` writes one line per measurement to stderr.

    Returns ``{"environment", "settings", "results": [one row per case × mode × path],
    "sizes": [one row per model]}``; a row holds ``case``, ``name``, ``mode``, ``path``,
    ``batch``, ``engine_ms``, ``torch_ms`` (medians), their minima, ``speedup`` (torch/engine),
    ``speedup_min``, ``gops``, ``pct_limit``, ``pct_peak``, and for ``e2e`` and ``wrn``
    ``model``, ``torch_latent_ms``, ``agreement`` (share of equal classes),
    ``predictions_equal``, for ``e2e`` also ``engine_offgrid_ms`` and ``engine_offgrid_min_ms``
    (the engine on off-grid input: the float path of the first layer).
    Bad options raise :class:`~onebit.errors.ConfigError` or
    :class:`~onebit.errors.UnknownNameError` before anything runs.
    """
    threads = _positive_int("threads", threads)
    plan = QUICK if quick else FULL
    reps = plan.reps if reps is None else _positive_int("reps", reps)
    cases = _names(cases, CASES, "case") or list(DEFAULT_CASES)
    native_paths = [p for p in kernels.available_paths() if p != "numpy"]
    paths = _names(paths, kernels.available_paths(), "kernel path") or native_paths or ["numpy"]
    cnn_width = plan.cnn_width if cnn_width is None else cnn_width
    if isinstance(cnn_width, bool) or not isinstance(cnn_width, (int, float)) or not cnn_width > 0:
        raise ConfigError(f"cnn width must be a positive number, got {cnn_width!r}")
    mlp_hidden = plan.mlp_hidden if mlp_hidden is None else _positive_int("mlp hidden", mlp_hidden)

    import torch

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    previous_threads, previous_path = torch.get_num_threads(), kernels.current_path()
    torch.set_num_threads(threads)
    try:
        env = environment(threads)
        load = env["loadavg_start"]
        env["busy"] = bool(load and load[0] > threads)
        if env["busy"]:
            say(f"warning: machine busy: load average {load[0]:.2f} > {threads} threads: ratios unreliable")
        settings = {"threads": threads, "reps": reps, "warmup": plan.warmup, "min_seconds": plan.min_seconds,
                    "quick": quick, "cases": cases, "paths": paths, "cnn_width": cnn_width,
                    "mlp_hidden": mlp_hidden, "seed": seed, "ops_per_bit_pair": OPS_PER_BIT_PAIR}
        bench = _Bench(plan, threads, reps, paths, env, say, seed)
        if "gemm" in cases:
            bench.gemm()
        if "conv" in cases:
            bench.conv()
        if "e2e" in cases or "size" in cases:
            bench.models(cnn_width, mlp_hidden, timing="e2e" in cases, sizes="size" in cases)
        if "wrn" in cases:
            bench.wrn()
        env["loadavg_end"] = _load_average()
    finally:
        torch.set_num_threads(previous_threads)
        kernels.set_path(previous_path)
    return {"environment": env, "settings": settings, "results": bench.rows, "sizes": bench.sizes}


class _Bench:
    """The measurements of one :func:`run_benchmark` call, collected into ``rows`` and ``sizes``."""

    def __init__(self, plan: Plan, threads: int, reps: int, paths: list[str], env: dict,
                 say: Callable[[str], None], seed: int) -> None:
        import torch

        self.plan, self.threads, self.reps, self.paths, self.say = plan, threads, reps, paths, say
        self.limit, self.peak = env["limit_gops"], env["peak_gops"]
        self.rows: list[dict] = []
        self.sizes: list[dict] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    def time(self, fn: Callable[[], Any]) -> Timing:
        return median_time(fn, self.reps, self.plan.warmup, self.plan.min_seconds)

    def time_torch(self, fn: Callable[[], Any]) -> Timing:
        import torch

        with torch.inference_mode():
            return self.time(fn)

    def record(self, case: str, name: str, mode: str, path: str, batch: int, engine: Timing, torch_: Timing,
               ops: float, binary: bool = True, **extra: Any) -> None:
        gops = ops / engine.median_ms / 1e6
        row = {
            "case": case, "name": name, "mode": mode, "path": path, "batch": batch,
            "engine_ms": engine.median_ms, "torch_ms": torch_.median_ms,
            "engine_min_ms": engine.min_ms, "torch_min_ms": torch_.min_ms,
            "speedup": torch_.median_ms / engine.median_ms, "speedup_min": torch_.min_ms / engine.min_ms,
            "gops": gops,
            "pct_limit": 100 * gops / self.limit if self.limit and binary else None,
            "pct_peak": 100 * gops / self.peak if self.peak and binary else None,
            **extra,
        }
        self.rows.append(row)
        self.say(f"{name} {mode} {path}: engine {engine.median_ms:.4g} ms, torch {torch_.median_ms:.4g} ms, "
                 f"{row['speedup']:.1f}x, {gops:.0f} GOPS")

    def randn(self, *shape: int):
        import torch

        return torch.randn(*shape, generator=self.generator)

    # ---- (a) bare GEMM
    def gemm(self) -> None:
        import torch.nn.functional as F

        weights: dict[tuple[int, int], tuple[Any, kernels.BinaryMatrix]] = {}
        for M, K, N in self.plan.gemm:
            if (K, N) not in weights:
                wf = self.randn(N, K)
                weights[(K, N)] = (wf, kernels.BinaryMatrix(kernels.pack_signs(wf.numpy()), K))
            wf, matrix = weights[(K, N)]
            xf = self.randn(M, K)
            reference = self.time_torch(lambda: F.linear(xf, wf))
            a = kernels.pack_signs(xf.numpy())
            scale, thresh = np.ones(N, np.int8), np.zeros(N, np.int32)
            name, ops = f"gemm M={M} K={K} N={N}", OPS_PER_BIT_PAIR * M * N * K
            shape = {"M": M, "K": K, "N": N}
            for path in self.paths:
                kernels.set_path(path)
                t = self.time(lambda: matrix.gemm(a, threads=self.threads))
                self.record("gemm", name, "int32", path, M, t, reference, ops, shape=shape)
                t = self.time(lambda: matrix.gemm_threshold(a, scale, thresh, threads=self.threads))
                self.record("gemm", name, "threshold", path, M, t, reference, ops, shape=shape)

    # ---- (b) conv layer
    def conv(self) -> None:
        import torch.nn.functional as F

        C, P = self.plan.conv_channels, self.plan.conv_pixels
        wf = self.randn(C, C, 3, 3)
        layer = kernels.BinaryConv2d(kernels.pack_signs(np.ascontiguousarray(wf.permute(0, 2, 3, 1).numpy())),
                                     C, 3, 3, stride=1, padding=1, pad_value=0)
        scale, thresh = np.ones(C, np.int8), np.zeros(C, np.int32)
        for B in self.plan.conv_batches:
            xf = self.randn(B, C, P, P)
            reference = self.time_torch(lambda: F.conv2d(xf, wf, padding=1))
            xb = kernels.pack_signs(np.ascontiguousarray(xf.permute(0, 2, 3, 1).numpy()))
            name = f"conv B={B} {C}->{C} 3x3 {P}x{P}"
            ops = OPS_PER_BIT_PAIR * (B * P * P) * C * (9 * C)
            shape = {"B": B, "C": C, "O": C, "H": P, "W": P, "kernel": 3, "padding": 1}
            for path in self.paths:
                kernels.set_path(path)
                t = self.time(lambda: layer.conv(xb, threads=self.threads))
                self.record("conv", name, "int32", path, B, t, reference, ops, shape=shape)
                t = self.time(lambda: layer.conv_threshold(xb, scale, thresh, threads=self.threads))
                self.record("conv", name, "threshold", path, B, t, reference, ops, shape=shape)

    # ---- (c) end to end and (d) sizes
    def models(self, cnn_width: float, mlp_hidden: int, *, timing: bool, sizes: bool) -> None:
        from .engine import load

        with tempfile.TemporaryDirectory(prefix="onebit-bench-") as tmp:
            for name, kwargs in (("binarynet_mlp", {"hidden": mlp_hidden}), ("binarynet_cnn", {"width": cnn_width})):
                prepared = _prepare_model(name, kwargs, Path(tmp), self.seed)
                if sizes:
                    self.size(prepared)
                if timing:
                    self.end_to_end(prepared, load(prepared.onebit, threads=self.threads))

    def wrn(self) -> None:
        from .engine import load

        kwargs = {"in_shape": list(_WRN_SHAPE), "depth": self.plan.wrn_depth, "width": self.plan.wrn_width}
        with tempfile.TemporaryDirectory(prefix="onebit-bench-") as tmp:
            prepared = _prepare_model("wrn_1bit", kwargs, Path(tmp), self.seed)
            self.size(prepared)
            self.end_to_end(prepared, load(prepared.onebit, threads=self.threads), case="wrn")

    def size(self, prepared: _Prepared) -> None:
        float_bytes, onebit_bytes = prepared.safetensors.stat().st_size, prepared.onebit.stat().st_size
        row = {"model": prepared.name, "name": prepared.label, "kwargs": prepared.kwargs,
               "params": sum(p.numel() for p in prepared.model.parameters()),
               "float32_format": "safetensors of the float32 state_dict (latent weights, BN parameters and buffers)",
               "float32_bytes": float_bytes, "onebit_bytes": onebit_bytes, "ratio": float_bytes / onebit_bytes}
        self.sizes.append(row)
        self.say(f"{prepared.label}: float32 {float_bytes:,} B, .onebit {onebit_bytes:,} B, {row['ratio']:.1f}x")

    def end_to_end(self, prepared: _Prepared, engine, case: str = "e2e") -> None:
        import torch

        from .data import to_float

        model = prepared.model
        inputs = {B: to_float(torch.randint(0, _LEVELS + 1, (B, *model.in_shape), generator=self.generator,
                                            dtype=torch.uint8), _LEVELS)
                  for B in self.plan.e2e_batches}
        latent, expected = {}, {}
        for B, x in inputs.items():
            latent[B] = self.time_torch(lambda: model(x))
            with torch.inference_mode():
                expected[B] = model(x).argmax(dim=1).numpy()
        _binarize_weights_once(model)
        for B, x in inputs.items():
            reference = self.time_torch(lambda: model(x))
            xn = x.numpy()
            name = f"{prepared.label} B={B}"
            off_grid = np.nextafter(xn, np.float32(2))  # one float32 step up: no longer pixel values
            for path in self.paths:
                kernels.set_path(path)
                t = self.time(lambda: engine.predict(xn))
                offgrid = {}
                if case == "e2e":  # (the WRN has no pixel path: its first op is the input BN)
                    t_off = self.time(lambda: engine.predict(off_grid))
                    offgrid = {"engine_offgrid_ms": t_off.median_ms, "engine_offgrid_min_ms": t_off.min_ms}
                agreement = float(np.mean(engine.classify(xn) == expected[B]))
                self.record(case, name, "predict", path, B, t, reference, prepared.ops * B, prepared.binary,
                            model=prepared.name, shape={"B": B, "input": list(model.in_shape)},
                            torch_latent_ms=latent[B].median_ms, **offgrid,
                            agreement=agreement, predictions_equal=agreement == 1.0)


# --------------------------------------------------------------------------- output
def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    """The results as plain-text tables: environment, one line per measurement, the file sizes."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"# cpu: {env['cpu']}; clock {_number(env['clock_ghz'], '.2f')} GHz (measured); "
        f"threads: {settings['threads']}; torch {env['torch']}; onebit {env['onebit']}",
        f"# limit {_number(env['limit_gops'], '.0f')} GOPS (512 bit pairs/cycle/core), measured peak "
        f"{_number(env['peak_gops'], '.0f')} GOPS ({env.get('peak_loop') or 'no'} loop); "
        f"1 bit pair = {settings['ops_per_bit_pair']} binary ops",
        f"# load average at start {env['loadavg_start']}, at end {env.get('loadavg_end')}"
        + ("  (machine busy: ratios unreliable)" if env.get("busy") else ""),
    ]
    if result["results"]:
        width = max(len(r["name"]) for r in result["results"])
        header = (f"{'case':<{width}}  {'mode':<9} {'path':<8} {'engine ms':>10} {'torch ms':>10} {'speedup':>8} "
                  f"{'min/min':>8} {'GOPS':>7} {'%limit':>7} {'%peak':>6}  agree  offgrid ms")
        lines += ["", header, "-" * len(header)]
        for r in result["results"]:
            agree = "" if "agreement" not in r else f"{100 * r['agreement']:.0f}%"
            offgrid = "" if "engine_offgrid_ms" not in r else f"{r['engine_offgrid_ms']:10.4f}"
            lines.append(
                f"{r['name']:<{width}}  {r['mode']:<9} {r['path']:<8} {r['engine_ms']:10.4f} {r['torch_ms']:10.3f} "
                f"{r['speedup']:7.1f}x {r['speedup_min']:7.1f}x {r['gops']:7.0f} {_number(r['pct_limit'], '7.1f')} "
                f"{_number(r['pct_peak'], '6.1f')}  {agree:>5}  {offgrid}".rstrip()
            )
    if result["sizes"]:
        width = max(len(s["name"]) for s in result["sizes"])
        lines += ["", f"{'model':<{width}}  {'params':>11} {'float32 (safetensors)':>22} {'.onebit':>12} {'ratio':>7}"]
        for s in result["sizes"]:
            lines.append(f"{s['name']:<{width}}  {s['params']:>11,} {s['float32_bytes']:>20,} B "
                         f"{s['onebit_bytes']:>10,} B {s['ratio']:6.1f}x")
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` to ``path`` as JSON through :func:`onebit.files.atomic_write`."""
    path = Path(path)
    with atomic_write(path, "w") as handle:
        json.dump(result, handle, indent=1)
    return path


def plot_speedups(result: dict, path: str | os.PathLike) -> Path:
    """Speedup (torch / engine, log scales) against batch size: one panel each for the bare GEMM
    (``int32``; M is the batch), the conv layer (``int32``) and end to end (``predict``), one
    colour per kernel path, one line style per GEMM shape or model; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    panels = []
    for cases, title, xlabel in ((("gemm",), "binary GEMM (int32 out)", "M (batch rows)"),
                                 (("conv",), "conv 3x3 (int32 out)", "batch"),
                                 (("e2e", "wrn"), "end to end (predict)", "batch")):
        rows = [r for r in result["results"] if r["case"] in cases and r["mode"] in ("int32", "predict")]
        if rows:
            panels.append((title, xlabel, rows))
    if not panels:
        raise ConfigError("nothing to plot: the results have no gemm, conv or e2e case")
    colors = {p: f"C{i}" for i, p in enumerate(result["settings"]["paths"])}
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    try:
        for ax, (title, xlabel, rows) in zip(axes[0], panels):
            lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
            for r in rows:
                variant = f"K={r['shape']['K']} N={r['shape']['N']}" if r["case"] == "gemm" else r.get("model", "")
                lines.setdefault((r["path"], variant), []).append((r["batch"], r["speedup"]))
            variants = list(dict.fromkeys(v for _, v in lines))
            for (path_name, variant), points in lines.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[path_name],
                        ls=styles[variants.index(variant) % len(styles)], label=f"{path_name} {variant}".strip())
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
            ax.set_xticks(sorted({r["batch"] for r in rows}))
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small", loc="best")
        axes[0][0].set_ylabel(f"speedup vs torch float32 (threads: {result['settings']['threads']})")
        fig.suptitle(result["environment"]["cpu"], fontsize="small")
        fig.tight_layout()
        return save_png(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bench`` command's arguments (``onebit bench``)."""
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and of the engine (default 2)")
    parser.add_argument("--reps", type=int, help=f"timed calls per measurement (default {FULL.reps}, quick {QUICK.reps})")
    parser.add_argument("--cases", help=f"comma-separated cases to run, of {','.join(CASES)} "
                                        f"(default {','.join(DEFAULT_CASES)})")
    parser.add_argument("--paths", help="comma-separated kernel paths (default: every native path of this CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions: a smoke test of seconds")
    parser.add_argument("--cnn-width", type=float,
                        help=f"binarynet_cnn width multiplier (default {FULL.cnn_width:g}, quick {QUICK.cnn_width:g})")
    parser.add_argument("--mlp-hidden", type=int,
                        help=f"binarynet_mlp hidden units (default {FULL.mlp_hidden}, quick {QUICK.mlp_hidden})")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write the speedup-vs-batch plot to this PNG")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args`` (see :func:`add_arguments`): print the table, write --json/--plot."""
    result = run_benchmark(threads=args.threads, reps=args.reps, cases=args.cases, paths=args.paths,
                           quick=args.quick, cnn_width=args.cnn_width, mlp_hidden=args.mlp_hidden)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"json: {args.json}")
    if args.plot:
        plot_speedups(result, args.plot)
        print(f"plot: {args.plot}")
    return 0
