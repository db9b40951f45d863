// Drivers: weight preparation, work decomposition over threads (OpenMP), epilogues
// (exact dot / fused threshold to bits / affine to float), conv im2col, maxpool, packing.
// Everything here is ISA-independent; the inner loops come from the current KernelTable.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>

#include "onebit_kernels.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace onebit {
namespace {

inline int popcount64(std::uint64_t v) {
#if defined(__GNUC__)
    return __builtin_popcountll(v);
#else
    int c = 0;
    while (v) { v &= v - 1; ++c; }
    return c;
#endif
}

// Rows per task. A multiple of the register blocks of every path (avx512: 6, avx2: 3) and of
// 8 (bit planes). The weight group (64 rows x KW words) stays in L1/L2 while MB activation
// rows stream past it.
constexpr std::int64_t MB = 96;

// ---- per-row fixes applied to the raw popcounts -------------------------------------------
// fill(m0, mc, n0, adj, corr) fills per-row adjustments for a tile and returns which exist.
struct NoFix {
    bool fill_adj(std::int64_t, int, std::int32_t*) const { return false; }
    bool fill_corr(std::int64_t, int, std::int64_t, const std::int32_t**) const { return false; }
};

// Padding bits of the caller's activations beyond K: weights have 0 there, so each such 1
// bit adds exactly one to every popcount of that row; remove it.
struct JunkFix {
    const std::uint64_t* a;
    std::size_t lda;
    std::size_t last;
    std::uint64_t junk;
    bool fill_adj(std::int64_t m0, int mc, std::int32_t* adj) const {
        if (!junk) return false;
        for (int i = 0; i < mc; ++i) adj[i] = popcount64(a[std::size_t(m0 + i) * lda + last] & junk);
        return true;
    }
    bool fill_corr(std::int64_t, int, std::int64_t, const std::int32_t**) const { return false; }
};

// conv with pad_value 0: padded taps were computed as +1; subtract their weight sums.
struct ConvFix {
    const std::int32_t* table = nullptr;  // [ny classes][nx classes][O]
    const std::int32_t* ycls = nullptr;   // [Ho] row class of each output row
    const std::int32_t* xcls = nullptr;   // [Wo]
    std::int64_t nxc = 0, Ho = 1, Wo = 1, O = 0;
    bool fill_adj(std::int64_t, int, std::int32_t*) const { return false; }
    bool fill_corr(std::int64_t m0, int mc, std::int64_t, const std::int32_t** corr) const {
        if (!table) return false;
        std::int64_t ox = m0 % Wo, oy = (m0 / Wo) % Ho;
        for (int i = 0; i < mc; ++i) {
            corr[i] = table + (std::int64_t(ycls[oy]) * nxc + xcls[ox]) * O;
            if (++ox == Wo) {
                ox = 0;
                if (++oy == Ho) oy = 0;
            }
        }
        return true;
    }
};

// scale/thresh -> (tcmp, flip) so that the epilogue is one compare per output (see OutSpec);
// the Python bindings prepare them already (and validate), other callers get it here
struct ThresholdPrep {
    std::vector<std::int32_t> tcmp;
    std::vector<std::uint64_t> flip;
    OutSpec apply(const OutSpec& in, std::int64_t N) {
        OutSpec o = in;
        if (in.mode != OutMode::Threshold || in.tcmp) return o;
        tcmp.assign(std::size_t(N), 0);
        flip.assign(std::size_t((N + 63) / 64), 0);
        current_table().threshold_prep(in.scale, false, in.thresh, N, tcmp.data(), flip.data());
        o.tcmp = tcmp.data();
        o.flip = flip.data();
        return o;
    }
};

template <class Fix>
inline void finish_tile(const KernelTable& kt, const OutSpec& out, const PackedWeights& W,
                        std::int64_t m0, int mc, std::int64_t g, const std::int32_t* tile,
                        const Fix& fix) {
    std::int32_t adj[MB];
    const std::int32_t* corr[MB];
    TileEpilogue e;
    e.out = &out;
    e.N = W.N;
    e.G = W.ngroups;
    e.K = std::int32_t(W.K);
    e.m0 = m0;
    e.g = g;
    e.mc = mc;
    e.ncols = W.group_cols(g);
    e.pc = tile;
    e.ldpc = GROUP;
    e.adj = fix.fill_adj(m0, mc, adj) ? adj : nullptr;
    e.corr = fix.fill_corr(m0, mc, g * GROUP, corr) ? corr : nullptr;
    kt.finish_tile(e);
}

// Below this many word pairs (about a microsecond of work) a call stays on one thread: an
// OpenMP fork/join costs more than it saves.
constexpr double kMinParallelWork = 65536.0;

int clamp_threads(int threads, std::int64_t ntasks, double work = 1e300) {
    std::int64_t nt = resolve_threads(threads);
    if (work < kMinParallelWork) nt = 1;
    if (nt > ntasks) nt = ntasks;
    return int(nt < 1 ? 1 : nt);
}

// Rows per task: MB, or fewer (a multiple of `quantum`) so that a small M still yields about
// four tasks per thread across its G column groups.
std::int64_t rows_per_task(std::int64_t M, std::int64_t G, int threads, std::int64_t quantum) {
    const std::int64_t nt = resolve_threads(threads);
    const std::int64_t want_blocks = (4 * nt + G - 1) / G;
    std::int64_t mb = (M + want_blocks - 1) / want_blocks;
    mb = (mb + quantum - 1) / quantum * quantum;
    return std::max<std::int64_t>(quantum, std::min<std::int64_t>(MB, mb));
}

// The 2-D grid of (block of mbr <= MB rows, 64-column group) tasks over M rows, on up to
// `threads` threads (fewer for less `work`): body(m0, mc, g, tile) for rows m0 .. m0+mc-1 and
// group g, with a per-thread scratch tile of MB x GROUP values T.
template <class T, class Body>
void tile_grid(std::int64_t M, std::int64_t mbr, const PackedWeights& W, int threads, double work,
               const Body& body) {
    const std::int64_t G = W.ngroups;
    const std::int64_t nmb = (M + mbr - 1) / mbr;
    const std::int64_t ntasks = nmb * G;
    // stream the larger operand once: if activations outweigh weights, rows outer
    const bool rows_outer = M > W.N;
    const int nt = clamp_threads(threads, ntasks, work);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        AlignedArray<T> tile = aligned_array<T>(std::size_t(MB) * GROUP);
#pragma omp for schedule(static)
        for (std::int64_t t = 0; t < ntasks; ++t) {
            const std::int64_t mb = rows_outer ? t / G : t % nmb;
            const std::int64_t g = rows_outer ? t % G : t / nmb;
            const std::int64_t m0 = mb * mbr;
            body(m0, int(std::min<std::int64_t>(mbr, M - m0)), g, tile.get());
        }
    }
}

