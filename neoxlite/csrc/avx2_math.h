/* AVX2 helpers shared by neoxlite's bf16 kernels (the linear layers' sums and GELU, decode attention). */
#ifndef NEOXLITE_AVX2_MATH_H
#define NEOXLITE_AVX2_MATH_H

#include <immintrin.h>

#include "gelu.h"

/* Eight accumulators' totals in one vector: lane j = ((v_j0 + v_j1) + (v_j2 + v_j3)) + ((v_j4 + v_j5) + (v_j6 + v_j7)),
 * the one order in which an output's eight partial sums are added, whatever the batch */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 hsum8x8_avx2(const __m256 v[8]) {
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67); /* v_0-3: lanes 0-3 | lanes 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

/* e^x for x <= 0, the AVX512 version's arithmetic on 8 lanes (the same polynomial, the same roundings). Below
 * -87, e^x < 2^-125 vanishes next to 1 in GELU's 1 - e^x t r just as e^-104 does, and next to a softmax's largest
 * term (1), so the clamp can sit where 2^n is still a normal float and p * 2^n rounds once, as scalef does. */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 exp_nonpositive_avx2(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* in this order a NaN stays NaN (max returns its second operand) */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP_POLY(__m256, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_set1_ps, x, n, p);
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 8 fp32 values to bf16, nearest even, NaN kept a (quiet) NaN: float_to_bf16 on each lane; in the low 16 bits */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256i round_bf16_avx2(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

__attribute__((target("avx2,fma"), always_inline)) static inline __m256 abs_avx2(__m256 v) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

#endif
