// Micro-probes used by benchmarks/bench_kernels.py to put measured kernel speed in relation
// to the machine: the core clock (a chain of dependent 1-cycle integer adds) and the
// in-register peak of the AVX-512 XOR + VPOPCNTQ + VPADDQ loop (no memory traffic).
// Single-threaded; both return 0 where they cannot run (non-x86 / no AVX-512 VPOPCNTDQ).
#include <chrono>
#include <cstdint>

#include "onebit_kernels.hpp"

#if defined(ONEBIT_X86)
#include <immintrin.h>
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
#endif

// bit pairs per second (one thread) of XOR+VPOPCNTQ+VPADDQ on zmm registers
double probe_popcnt_peak(std::int64_t iters) {
#if defined(ONEBIT_X86) && defined(__GNUC__)
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq"))) return 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    volatile std::uint64_t sink = peak_loop(iters);
    (void)sink;
    const auto t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    return s > 0 ? double(iters) * 24.0 * 512.0 / s : 0.0;
#else
    (void)iters;
    return 0.0;
#endif
}

}  // namespace onebit
