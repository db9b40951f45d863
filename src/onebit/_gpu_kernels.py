"""Triton kernels of :mod:`onebit.gpu`; imported by it on the first Triton call, never at
``import onebit.gpu`` (this module imports triton).

Triton decides when a kernel is decorated whether it is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be set before this module is first imported. The kernels live in a
module of their own because Triton resolves names through the kernel's module globals (the
interpreter needs ``triton.language`` there and adds names of its own).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

@triton.jit
def popcount_swar(x, WORD: tl.constexpr):
    """Per-element popcount of int32/int64 words by shifts and adds (int32 result)."""
    # logical shifts need unsigned words; no step can overflow
    if WORD == 64:
        u = x.to(tl.uint64, bitcast=True)
        u = u - ((u >> 1) & 0x5555555555555555)
        u = (u & 0x3333333333333333) + ((u >> 2) & 0x3333333333333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F0F0F0F0F
        u = u + (u >> 8)
        u = u + (u >> 16)
        u = u + (u >> 32)
        return (u & 0x7F).to(tl.int32)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = u + (u >> 8)
        u = u + (u >> 16)
        return (u & 0x3F).to(tl.int32)


@triton.jit
def binary_matmul_kernel(a_ptr, w_ptr, out_ptr, M, N, KW, K,
                         stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                         WORD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         SWAR: tl.constexpr):
    """out[m, n] = K − 2·Σ_words popcount(a[m] XOR w[n]), bits past K in either operand ignored.

    One program computes a BM×BN output tile, looping over the KW words of K, BK at a time.
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    word_t = a_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, KW, BK):
        kk = k0 + rk
        # bits of each word inside K: all, some (the last word), none (past KW, loads give 0 there)
        valid = K - kk * WORD
        shift = tl.minimum(tl.maximum(valid, 0), WORD - 1).to(word_t)
        keep = tl.where(valid >= WORD, tl.full((BK,), -1, word_t), (tl.full((BK,), 1, word_t) << shift) - 1)
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < KW), other=0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (kk[None, :] < KW), other=0)
        x = (a & keep[None, :])[:, None, :] ^ (w & keep[None, :])[None, :, :]
        if SWAR:
            pc = popcount_swar(x, WORD)
        else:
            pc = libdevice.popc(x)
        acc += tl.sum(pc, axis=2)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, K - 2 * acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


#: whether the kernels above run in Triton's interpreter (TRITON_INTERPRET=1 at import)
INTERPRETED = type(binary_matmul_kernel).__name__ == "InterpretedFunction"
