"""Time the engine's float × binary GEMM against PyTorch's float32 matmul, in the same run.

    python benchmarks/float_gemm_binary.py --threads 1 --paths avx2 --json float_gemm_binary.json

``float_gemm_binary`` (float32 inputs × ±1 weights) is what every convolution of a 1-bit-weight
WRN runs after im2col, and the first layer of a binary network whose input is off the pixel
grid. The shapes below are the im2col GEMMs of WRN-20-4 on 28×28 inputs at batch 16 (rows =
16 · H · W, K = 9 · input channels, N = output channels) and a batch-16 4096 × 4096 layer.
Both sides multiply the same matrices; the engine's result must match torch's within float32
rounding (checked). GMAC/s = M · K · N / seconds (one multiply-add per weight and input).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from onebit.bench import median_time
from onebit.engine import kernels

SHAPES = [  # (label, M, K, N)
    ("WRN-20-4 stage 1 conv, 64 -> 64", 16 * 28 * 28, 9 * 64, 64),
    ("WRN-20-4 stage 2 conv, 128 -> 128", 16 * 14 * 14, 9 * 128, 128),
    ("WRN-20-4 stage 3 conv, 256 -> 256", 16 * 7 * 7, 9 * 256, 256),
    ("dense 4096 -> 4096, batch 16", 16, 4096, 4096),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and of the engine (default 1)")
    native = [path for path in kernels.available_paths() if path != "numpy"]
    parser.add_argument("--paths", default=",".join(native),
                        help=f"comma-separated kernel paths (default: {','.join(native)}, this CPU's native ones)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'shape':36} {'path':9} {'engine ms':>10} {'torch ms':>9} {'GMAC/s':>7} {'speed-up':>8}")
    for label, M, K, N in SHAPES:
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = np.where(rng.random((N, K)) < 0.5, -1.0, 1.0).astype(np.float32)
        matrix = kernels.BinaryMatrix(kernels.pack_signs(w), K)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w).T.contiguous()
        torch_s = median_time(lambda: xt @ wt, args.repeats, warmup=2).median_ms / 1e3
        want = (xt @ wt).numpy()
        for path in args.paths.split(","):
            kernels.set_path(path)
            got = kernels.float_gemm_binary(x, matrix, args.threads)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.sqrt(K))
            engine_s = median_time(lambda: kernels.float_gemm_binary(x, matrix, args.threads), args.repeats,
                                   warmup=2).median_ms / 1e3
            gmacs = M * K * N / engine_s / 1e9
            rows.append({"shape": label, "M": M, "K": K, "N": N, "path": path, "threads": args.threads,
                         "engine_ms": engine_s * 1e3, "torch_ms": torch_s * 1e3, "engine_gmacs": gmacs,
                         "speedup": torch_s / engine_s})
            print(f"{label:36} {path:9} {engine_s * 1e3:10.2f} {torch_s * 1e3:9.2f} {gmacs:7.1f} "
                  f"{torch_s / engine_s:7.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
