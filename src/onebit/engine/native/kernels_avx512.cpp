// AVX-512 path: VPOPCNTDQ popcount on 512-bit vectors (8 uint64 lanes = one weight panel).
// Every function carries its own target attribute, so this file is compiled for the
// baseline ISA and only executed after cpuid says avx512f/bw/vl + avx512vpopcntdq exist.
#include "onebit_kernels.hpp"

#if defined(ONEBIT_X86)
#include <immintrin.h>

#define ONEBIT_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))
#define ONEBIT_T512_INLINE \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt"), always_inline)) inline

namespace onebit {
namespace {

// Register block: R activation rows x V panels (V*8 output rows). One k step loads V weight
// vectors (the word k of V*8 rows), broadcasts R activation words, and does R*V
// XOR + VPOPCNTQ + VPADDQ, accumulating per-lane popcounts in R*V zmm registers.
template <int R, int V>
ONEBIT_T512_INLINE void micro512(const std::uint64_t* a, std::size_t lda,
                                 const std::uint64_t* w, std::size_t KW, std::size_t ldw,
                                 std::int32_t* pc, std::size_t ldpc) {
    __m512i acc[R][V];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) acc[i][j] = _mm512_setzero_si512();
    const std::uint64_t* ap[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) ap[i] = a + std::size_t(i) * lda;
    for (std::size_t k = 0; k < KW; ++k) {
        const std::uint64_t* wk = w + k * ldw;
        __m512i wv[V];
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) wv[j] = _mm512_load_si512(static_cast<const void*>(wk + 8 * j));
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512i av = _mm512_set1_epi64(static_cast<long long>(ap[i][k]));
#pragma GCC unroll 8
            for (int j = 0; j < V; ++j)
                acc[i][j] = _mm512_add_epi64(acc[i][j],
                                             _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[j])));
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + std::size_t(i) * ldpc + 8 * j),
                                _mm512_cvtepi64_epi32(acc[i][j]));
}

// panels per register block for R rows (R*V accumulators + V weights + broadcasts <= 32 zmm;
// 6 rows x 4 panels = 24 accumulators measured best on Zen 5, ahead of 6x3, 8x3, 5x4, 7x3)
#ifndef ONEBIT_V512_BIG
#define ONEBIT_V512_BIG 4
#endif
template <int R>
struct Vfor {
    static constexpr int value = R == 1 ? 8 : (R == 2 ? 8 : (R <= 4 ? 4 : ONEBIT_V512_BIG));
};

template <int R>
ONEBIT_T512_INLINE void rows512(const std::uint64_t* a, std::size_t lda, const std::uint64_t* w,
                                std::size_t KW, int npan, std::int32_t* pc, std::size_t ldpc) {
    constexpr int V = Vfor<R>::value;
    const std::size_t ldw = std::size_t(npan) * PANEL;
    int p = 0;
    for (; p + V <= npan; p += V) micro512<R, V>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc);
    switch (npan - p) {
        case 1: micro512<R, 1>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 2: if constexpr (V > 2) micro512<R, 2>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 3: if constexpr (V > 3) micro512<R, 3>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 4: if constexpr (V > 4) micro512<R, 4>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 5: if constexpr (V > 5) micro512<R, 5>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 6: if constexpr (V > 6) micro512<R, 6>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        case 7: if constexpr (V > 7) micro512<R, 7>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc); break;
        default: break;
    }
}

#ifndef ONEBIT_MR512
#define ONEBIT_MR512 6
#endif

