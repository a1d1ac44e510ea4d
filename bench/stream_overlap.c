/* How much of a loop's in-cache speed survives when its data streams from RAM, on this machine: the question
 * behind the quantized decode kernels' share of the bandwidth bound (neoxlite/csrc/linear_quant.c). A decode
 * kernel does some vector work per 64 bytes of weights; with no work a loop is bound by the memory system, with
 * much it is bound by the core, and in between the two limits do not simply overlap.
 *
 *     cc -O2 -fopenmp -o /tmp/stream_overlap bench/stream_overlap.c && /tmp/stream_overlap
 *
 * For 1 and 2 threads and a range of work per 64 bytes (each unit: a shift, a vpermps and an FMA into one of
 * eight accumulators), the loop reads a 1 GiB buffer (RAM: "cold") and a 1 MiB one per thread (its L2: "hot"),
 * in the kernels' layout (tasks of four 512-byte rows read side by side), each thread its own half, with a
 * software prefetch into L2 8 KiB ahead (the best of the schemes tried: none, into L1 512 or 2048 bytes ahead,
 * into L2 2, 8 or 32 KiB ahead). Best of three passes. Compare a kernel with the row whose hot rate matches its
 * own (bench/quant_kernels.py prints both for each kernel): the units do not count the kernels' instructions. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define COLD_BYTES (1L << 30)
#define HOT_BYTES (1L << 20)
#define ROW_BYTES 512L
#define TASK_BYTES (4 * ROW_BYTES)
#define PREFETCH_AHEAD 8192

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* one thread's share: `size` bytes from `buf`, `work` units per 64 bytes; the sum keeps the work alive */
__attribute__((target("avx512f,avx512bw"), noinline)) static float read_share(const uint8_t *buf, long size,
                                                                            int work) {
    __m512 acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = _mm512_setzero_ps();
    const __m512 table = _mm512_set1_ps(1.0001f);
    for (long base = 0; base < size; base += TASK_BYTES)
        for (long offset = 0; offset < ROW_BYTES; offset += 64)
            for (int r = 0; r < 4; ++r) {
                const uint8_t *p = buf + base + r * ROW_BYTES + offset;
                _mm_prefetch((const char *)p + PREFETCH_AHEAD, _MM_HINT_T1);
                const __m512i v = _mm512_loadu_si512(p);
                const __m512 x = _mm512_castsi512_ps(v);
                for (int i = 0; i < work; ++i) { /* eight independent chains: bound by issue slots, not latency */
                    const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (i & 7)), table);
                    acc[i & 7] = _mm512_fmadd_ps(w, x, acc[i & 7]);
                }
            }
    for (int a = 1; a < 8; ++a) acc[0] = _mm512_add_ps(acc[0], acc[a]);
    return _mm512_reduce_add_ps(acc[0]);
}

/* bytes per second over `passes` reads of `size` bytes split between `threads` threads: the best of three */
static double rate(const uint8_t *buf, long size, int passes, int threads, int work, float *sink) {
    double best = 1e30;
    for (int trial = 0; trial < 3; ++trial) {
        const double start = now();
        for (int pass = 0; pass < passes; ++pass) {
#pragma omp parallel num_threads(threads)
            {
                const long share = size / threads;
                const float s = read_share(buf + omp_get_thread_num() * share, share, work);
#pragma omp atomic
                *sink += s;
            }
        }
        const double seconds = now() - start;
        if (seconds < best) best = seconds;
    }
    return (double)size * passes / best;
}

int main(void) {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) {
        fprintf(stderr, "this CPU has no AVX512F/BW, which this benchmark's loop uses\n");
        return 1;
    }
    uint8_t *cold = aligned_alloc(4096, COLD_BYTES), *hot = aligned_alloc(4096, HOT_BYTES * 2);
    if (!cold || !hot) {
        fprintf(stderr, "could not allocate the %ld MiB buffer\n", COLD_BYTES >> 20);
        return 1;
    }
    memset(cold, 1, COLD_BYTES);
    memset(hot, 1, HOT_BYTES * 2);
    float sink = 0;
    printf("threads  work/64B | hot GB/s  cold GB/s  cold/hot\n");
    for (int threads = 1; threads <= 2; ++threads)
        for (int work = 0; work <= 12; work += work < 4 ? 1 : 2) {
            /* hot: each thread's share (1 MiB) fits its L2 */
            const double h = rate(hot, HOT_BYTES * threads, 256, threads, work, &sink);
            const double c = rate(cold, COLD_BYTES, 1, threads, work, &sink);
            printf("%7d  %8d | %8.1f  %9.1f  %7.0f%%\n", threads, work, h / 1e9, c / 1e9, 100 * c / h);
        }
    free(cold);
    free(hot);
    return sink == 12345.0f; /* never: the sums stay live */
}
