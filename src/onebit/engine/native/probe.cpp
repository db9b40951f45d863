// Micro-probes used by onebit.bench to put measured kernel speed in relation to the machine:
// the core clock (a chain of dependent 1-cycle integer adds) and the in-register peak of the
// XOR + popcount + accumulate loop of the best popcount this CPU has (no memory traffic):
// AVX-512 VPOPCNTQ, else AVX2's nibble lookup (VPSHUFB) with byte accumulators.
// Single-threaded; both return 0 where they cannot run (non-x86, or neither instruction set).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "onebit_kernels.hpp"

#if defined(ONEBIT_X86)
#include <immintrin.h>

#include "popcount_avx2.hpp"
#endif

namespace onebit {

// GHz: `iters` x 200 dependent adds take iters x 200 cycles.
double probe_clock_ghz(std::int64_t iters) {
#if defined(ONEBIT_X86) && defined(__GNUC__)
    std::uint64_t x = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < iters; ++i) {
        __asm__ volatile(".rept 200\n\taddq $1, %0\n\t.endr" : "+r"(x));
    }
    const auto t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    return s > 0 ? double(iters) * 200.0 / s / 1e9 : 0.0;
#else
    (void)iters;
    return 0.0;
#endif
}

#if defined(ONEBIT_X86)
__attribute__((target("avx512f,avx512vpopcntdq"), noinline)) static std::uint64_t peak_loop(std::int64_t iters) {
    // 24 independent accumulators, operands in registers: 24 x (xor, popcnt, add) per step
    __m512i acc[24];
    __m512i w[4];
    for (int j = 0; j < 4; ++j) w[j] = _mm512_set1_epi64(0x0123456789ABCDEFLL * (j + 1));
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_setzero_si512();
    __m512i a[6];
    for (int i = 0; i < 6; ++i) a[i] = _mm512_set1_epi64(0x5555AAAA3333CCCCLL + i);
    for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 6
        for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
                acc[i * 4 + j] = _mm512_add_epi64(acc[i * 4 + j], _mm512_popcnt_epi64(_mm512_xor_si512(a[i], w[j])));
        // keep the compiler from hoisting the loop-invariant popcounts
        __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]), "+v"(a[4]), "+v"(a[5]));
    }
    std::uint64_t s = 0;
    alignas(64) std::uint64_t buf[8];
    for (int i = 0; i < 24; ++i) {
        _mm512_store_si512(buf, acc[i]);
        for (int j = 0; j < 8; ++j) s += buf[j];
    }
    return s;
}

// The AVX2 kernel's inner step (kernels_avx2.cpp) on registers only: per 256 bit pairs one XOR,
// two nibble lookups, one byte add into an accumulator that is widened (VPSADBW) every 31 steps.
// Four independent streams fit the 16 ymm registers with the lookup table and the masks.
constexpr int kAvx2Streams = 4, kAvx2Run = 31;

__attribute__((target("avx2"), noinline)) static std::uint64_t peak_loop_avx2(std::int64_t iters) {
    const __m256i lut = nibble_lut_avx2();
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    __m256i a[2] = {_mm256_set1_epi64x(0x5555AAAA3333CCCCLL), _mm256_set1_epi64x(0x0F0F3C3C9696A5A5LL)};
    const __m256i w[2] = {_mm256_set1_epi64x(0x0123456789ABCDEFLL), _mm256_set1_epi64x(0x2468ACE013579BDFLL)};
    __m256i wide[kAvx2Streams];
    for (int s = 0; s < kAvx2Streams; ++s) wide[s] = zero;
    for (std::int64_t it = 0; it < iters; ++it) {
        __m256i bytes[kAvx2Streams];
        for (int s = 0; s < kAvx2Streams; ++s) bytes[s] = zero;
        for (int step = 0; step < kAvx2Run; ++step) {
#pragma GCC unroll 4
            for (int s = 0; s < kAvx2Streams; ++s) {
                const __m256i x = _mm256_xor_si256(a[s / 2], w[s % 2]);
                bytes[s] = _mm256_add_epi8(bytes[s], popcount_bytes_avx2(x, lut, low));
            }
            // keep the compiler from hoisting the loop-invariant popcounts
            __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]));
        }
        for (int s = 0; s < kAvx2Streams; ++s) wide[s] = _mm256_add_epi64(wide[s], _mm256_sad_epu8(bytes[s], zero));
    }
    std::uint64_t total = 0;
    alignas(32) std::uint64_t buf[4];
    for (int s = 0; s < kAvx2Streams; ++s) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(buf), wide[s]);
        for (int j = 0; j < 4; ++j) total += buf[j];
    }
    return total;
}
#endif

// bit pairs per second (one thread) of the in-register loop of `path`: "avx512" (XOR + VPOPCNTQ +
// VPADDQ on zmm) or "avx2" (XOR + nibble lookups + byte adds on ymm); 0 where the CPU lacks it
double probe_popcnt_peak(std::int64_t iters, const std::string& path) {
#if defined(ONEBIT_X86) && defined(__GNUC__)
    // the same CPU test as the kernel dispatch: a probe runs where its kernel path does
    const std::vector<std::string> paths = available_paths();
    if (std::find(paths.begin(), paths.end(), path) == paths.end()) return 0.0;
    double bit_pairs = 0.0;
    std::uint64_t (*loop)(std::int64_t) = nullptr;
    if (path == "avx512") {
        loop = peak_loop;
        bit_pairs = double(iters) * 24.0 * 512.0;
    } else if (path == "avx2") {
        loop = peak_loop_avx2;
        bit_pairs = double(iters) * kAvx2Run * kAvx2Streams * 256.0;
    }
    if (loop == nullptr) return 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    volatile std::uint64_t sink = loop(iters);
    (void)sink;
    const auto t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    return s > 0 ? bit_pairs / s : 0.0;
#else
    (void)iters;
    (void)path;
    return 0.0;
#endif
}

}  // namespace onebit