ONEBIT_T512 void xor_popcount_tile_avx512(const std::uint64_t* a, std::size_t lda, int m,
                                          const std::uint64_t* w, std::size_t KW, int npan,
                                          std::int32_t* pc, std::size_t ldpc) {
    constexpr int MR = ONEBIT_MR512;
    int i = 0;
    for (; i + MR <= m; i += MR) rows512<MR>(a + std::size_t(i) * lda, lda, w, KW, npan, pc + std::size_t(i) * ldpc, ldpc);
    const std::uint64_t* ar = a + std::size_t(i) * lda;
    std::int32_t* pr = pc + std::size_t(i) * ldpc;
    switch (m - i) {
        case 1: rows512<1>(ar, lda, w, KW, npan, pr, ldpc); break;
        case 2: rows512<2>(ar, lda, w, KW, npan, pr, ldpc); break;
        case 3: rows512<3>(ar, lda, w, KW, npan, pr, ldpc); break;
        case 4: if constexpr (MR > 4) rows512<4>(ar, lda, w, KW, npan, pr, ldpc); break;
        case 5: if constexpr (MR > 5) rows512<5>(ar, lda, w, KW, npan, pr, ldpc); break;
        default: break;
    }
}

ONEBIT_T512 void pack_signs_row_avx512(const float* x, std::size_t K, std::uint64_t* out) {
    const std::size_t KW = (K + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    for (std::size_t c = 0; c < KW; ++c) {
        std::uint64_t word = 0;
        for (int q = 0; q < 4; ++q) {
            const std::size_t k0 = c * 64 + std::size_t(q) * 16;
            if (k0 >= K) break;
            const std::size_t n = K - k0 < 16 ? K - k0 : 16;
            const __mmask16 lm = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(lm, x + k0);
            const __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
            word |= std::uint64_t(neg) << (16 * q);
        }
        out[c] = word;
    }
}

ONEBIT_T512 void pack_bitplanes_row_avx512(const std::uint8_t* x, std::size_t K,
                                           std::uint64_t* out, std::size_t KW) {
    for (std::size_t c = 0; c < KW; ++c) {
        const std::size_t k0 = c * 64;
        const std::size_t n = K - k0 < 64 ? K - k0 : 64;
        const __mmask64 lm = n == 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1);
        const __m512i v = _mm512_maskz_loadu_epi8(lm, x + k0);
#pragma GCC unroll 8
        for (int b = 0; b < 8; ++b)
            out[std::size_t(b) * KW + c] =
                _mm512_test_epi8_mask(v, _mm512_set1_epi8(static_cast<char>(1 << b)));
    }
}

// Float input x +-1 weights: per output one float32 accumulator, k strictly increasing.
// The sign of x[k] is flipped (XOR of the sign bit, exact) in the lanes whose weight bit is 1.
template <int R, int V>
ONEBIT_T512_INLINE void float_micro512(const float* x, std::size_t ldx, const std::uint64_t* w,
                                       std::size_t K, std::size_t KW, std::size_t ldw,
                                       float* out, std::size_t ldo) {
    __m256 acc[R][V];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) acc[i][j] = _mm256_setzero_ps();
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i one = _mm512_set1_epi64(1);
    for (std::size_t c = 0; c < KW; ++c) {
        __m512i wv[V];
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) wv[j] = _mm512_load_si512(static_cast<const void*>(w + c * ldw + 8 * j));
        const std::size_t k0 = c * 64;
        const int nb = int(K - k0 < 64 ? K - k0 : 64);
        for (int b = 0; b < nb; ++b) {
            __mmask8 mk[V];
#pragma GCC unroll 8
            for (int j = 0; j < V; ++j) {
                mk[j] = _mm512_test_epi64_mask(wv[j], one);
                wv[j] = _mm512_srli_epi64(wv[j], 1);
            }
#pragma GCC unroll 8
            for (int i = 0; i < R; ++i) {
                const __m256i xb = _mm256_castps_si256(_mm256_set1_ps(x[std::size_t(i) * ldx + k0 + b]));
#pragma GCC unroll 8
                for (int j = 0; j < V; ++j)
                    acc[i][j] = _mm256_add_ps(
                        acc[i][j], _mm256_castsi256_ps(_mm256_mask_xor_epi32(xb, mk[j], xb, sign)));
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) _mm256_storeu_ps(out + std::size_t(i) * ldo + 8 * j, acc[i][j]);
}

