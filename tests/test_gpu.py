"""onebit.gpu: packing, the pure-torch fallback and the custom op against the numpy engine,
the Triton kernel in Triton's interpreter (subprocess), conv and the packed inference modules;
``@pytest.mark.gpu`` tests run the compiled kernel on CUDA and skip without one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit import gpu
from onebit.engine import kernels as kn
from onebit.errors import ConfigError, ShapeError
from onebit.gpu import (
    BinaryInferenceConv2d,
    BinaryInferenceLinear,
    binary_conv2d,
    binary_matmul,
    binary_matmul_torch,
    pack_signs_torch,
    to_binary_inference,
    unpack_signs_torch,
)
from onebit.layers import QuantConv2d, QuantLinear

KS = [1, 63, 64, 65, 784]
MS = [1, 3, 64]
WORDS = [torch.int32, torch.int64]
SRC = Path(__file__).resolve().parents[1] / "src"


def signs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """float ±1 with some exact zeros (sign(0) = +1)."""
    x = torch.randn(*shape, generator=gen)
    x[torch.rand(*shape, generator=gen) < 0.05] = 0.0
    return x


def engine_gemm(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """The numpy/native engine's ±1 GEMM of the signs of x [M, K] and w [N, K]."""
    k = x.shape[1]
    return kn.BinaryMatrix(kn.pack_signs(w.numpy()), k).gemm(kn.pack_signs(x.numpy()))


