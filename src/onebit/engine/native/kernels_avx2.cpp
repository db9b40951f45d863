// AVX2 path: 256-bit vectors, popcount by nibble lookup (vpshufb) with byte accumulators
// that are widened with vpsadbw every 31 steps (31 * 8 = 248 < 256, no byte overflow).
#include "onebit_kernels.hpp"

#if defined(ONEBIT_X86)
#include <immintrin.h>

#include "popcount_avx2.hpp"

// fma: the float x binary GEMM multiplies by +-1.0 (exact, so one rounding as in an add); no
// other code here contracts a multiply and an add, since the build passes -ffp-contract=off
#define ONEBIT_T2 __attribute__((target("avx2,fma,popcnt")))
#define ONEBIT_T2_INLINE __attribute__((target("avx2,fma,popcnt"), always_inline)) inline

namespace onebit {
namespace {

// R rows x one panel (8 output rows = 2 ymm of 4 uint64 lanes)
template <int R>
ONEBIT_T2_INLINE void micro_avx2(const std::uint64_t* a, std::size_t lda, const std::uint64_t* w,
                                 std::size_t KW, std::size_t ldw, std::int32_t* pc,
                                 std::size_t ldpc) {
    const __m256i lut = nibble_lut_avx2();
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i q[R][2];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) q[i][0] = q[i][1] = _mm256_setzero_si256();
    std::size_t k = 0;
    while (k < KW) {
        const std::size_t kend = KW - k > 31 ? k + 31 : KW;
        __m256i b8[R][2];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) b8[i][0] = b8[i][1] = _mm256_setzero_si256();
        for (; k < kend; ++k) {
            const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + k * ldw));
            const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + k * ldw + 4));
#pragma GCC unroll 8
            for (int i = 0; i < R; ++i) {
                const __m256i av = _mm256_set1_epi64x(static_cast<long long>(a[std::size_t(i) * lda + k]));
                const __m256i x0 = _mm256_xor_si256(av, w0);
                const __m256i x1 = _mm256_xor_si256(av, w1);
                b8[i][0] = _mm256_add_epi8(b8[i][0], popcount_bytes_avx2(x0, lut, low));
                b8[i][1] = _mm256_add_epi8(b8[i][1], popcount_bytes_avx2(x1, lut, low));
            }
        }
        const __m256i z = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            q[i][0] = _mm256_add_epi64(q[i][0], _mm256_sad_epu8(b8[i][0], z));
            q[i][1] = _mm256_add_epi64(q[i][1], _mm256_sad_epu8(b8[i][1], z));
        }
    }
    // narrow 2 x 4 int64 -> 8 int32 (values < 2^31)
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        const __m256i lo = _mm256_permutevar8x32_epi32(q[i][0], idx);  // lanes 0..3 in low 128
        const __m256i hi = _mm256_permutevar8x32_epi32(q[i][1], idx);
        const __m256i r = _mm256_permute2x128_si256(lo, hi, 0x20);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + std::size_t(i) * ldpc), r);
    }
}

template <int R>
ONEBIT_T2_INLINE void rows_avx2(const std::uint64_t* a, std::size_t lda, const std::uint64_t* w,
                                std::size_t KW, int npan, std::int32_t* pc, std::size_t ldpc) {
    const std::size_t ldw = std::size_t(npan) * PANEL;
    for (int p = 0; p < npan; ++p) micro_avx2<R>(a, lda, w + PANEL * p, KW, ldw, pc + PANEL * p, ldpc);
}

ONEBIT_T2 void xor_popcount_tile_avx2(const std::uint64_t* a, std::size_t lda, int m,
                                      const std::uint64_t* w, std::size_t KW, int npan,
                                      std::int32_t* pc, std::size_t ldpc) {
    int i = 0;
    for (; i + 3 <= m; i += 3) rows_avx2<3>(a + std::size_t(i) * lda, lda, w, KW, npan, pc + std::size_t(i) * ldpc, ldpc);
    if (m - i == 2) rows_avx2<2>(a + std::size_t(i) * lda, lda, w, KW, npan, pc + std::size_t(i) * ldpc, ldpc);
    if (m - i == 1) rows_avx2<1>(a + std::size_t(i) * lda, lda, w, KW, npan, pc + std::size_t(i) * ldpc, ldpc);
}

