#!/usr/bin/env python
"""Time the onebit binary kernels against torch float32 on the same shapes, in one run.

    python benchmarks/bench_kernels.py --threads 2 [--json out.json] [--reps 15]

Cases: GEMM M ∈ {1, 16, 64, 256} with K = N = 4096; GEMM K = 784, N = 4096 (M ∈ {1, 64});
conv 256→256 channels, 3×3, pad 1, 16×16 pixels, batch 1 and 64. Torch runs
``torch.nn.functional.linear`` / ``conv2d`` in float32 under ``torch.inference_mode`` with
``torch.set_num_threads(threads)``; the engine runs every available native path (and numpy
with ``--numpy``) with ``threads=threads``. Times are the median of ``--reps`` runs after
warm-up; inputs and weights stay the same between repetitions (cache-warm, as in serving).

Definitions:
* binary ops = 2·M·N·K (one XNOR + one popcount-add per bit pair); for conv M = B·Ho·Wo,
  K = 9·256. GOPS = binary ops / time.
* limit (the brief's estimate) = threads × clock × 512 bit pairs per cycle, i.e. one 512-bit
  VPOPCNTQ + XOR per core per cycle; the clock is measured with a chain of dependent adds
  (``_native._probe_clock_ghz``), /proc/cpuinfo MHz is printed next to it.
* peak (measured) = threads × the in-register XOR+VPOPCNTQ+VPADDQ rate of one core
  (``_native._probe_popcnt_peak``, 24 independent accumulators, no loads): what this core can
  actually retire. CPUs that issue more than one VPOPCNTQ per cycle (e.g. AMD Zen 5) exceed the
  brief's limit, so both fractions are shown.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from onebit.engine import kernels as kn  # noqa: E402


BEST: dict[int, float] = {}  # id(fn) -> best time of the last median_time call


def median_time(fn, reps: int, warmup: int, min_time: float = 0.0) -> float:
    """Median of at least ``reps`` timed calls (and at least ``min_time`` seconds) after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 50 * reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    BEST[0] = min(times)
    return statistics.median(times)


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def cpu_mhz() -> float | None:
    try:
        vals = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
        return max(vals) if vals else None
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--paths", default=None, help="comma-separated engine paths (default: all native)")
    ap.add_argument("--numpy", action="store_true", help="also time the numpy reference (slow)")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = args.paths.split(",") if args.paths else [p for p in kn.available_paths() if p != "numpy"]
    if args.numpy and "numpy" not in paths:
        paths.append("numpy")
    nat = kn._native
    clock = nat._probe_clock_ghz(3_000_000) if nat is not None else 0.0
    clock = max(clock, nat._probe_clock_ghz(3_000_000)) if nat is not None else 0.0
    peak1 = nat._probe_popcnt_peak(3_000_000) if nat is not None else 0.0
    limit_ops = args.threads * clock * 1e9 * 512 * 2  # binary ops / s
    peak_ops = args.threads * peak1 * 2
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_"))}
    info = {
        "cpu": cpu_name(),
        "cpuinfo_mhz": cpu_mhz(),
        "clock_ghz_measured": round(clock, 3),
        "popcnt_peak_bitpairs_per_cycle": round(peak1 / (clock * 1e9), 1) if clock else None,
        "threads": args.threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas_env": env,
        "paths": paths,
        "limit_tops": round(limit_ops / 1e12, 3),
        "peak_tops": round(peak_ops / 1e12, 3),
        "loadavg_start": load_average(),
    }
    print(f"# cpu: {info['cpu']}  cpuinfo MHz: {info['cpuinfo_mhz']}  measured clock: {clock:.2f} GHz")
    print(f"# threads: {args.threads}  torch {torch.__version__} (threads {torch.get_num_threads()})  "
          f"BLAS/OMP env: {env or 'none set'}")
    print(f"# limit (1 VPOPCNTQ+XOR / core / cycle): {limit_ops / 1e12:.2f} TOPS;  "
          f"measured in-register peak: {peak_ops / 1e12:.2f} TOPS "
          f"({info['popcnt_peak_bitpairs_per_cycle']} bit pairs / cycle / core)")

    rows = []

    def record(case, mode, path, t_eng, t_torch, ops, best_eng, best_torch):
        r = {
            "case": case, "mode": mode, "path": path, "engine_ms": t_eng * 1e3, "torch_ms": t_torch * 1e3,
            "engine_best_ms": best_eng * 1e3, "torch_best_ms": best_torch * 1e3,
            "speedup_best": best_torch / best_eng,
            "speedup": t_torch / t_eng, "gops": ops / t_eng / 1e9,
            "pct_limit": 100 * ops / t_eng / limit_ops if limit_ops else None,
            "pct_peak": 100 * ops / t_eng / peak_ops if peak_ops else None,
        }
        rows.append(r)
        pl = f"{r['pct_limit']:6.1f}" if r["pct_limit"] is not None else "   n/a"
        pp = f"{r['pct_peak']:6.1f}" if r["pct_peak"] is not None else "   n/a"
        print(f"{case:<28} {mode:<10} {path:<9} {r['engine_ms']:10.4f} {r['torch_ms']:10.3f} "
              f"{r['speedup']:8.1f}x {r['gops']:9.0f} {pl}% {pp}%   {r['speedup_best']:8.1f}x", flush=True)

    print(f"\n{'case':<28} {'mode':<10} {'path':<9} {'engine ms':>10} {'torch ms':>10} {'speedup':>9} "
          f"{'GOPS':>9} {'%limit':>7} {'%peak':>7}   {'best/best':>9}")

    # ---------------------------------------------------------------- GEMM
    gemm_cases = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096),
                  (1, 784, 4096), (64, 784, 4096)]
    if args.quick:
        gemm_cases = [(1, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096)]
    weights = {}
    for M, K, N in gemm_cases:
        if (K, N) not in weights:
            wf = torch.randn(N, K)
            weights[(K, N)] = (wf, kn.pack_signs(wf.numpy()))
        wf, wbits = weights[(K, N)]
        xf = torch.randn(M, K)
        with torch.inference_mode():
            t_torch = median_time(lambda: F.linear(xf, wf), args.reps, args.warmup, min_time=0.3)
        b_torch = BEST[0]
        a = kn.pack_signs(xf.numpy())
        bm = kn.BinaryMatrix(wbits, K)
        scale = np.ones(N, np.int8)
        thresh = np.zeros(N, np.int32)
        ops = 2.0 * M * N * K
        case = f"gemm M={M} K={K} N={N}"
        for p in paths:
            kn.set_path(p)
            reps = args.reps if p != "numpy" else 3
            t = median_time(lambda: bm.gemm(a, threads=args.threads), reps, args.warmup, min_time=0.2)
            record(case, "int32", p, t, t_torch, ops, BEST[0], b_torch)
            t = median_time(lambda: bm.gemm_threshold(a, scale, thresh, threads=args.threads), reps,
                            args.warmup, min_time=0.2)
            record(case, "threshold", p, t, t_torch, ops, BEST[0], b_torch)

    # ---------------------------------------------------------------- conv
    C = O = 256
    H = W = 16
    conv_batches = [1, 64]
    wconv = torch.randn(O, C, 3, 3)
    wbits = kn.pack_signs(np.ascontiguousarray(wconv.permute(0, 2, 3, 1).numpy()))
    conv = kn.BinaryConv2d(wbits, C, 3, 3, stride=1, padding=1, pad_value=0)
    for B in conv_batches:
        xf = torch.randn(B, C, H, W)
        with torch.inference_mode():
            t_torch = median_time(lambda: F.conv2d(xf, wconv, padding=1), args.reps, args.warmup, min_time=0.3)
        b_torch = BEST[0]
        xb = kn.pack_signs(np.ascontiguousarray(xf.permute(0, 2, 3, 1).numpy()))
        scale = np.ones(O, np.int8)
        thresh = np.zeros(O, np.int32)
        ops = 2.0 * B * H * W * O * 9 * C
        case = f"conv B={B} 256->256 3x3 16x16"
        for p in paths:
            if p == "numpy" and B > 1:
                continue
            kn.set_path(p)
            reps = args.reps if p != "numpy" else 3
            t = median_time(lambda: conv.conv(xb, threads=args.threads), reps, args.warmup, min_time=0.2)
            record(case, "int32", p, t, t_torch, ops, BEST[0], b_torch)
            t = median_time(lambda: conv.conv_threshold(xb, scale, thresh, threads=args.threads), reps,
                            args.warmup, min_time=0.2)
            record(case, "threshold", p, t, t_torch, ops, BEST[0], b_torch)

    info["loadavg_end"] = load_average()
    print(f"\n# load average at start: {info['loadavg_start']}, at end: {info['loadavg_end']} "
          f"(other processes on the machine inflate the medians; 'best/best' is the ratio of minima)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