// XOR/popcount GEMM of rows a[M][lda] with an epilogue per tile.
template <class Fix>
void run_grid(const KernelTable& kt, const std::uint64_t* a, std::size_t lda, std::int64_t M,
              const PackedWeights& W, const OutSpec& out, int threads, const Fix& fix) {
    if (M <= 0) return;
    tile_grid<std::int32_t>(M, rows_per_task(M, W.ngroups, threads, 6), W, threads,
                            double(M) * double(W.N) * double(W.KW),
                            [&](std::int64_t m0, int mc, std::int64_t g, std::int32_t* tile) {
                                kt.xor_popcount_tile(a + std::size_t(m0) * lda, lda, mc, W.group(g),
                                                     std::size_t(W.KW), W.group_panels(g), tile, GROUP);
                                finish_tile(kt, out, W, m0, mc, g, tile, fix);
                            });
}

}  // namespace

int resolve_threads(int threads) {
#ifdef _OPENMP
    if (threads <= 0) return omp_get_max_threads();
    return threads;
#else
    (void)threads;
    return 1;
#endif
}

PackedWeights pack_weights(const std::uint64_t* w, std::int64_t N, std::int64_t KW, std::int64_t K,
                           const std::vector<std::uint64_t>& keep_mask) {
    PackedWeights P;
    P.N = N;
    P.K = K;
    P.KW = KW;
    P.npanels = (N + PANEL - 1) / PANEL;
    P.ngroups = (N + GROUP - 1) / GROUP;
    const std::size_t total = std::size_t(KW) * std::size_t(P.npanels) * PANEL;
    P.data = aligned_array<std::uint64_t>(total);
    std::memset(P.data.get(), 0, sizeof(std::uint64_t) * (total ? total : 1));
    P.row_popcount.assign(std::size_t(N), 0);
    for (std::int64_t g = 0; g < P.ngroups; ++g) {
        std::uint64_t* base = P.data.get() + g * KW * GROUP;
        const std::size_t ldw = std::size_t(P.group_panels(g)) * PANEL;
        const int ncols = P.group_cols(g);
        for (int c = 0; c < ncols; ++c) {
            const std::int64_t n = g * GROUP + c;
            const std::uint64_t* row = w + std::size_t(n) * std::size_t(KW);
            std::int32_t pc = 0;
            for (std::int64_t k = 0; k < KW; ++k) {
                const std::uint64_t v = row[k] & keep_mask[std::size_t(k)];
                base[std::size_t(k) * ldw + std::size_t(c)] = v;
                pc += popcount64(v);
            }
            P.row_popcount[std::size_t(n)] = pc;
        }
    }
    return P;
}