ONEBIT_T2 void pack_signs_row_avx2(const float* x, std::size_t K, std::uint64_t* out) {
    const std::size_t KW = (K + 63) / 64;
    const __m256 zero = _mm256_setzero_ps();
    for (std::size_t c = 0; c < KW; ++c) {
        const std::size_t k0 = c * 64;
        std::uint64_t word = 0;
        if (K - k0 >= 64) {
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) {
                const __m256 v = _mm256_loadu_ps(x + k0 + 8 * q);
                const unsigned neg = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)));
                word |= std::uint64_t(neg) << (8 * q);
            }
        } else {
            for (std::size_t j = 0; j < K - k0; ++j) word |= std::uint64_t(x[k0 + j] < 0.0f) << j;
        }
        out[c] = word;
    }
}

ONEBIT_T2 void pack_bitplanes_row_avx2(const std::uint8_t* x, std::size_t K, std::uint64_t* out,
                                       std::size_t KW) {
    alignas(32) std::uint8_t tail[64];
    for (std::size_t c = 0; c < KW; ++c) {
        const std::size_t k0 = c * 64;
        const std::uint8_t* src = x + k0;
        if (K - k0 < 64) {
            for (int j = 0; j < 64; ++j) tail[j] = (k0 + std::size_t(j) < K) ? x[k0 + j] : 0;
            src = tail;
        }
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
#pragma GCC unroll 8
        for (int b = 0; b < 8; ++b) {
            const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << b));
            const unsigned lo = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_and_si256(v0, bit), bit)));
            const unsigned hi = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_and_si256(v1, bit), bit)));
            out[std::size_t(b) * KW + c] = std::uint64_t(lo) | (std::uint64_t(hi) << 32);
        }
    }
}

// byte (8 weight bits of one panel at one k) -> 8 float lanes, lane j = -1 if bit j set, else +1
struct SignLut {
    alignas(32) float v[256][8];
    SignLut() {
        for (int m = 0; m < 256; ++m)
            for (int j = 0; j < 8; ++j) v[m][j] = ((m >> j) & 1) ? -1.0f : 1.0f;
    }
};
const SignLut kSignLut;

// Sign masks of one panel (8 output rows) for words c0 .. c0+nw-1: masks[64 c + b] bit j =
// bit b of row j's word c0 + c, the index of that k's entry in kSignLut.
ONEBIT_T2_INLINE void panel_masks_avx2(const std::uint64_t* w, std::size_t ldw, std::size_t c0,
                                       std::size_t nw, std::uint8_t* masks) {
    for (std::size_t c = 0; c < nw; ++c) {
        __m256i t0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + (c0 + c) * ldw));
        __m256i t1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + (c0 + c) * ldw + 4));
        for (int b = 63; b >= 0; --b) {  // t << (63 - b) puts bit b at the sign position
            const unsigned lo = unsigned(_mm256_movemask_pd(_mm256_castsi256_pd(t0)));
            const unsigned hi = unsigned(_mm256_movemask_pd(_mm256_castsi256_pd(t1)));
            masks[64 * c + std::size_t(b)] = static_cast<std::uint8_t>(lo | (hi << 4));
            t0 = _mm256_slli_epi64(t0, 1);
            t1 = _mm256_slli_epi64(t1, 1);
        }
    }
}

// R rows x PN panels over k = k0 .. k0+nk-1 (masks[p]: panel p's masks of this chunk); the
// accumulators start at 0 when k0 == 0 and are carried through out[] between chunks (a float32
// store and load changes nothing, so each output is still one accumulator adding its terms in
// increasing k). fma(x, +-1, acc) rounds acc +- x once, exactly as an add of +-x would, in
// one instruction where xor + add took two (1.15-1.18x on WRN conv shapes, docs/benchmarks.md).
// R x PN independent accumulators hide the FMA latency.
template <int R, int PN>
ONEBIT_T2_INLINE void float_micro_avx2(const float* x, std::size_t ldx, const std::uint8_t* const* masks,
                                       std::size_t k0, std::size_t nk, float* out, std::size_t ldo) {
    __m256 acc[R][PN];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int p = 0; p < PN; ++p)
            acc[i][p] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out + std::size_t(i) * ldo + PANEL * p);
    for (std::size_t k = 0; k < nk; ++k) {
        __m256 sign[PN];
#pragma GCC unroll 8
        for (int p = 0; p < PN; ++p) sign[p] = _mm256_load_ps(kSignLut.v[masks[p][k]]);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m256 xb = _mm256_set1_ps(x[std::size_t(i) * ldx + k0 + k]);
#pragma GCC unroll 8
            for (int p = 0; p < PN; ++p) acc[i][p] = _mm256_fmadd_ps(xb, sign[p], acc[i][p]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int p = 0; p < PN; ++p) _mm256_storeu_ps(out + std::size_t(i) * ldo + PANEL * p, acc[i][p]);
}

