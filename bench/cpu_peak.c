/* Peak multiply-add throughput of one core, for judging what batched CPU decoding can reach.
 *
 *     cc -O2 -o /tmp/cpu_peak bench/cpu_peak.c && /tmp/cpu_peak
 *
 * Runs 12 independent accumulator chains (more than the latency x throughput product of either instruction)
 * of AVX512-BF16 vdpbf16ps (32 bf16 multiply-adds each) and of AVX-512 vfmadd231ps (16 fp32 multiply-adds),
 * and prints GFLOP/s per core (one multiply-add = 2 FLOP). The chains start from different values and are
 * hidden from the optimizer, so none can be merged. Needs a CPU with AVX512-BF16.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS(OP) a0 = OP(a0); a1 = OP(a1); a2 = OP(a2); a3 = OP(a3); a4 = OP(a4); a5 = OP(a5); \
                   a6 = OP(a6); a7 = OP(a7); a8 = OP(a8); a9 = OP(a9); a10 = OP(a10); a11 = OP(a11);

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) int main(void) {
    const long iterations = 50000000;
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3c00);
    __m512 fx = _mm512_set1_ps(1.0f), fy = _mm512_set1_ps(1e-9f);
    for (int fma = 0; fma < 2; ++fma) {
        __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2), a3 = _mm512_set1_ps(3),
               a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5), a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7),
               a8 = _mm512_set1_ps(8), a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
        __asm__ volatile("" : "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11), "+v"(x), "+v"(y), "+v"(fx), "+v"(fy));
        const double start = seconds();
#define DP(a) _mm512_dpbf16_ps(a, x, y)
#define FM(a) _mm512_fmadd_ps(fx, fy, a)
        if (fma) for (long i = 0; i < iterations; ++i) { CHAINS(FM) }
        else for (long i = 0; i < iterations; ++i) { CHAINS(DP) }
        const double elapsed = seconds() - start;
        __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
        const double per_second = 12.0 * iterations / elapsed, flop = fma ? 32 : 64;
        printf("%-22s %6.2f G instructions/s  %5.0f GFLOP/s per core  (checksum %g)\n",
               fma ? "vfmadd231ps (fp32)" : "vdpbf16ps (bf16 pairs)", per_second / 1e9, per_second * flop / 1e9,
               _mm512_reduce_add_ps(sum));
    }
    return 0;
}
