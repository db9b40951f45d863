// The AVX2 popcount step shared by the AVX2 kernel and its peak probe: per byte of x, the
// number of set bits, by two nibble lookups (VPSHUFB). Include only where x86 intrinsics exist.
#pragma once
#include <immintrin.h>

namespace onebit {

__attribute__((target("avx2"), always_inline)) inline __m256i nibble_lut_avx2() {
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

// bytewise popcount of x; lut = nibble_lut_avx2(), low = 0x0F in every byte
__attribute__((target("avx2"), always_inline)) inline __m256i popcount_bytes_avx2(__m256i x, __m256i lut, __m256i low) {
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                           _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
}

}  // namespace onebit