void gemm_driver(const std::uint64_t* a, std::size_t lda, std::int64_t M, const PackedWeights& W,
                 const OutSpec& out_in, int threads) {
    const KernelTable& kt = current_table();
    ThresholdPrep prep;
    const OutSpec out = prep.apply(out_in, W.N);
    JunkFix fix{a, lda, std::size_t(W.KW - 1), 0};
    if (W.K % 64) fix.junk = ~((std::uint64_t(1) << (W.K % 64)) - 1);
    run_grid(kt, a, lda, M, W, out, threads, fix);
}

namespace {

// one word of OutsideBits for the n <= 64 values v of row m, group g
std::uint64_t outside_word(const OutsideBits& o, const std::int32_t* v, std::int64_t m, std::int64_t N,
                           std::int64_t g, int n) {
    const std::int64_t r = (m % o.P) * N + g * GROUP;
    const std::int32_t* lo = o.lo + r;
    const std::int32_t* hi = o.hi + r;
    alignas(8) std::uint8_t out[64] = {0};
    for (int c = 0; c < n; ++c) out[c] = std::uint8_t((v[c] < lo[c]) | (v[c] > hi[c]));
    return pack_bytes64(out);
}

// one row of sums of group g: into out [M][N], or as bits of OutsideBits
inline void emit_sums(const std::int32_t* sums, std::int64_t m, std::int64_t g, int ncols, std::int64_t N,
                      std::int64_t G, std::int32_t* out, const OutsideBits* outside) {
    if (outside)
        outside->bits[m * G + g] = outside_word(*outside, sums, m, N, g, ncols);
    else
        std::memcpy(out + m * N + g * GROUP, sums, sizeof(std::int32_t) * std::size_t(ncols));
}

// Per bit plane b of x: sum_k bit_b(x_k) w_k = popcount(x_b XOR w) - popcount(w), on the packed bits.
void bitplane_sums(const std::uint8_t* x, std::int64_t M, const PackedWeights& W, std::int32_t* out,
                   int threads, const OutsideBits* outside) {
    const KernelTable& kt = current_table();
    const std::int64_t K = W.K, KW = W.KW, N = W.N, G = W.ngroups;
    // planes: row 8m + b = bit plane b of x[m]
    AlignedArray<std::uint64_t> planes = aligned_array<std::uint64_t>(std::size_t(M) * 8 * std::size_t(KW));
    for (std::int64_t m = 0; m < M; ++m)
        kt.pack_bitplanes_row(x + std::size_t(m) * std::size_t(K), std::size_t(K),
                              planes.get() + std::size_t(m) * 8 * std::size_t(KW), std::size_t(KW));
    const std::int64_t R = 8 * M;
    tile_grid<std::int32_t>(
        R, rows_per_task(R, G, threads, 24), W, threads, double(R) * double(N) * double(KW),  // 24: whole outputs
        [&](std::int64_t r0, int rc, std::int64_t g, std::int32_t* tile) {
            kt.xor_popcount_tile(planes.get() + std::size_t(r0) * std::size_t(KW), std::size_t(KW), rc,
                                 W.group(g), std::size_t(KW), W.group_panels(g), tile, GROUP);
            const int ncols = W.group_cols(g);
            const std::int64_t n0 = g * GROUP;
            for (int i = 0; i < rc / 8; ++i) {
                std::int32_t sums[GROUP];
                for (int c = 0; c < ncols; ++c) {
                    std::int32_t v = 0;
                    for (int b = 0; b < 8; ++b) v += tile[std::size_t(8 * i + b) * GROUP + std::size_t(c)] << b;
                    sums[c] = v - 255 * W.row_popcount[std::size_t(n0 + c)];
                }
                emit_sums(sums, r0 / 8 + i, g, ncols, N, G, out, outside);
            }
        });
}

// uint8 x int8 multiply-adds (u8_tile) on W's int8 copy.
void byte_sums(const std::uint8_t* x, std::int64_t M, const PackedWeights& W, std::int32_t* out, int threads,
               const OutsideBits* outside) {
    const KernelTable& kt = current_table();
    const ByteWeights& B = byte_weights(W);
    const std::int64_t K = W.K, N = W.N, G = W.ngroups, K4 = B.K4;
    // the kernel reads 4 k at a time: rows of 4·K4 bytes, zero beyond K
    AlignedArray<std::uint8_t> padded;
    const std::uint8_t* rows = x;
    std::size_t ldx = std::size_t(K);
    if (K % 4) {
        ldx = std::size_t(4 * K4);
        padded = aligned_array<std::uint8_t>(std::size_t(M) * ldx);
        for (std::int64_t m = 0; m < M; ++m) {
            std::memcpy(padded.get() + std::size_t(m) * ldx, x + std::size_t(m) * std::size_t(K), std::size_t(K));
            std::memset(padded.get() + std::size_t(m) * ldx + std::size_t(K), 0, ldx - std::size_t(K));
        }
        rows = padded.get();
    }
    tile_grid<std::int32_t>(
        M, rows_per_task(M, G, threads, 6), W, threads, double(M) * double(N) * double(K4) / 16.0,
        [&](std::int64_t m0, int mc, std::int64_t g, std::int32_t* tile) {
            kt.u8_tile(rows + std::size_t(m0) * ldx, ldx, mc, B.group(g), std::size_t(K4), W.group_panels(g), tile,
                       GROUP);
            for (int i = 0; i < mc; ++i)
                emit_sums(tile + std::size_t(i) * GROUP, m0 + i, g, W.group_cols(g), N, G, out, outside);
        });
}

// A single row takes the bit planes: the int8 copy is 8x the bits, and one row does not repay
// streaming it from memory (from 2 rows on the multiply-adds are faster: AVX2, K = 784).
constexpr std::int64_t BYTE_SUMS_MIN_ROWS = 2;

}  // namespace