def junk_pad(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every padding bit past k in the last word (the ops must ignore them)."""
    word = gpu.WORD_BITS[bits.dtype]
    out = bits.clone()
    if k % word:
        out[:, -1] |= -1 << (k % word)
    return out


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", KS)
def test_pack_matches_engine_bits(k):
    gen = torch.Generator().manual_seed(k)
    x = signs(gen, 4, k)
    x[0, 0] = -0.0
    x[1, 0] = float("nan")
    got = pack_signs_torch(x)
    assert got.dtype == torch.int64 and got.shape == (4, -(-k // 64))
    np.testing.assert_array_equal(got.numpy().view(np.uint64), kn.pack_signs(x.numpy()))
    # int32 words hold the same bits: the low and high halves of each int64 word
    got32 = pack_signs_torch(x, dtype=torch.int32)
    assert got32.shape == (4, -(-k // 32))
    assert torch.equal(got.view(torch.int32)[:, : got32.shape[1]], got32)


@pytest.mark.parametrize("dtype", WORDS)
def test_pack_along_other_dim_and_unpack_roundtrip(dtype):
    gen = torch.Generator().manual_seed(1)
    x = signs(gen, 3, 70, 5)
    bits = pack_signs_torch(x, dim=1, dtype=dtype)
    word = gpu.WORD_BITS[dtype]
    assert bits.shape == (3, -(-70 // word), 5) and bits.is_contiguous()
    assert torch.equal(bits, pack_signs_torch(x.transpose(1, 2), dtype=dtype).transpose(1, 2))
    assert torch.equal(unpack_signs_torch(bits, 70, dim=1), torch.where(x < 0, -1.0, 1.0))
    assert torch.equal(pack_signs_torch(x < 0, dim=1, dtype=dtype), bits)  # bool: True is −1


def test_pack_errors():
    with pytest.raises(ShapeError, match="dtype"):
        pack_signs_torch(torch.randn(2, 3), dtype=torch.int16)
    with pytest.raises(ShapeError, match="float or bool"):
        pack_signs_torch(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ShapeError, match="non-empty axis"):
        pack_signs_torch(torch.randn(2, 0))
    with pytest.raises(ShapeError, match="words along axis"):
        unpack_signs_torch(torch.zeros(2, 3, dtype=torch.int64), 64)


# ---------------------------------------------------------------------------- fallback GEMM
@pytest.mark.parametrize("dtype", WORDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
def test_torch_gemm_bit_exact_vs_engine(k, m, dtype):
    gen = torch.Generator().manual_seed(1000 * k + m)
    x, w = signs(gen, m, k), signs(gen, 37, k)
    a_bits, w_bits = pack_signs_torch(x, dtype=dtype), pack_signs_torch(w, dtype=dtype)
    got = binary_matmul_torch(junk_pad(a_bits, k), junk_pad(w_bits, k), k)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), engine_gemm(x, w))


def test_torch_gemm_equals_float_matmul_of_signs():
    gen = torch.Generator().manual_seed(7)
    x, w = signs(gen, 130, 300), signs(gen, 20, 300)
    sx, sw = torch.where(x < 0, -1.0, 1.0), torch.where(w < 0, -1.0, 1.0)
    got = binary_matmul_torch(pack_signs_torch(x), pack_signs_torch(w), 300)
    assert torch.equal(got, (sx @ sw.T).to(torch.int32))


def test_op_on_cpu_runs_the_fallback():
    gen = torch.Generator().manual_seed(3)
    x, w = signs(gen, 5, 65), signs(gen, 9, 65)
    got = torch.ops.onebit.binary_matmul(pack_signs_torch(x), pack_signs_torch(w), 65)
    assert gpu.last_backend() == "torch"
    np.testing.assert_array_equal(got.numpy(), engine_gemm(x, w))


@pytest.mark.parametrize("dtype", WORDS)
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(4)
    a = pack_signs_torch(signs(gen, 5, 100), dtype=dtype)
    w = pack_signs_torch(signs(gen, 7, 100), dtype=dtype)
    torch.library.opcheck(torch.ops.onebit.binary_matmul.default, (a, w, 100))


def test_export_traces_through_the_fake_impl():
    gen = torch.Generator().manual_seed(5)
    layer = QuantLinear(100, 8, input_quantizer="sign", weight_quantizer="sign").eval()
    twin = BinaryInferenceLinear.from_quant(layer)
    x = torch.randn(4, 100, generator=gen)
    ep = torch.export.export(twin, (x,))
    assert torch.ops.onebit.binary_matmul.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(x), twin(x))
    compiled = torch.compile(twin, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), twin(x))


def test_gemm_errors():
    a = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ShapeError, match="2-D"):
        binary_matmul(a[0], a, 100)
    with pytest.raises(ShapeError, match="dtype torch.int32 or torch.int64"):
        binary_matmul(a.float(), a.float(), 100)
    with pytest.raises(ShapeError, match="same dtype"):
        binary_matmul(a, a.to(torch.int32), 100)
    with pytest.raises(ShapeError, match="needs 1 64-bit words"):
        binary_matmul(a, a, 64)
    with pytest.raises(ShapeError, match="k must be an int >= 1"):
        binary_matmul(a, a, 0)


# ---------------------------------------------------------------------------- Triton
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr):
        tl.store(out_ptr + tl.arange(0, 4), tl.arange(0, 4))

    try:
        out = torch.zeros(4, dtype=torch.int32)
        probe[(1,)](out)
        assert out.tolist() == [0, 1, 2, 3]
    except Exception as exc:  # an interpreter that cannot run a trivial kernel
        print("INTERPRETER UNUSABLE:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        raise SystemExit(0)

    from onebit import gpu
    from onebit.errors import ConfigError

    gen = torch.Generator().manual_seed(0)
    cases = 0
    for dtype in (torch.int64, torch.int32):
        word = gpu.WORD_BITS[dtype]
        for k in (1, 63, 64, 65, 784):
            for m in (1, 3, 64):
                blocks = [None] + ([(2, 16, 4)] if m == 3 else [])
                a = gpu.pack_signs_torch(torch.randn(m, k, generator=gen), dtype=dtype)
                w = gpu.pack_signs_torch(torch.randn(37, k, generator=gen), dtype=dtype)
                if k % word:  # junk padding bits must be ignored
                    a[:, -1] |= -1 << (k % word)
                ref = gpu.binary_matmul_torch(a, w, k)
                for block in blocks:
                    got = gpu.binary_matmul_triton(a, w, k, block=block)
                    assert gpu.last_backend() == "triton"
                    assert torch.equal(got, ref), (dtype, k, m, block)
                    cases += 1
    # strided operands (a column slice of a wider matrix)
    a = gpu.pack_signs_torch(torch.randn(5, 300, generator=gen))
    w = gpu.pack_signs_torch(torch.randn(9, 300, generator=gen))
    a, w = a[:, 1:4], w[:, 1:4]
    assert torch.equal(gpu.binary_matmul_triton(a, w, 192), gpu.binary_matmul_torch(a, w, 192))
    try:
        gpu.binary_matmul_triton(a, w, 192, popcount="hw")
        raise AssertionError("popcount='hw' ran in the interpreter")
    except ConfigError:
        pass
    print("OK", cases)
    """
)


