// onebit native kernels: shared declarations.
//
// Bit conventions (docs/design.md): bit 1 <-> -1, bit 0 <-> +1; uint64 words along the
// reduction axis K, least significant bit first; K padded to a multiple of 64 with 0 bits in
// both operands; dot = K - 2 * popcount(a XOR w).
//
// Prepared weight layout ("groups of panels"): the N output rows are cut into groups of 64
// rows (GROUP), each group into panels of 8 rows (PANEL, one 512-bit vector of 8 uint64
// lanes). A group with P panels (P = 8 except maybe the last) is stored as
//     group[k][P * 8]      (k = 0 .. KW-1 word index along K)
// i.e. word k of all its rows side by side. A kernel broadcasts one activation word a[m][k]
// into all lanes and XORs it with the (P*8) weight words of that k; lane j of accumulator
// (m, panel p) collects the popcount of output (m, 8p + j). No horizontal reduction is ever
// needed, and one 64-row group is exactly one uint64 word of thresholded output bits.
// Rows beyond N in the last panel are zero and their results are discarded.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace onebit {

constexpr int PANEL = 8;                     // output rows per panel
constexpr int GROUP_PANELS = 8;              // panels per group
constexpr int GROUP = PANEL * GROUP_PANELS;  // 64 output rows per group

// ---------------------------------------------------------------------------------------
// 64-byte aligned buffers
struct AlignedFree {
    void operator()(void* p) const noexcept { std::free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedArray<T> aligned_array(std::size_t n) {
    std::size_t bytes = n * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0 || p == nullptr) throw std::bad_alloc();
    return AlignedArray<T>(static_cast<T*>(p));
}

// ---------------------------------------------------------------------------------------
// Output modes shared by GEMM and conv.
enum class OutMode { Raw, Threshold, Affine };

struct OutSpec {
    OutMode mode = OutMode::Raw;
    std::int32_t* raw = nullptr;      // [M][N]
    std::uint64_t* bits = nullptr;    // [M][NW]
    float* affine = nullptr;          // [M][N]
    const std::int32_t* scale = nullptr;   // s in {-1, 0, +1}, [N]
    const std::int32_t* thresh = nullptr;  // t, [N]
    // prepared from scale/thresh by the driver: bit = (dot < tcmp[n]) XOR flip bit n
    //   s=+1: tcmp = t; s=-1: tcmp = 1 - t, flip (since -dot < t <=> !(dot < 1 - t));
    //   s=0: tcmp = INT32_MAX if t > 0 else INT32_MIN (constant; |dot| <= K < INT32_MAX)
    const std::int32_t* tcmp = nullptr;    // [N]
    const std::uint64_t* flip = nullptr;   // [ceil(N/64)]
    const float* mul = nullptr;
    const float* add = nullptr;
};

// The epilogue of one tile: rows m0 .. m0+mc-1, output columns n0 = 64 g .. n0+ncols-1.
// dot = K - 2 * (pc - adj[i]) - corr[i][c]   (adj / corr / corr[i] may be null = 0), then
// Raw: int32 dot; Threshold: bit c of word (m, g) = (scale * dot < thresh) computed as
// (dot < tcmp) ^ flip, padding bits 0;
// Affine: float32(dot) * mul rounded, + add rounded.
struct TileEpilogue {
    const OutSpec* out;
    std::int64_t N, G;  // outputs per row, words per row of threshold output
    std::int32_t K;
    std::int64_t m0, g;
    int mc, ncols;
    const std::int32_t* pc;  // [mc][ldpc]
    std::size_t ldpc;
    const std::int32_t* adj;           // [mc] or null
    const std::int32_t* const* corr;   // [mc] row pointers (column 0; add n0) or null = none
};

// ---------------------------------------------------------------------------------------
// One implementation path (portable / avx2 / avx512): a table of function pointers.
struct KernelTable {
    const char* name;
    // pc[i * ldpc + n] = sum_k popcount(a[i * lda + k] XOR w[k * (npan*8) + n])
    //   for i < m, n < npan * 8, k < KW.   w: one group in the layout above.
    void (*xor_popcount_tile)(const std::uint64_t* a, std::size_t lda, int m,
                              const std::uint64_t* w, std::size_t KW, int npan,
                              std::int32_t* pc, std::size_t ldpc);
    // Pack one row of K floats: bit = 1 iff x < 0 (false for -0.0 and NaN). out: ceil(K/64) words.
    void (*pack_signs_row)(const float* x, std::size_t K, std::uint64_t* out);
    // Bit planes of one row of K uint8: out[b * KW + k/64] bit k%64 = bit b of x[k], b = 0..7.
    void (*pack_bitplanes_row)(const std::uint8_t* x, std::size_t K, std::uint64_t* out,
                               std::size_t KW);
    // out[i * ldo + n] = sum_{k=0}^{K-1} (bit_k(w_n) ? -x[i][k] : x[i][k]), accumulated in
    // float32 strictly in increasing k, one accumulator per output (deterministic order).
    void (*float_tile)(const float* x, std::size_t ldx, int m, const std::uint64_t* w,
                       std::size_t K, std::size_t KW, int npan, float* out, std::size_t ldo);
    // out[i * ldo + n] = sum_k x[i * ldx + k] * w(n, k) exactly, for i < m, n < npan * 8: uint8
    // x (rows of 4 * K4 bytes, 0 beyond K) times int8 +-1 weights w, one group of ByteWeights.
    void (*u8_tile)(const std::uint8_t* x, std::size_t ldx, int m, const std::int8_t* w,
                    std::size_t K4, int npan, std::int32_t* out, std::size_t ldo);
    void (*finish_tile)(const TileEpilogue& e);
    // scale (int8 if s_i8 else int32) / thresh [N] -> tcmp [N], flip [ceil(N/64)] (see OutSpec);
    // returns false if a scale entry is not -1, 0 or +1
    bool (*threshold_prep)(const void* s, bool s_i8, const std::int32_t* t, std::int64_t N,
                           std::int32_t* tcmp, std::uint64_t* flip);
};

// 64 bytes of 0/1 -> one word, byte j -> bit j (little endian: 8 bytes per multiply).
__attribute__((always_inline)) inline std::uint64_t pack_bytes64(const std::uint8_t* bytes) {
    std::uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
        std::uint64_t v;
        __builtin_memcpy(&v, bytes + 8 * q, 8);
        word |= ((v * 0x0102040810204080ULL) >> 56) << (8 * q);
    }
    return word;
}