const ByteWeights& byte_weights(const PackedWeights& W) {
    ByteWeights& B = *W.bytes;
    std::call_once(B.built, [&W, &B] {
        const std::int64_t K4 = (W.K + 3) / 4;
        const std::size_t bytes = std::size_t(K4 * 4 * W.npanels * PANEL);
        AlignedArray<std::int8_t> data = aligned_array<std::int8_t>(bytes);
        std::memset(data.get(), 0, bytes);
        for (std::int64_t g = 0; g < W.ngroups; ++g) {
            const std::uint64_t* bits = W.group(g);
            const std::size_t ldw = std::size_t(W.group_panels(g)) * PANEL;  // words per k word
            std::int8_t* dst = data.get() + g * K4 * GROUP * 4;
            const int ncols = W.group_cols(g);
            for (std::int64_t k = 0; k < W.K; ++k) {
                const std::uint64_t* word = bits + std::size_t(k / 64) * ldw;
                std::int8_t* row = dst + std::size_t(k / 4) * ldw * 4 + std::size_t(k % 4);
                for (int c = 0; c < ncols; ++c) row[4 * c] = ((word[c] >> (k % 64)) & 1) ? -1 : 1;
            }
        }
        B.K4 = K4;
        B.data = std::move(data);
    });
    return B;
}