def test_triton_kernel_in_interpreter():
    """The kernel's tiling, K loop, padding masks and SWAR popcount, run by Triton's interpreter."""
    if not gpu.triton_available():
        pytest.skip("triton is not installed: the Triton kernel is untested here (the fallback and packing are)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    if proc.stdout.startswith("INTERPRETER UNUSABLE"):
        pytest.skip(f"Triton's interpreter cannot run here: {proc.stdout.strip()}")
    assert proc.stdout.startswith("OK "), proc.stdout


def test_import_and_fallback_need_no_triton(monkeypatch):
    code = ("import sys, torch, onebit.gpu as g; b = g.pack_signs_torch(torch.randn(2, 5)); g.binary_matmul(b, b, 5); "
            "assert 'onebit._gpu_kernels' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    monkeypatch.setattr(gpu, "triton_available", lambda: False)
    a = pack_signs_torch(torch.randn(2, 10))
    with pytest.raises(ConfigError, match="triton is not installed"):
        gpu.binary_matmul_triton(a, a, 10)


def test_triton_needs_cuda_or_interpreter():
    if not gpu.triton_available():
        pytest.skip("triton is not installed")
    a = pack_signs_torch(torch.randn(2, 10))
    if gpu._kernels().INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are allowed")
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        gpu.binary_matmul_triton(a, a, 10)


# ---------------------------------------------------------------------------- conv
@pytest.mark.parametrize("pad_value", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("padding,stride,dilation", [(0, 1, 1), (1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_binary_conv2d_matches_float_conv(pad_value, padding, stride, dilation):
    gen = torch.Generator().manual_seed(11)
    x, w = signs(gen, 2, 5, 9, 8), signs(gen, 6, 5, 3, 3)
    sx, sw = torch.where(x < 0, -1.0, 1.0), torch.where(w < 0, -1.0, 1.0)
    ref = F.conv2d(F.pad(sx, (padding,) * 4, value=pad_value), sw, stride=stride, dilation=dilation)
    got = binary_conv2d(x, pack_signs_torch(w.reshape(6, -1)), 3, stride, padding, dilation, pad_value)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.to(torch.int32))


def test_binary_conv2d_matches_engine_conv():
    gen = torch.Generator().manual_seed(12)
    x, w = signs(gen, 2, 70, 6, 6), signs(gen, 4, 70, 3, 3)
    got = binary_conv2d(x, pack_signs_torch(w.reshape(4, -1)), 3, padding=1, pad_value=-1)
    conv = kn.BinaryConv2d(kn.pack_signs(w.permute(0, 2, 3, 1).contiguous().numpy()), 70, 3, 3, padding=1, pad_value=-1)
    ref = conv.conv(kn.pack_signs(x.permute(0, 2, 3, 1).contiguous().numpy()))  # NHWC
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), ref)


def test_binary_conv2d_errors():
    w_bits = pack_signs_torch(torch.randn(4, 27))
    with pytest.raises(ShapeError, match=r"float tensor \[B, C, H, W\]"):
        binary_conv2d(torch.randn(3, 5, 5), w_bits, 3)
    with pytest.raises(ConfigError, match="pad_value"):
        binary_conv2d(torch.randn(1, 3, 5, 5), w_bits, 3, pad_value=0.5)
    with pytest.raises(ShapeError, match="smaller than"):
        binary_conv2d(torch.randn(1, 3, 2, 2), w_bits, 3)
    with pytest.raises(ShapeError, match="words per row"):
        binary_conv2d(torch.randn(1, 80, 5, 5), w_bits, 3)


# ---------------------------------------------------------------------------- modules
def bnn(pad_value: float = -1.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        QuantConv2d(1, 8, 3, padding=1, bias=False, weight_quantizer="sign"),  # float input: kept
        nn.BatchNorm2d(8),
        QuantConv2d(8, 8, 3, padding=1, input_quantizer="sign", weight_quantizer="sign", pad_value=pad_value),
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        QuantLinear(8 * 4 * 4, 10, input_quantizer="approx_sign", weight_quantizer="sign"),
    ).eval()


@pytest.mark.parametrize("pad_value", [-1.0, 0.0])
def test_to_binary_inference_same_outputs(pad_value):
    model = bnn(pad_value)
    packed = to_binary_inference(model)
    assert isinstance(packed[0], QuantConv2d)  # float input
    assert isinstance(packed[2], BinaryInferenceConv2d) and isinstance(packed[6], BinaryInferenceLinear)
    assert isinstance(model[2], QuantConv2d)  # not in place by default
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=0, atol=1e-5)
    assert to_binary_inference(model, inplace=True) is model and isinstance(model[6], BinaryInferenceLinear)


def test_to_binary_inference_single_layer_and_leading_dims():
    layer = QuantLinear(65, 3, input_quantizer="sign", weight_quantizer="sign").eval()
    twin = to_binary_inference(layer, word_dtype=torch.int32)
    assert isinstance(twin, BinaryInferenceLinear) and twin.w_bits.dtype == torch.int32
    x = torch.randn(2, 4, 65, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=1e-5)
    with pytest.raises(ShapeError, match="expects 65"):
        twin(torch.randn(2, 64))


def test_from_quant_rejects_non_sign_layers():
    with pytest.raises(ConfigError, match="sign-like"):
        BinaryInferenceLinear.from_quant(QuantLinear(8, 2, weight_quantizer="sign"))
    with pytest.raises(ConfigError, match="groups=1"):
        BinaryInferenceConv2d.from_quant(
            QuantConv2d(4, 4, 3, groups=2, input_quantizer="sign", weight_quantizer="sign"))
    kept = QuantLinear(8, 2, input_quantizer="scaled_sign", weight_quantizer="sign")
    assert to_binary_inference(nn.Sequential(kept))[0].__class__ is QuantLinear


# ---------------------------------------------------------------------------- CUDA
def cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", WORDS)
@pytest.mark.parametrize("popcount", ["hw", "swar"])
def test_cuda_triton_matches_cpu(dtype, popcount):
    dev = cuda_or_skip()
    if not gpu.triton_available():
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(21)
    for k in (*KS, 4096):
        for m in (*MS, 1024):
            a = junk_pad(pack_signs_torch(torch.randn(m, k, generator=gen), dtype=dtype), k)
            w = pack_signs_torch(torch.randn(300, k, generator=gen), dtype=dtype)
            ref = binary_matmul_torch(a, w, k)
            got = gpu.binary_matmul_triton(a.to(dev), w.to(dev), k, popcount=popcount)
            assert torch.equal(got.cpu(), ref), (k, m)


@pytest.mark.gpu
def test_cuda_op_conv_and_modules():
    dev = cuda_or_skip()
    gen = torch.Generator().manual_seed(22)
    x, w = signs(gen, 64, 4096), signs(gen, 512, 4096)
    got = binary_matmul(pack_signs_torch(x.to(dev)), pack_signs_torch(w.to(dev)), 4096)
    assert gpu.last_backend() == ("triton" if gpu.triton_available() else "torch")
    np.testing.assert_array_equal(got.cpu().numpy(), engine_gemm(x, w))
    xc, wc = signs(gen, 2, 16, 10, 10), signs(gen, 8, 16, 3, 3)
    for pad_value in (1.0, -1.0, 0.0):
        ref = binary_conv2d(xc, pack_signs_torch(wc.reshape(8, -1)), 3, padding=1, pad_value=pad_value)
        got = binary_conv2d(xc.to(dev), pack_signs_torch(wc.reshape(8, -1)).to(dev), 3, padding=1,
                            pad_value=pad_value)
        assert torch.equal(got.cpu(), ref)
    model = bnn()
    packed = to_binary_inference(model).to(dev)
    xm = torch.randn(5, 1, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(packed(xm.to(dev)).cpu(), model(xm), rtol=0, atol=1e-4)
