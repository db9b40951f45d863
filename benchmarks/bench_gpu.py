#!/usr/bin/env python
"""Time the Triton binary GEMM of onebit.gpu against cuBLAS (torch.matmul fp16 / fp32) on one GPU.

    python benchmarks/bench_gpu.py [--json bench_gpu.json] [--sweep] [--m 1 64 1024] [--k 4096] [--n 4096]

Needs a CUDA GPU and triton; without either it prints one line and exits with status 2.

Cases: M ∈ {1, 64, 1024}, K = N = 4096 (``--m/--k/--n`` change them). Per case:

* ``fp32`` / ``fp16``: ``x @ w.T`` with x [M, K], w [N, K] in that dtype (cuBLAS; fp32 runs
  with TF32 off unless torch's ``allow_tf32`` says otherwise, printed in the header).
* ``bin64`` / ``bin32``: ``binary_matmul_triton`` on int64 / int32 words with the hardware
  popcount (libdevice popc), default tiles (``onebit.gpu.default_block``); ``swar64``: int64
  words, shift-and-add popcount. ``pack``: ``pack_signs_torch`` of the float32 activations
  [M, K] (a binary layer's input packing, not included in the bin columns).
* Times are ``triton.testing.do_bench`` medians in microseconds (the L2 cache is flushed
  before each run, so weights are read from HBM: 32 MiB fp16, 2 MiB packed for 4096×4096).
  ``x fp16`` = fp16 time / bin64 time. binary TOPS = 2·M·N·K / bin64 time (one XNOR and one
  popcount-add per bit pair).
* Every binary result is checked against the fp32 product of the ±1 matrices (exact: |dot| ≤ K).

``--sweep`` also times every tile (BM, BN, BK) × num_warps of a small grid for bin64 and prints
the fastest per M: the data for tuning ``default_block``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from onebit import gpu  # noqa: E402
from onebit.files import atomic_write  # noqa: E402

SWEEP_BLOCKS = [(bm, bn, bk) for bm in (1, 16, 32, 64, 128) for bn in (32, 64, 128) for bk in (1, 2, 4, 8)]
SWEEP_WARPS = (4, 8)
MAX_TILE = 8192  # BM·BN·BK words per program; larger tiles spill registers on sm_90


def bench_us(fn) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(a_bits: torch.Tensor, w_bits: torch.Tensor, k: int) -> tuple[float, tuple[int, int, int], int]:
    """(time µs, block, num_warps) of the fastest tile for these operands."""
    best = (float("inf"), (0, 0, 0), 0)
    m = a_bits.shape[0]
    for block in SWEEP_BLOCKS:
        bm, bn, bk = block
        if bm > max(1, 2 * m) or bm * bn * bk > MAX_TILE or bk > a_bits.shape[1]:
            continue
        for warps in SWEEP_WARPS:
            t = bench_us(lambda: gpu.binary_matmul_triton(a_bits, w_bits, k, block=block, num_warps=warps))
            best = min(best, (t, block, warps))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench_gpu.json"), help="where to write the results")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="also search tiles for the int64 kernel")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to torch; nothing to benchmark", file=sys.stderr)
        return 2
    if not gpu.triton_available():
        print("bench_gpu: triton is not installed (pip install triton); nothing to benchmark", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print(f"{info['gpu']} (sm_{props.major}{props.minor}, {info['sms']} SMs), torch {info['torch']}, "
          f"CUDA {info['cuda']}, triton {info['triton']}, fp32 allow_tf32={info['allow_tf32']}")
    print("times in µs (do_bench median, L2 flushed); K =", args.k, "N =", args.n)
    print(f"{'M':>5} {'fp32':>9} {'fp16':>9} {'bin64':>9} {'bin32':>9} {'swar64':>9} {'pack':>8} "
          f"{'x fp16':>7} {'TOPS':>7}")
    gen = torch.Generator(device=dev).manual_seed(0)
    w32 = torch.randn(args.n, args.k, device=dev, generator=gen)
    w16 = w32.half()
    w_pm1 = torch.where(w32 < 0, -1.0, 1.0)
    w_bits = {dt: gpu.pack_signs_torch(w32, dtype=dt) for dt in (torch.int64, torch.int32)}
    rows = []
    for m in args.m:
        x32 = torch.randn(m, args.k, device=dev, generator=gen)
        x16 = x32.half()
        a_bits = {dt: gpu.pack_signs_torch(x32, dtype=dt) for dt in (torch.int64, torch.int32)}
        exact = (torch.where(x32 < 0, -1.0, 1.0) @ w_pm1.T).to(torch.int32)
        for dt in (torch.int64, torch.int32):
            for popcount in ("hw", "swar"):
                got = gpu.binary_matmul_triton(a_bits[dt], w_bits[dt], args.k, popcount=popcount)
                if not torch.equal(got, exact):
                    print(f"bench_gpu: wrong binary GEMM result for M={m}, {dt}, popcount={popcount}", file=sys.stderr)
                    return 1
        row = {
            "M": m, "K": args.k, "N": args.n,
            "fp32_us": bench_us(lambda: x32 @ w32.T),
            "fp16_us": bench_us(lambda: x16 @ w16.T),
            "bin64_us": bench_us(lambda: gpu.binary_matmul_triton(a_bits[torch.int64], w_bits[torch.int64], args.k)),
            "bin32_us": bench_us(lambda: gpu.binary_matmul_triton(a_bits[torch.int32], w_bits[torch.int32], args.k)),
            "swar64_us": bench_us(lambda: gpu.binary_matmul_triton(a_bits[torch.int64], w_bits[torch.int64], args.k,
                                                                   popcount="swar")),
            "pack_us": bench_us(lambda: gpu.pack_signs_torch(x32)),
            "block": list(gpu.default_block(m, args.n, a_bits[torch.int64].shape[1])),
        }
        row["speedup_vs_fp16"] = row["fp16_us"] / row["bin64_us"]
        row["binary_tops"] = 2 * m * args.n * args.k / (row["bin64_us"] * 1e-6) / 1e12
        if args.sweep:
            t, block, warps = sweep(a_bits[torch.int64], w_bits[torch.int64], args.k)
            row["sweep_best"] = {"us": t, "block": list(block), "num_warps": warps}
        rows.append(row)
        print(f"{m:>5} {row['fp32_us']:>9.1f} {row['fp16_us']:>9.1f} {row['bin64_us']:>9.1f} {row['bin32_us']:>9.1f} "
              f"{row['swar64_us']:>9.1f} {row['pack_us']:>8.1f} {row['speedup_vs_fp16']:>7.2f} "
              f"{row['binary_tops']:>7.1f}")
    if args.sweep:
        print("\nfastest int64 tile per M (default tile in parentheses):")
        for row in rows:
            best = row["sweep_best"]
            print(f"  M={row['M']:<5} {best['us']:9.1f} µs  block={tuple(best['block'])} num_warps={best['num_warps']}"
                  f"  (default {tuple(row['block'])}: {row['bin64_us']:.1f} µs)")
    with atomic_write(args.json, "w") as f:
        json.dump({"info": info, "results": rows}, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