void u8_driver(const std::uint8_t* x, std::int64_t M, const PackedWeights& W, std::int32_t* out,
               int threads, const OutsideBits* outside) {
    if (M <= 0) return;
    if (M < BYTE_SUMS_MIN_ROWS)
        bitplane_sums(x, M, W, out, threads, outside);
    else
        byte_sums(x, M, W, out, threads, outside);
}

void float_driver(const float* x, std::int64_t M, const PackedWeights& W, float* out, int threads) {
    if (M <= 0) return;
    const KernelTable& kt = current_table();
    const std::int64_t K = W.K, N = W.N;
    constexpr std::int64_t FMB = 32;  // rows per task
    tile_grid<float>(M, FMB, W, threads, double(M) * double(N) * double(K) / 4.0,
                     [&](std::int64_t m0, int mc, std::int64_t g, float* tile) {
                         kt.float_tile(x + std::size_t(m0) * std::size_t(K), std::size_t(K), mc, W.group(g),
                                       std::size_t(K), std::size_t(W.KW), W.group_panels(g), tile, GROUP);
                         for (int i = 0; i < mc; ++i)
                             std::memcpy(out + (m0 + i) * N + g * GROUP, tile + std::size_t(i) * GROUP,
                                         sizeof(float) * std::size_t(W.group_cols(g)));
                     });
}

// ---- conv ----------------------------------------------------------------------------------
namespace {

struct Im2col {
    const std::uint64_t* x;
    const ConvGeom* g;
    std::uint64_t cmask;     // valid channel bits of the last channel word
    std::uint64_t padfull;   // pad word for full channel words
    std::uint64_t padlast;   // pad word for the last channel word
    std::int64_t Kc;         // words per row = kh*kw*CW