// K is cut into chunks of CHUNK_WORDS words whose panel masks (4 KiB per panel) stay in L1
// while every row block of the tile reuses them.
constexpr std::size_t CHUNK_WORDS = 64;

template <int PN>
ONEBIT_T2_INLINE void float_panels_avx2(const float* x, std::size_t ldx, int m, const std::uint64_t* w,
                                        std::size_t ldw, std::size_t K, std::size_t KW, float* out,
                                        std::size_t ldo) {
    alignas(64) std::uint8_t masks[PN][64 * CHUNK_WORDS];
    const std::uint8_t* panel_masks[PN];
    for (int p = 0; p < PN; ++p) panel_masks[p] = masks[p];
    for (std::size_t c0 = 0; c0 < KW; c0 += CHUNK_WORDS) {
        const std::size_t nw = KW - c0 < CHUNK_WORDS ? KW - c0 : CHUNK_WORDS;
        for (int p = 0; p < PN; ++p) panel_masks_avx2(w + PANEL * p, ldw, c0, nw, masks[p]);
        const std::size_t k0 = 64 * c0, nk = (K - k0 < 64 * nw) ? K - k0 : 64 * nw;
        int i = 0;
        for (; i + 6 <= m; i += 6) float_micro_avx2<6, PN>(x + std::size_t(i) * ldx, ldx, panel_masks, k0, nk,
                                                            out + std::size_t(i) * ldo, ldo);
        const float* xr = x + std::size_t(i) * ldx;
        float* orow = out + std::size_t(i) * ldo;
        switch (m - i) {
            case 1: float_micro_avx2<1, PN>(xr, ldx, panel_masks, k0, nk, orow, ldo); break;
            case 2: float_micro_avx2<2, PN>(xr, ldx, panel_masks, k0, nk, orow, ldo); break;
            case 3: float_micro_avx2<3, PN>(xr, ldx, panel_masks, k0, nk, orow, ldo); break;
            case 4: float_micro_avx2<4, PN>(xr, ldx, panel_masks, k0, nk, orow, ldo); break;
            case 5: float_micro_avx2<5, PN>(xr, ldx, panel_masks, k0, nk, orow, ldo); break;
            default: break;
        }
    }
}

ONEBIT_T2 void float_tile_avx2(const float* x, std::size_t ldx, int m, const std::uint64_t* w,
                               std::size_t K, std::size_t KW, int npan, float* out,
                               std::size_t ldo) {
    const std::size_t ldw = std::size_t(npan) * PANEL;
    int p = 0;
    if (m <= 2)  // few rows: more independent accumulators per row to hide the FMA latency
        for (; p + 4 <= npan; p += 4) float_panels_avx2<4>(x, ldx, m, w + PANEL * p, ldw, K, KW, out + PANEL * p, ldo);
    for (; p + 2 <= npan; p += 2) float_panels_avx2<2>(x, ldx, m, w + PANEL * p, ldw, K, KW, out + PANEL * p, ldo);
    if (p < npan) float_panels_avx2<1>(x, ldx, m, w + PANEL * p, ldw, K, KW, out + PANEL * p, ldo);
}

ONEBIT_T2 void finish_tile_avx2(const TileEpilogue& e) {
    const OutSpec& out = *e.out;
    const std::int64_t n0 = e.g * GROUP;
    for (int i = 0; i < e.mc; ++i) {
        const std::int64_t m = e.m0 + i;
        const std::int32_t* pcr = e.pc + std::size_t(i) * e.ldpc;
        const std::int32_t b = e.K + 2 * (e.adj ? e.adj[i] : 0);
        const __m256i base = _mm256_set1_epi32(b);
        const std::int32_t* corr = e.corr ? e.corr[i] + n0 : nullptr;
        std::uint64_t word = 0;
        int c0 = 0;
        for (; c0 + 8 <= e.ncols; c0 += 8) {
            __m256i dot = _mm256_sub_epi32(
                base, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pcr + c0)), 1));
            if (corr) dot = _mm256_sub_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + c0)));
            switch (out.mode) {
                case OutMode::Raw:
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.raw + m * e.N + n0 + c0), dot);
                    break;
                case OutMode::Threshold: {
                    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out.tcmp + n0 + c0));
                    const __m256i neg = _mm256_cmpgt_epi32(t, dot);  // dot < t
                    word |= std::uint64_t(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(neg)))) << c0;
                    break;
                }
                case OutMode::Affine: {
                    const __m256 prod = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(out.mul + n0 + c0));
                    _mm256_storeu_ps(out.affine + m * e.N + n0 + c0, _mm256_add_ps(prod, _mm256_loadu_ps(out.add + n0 + c0)));
                    break;
                }
            }
        }
        for (int c = c0; c < e.ncols; ++c) {  // tail
            const std::int32_t dot = b - 2 * pcr[c] - (corr ? corr[c] : 0);
            const std::int64_t n = n0 + c;
            switch (out.mode) {
                case OutMode::Raw: out.raw[m * e.N + n] = dot; break;
                case OutMode::Threshold: word |= std::uint64_t(dot < out.tcmp[n]) << c; break;
                case OutMode::Affine: {
                    const float prod = float(dot) * out.mul[n];
                    out.affine[m * e.N + n] = prod + out.add[n];
                    break;
                }
            }
        }
        if (out.mode == OutMode::Threshold) out.bits[m * e.G + e.g] = word ^ out.flip[e.g];
    }
}