// Generic body of threshold_prep, inlined into each path's function so that it is
// auto-vectorised for that path's ISA.
template <class S>
__attribute__((always_inline)) inline bool threshold_prep_body(const S* s, const std::int32_t* t,
                                                               std::int64_t N, std::int32_t* tcmp,
                                                               std::uint64_t* flip) {
    int bad = 0;
    for (std::int64_t n = 0; n < N; ++n) {
        const std::int32_t sv = s[n], tv = t[n];
        bad |= int(sv < -1) | int(sv > 1);
        const std::int32_t neg = tv <= INT32_MIN + 1 ? INT32_MAX : 1 - tv;  // 1 - t, saturated
        const std::int32_t zero = tv > 0 ? INT32_MAX : INT32_MIN;
        tcmp[n] = sv > 0 ? tv : (sv < 0 ? neg : zero);
    }
    for (std::int64_t w = 0; w < (N + 63) / 64; ++w) {
        const std::int64_t n0 = w * 64;
        const int cnt = int(N - n0 < 64 ? N - n0 : 64);
        std::uint8_t neg[64] = {0};
        for (int j = 0; j < cnt; ++j) neg[j] = std::uint8_t(s[n0 + j] < 0);
        flip[w] = pack_bytes64(neg);
    }
    return bad == 0;
}

#define ONEBIT_THRESHOLD_PREP(NAME, ATTR)                                                         \
    ATTR bool NAME(const void* s, bool s_i8, const std::int32_t* t, std::int64_t N,              \
                   std::int32_t* tcmp, std::uint64_t* flip) {                                    \
        return s_i8 ? threshold_prep_body(static_cast<const std::int8_t*>(s), t, N, tcmp, flip)  \
                    : threshold_prep_body(static_cast<const std::int32_t*>(s), t, N, tcmp, flip); \
    }

void finish_tile_portable(const TileEpilogue& e);

extern const KernelTable kPortableTable;
#if defined(__x86_64__) || defined(_M_X64)
#define ONEBIT_X86 1
extern const KernelTable kAvx2Table;
extern const KernelTable kAvx512Table;
// AVX-512 CPUs run the AVX2 uint8 x int8 kernel
void u8_tile_avx2(const std::uint8_t* x, std::size_t ldx, int m, const std::int8_t* w,
                  std::size_t K4, int npan, std::int32_t* out, std::size_t ldo);
#endif

const KernelTable& current_table();
bool set_path(const std::string& name);  // false if unknown or unsupported on this CPU
std::vector<std::string> available_paths();
std::string current_path();