    // rows r0 .. r0+nr-1 (r = (b * Ho + oy) * Wo + ox) into dst[nr][Kc]
    void rows(std::int64_t r0, std::int64_t nr, std::uint64_t* dst) const {
        const ConvGeom& G = *g;
        const std::int64_t CW = G.CW, run = G.kw * CW;
        const bool full_words = cmask == ~std::uint64_t(0);
        std::int64_t ox = r0 % G.Wo, oy = (r0 / G.Wo) % G.Ho, b = r0 / (G.Wo * G.Ho);
        for (std::int64_t r = 0; r < nr; ++r) {
            std::uint64_t* d = dst + r * Kc;
            const std::int64_t ix0 = ox * G.sw - G.pw, iy0 = oy * G.sh - G.ph;
            const bool xin = ix0 >= 0 && ix0 + G.kw <= G.W;
            for (std::int64_t ky = 0; ky < G.kh; ++ky, d += run) {
                const std::int64_t iy = iy0 + ky;
                const bool yok = iy >= 0 && iy < G.H;
                if (yok && xin) {  // kw taps = kw consecutive pixels: one contiguous run
                    const std::uint64_t* s = x + ((b * G.H + iy) * G.W + ix0) * CW;
                    std::memcpy(d, s, sizeof(std::uint64_t) * std::size_t(run));
                    if (!full_words)
                        for (std::int64_t kx = 0; kx < G.kw; ++kx) d[kx * CW + CW - 1] &= cmask;
                    continue;
                }
                for (std::int64_t kx = 0; kx < G.kw; ++kx) {
                    std::uint64_t* dt = d + kx * CW;
                    const std::int64_t ix = ix0 + kx;
                    if (yok && ix >= 0 && ix < G.W) {
                        const std::uint64_t* s = x + ((b * G.H + iy) * G.W + ix) * CW;
                        for (std::int64_t c = 0; c + 1 < CW; ++c) dt[c] = s[c];
                        dt[CW - 1] = s[CW - 1] & cmask;
                    } else {
                        for (std::int64_t c = 0; c + 1 < CW; ++c) dt[c] = padfull;
                        dt[CW - 1] = padlast;
                    }
                }
            }
            if (++ox == G.Wo) {
                ox = 0;
                if (++oy == G.Ho) {
                    oy = 0;
                    ++b;
                }
            }
        }
    }
};

// distinct valid-tap intervals [lo, hi) along one axis; cls[o] = class index
void axis_classes(std::int64_t n_out, std::int64_t stride, std::int64_t pad, std::int64_t size,
                  std::int64_t k, std::vector<std::pair<std::int64_t, std::int64_t>>& classes,
                  std::vector<std::int32_t>& cls) {
    cls.assign(std::size_t(n_out), 0);
    for (std::int64_t o = 0; o < n_out; ++o) {
        const std::int64_t start = o * stride - pad;
        std::int64_t lo = std::max<std::int64_t>(0, -start);
        std::int64_t hi = std::min<std::int64_t>(k, size - start);
        if (hi < lo) hi = lo;
        std::int32_t idx = -1;
        for (std::size_t i = 0; i < classes.size(); ++i)
            if (classes[i].first == lo && classes[i].second == hi) idx = std::int32_t(i);
        if (idx < 0) {
            idx = std::int32_t(classes.size());
            classes.emplace_back(lo, hi);
        }
        cls[std::size_t(o)] = idx;
    }
}

}  // namespace