// Same computation with 16-lane accumulators: one zmm covers two panels (16 outputs), its
// sign mask is the two panels' 8-bit masks side by side.
template <int R, int VZ>
ONEBIT_T512_INLINE void float_micro512z(const float* x, std::size_t ldx, const std::uint64_t* w,
                                        std::size_t K, std::size_t KW, std::size_t ldw,
                                        float* out, std::size_t ldo) {
    __m512 acc[R][VZ];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < VZ; ++j) acc[i][j] = _mm512_setzero_ps();
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i one = _mm512_set1_epi64(1);
    for (std::size_t c = 0; c < KW; ++c) {
        __m512i wv[2 * VZ];
#pragma GCC unroll 8
        for (int j = 0; j < 2 * VZ; ++j) wv[j] = _mm512_load_si512(static_cast<const void*>(w + c * ldw + 8 * j));
        const std::size_t k0 = c * 64;
        const int nb = int(K - k0 < 64 ? K - k0 : 64);
        for (int b = 0; b < nb; ++b) {
            __mmask16 mk[VZ];
#pragma GCC unroll 8
            for (int j = 0; j < VZ; ++j) {
                const __mmask8 lo = _mm512_test_epi64_mask(wv[2 * j], one);
                const __mmask8 hi = _mm512_test_epi64_mask(wv[2 * j + 1], one);
                mk[j] = __mmask16(unsigned(lo) | (unsigned(hi) << 8));
                wv[2 * j] = _mm512_srli_epi64(wv[2 * j], 1);
                wv[2 * j + 1] = _mm512_srli_epi64(wv[2 * j + 1], 1);
            }
#pragma GCC unroll 8
            for (int i = 0; i < R; ++i) {
                const __m512i xb = _mm512_castps_si512(_mm512_set1_ps(x[std::size_t(i) * ldx + k0 + b]));
#pragma GCC unroll 8
                for (int j = 0; j < VZ; ++j)
                    acc[i][j] = _mm512_add_ps(
                        acc[i][j], _mm512_castsi512_ps(_mm512_mask_xor_epi32(xb, mk[j], xb, sign)));
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < VZ; ++j) _mm512_storeu_ps(out + std::size_t(i) * ldo + 16 * j, acc[i][j]);
}

template <int R>
ONEBIT_T512_INLINE void float_rows512(const float* x, std::size_t ldx, const std::uint64_t* w,
                                      std::size_t K, std::size_t KW, int npan, float* out,
                                      std::size_t ldo) {
    const std::size_t ldw = std::size_t(npan) * PANEL;
    int p = 0;
    if (R <= 2)  // few rows: more independent accumulators per row to hide the add latency
        for (; p + 8 <= npan; p += 8) float_micro512z<R, 4>(x, ldx, w + PANEL * p, K, KW, ldw, out + PANEL * p, ldo);
    for (; p + 4 <= npan; p += 4) float_micro512z<R, 2>(x, ldx, w + PANEL * p, K, KW, ldw, out + PANEL * p, ldo);
    for (; p + 2 <= npan; p += 2) float_micro512z<R, 1>(x, ldx, w + PANEL * p, K, KW, ldw, out + PANEL * p, ldo);
    if (p < npan) float_micro512<R, 1>(x, ldx, w + PANEL * p, K, KW, ldw, out + PANEL * p, ldo);
}

ONEBIT_T512 void float_tile_avx512(const float* x, std::size_t ldx, int m, const std::uint64_t* w,
                                   std::size_t K, std::size_t KW, int npan, float* out,
                                   std::size_t ldo) {
    int i = 0;
    for (; i + 6 <= m; i += 6) float_rows512<6>(x + std::size_t(i) * ldx, ldx, w, K, KW, npan, out + std::size_t(i) * ldo, ldo);
    const float* xr = x + std::size_t(i) * ldx;
    float* orow = out + std::size_t(i) * ldo;
    switch (m - i) {
        case 1: float_rows512<1>(xr, ldx, w, K, KW, npan, orow, ldo); break;
        case 2: float_rows512<2>(xr, ldx, w, K, KW, npan, orow, ldo); break;
        case 3: float_rows512<3>(xr, ldx, w, K, KW, npan, orow, ldo); break;
        case 4: float_rows512<4>(xr, ldx, w, K, KW, npan, orow, ldo); break;
        case 5: float_rows512<5>(xr, ldx, w, K, KW, npan, orow, ldo); break;
        default: break;
    }
}

// one row of the epilogue, specialised on the output mode and the conv correction
template <OutMode MODE, bool CORR>
ONEBIT_T512_INLINE void finish_rows512(const TileEpilogue& e) {
    const OutSpec& out = *e.out;
    const std::int64_t n0 = e.g * GROUP;
    const int ncols = e.ncols;
    for (int i = 0; i < e.mc; ++i) {
        const std::int64_t m = e.m0 + i;
        const std::int32_t* pcr = e.pc + std::size_t(i) * e.ldpc;
        const __m512i base = _mm512_set1_epi32(e.K + 2 * (e.adj ? e.adj[i] : 0));
        const std::int32_t* corr = CORR ? e.corr[i] + n0 : nullptr;
        std::uint64_t word = 0;
#pragma GCC unroll 4
        for (int c0 = 0; c0 < GROUP; c0 += 16) {
            if (c0 >= ncols) break;
            const int n = ncols - c0 < 16 ? ncols - c0 : 16;
            const __mmask16 lm = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
            __m512i dot = _mm512_sub_epi32(base, _mm512_slli_epi32(_mm512_maskz_loadu_epi32(lm, pcr + c0), 1));
            if (CORR) dot = _mm512_sub_epi32(dot, _mm512_maskz_loadu_epi32(lm, corr + c0));
            if (MODE == OutMode::Raw) {
                _mm512_mask_storeu_epi32(out.raw + m * e.N + n0 + c0, lm, dot);
            } else if (MODE == OutMode::Threshold) {
                const __m512i t = _mm512_maskz_loadu_epi32(lm, out.tcmp + n0 + c0);
                word |= std::uint64_t(_mm512_mask_cmplt_epi32_mask(lm, dot, t)) << c0;
            } else {
                const __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_maskz_loadu_ps(lm, out.mul + n0 + c0));
                _mm512_mask_storeu_ps(out.affine + m * e.N + n0 + c0, lm,
                                      _mm512_add_ps(prod, _mm512_maskz_loadu_ps(lm, out.add + n0 + c0)));
            }
        }
        if (MODE == OutMode::Threshold) out.bits[m * e.G + e.g] = word ^ out.flip[e.g];
    }
}

ONEBIT_T512 void finish_tile_avx512(const TileEpilogue& e) {
    const bool corr = e.corr != nullptr;
    switch (e.out->mode) {
        case OutMode::Raw:
            corr ? finish_rows512<OutMode::Raw, true>(e) : finish_rows512<OutMode::Raw, false>(e);
            break;
        case OutMode::Threshold:
            corr ? finish_rows512<OutMode::Threshold, true>(e) : finish_rows512<OutMode::Threshold, false>(e);
            break;
        case OutMode::Affine:
            corr ? finish_rows512<OutMode::Affine, true>(e) : finish_rows512<OutMode::Affine, false>(e);
            break;
    }
}

ONEBIT_THRESHOLD_PREP(threshold_prep_avx512, ONEBIT_T512)

}  // namespace

const KernelTable kAvx512Table = {"avx512", xor_popcount_tile_avx512, pack_signs_row_avx512,
                                  pack_bitplanes_row_avx512, float_tile_avx512, u8_tile_avx2,
                                  finish_tile_avx512, threshold_prep_avx512};

}  // namespace onebit

#endif  // ONEBIT_X86
