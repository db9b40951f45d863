"""onebit.engine.kernels: every kernel path against the numpy reference and a direct ±1 integer computation."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from onebit.engine import kernels as kn
from onebit.errors import ShapeError, UnknownNameError

ALL_PATHS = ["avx512", "avx2", "portable", "numpy"]
KS = [1, 63, 64, 65, 127, 200, 784]
NS = [1, 5, 63, 65, 130]


@pytest.fixture(params=ALL_PATHS)
def path(request, restore_kernel_path):
    name = request.param
    if name not in kn.available_paths():
        pytest.skip(f"kernel path {name} not available on this machine")
    kn.set_path(name)
    return name


def ref(fn, *args, **kwargs):
    """Run fn on the numpy reference path."""
    before = kn.current_path()
    kn.set_path("numpy")
    try:
        return fn(*args, **kwargs)
    finally:
        kn.set_path(before)


# ---------------------------------------------------------------------------- helpers
def words(k: int) -> int:
    return -(-k // 64)


def pack_pm1(v: np.ndarray) -> np.ndarray:
    """±1 array [..., K] → uint64[..., KW] (bit 1 for −1), independent of the module."""
    K = v.shape[-1]
    bits = np.zeros(v.shape[:-1] + (words(K) * 64,), dtype=np.uint64)
    bits[..., :K] = v < 0
    shifts = np.arange(64, dtype=np.uint64)
    return (bits.reshape(v.shape[:-1] + (words(K), 64)) << shifts).sum(axis=-1, dtype=np.uint64)


def rand_pm1(rng, shape) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int64), size=shape)


def junk_pad(bits: np.ndarray, K: int, rng) -> np.ndarray:
    """Set random bits in the padding beyond K (the kernels must ignore them)."""
    out = bits.copy()
    if K % 64:
        junk = rng.integers(0, 2**63, size=out.shape[:-1], dtype=np.uint64) << np.uint64(K % 64)
        out[..., -1] |= junk
    return out


def bits_to_bool(bits: np.ndarray, n: int) -> np.ndarray:
    shifts = np.arange(64, dtype=np.uint64)
    b = (bits[..., :, None] >> shifts) & np.uint64(1)
    return b.reshape(bits.shape[:-1] + (-1,))[..., :n].astype(bool)


def conv_direct(xpm, wpm, stride, pad, pad_value):
    """int64 conv of ±1 NHWC input with ±1 OHWI weights, padding with pad_value."""
    B, H, W, C = xpm.shape
    O, kh, kw, _ = wpm.shape
    (sh, sw), (ph, pw) = stride, pad
    xp = np.full((B, H + 2 * ph, W + 2 * pw, C), pad_value, dtype=np.int64)
    xp[:, ph : ph + H, pw : pw + W] = xpm
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out = np.zeros((B, Ho, Wo, O), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky : ky + sh * (Ho - 1) + 1 : sh, kx : kx + sw * (Wo - 1) + 1 : sw, :]
            out += patch @ wpm[:, ky, kx, :].T
    return out


# ---------------------------------------------------------------------------- paths
def test_paths_listed():
    paths = kn.available_paths()
    assert paths[-1] == "numpy"
    assert kn.current_path() in paths
    if kn.native_available():
        assert "portable" in paths
    with pytest.raises(UnknownNameError, match="not available"):
        kn.set_path("sse9")


@pytest.mark.parametrize("env,expected", [("numpy", "numpy"), ("portable", "portable")])
def test_env_var_selects_path(env, expected):
    if expected not in kn.available_paths():
        pytest.skip("path not available")
    src = str(Path(kn.__file__).resolve().parents[2])
    code = "from onebit.engine import kernels as k; print(k.current_path())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEBIT_KERNEL": env, "PYTHONPATH": src})
    assert res.stdout.strip() == expected


def test_env_var_unknown_warns():
    src = str(Path(kn.__file__).resolve().parents[2])
    code = ("import warnings; warnings.simplefilter('error')\n"
            "try:\n from onebit.engine import kernels\nexcept RuntimeWarning as e: print('warned', e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEBIT_KERNEL": "bogus", "PYTHONPATH": src})
    assert "warned" in res.stdout


# ---------------------------------------------------------------------------- packing
def test_pack_signs(path):
    rng = np.random.default_rng(1)
    for K in KS:
        x = rng.standard_normal((3, K)).astype(np.float32)
        x[0, : min(K, 4)] = [-0.0, 0.0, np.nan, -np.inf][: min(K, 4)]
        got = kn.pack_signs(x)
        assert got.dtype == np.uint64 and got.shape == (3, words(K))
        expect = pack_pm1(np.where(x < 0, -1, 1))
        np.testing.assert_array_equal(got, expect)
        np.testing.assert_array_equal(kn.unpack_signs(got, K), np.where(x < 0, -1.0, 1.0).astype(np.float32))
    x3 = rng.standard_normal((2, 3, 70)).astype(np.float32)
    np.testing.assert_array_equal(kn.pack_signs(x3), pack_pm1(np.where(x3 < 0, -1, 1)))
    nc = rng.standard_normal((100, 8)).astype(np.float32).T  # non-contiguous
    np.testing.assert_array_equal(kn.pack_signs(nc), pack_pm1(np.where(nc < 0, -1, 1)))


# ---------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("M", [1, 3, 64])
def test_gemm_exact(path, M):
    rng = np.random.default_rng(M)
    for K in KS:
        for N in NS:
            x, w = rand_pm1(rng, (M, K)), rand_pm1(rng, (N, K))
            a = junk_pad(pack_pm1(x), K, rng)
            bm = kn.BinaryMatrix(junk_pad(pack_pm1(w), K, rng), K)
            got = bm.gemm(a)
            assert got.dtype == np.int32 and got.shape == (M, N)
            np.testing.assert_array_equal(got, x @ w.T, err_msg=f"K={K} N={N}")
            np.testing.assert_array_equal(got, ref(bm.gemm, a), err_msg=f"K={K} N={N}")


@pytest.mark.parametrize("M", [1, 3, 64])
def test_gemm_threshold(path, M):
    rng = np.random.default_rng(10 + M)
    for K in KS:
        for N in NS:
            x, w = rand_pm1(rng, (M, K)), rand_pm1(rng, (N, K))
            dot = x @ w.T
            scale = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=N)
            # thresholds exactly at a reachable value (ties), just above and just below
            pick = dot[rng.integers(0, M, size=N), np.arange(N)] * scale
            thresh = (pick + rng.integers(-1, 2, size=N)).astype(np.int32)
            thresh[scale == 0] = rng.choice([-1, 0, 1], size=int((scale == 0).sum()))
            bm = kn.BinaryMatrix(pack_pm1(w), K)
            a = pack_pm1(x)
            got = bm.gemm_threshold(a, scale, thresh)
            assert got.dtype == np.uint64 and got.shape == (M, words(N))
            expect_neg = scale.astype(np.int64) * dot < thresh  # bit 1 (−1) iff s·dot < t
            np.testing.assert_array_equal(bits_to_bool(got, words(N) * 64)[:, N:], False)
            np.testing.assert_array_equal(bits_to_bool(got, N), expect_neg, err_msg=f"K={K} N={N}")
            np.testing.assert_array_equal(got, ref(bm.gemm_threshold, a, scale, thresh))
            np.testing.assert_array_equal(bm.gemm_threshold(a, scale.astype(np.int32), thresh), got)


def test_threshold_scale_zero_is_constant(path):
    rng = np.random.default_rng(5)
    K, N = 100, 3
    bm = kn.BinaryMatrix(pack_pm1(rand_pm1(rng, (N, K))), K)
    a = pack_pm1(rand_pm1(rng, (4, K)))
    got = bm.gemm_threshold(a, np.zeros(N, np.int8), np.array([-5, 0, 1], np.int32))
    np.testing.assert_array_equal(bits_to_bool(got, N), np.tile([False, False, True], (4, 1)))
    # extreme thresholds with every scale (1 − t overflows int32 for t = min and min + 1)
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    bm9 = kn.BinaryMatrix(pack_pm1(rand_pm1(rng, (9, K))), K)
    scale = np.array([1, 1, 1, -1, -1, -1, 0, 0, 0], np.int8)
    thresh = np.array([lo, lo + 1, hi] * 3, np.int32)
    got = bm9.gemm_threshold(a, scale, thresh)
    expect = [False, False, True, False, False, True, False, False, True]  # −1 iff s·dot < t
    np.testing.assert_array_equal(bits_to_bool(got, 9), np.tile(expect, (4, 1)))
    conv = kn.BinaryConv2d(pack_pm1(rand_pm1(rng, (9, 1, 1, K))), K, 1, 1)
    got = conv.conv_threshold(a.reshape(4, 1, 1, -1), scale, thresh)
    np.testing.assert_array_equal(bits_to_bool(got.reshape(4, -1), 9), np.tile(expect, (4, 1)))


@pytest.mark.parametrize("M", [1, 3, 64])
def test_gemm_affine(path, M):
    rng = np.random.default_rng(20 + M)
    for K in (1, 65, 784):
        for N in NS:
            x, w = rand_pm1(rng, (M, K)), rand_pm1(rng, (N, K))
            mul = rng.standard_normal(N).astype(np.float32)
            add = rng.standard_normal(N).astype(np.float32)
            bm = kn.BinaryMatrix(pack_pm1(w), K)
            got = bm.gemm_affine(pack_pm1(x), mul, add)
            assert got.dtype == np.float32 and got.shape == (M, N)
            expect = (x @ w.T).astype(np.float32) * mul + add
            np.testing.assert_array_equal(got, expect)  # bit-identical: no FMA anywhere


def test_gemm_large_blocks(path):
    """Row blocks, several 64-column groups, both task orders, threads=1 vs all."""
    rng = np.random.default_rng(7)
    for M, K, N in ((200, 300, 70), (7, 129, 300)):
        x, w = rand_pm1(rng, (M, K)), rand_pm1(rng, (N, K))
        bm = kn.BinaryMatrix(pack_pm1(w), K)
        a = pack_pm1(x)
        np.testing.assert_array_equal(bm.gemm(a), x @ w.T)
        np.testing.assert_array_equal(bm.gemm(a, threads=1), bm.gemm(a, threads=0))
    assert bm.gemm(np.zeros((0, words(129)), np.uint64)).shape == (0, 300)


def test_matrix_roundtrip_and_noncontiguous(path):
    rng = np.random.default_rng(8)
    K, N = 130, 9
    wb = pack_pm1(rand_pm1(rng, (N, K)))
    bm = kn.BinaryMatrix(junk_pad(wb, K, rng), K)
    np.testing.assert_array_equal(bm.to_bits(), wb)
    assert (bm.N, bm.K, bm.KW) == (N, K, 3)
    big = pack_pm1(rand_pm1(rng, (6, K)))
    nc = np.asfortranarray(big)
    np.testing.assert_array_equal(bm.gemm(nc), bm.gemm(big))


# ---------------------------------------------------------------------------- first layer
@pytest.mark.parametrize("M", [1, 2, 3, 7, 37, 64])  # 1 row: bit planes; more: int8 multiply-adds
def test_bitplane_gemm(path, M):
    rng = np.random.default_rng(30 + M)
    for K in (1, 27, 63, 65, 784):
        for N in (1, 65, 130):
            x = rng.integers(0, 256, size=(M, K), dtype=np.uint8)
            x[0, 0] = 255
            w = rand_pm1(rng, (N, K))
            bm = kn.BinaryMatrix(pack_pm1(w), K)
            got = kn.bitplane_gemm(x, bm)
            assert got.dtype == np.int32 and got.shape == (M, N)
            np.testing.assert_array_equal(got, x.astype(np.int64) @ w.T)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 10, 64])  # every row remainder of the 6-row AVX2 block
def test_float_gemm_binary(path, M):
    rng = np.random.default_rng(40 + M)
    for K, Ns in ((1, (1, 5, 65)), (63, (1, 5, 65)), (65, (1, 5, 65)), (200, (1, 5, 24, 65)),
                  (4161, (9,))):  # 4161: kernels that cut K into chunks of 4096 carry across
        for N in Ns:
            x = rng.standard_normal((M, K)).astype(np.float32)
            w = rand_pm1(rng, (N, K))
            bm = kn.BinaryMatrix(pack_pm1(w), K)
            got = kn.float_gemm_binary(x, bm)
            assert got.dtype == np.float32 and got.shape == (M, N)
            np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)
            # the documented order: one float32 accumulator, k = 0 .. K-1
            acc = np.zeros((M, N), np.float32)
            for k in range(K):
                acc += x[:, k : k + 1] * w[:, k].astype(np.float32)
            np.testing.assert_array_equal(got, acc)


# ---------------------------------------------------------------------------- conv
CONV_CASES = [
    # B, H, W, C, O, k, stride, padding
    (1, 5, 7, 3, 5, 3, 1, 1),
    (3, 7, 5, 65, 70, 3, 2, 1),
    (2, 6, 6, 128, 1, 3, 2, 0),
    (1, 9, 4, 64, 65, 2, 1, 0),
    (2, 4, 5, 3, 8, 1, 1, 1),
    (2, 16, 17, 20, 7, 3, 1, 1),  # enough rows for the fused per-block im2col
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("pad_value", [1, -1, 0])
def test_conv(path, case, pad_value):
    B, H, W, C, O, k, s, p = case
    rng = np.random.default_rng(hash((case, pad_value)) % 2**32)
    xpm, wpm = rand_pm1(rng, (B, H, W, C)), rand_pm1(rng, (O, k, k, C))
    xb = junk_pad(pack_pm1(xpm), C, rng)
    conv = kn.BinaryConv2d(junk_pad(pack_pm1(wpm), C, rng), C, k, k, stride=s, padding=p, pad_value=pad_value)
    expect = conv_direct(xpm, wpm, (s, s), (p, p), pad_value)
    got = conv.conv(xb)
    assert got.dtype == np.int32 and got.shape == expect.shape
    assert conv.output_size(H, W) == expect.shape[1:3]
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(got, ref(conv.conv, xb))

    scale = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=O)
    thresh = (expect[0, 0, 0] * scale + rng.integers(-1, 2, size=O)).astype(np.int32)
    tb = conv.conv_threshold(xb, scale, thresh)
    assert tb.dtype == np.uint64 and tb.shape == expect.shape[:3] + (words(O),)
    np.testing.assert_array_equal(bits_to_bool(tb, O), scale.astype(np.int64) * expect < thresh)
    np.testing.assert_array_equal(tb, ref(conv.conv_threshold, xb, scale, thresh))

    mul = rng.standard_normal(O).astype(np.float32)
    add = rng.standard_normal(O).astype(np.float32)
    np.testing.assert_array_equal(conv.conv_affine(xb, mul, add), expect.astype(np.float32) * mul + add)


def test_conv_rect_kernel_and_stride(path):
    rng = np.random.default_rng(50)
    xpm, wpm = rand_pm1(rng, (2, 7, 9, 10)), rand_pm1(rng, (4, 2, 3, 10))
    conv = kn.BinaryConv2d(pack_pm1(wpm), 10, 2, 3, stride=(2, 1), padding=(1, 2), pad_value=0)
    np.testing.assert_array_equal(conv.conv(pack_pm1(xpm)), conv_direct(xpm, wpm, (2, 1), (1, 2), 0))
    np.testing.assert_array_equal(conv.to_bits(), pack_pm1(wpm))


# ---------------------------------------------------------------------------- maxpool
@pytest.mark.parametrize("shape,kernel,stride", [
    ((2, 7, 5, 3), 2, None), ((1, 9, 9, 65), 3, 2), ((3, 4, 7, 128), (2, 3), (1, 2)), ((1, 1, 1, 5), 1, 1),
])
def test_maxpool_bits(path, shape, kernel, stride):
    rng = np.random.default_rng(60)
    xpm = rand_pm1(rng, shape)
    xb = pack_pm1(xpm)
    got = kn.maxpool_bits(xb, kernel, stride)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (kh, kw) if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    B, H, W, C = shape
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    expect = np.full((B, Ho, Wo, C), -1, dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            expect = np.maximum(expect, xpm[:, ky : ky + sh * (Ho - 1) + 1 : sh, kx : kx + sw * (Wo - 1) + 1 : sw])
    np.testing.assert_array_equal(got, pack_pm1(expect))


def test_bitplane_gemm_extreme_sums(path):
    """Every pixel 255 against rows of all +1, all −1 and alternating signs: the largest sums
    (±255·K) come out exact, whatever the kernel accumulates in (int16 partial sums included)."""
    for M in (1, 9):
        for K in (4, 257, 5000):
            w = np.stack([np.ones(K), -np.ones(K), np.where(np.arange(K) % 2, -1.0, 1.0)])
            bm = kn.BinaryMatrix(pack_pm1(w), K)
            got = kn.bitplane_gemm(np.full((M, K), 255, np.uint8), bm)
            np.testing.assert_array_equal(got, np.tile([255 * K, -255 * K, 255 * (K % 2)], (M, 1)))


@pytest.mark.parametrize("M, P", [(1, 1), (6, 1), (6, 3), (64, 16)])
def test_outside_bits_equal_the_sums_compared(path, M, P):
    """bitplane_gemm_outside: bit n of row m is 1 iff the sum bitplane_gemm returns lies
    outside [lo[m % P, n], hi[m % P, n]], bounds on and around the sums."""
    rng = np.random.default_rng(90 + M + P)
    for K, N in ((27, 5), (200, 65), (784, 130)):
        w = rand_pm1(rng, (N, K))
        bm = kn.BinaryMatrix(pack_pm1(w), K)
        x = rng.integers(0, 256, size=(M, K), dtype=np.uint8)
        sums = kn.bitplane_gemm(x, bm)
        some = sums[rng.integers(0, M, size=(P, N)), np.arange(N)]  # sums of other rows
        lo = (some + rng.integers(-1, 2, size=(P, N))).astype(np.int32)
        hi = (lo + rng.integers(0, 3000, size=(P, N))).astype(np.int32)
        rows = np.arange(M) % P
        got = kn.bitplane_gemm_outside(x, bm, lo, hi)
        assert got.dtype == np.uint64 and got.shape == (M, words(N))
        np.testing.assert_array_equal(got, pack_pm1(np.where((sums < lo[rows]) | (sums > hi[rows]), -1, 1)))


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise_shape_error(path):
    rng = np.random.default_rng(70)
    K, N = 100, 5
    bm = kn.BinaryMatrix(pack_pm1(rand_pm1(rng, (N, K))), K)
    a = pack_pm1(rand_pm1(rng, (2, K)))
    s, t = np.ones(N, np.int8), np.zeros(N, np.int32)
    f = np.ones(N, np.float32)
    bad = [
        lambda: kn.BinaryMatrix(np.zeros((N, 3), np.uint64), K),  # KW mismatch
        lambda: kn.BinaryMatrix(np.zeros((N, 2), np.int64), K),  # dtype
        lambda: kn.BinaryMatrix(np.zeros(2, np.uint64), K),  # rank
        lambda: bm.gemm(a.astype(np.int64)),
        lambda: bm.gemm(a[:, :1]),
        lambda: bm.gemm(a[0]),
        lambda: bm.gemm(a.tolist()),
        lambda: bm.gemm(a, threads=-1),
        lambda: bm.gemm_threshold(a, s[:-1], t),
        lambda: bm.gemm_threshold(a, s * 2, t),
        lambda: bm.gemm_threshold(a, s.astype(np.float32), t),
        lambda: bm.gemm_threshold(a, s, t.astype(np.int64)),
        lambda: bm.gemm_affine(a, f, f[:-1]),
        lambda: bm.gemm_affine(a, f.astype(np.float64), f),
        lambda: kn.bitplane_gemm(np.zeros((2, K), np.int8), bm),
        lambda: kn.bitplane_gemm(np.zeros((2, K + 1), np.uint8), bm),
        lambda: kn.float_gemm_binary(np.zeros((2, K), np.float64), bm),
        lambda: kn.float_gemm_binary(np.zeros((2, K - 1), np.float32), bm),
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K), np.uint8), bm, t[None], t[None].astype(np.float32)),
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K), np.uint8), bm, t[None], t[None, :-1]),
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K), np.uint8), bm, t, t),  # 1-D bounds
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K), np.uint8), bm, np.zeros((3, N), np.int32),
                                         np.zeros((3, N), np.int32)),  # P = 3 does not divide M = 2
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K + 1), np.uint8), bm, t[None], t[None]),
        lambda: kn.bitplane_gemm_outside(np.zeros((2, K), np.uint8), bm, np.zeros((0, N), np.int32),
                                         np.zeros((0, N), np.int32)),
        lambda: kn.pack_signs(np.zeros((2, K), np.float64)),
        lambda: kn.pack_signs(np.zeros((2, 0), np.float32)),
        lambda: kn.BinaryConv2d(np.zeros((4, 3, 3, 1), np.uint64), 65, 3, 3),  # CW mismatch
        lambda: kn.BinaryConv2d(np.zeros((4, 3, 3, 1), np.uint64), 3, 3, 3, pad_value=2),
        lambda: kn.BinaryConv2d(np.zeros((4, 3, 3, 1), np.uint64), 3, 3, 3, stride=0),
        lambda: kn.maxpool_bits(np.zeros((1, 2, 2, 1), np.uint64), 3),
        lambda: kn.maxpool_bits(np.zeros((2, 2, 1), np.uint64), 2),
        lambda: kn.unpack_signs(np.zeros((2, 2), np.uint64), 200),
    ]
    conv = kn.BinaryConv2d(np.zeros((4, 3, 3, 1), np.uint64), 3, 3, 3)
    bad += [
        lambda: conv.conv(np.zeros((1, 5, 5, 2), np.uint64)),  # C mismatch
        lambda: conv.conv(np.zeros((1, 2, 5, 1), np.uint64)),  # smaller than kernel
        lambda: conv.conv(np.zeros((5, 5, 1), np.uint64)),
        lambda: conv.conv_threshold(np.zeros((1, 5, 5, 1), np.uint64), np.ones(3, np.int8), np.zeros(4, np.int32)),
        lambda: conv.conv_affine(np.zeros((1, 5, 5, 1), np.uint64), np.ones(4, np.float32), np.ones(5, np.float32)),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ShapeError):
            call()
            pytest.fail(f"case {i} did not raise")


# ---------------------------------------------------------------------------- threads
def test_concurrent_calls_match_serial(path):
    if path == "numpy":
        pytest.skip("the numpy path has no native threads to race")
    rng = np.random.default_rng(80)
    K, N = 1000, 200
    bm = kn.BinaryMatrix(pack_pm1(rand_pm1(rng, (N, K))), K)
    conv = kn.BinaryConv2d(pack_pm1(rand_pm1(rng, (70, 3, 3, 65))), 65, 3, 3, padding=1, pad_value=0)
    scale, thresh = np.ones(70, np.int8), np.zeros(70, np.int32)
    inputs = [(pack_pm1(rand_pm1(rng, (40, K))), pack_pm1(rand_pm1(rng, (2, 9, 9, 65)))) for _ in range(8)]

    def work(item):
        a, x = item
        return bm.gemm(a), conv.conv_threshold(x, scale, thresh), kn.float_gemm_binary(
            kn.unpack_signs(a, K), bm)

    serial = [work(item) for item in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(work, inputs), serial):
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w)


def test_maxpool_bits_takes_numpy_integer_sizes(path):
    xb = pack_pm1(rand_pm1(np.random.default_rng(61), (1, 4, 4, 3)))
    expected = ref(kn.maxpool_bits, xb, 2, 2)
    np.testing.assert_array_equal(kn.maxpool_bits(xb, np.int64(2), (np.int32(2), 2)), expected)
    with pytest.raises(ShapeError, match="out of range"):
        kn.maxpool_bits(xb, 2**63)


def test_sizes_whose_int32_sums_could_overflow_are_refused(path):
    tiny = np.zeros((1, 1), np.uint64)
    with pytest.raises(ShapeError, match="limit of 2\\^30"):
        kn.BinaryMatrix(tiny, 2**30)
    with pytest.raises(ShapeError, match="limit of 2\\^30"):
        kn.BinaryConv2d(np.zeros((1, 3, 3, 1), np.uint64), 2**27, 3, 3)
    K = 8_421_505  # the smallest K with 255·K ≥ 2^31
    matrix = kn.BinaryMatrix(np.zeros((1, words(K)), np.uint64), K)
    with pytest.raises(ShapeError, match="255\\*K < 2\\^31"):
        kn.bitplane_gemm(np.full((1, K), 255, np.uint8), matrix)