void conv_driver(const std::uint64_t* x, const ConvGeom& G, const PackedWeights& W,
                 const std::vector<std::int32_t>& wsum, const OutSpec& out_in, int threads) {
    const std::int64_t M = G.B * G.Ho * G.Wo;
    if (M <= 0) return;
    const KernelTable& kt = current_table();
    ThresholdPrep prep;
    const OutSpec out = prep.apply(out_in, W.N);
    const std::int64_t Kc = G.kh * G.kw * G.CW;
    Im2col ic;
    ic.x = x;
    ic.g = &G;
    ic.cmask = (G.C % 64) ? ((std::uint64_t(1) << (G.C % 64)) - 1) : ~std::uint64_t(0);
    ic.padfull = G.pad_value < 0 ? ~std::uint64_t(0) : 0;
    ic.padlast = G.pad_value < 0 ? ic.cmask : 0;
    ic.Kc = Kc;

    // pad_value 0: correction table per (row class, column class)
    ConvFix fix;
    std::vector<std::int32_t> table, ycls, xcls;
    if (G.pad_value == 0 && (G.ph > 0 || G.pw > 0)) {
        std::vector<std::pair<std::int64_t, std::int64_t>> yc, xc;
        axis_classes(G.Ho, G.sh, G.ph, G.H, G.kh, yc, ycls);
        axis_classes(G.Wo, G.sw, G.pw, G.W, G.kw, xc, xcls);
        const std::int64_t T = G.kh * G.kw;
        table.assign(yc.size() * xc.size() * std::size_t(G.O), 0);
        for (std::size_t i = 0; i < yc.size(); ++i)
            for (std::size_t j = 0; j < xc.size(); ++j) {
                std::int32_t* t = table.data() + (i * xc.size() + j) * std::size_t(G.O);
                for (std::int64_t ky = 0; ky < G.kh; ++ky)
                    for (std::int64_t kx = 0; kx < G.kw; ++kx) {
                        const bool inside = ky >= yc[i].first && ky < yc[i].second &&
                                            kx >= xc[j].first && kx < xc[j].second;
                        if (inside) continue;
                        for (std::int64_t o = 0; o < G.O; ++o) t[o] += wsum[std::size_t(o * T + ky * G.kw + kx)];
                    }
            }
        fix.table = table.data();
        fix.ycls = ycls.data();
        fix.xcls = xcls.data();
        fix.nxc = std::int64_t(xc.size());
        fix.Ho = G.Ho;
        fix.Wo = G.Wo;
        fix.O = G.O;
    }

    const int nt_all = resolve_threads(threads);
    const std::int64_t mbr = rows_per_task(M, 1, threads, 6);
    const std::int64_t nmb = (M + mbr - 1) / mbr;
    if (nmb >= 2 * std::int64_t(nt_all) || nt_all <= 1) {
        // fused: each task builds its own block of im2col rows (thread-local scratch) and
        // runs it against every weight group while the rows are hot in cache
        const int nt = clamp_threads(threads, nmb, double(M) * double(W.N) * double(Kc));
        const std::int64_t Gn = W.ngroups;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            AlignedArray<std::uint64_t> rows = aligned_array<std::uint64_t>(std::size_t(MB * Kc));
            AlignedArray<std::int32_t> tile = aligned_array<std::int32_t>(std::size_t(MB) * GROUP);
#pragma omp for schedule(static)
            for (std::int64_t mb = 0; mb < nmb; ++mb) {
                const std::int64_t m0 = mb * mbr;
                const int mc = int(std::min<std::int64_t>(mbr, M - m0));
                ic.rows(m0, mc, rows.get());
                for (std::int64_t g = 0; g < Gn; ++g) {
                    kt.xor_popcount_tile(rows.get(), std::size_t(Kc), mc, W.group(g), std::size_t(Kc),
                                         W.group_panels(g), tile.get(), GROUP);
                    finish_tile(kt, out, W, m0, mc, g, tile.get(), fix);
                }
            }
        }
    } else {
        // few rows: im2col everything once, then the 2-D grid spreads groups over threads
        AlignedArray<std::uint64_t> rows = aligned_array<std::uint64_t>(std::size_t(M * Kc));
        const int nt = clamp_threads(threads, M);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (std::int64_t r = 0; r < M; ++r) ic.rows(r, 1, rows.get() + r * Kc);
        run_grid(kt, rows.get(), std::size_t(Kc), M, W, out, threads, fix);
    }
}

void maxpool_driver(const std::uint64_t* x, std::int64_t B, std::int64_t H, std::int64_t W,
                    std::int64_t CW, std::int64_t kh, std::int64_t kw, std::int64_t sh,
                    std::int64_t sw, std::uint64_t* out, int threads) {
    const std::int64_t Ho = (H - kh) / sh + 1, Wo = (W - kw) / sw + 1;
    const std::int64_t rows = B * Ho;
    if (rows <= 0 || Wo <= 0) return;
    const int nt = clamp_threads(threads, rows * Wo * CW >= 4096 ? rows : 1);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t b = r / Ho, oy = r % Ho;
        for (std::int64_t ox = 0; ox < Wo; ++ox) {
            std::uint64_t* d = out + (r * Wo + ox) * CW;
            for (std::int64_t c = 0; c < CW; ++c) d[c] = ~std::uint64_t(0);
            for (std::int64_t ky = 0; ky < kh; ++ky) {
                const std::uint64_t* srow = x + ((b * H + oy * sh + ky) * W + ox * sw) * CW;
                for (std::int64_t kx = 0; kx < kw; ++kx)
                    for (std::int64_t c = 0; c < CW; ++c) d[c] &= srow[kx * CW + c];
            }
        }
    }
}

void pack_signs_driver(const float* x, std::int64_t M, std::int64_t K, std::uint64_t* out,
                       int threads) {
    if (M <= 0) return;
    const KernelTable& kt = current_table();
    const std::int64_t KW = (K + 63) / 64;
    const int nt = clamp_threads(threads, M * K >= (1 << 16) ? M : 1);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (std::int64_t m = 0; m < M; ++m)
        kt.pack_signs_row(x + m * K, std::size_t(K), out + m * KW);
}

}  // namespace onebit