ONEBIT_THRESHOLD_PREP(threshold_prep_avx2, ONEBIT_T2)

// R rows x PN panels of uint8 x int8: vpmaddubsw adds the products of 2 k into int16 (|.| <=
// 510), vpaddw collects 64 steps of 4 k (<= 64 * 2 * 510 = 65280 split over the 2 int16 of an
// output: each <= 32640, no overflow), vpmaddwd widens into the int32 sums.
template <int R, int PN>
ONEBIT_T2_INLINE void u8_micro_avx2(const std::uint8_t* x, std::size_t ldx, const std::int8_t* w,
                                    std::size_t K4, std::size_t ldw, std::int32_t* out,
                                    std::size_t ldo) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[R][PN];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int p = 0; p < PN; ++p) acc[i][p] = _mm256_setzero_si256();
    std::size_t k = 0;
    while (k < K4) {
        const std::size_t kend = K4 - k > 64 ? k + 64 : K4;
        __m256i a16[R][PN];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
            for (int p = 0; p < PN; ++p) a16[i][p] = _mm256_setzero_si256();
        for (; k < kend; ++k) {
            __m256i wv[PN];
#pragma GCC unroll 8
            for (int p = 0; p < PN; ++p)
                wv[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + k * ldw + 32 * std::size_t(p)));
#pragma GCC unroll 8
            for (int i = 0; i < R; ++i) {
                std::int32_t four;
                __builtin_memcpy(&four, x + std::size_t(i) * ldx + 4 * k, 4);
                const __m256i xb = _mm256_set1_epi32(four);
#pragma GCC unroll 8
                for (int p = 0; p < PN; ++p) a16[i][p] = _mm256_add_epi16(a16[i][p], _mm256_maddubs_epi16(xb, wv[p]));
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
            for (int p = 0; p < PN; ++p) acc[i][p] = _mm256_add_epi32(acc[i][p], _mm256_madd_epi16(a16[i][p], ones));
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int p = 0; p < PN; ++p)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + std::size_t(i) * ldo + PANEL * p), acc[i][p]);
}

template <int R>
ONEBIT_T2_INLINE void u8_rows_avx2(const std::uint8_t* x, std::size_t ldx, const std::int8_t* w,
                                   std::size_t K4, int npan, std::int32_t* out, std::size_t ldo) {
    const std::size_t ldw = std::size_t(npan) * PANEL * 4;
    int p = 0;
    for (; p + 2 <= npan; p += 2) u8_micro_avx2<R, 2>(x, ldx, w + 32 * p, K4, ldw, out + PANEL * p, ldo);
    if (p < npan) u8_micro_avx2<R, 1>(x, ldx, w + 32 * p, K4, ldw, out + PANEL * p, ldo);
}

}  // namespace

ONEBIT_T2 void u8_tile_avx2(const std::uint8_t* x, std::size_t ldx, int m, const std::int8_t* w,
                            std::size_t K4, int npan, std::int32_t* out, std::size_t ldo) {
    int i = 0;
    for (; i + 3 <= m; i += 3) u8_rows_avx2<3>(x + std::size_t(i) * ldx, ldx, w, K4, npan, out + std::size_t(i) * ldo, ldo);
    if (m - i == 2) u8_rows_avx2<2>(x + std::size_t(i) * ldx, ldx, w, K4, npan, out + std::size_t(i) * ldo, ldo);
    if (m - i == 1) u8_rows_avx2<1>(x + std::size_t(i) * ldx, ldx, w, K4, npan, out + std::size_t(i) * ldo, ldo);
}

const KernelTable kAvx2Table = {"avx2", xor_popcount_tile_avx2, pack_signs_row_avx2,
                                pack_bitplanes_row_avx2, float_tile_avx2, u8_tile_avx2,
                                finish_tile_avx2, threshold_prep_avx2};

}  // namespace onebit

#endif  // ONEBIT_X86