// ---------------------------------------------------------------------------------------
// The +-1 weights as int8 for the uint8 x int8 multiply-add kernel (u8_tile), built on first
// use by byte_weights(): group g at data + g * K4 * GROUP * 4 (only the last group may hold
// fewer than 8 panels), laid out [K4][rows][4] (4 consecutive k of one row side by side, rows
// of the group's panels), 0 beyond K.
struct ByteWeights {
    std::once_flag built;
    std::int64_t K4 = 0;
    AlignedArray<std::int8_t> data;
    const std::int8_t* group(std::int64_t g) const { return data.get() + g * K4 * GROUP * 4; }
};

// Prepared binary weights (used by BinaryMatrix and BinaryConv2d).
struct PackedWeights {
    std::int64_t N = 0;   // output rows
    std::int64_t K = 0;   // true reduction length (number of signs)
    std::int64_t KW = 0;  // words per row
    std::int64_t npanels = 0;
    std::int64_t ngroups = 0;
    AlignedArray<std::uint64_t> data;
    std::vector<std::int32_t> row_popcount;  // popcount of each (masked) weight row
    std::shared_ptr<ByteWeights> bytes = std::make_shared<ByteWeights>();  // see byte_weights

    const std::uint64_t* group(std::int64_t g) const { return data.get() + g * KW * GROUP; }
    int group_panels(std::int64_t g) const {
        std::int64_t p = npanels - g * GROUP_PANELS;
        return int(p < GROUP_PANELS ? p : GROUP_PANELS);
    }
    int group_cols(std::int64_t g) const {
        std::int64_t c = N - g * GROUP;
        return int(c < GROUP ? c : GROUP);
    }
};

// Build from row-major w[N][KW]; keep_mask (KW words) selects the valid bits of each row
// (bits outside are cleared, so padding is 0 whatever the caller passed).
PackedWeights pack_weights(const std::uint64_t* w, std::int64_t N, std::int64_t KW,
                           std::int64_t K, const std::vector<std::uint64_t>& keep_mask);

// W's int8 copy, built once (thread-safe) on the first call: 8 bits per weight, so only the
// layers that run on uint8 inputs get one.
const ByteWeights& byte_weights(const PackedWeights& W);

int resolve_threads(int threads);

// GEMM driver. a: [M][lda] words (lda >= KW). junk_mask: bits of the last word that are
// padding (their popcount is removed so callers' junk padding bits cannot change results).
void gemm_driver(const std::uint64_t* a, std::size_t lda, std::int64_t M,
                 const PackedWeights& W, const OutSpec& out, int threads);

// Output of a sum as bits: bit c of word g of row m = (v < lo[r][n]) | (v > hi[r][n]) for
// n = 64 g + c, r = m % P (a conv's im2col rows cycle through its P = Ho·Wo output pixels).
struct OutsideBits {
    const std::int32_t* lo = nullptr;  // [P][N]
    const std::int32_t* hi = nullptr;  // [P][N]
    std::int64_t P = 1;
    std::uint64_t* bits = nullptr;  // [M][ceil(N/64)]
};

// Exact sums of uint8 x[M][K] times the +-1 weights: int32 out [M][N], or (outside != null)
// outside->bits instead. One row runs on bit planes (popcounts on the packed weights), more
// rows on int8 multiply-adds (u8_tile) on the weights' int8 copy.
void u8_driver(const std::uint8_t* x, std::int64_t M, const PackedWeights& W, std::int32_t* out,
               int threads, const OutsideBits* outside = nullptr);

void float_driver(const float* x, std::int64_t M, const PackedWeights& W, float* out,
                  int threads);

struct ConvGeom {
    std::int64_t B, H, W, C, CW, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
    int pad_value;  // +1, -1 or 0
};

// wsum[o * kh*kw + tap] = sum over the C channels of tap of the +-1 weights.
void conv_driver(const std::uint64_t* x, const ConvGeom& g, const PackedWeights& W,
                 const std::vector<std::int32_t>& wsum, const OutSpec& out, int threads);

void maxpool_driver(const std::uint64_t* x, std::int64_t B, std::int64_t H, std::int64_t W,
                    std::int64_t CW, std::int64_t kh, std::int64_t kw, std::int64_t sh,
                    std::int64_t sw, std::uint64_t* out, int threads);

void pack_signs_driver(const float* x, std::int64_t M, std::int64_t K, std::uint64_t* out,
                       int threads);

}  // namespace onebit
