// Portable C++ path: plain loops, compiled for the baseline ISA. Works on any CPU.
#include <cstring>

#include "onebit_kernels.hpp"

namespace onebit {
namespace {

inline int popcount64(std::uint64_t v) {
#if defined(__GNUC__) && (!defined(__x86_64__) || defined(__POPCNT__))
    return __builtin_popcountll(v);
#else
    // SWAR popcount (baseline x86-64 has no popcnt instruction; this vectorises with SSE2)
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return int((v * 0x0101010101010101ULL) >> 56);
#endif
}

void xor_popcount_tile_portable(const std::uint64_t* a, std::size_t lda, int m,
                                const std::uint64_t* w, std::size_t KW, int npan,
                                std::int32_t* pc, std::size_t ldpc) {
    const int ncol = npan * PANEL;
    std::int32_t acc[GROUP];
    for (int i = 0; i < m; ++i) {
        const std::uint64_t* ai = a + std::size_t(i) * lda;
        for (int n = 0; n < ncol; ++n) acc[n] = 0;
        for (std::size_t k = 0; k < KW; ++k) {
            const std::uint64_t av = ai[k];
            const std::uint64_t* wk = w + k * std::size_t(ncol);
            for (int n = 0; n < ncol; ++n) acc[n] += popcount64(av ^ wk[n]);
        }
        std::memcpy(pc + std::size_t(i) * ldpc, acc, sizeof(std::int32_t) * std::size_t(ncol));
    }
}

void pack_signs_row_portable(const float* x, std::size_t K, std::uint64_t* out) {
    const std::size_t KW = (K + 63) / 64;
    for (std::size_t c = 0; c < KW; ++c) {
        std::uint64_t word = 0;
        const std::size_t k0 = c * 64;
        const std::size_t n = K - k0 < 64 ? K - k0 : 64;
        for (std::size_t j = 0; j < n; ++j) word |= std::uint64_t(x[k0 + j] < 0.0f) << j;
        out[c] = word;
    }
}

void pack_bitplanes_row_portable(const std::uint8_t* x, std::size_t K, std::uint64_t* out,
                                 std::size_t KW) {
    for (std::size_t c = 0; c < KW; ++c) {
        std::uint64_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const std::size_t k0 = c * 64;
        const std::size_t n = K - k0 < 64 ? K - k0 : 64;
        for (std::size_t j = 0; j < n; ++j) {
            const unsigned v = x[k0 + j];
            for (int b = 0; b < 8; ++b) words[b] |= std::uint64_t((v >> b) & 1u) << j;
        }
        for (int b = 0; b < 8; ++b) out[std::size_t(b) * KW + c] = words[b];
    }
}

void float_tile_portable(const float* x, std::size_t ldx, int m, const std::uint64_t* w,
                         std::size_t K, std::size_t KW, int npan, float* out, std::size_t ldo) {
    (void)KW;
    const int ncol = npan * PANEL;
    float acc[GROUP];
    for (int i = 0; i < m; ++i) {
        const float* xi = x + std::size_t(i) * ldx;
        for (int n = 0; n < ncol; ++n) acc[n] = 0.0f;
        for (std::size_t k = 0; k < K; ++k) {
            std::uint32_t xv;
            std::memcpy(&xv, xi + k, sizeof xv);
            const std::uint64_t* wk = w + (k >> 6) * std::size_t(ncol);
            const unsigned b = unsigned(k & 63);
            for (int n = 0; n < ncol; ++n) {
                // flip the sign bit of x where the weight bit is 1 (exact negation)
                const std::uint32_t r = xv ^ (std::uint32_t((wk[n] >> b) & 1u) << 31);
                float f;
                std::memcpy(&f, &r, sizeof f);
                acc[n] += f;
            }
        }
        std::memcpy(out + std::size_t(i) * ldo, acc, sizeof(float) * std::size_t(ncol));
    }
}

}  // namespace

void finish_tile_portable(const TileEpilogue& e) {
    const OutSpec& out = *e.out;
    const std::int64_t n0 = e.g * GROUP;
    std::int32_t dot[GROUP];
    for (int i = 0; i < e.mc; ++i) {
        const std::int64_t m = e.m0 + i;
        const std::int32_t* pcr = e.pc + std::size_t(i) * e.ldpc;
        const std::int32_t base = e.K + 2 * (e.adj ? e.adj[i] : 0);
        const std::int32_t* corr = e.corr ? e.corr[i] + n0 : nullptr;
        if (corr) {
            for (int c = 0; c < e.ncols; ++c) dot[c] = base - 2 * pcr[c] - corr[c];
        } else {
            for (int c = 0; c < e.ncols; ++c) dot[c] = base - 2 * pcr[c];
        }
        switch (out.mode) {
            case OutMode::Raw:
                std::memcpy(out.raw + m * e.N + n0, dot, sizeof(std::int32_t) * std::size_t(e.ncols));
                break;
            case OutMode::Threshold: {
                std::uint64_t word = 0;
                const std::int32_t* t = out.tcmp + n0;
                for (int c = 0; c < e.ncols; ++c) word |= std::uint64_t(dot[c] < t[c]) << c;
                out.bits[m * e.G + e.g] = word ^ out.flip[e.g];
                break;
            }
            case OutMode::Affine: {
                float* o = out.affine + m * e.N + n0;
                const float* mul = out.mul + n0;
                const float* add = out.add + n0;
                for (int c = 0; c < e.ncols; ++c) {
                    const float prod = float(dot[c]) * mul[c];  // rounded product, then rounded sum
                    o[c] = prod + add[c];
                }
                break;
            }
        }
    }
}

namespace {
ONEBIT_THRESHOLD_PREP(threshold_prep_portable, )

void u8_tile_portable(const std::uint8_t* x, std::size_t ldx, int m, const std::int8_t* w,
                      std::size_t K4, int npan, std::int32_t* out, std::size_t ldo) {
    const int ncol = npan * PANEL;
    const std::size_t ldw = std::size_t(ncol) * 4;
    std::int32_t acc[GROUP];
    for (int i = 0; i < m; ++i) {
        const std::uint8_t* xi = x + std::size_t(i) * ldx;
        for (int n = 0; n < ncol; ++n) acc[n] = 0;
        for (std::size_t k = 0; k < K4; ++k) {
            const std::int8_t* wk = w + k * ldw;
            for (int n = 0; n < ncol; ++n)
                for (int j = 0; j < 4; ++j) acc[n] += std::int32_t(xi[4 * k + j]) * wk[4 * n + j];
        }
        std::memcpy(out + std::size_t(i) * ldo, acc, sizeof(std::int32_t) * std::size_t(ncol));
    }
}

}  // namespace

const KernelTable kPortableTable = {
    "portable", xor_popcount_tile_portable, pack_signs_row_portable,
    pack_bitplanes_row_portable, float_tile_portable, u8_tile_portable, finish_tile_portable,
    threshold_prep_portable};

}  // namespace onebit
