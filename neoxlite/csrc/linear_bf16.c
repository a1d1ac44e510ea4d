/* bf16 linear layers for CPU decoding: y[m, n] = bias[n] + sum_k x[m, k] * w[n, k].
 *
 * At batch 1 a decode step is a chain of matrix-vector products, so its speed is how fast the weights stream
 * from memory. These loops read each weight row once for up to four input rows, in the checkpoint's own
 * row-major layout (nothing to reorder, no second copy), accumulate in fp32 and round once to bf16, as
 * nn.Linear does. Threads: OpenMP, which resolves to the libgomp that torch has already loaded, so the
 * threads are torch's threads and torch.set_num_threads() applies.
 *
 * Built at first use by neoxlite/cpu_kernels.py; the ISA is picked at run time (AVX512-BF16, else AVX2+FMA).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 4       /* weight rows per task: their 64-byte chunks are read side by side */
#define MAX_M 4      /* input rows per pass over a weight block (one fp32 accumulator each) */
#define PREFETCH 512 /* bytes ahead of each weight row's read position, into L1 */
/* Each row's next task (the same thread's, under a static schedule) is also prefetched into L2 as the current
 * one is read: the memory system then always has two blocks in flight, which takes one core from about 75% to
 * about 100% of the bandwidth that a plain streaming read reaches (measured on Sapphire Rapids). */

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store_row_sums(const float *sums, int rows, int mt, int64_t n0, int64_t m0, int64_t N,
                                  const uint16_t *bias, uint16_t *y) {
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) {
            float s = sums[r * MAX_M + m];
            if (bias) s += bf16_to_float(bias[n0 + r]);
            y[(m0 + m) * N + n0 + r] = float_to_bf16(s);
        }
}

/* ---------------------------------------------------------------- AVX512-BF16: 32 products per instruction */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline void
block_avx512bf16(const uint16_t *x, const uint16_t *w, int64_t K, int rows, int mt, float *sums) {
    __m512 acc[ROWS][MAX_M];
    for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MAX_M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kfull = K / 32 * 32;
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = k < kfull ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - kfull)) - 1u);
        __m512bh xv[MAX_M];
        for (int m = 0; m < mt; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const uint16_t *p = w + r * K + k;
            _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(p + ROWS * K), _MM_HINT_T1); /* a hint: never faults past the end */
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
            for (int m = 0; m < mt; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) sums[r * MAX_M + m] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void
linear_avx512bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                  int64_t K) {
    const int64_t tasks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        float sums[ROWS * MAX_M];
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
            const int mt = M - m0 < MAX_M ? (int)(M - m0) : MAX_M;
            /* constant rows and mt let the compiler keep every accumulator in a register */
            const uint16_t *xm = x + m0 * K, *wn = w + n0 * K;
            if (rows < ROWS) block_avx512bf16(xm, wn, K, rows, mt, sums); /* the last few rows */
            else if (mt == 1) block_avx512bf16(xm, wn, K, ROWS, 1, sums);
            else if (mt == 2) block_avx512bf16(xm, wn, K, ROWS, 2, sums);
            else if (mt == 3) block_avx512bf16(xm, wn, K, ROWS, 3, sums);
            else block_avx512bf16(xm, wn, K, ROWS, 4, sums);
            store_row_sums(sums, rows, mt, n0, m0, N, bias, y);
        }
    }
}

/* ---------------------------------------------------------------- AVX2 + FMA: widen bf16 to fp32, then FMA */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 load8_avx2(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
block_avx2(const uint16_t *x, const uint16_t *w, int64_t K, int rows, int mt, float *sums) {
    __m256 acc[ROWS][MAX_M];
    for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MAX_M; ++m) acc[r][m] = _mm256_setzero_ps();
    const int64_t kfull = K / 8 * 8;
    for (int64_t k = 0; k < kfull; k += 8) {
        __m256 xv[MAX_M];
        for (int m = 0; m < mt; ++m) xv[m] = load8_avx2(x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const uint16_t *p = w + r * K + k;
            if ((k & 31) == 0) { /* once per 64-byte line */
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + ROWS * K), _MM_HINT_T1);
            }
            const __m256 wv = load8_avx2(p);
            for (int m = 0; m < mt; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) {
            float s = hsum_avx2(acc[r][m]);
            for (int64_t k = kfull; k < K; ++k) s += bf16_to_float(w[r * K + k]) * bf16_to_float(x[m * K + k]);
            sums[r * MAX_M + m] = s;
        }
}

__attribute__((target("avx2,fma"))) static void
linear_avx2(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
            int64_t K) {
    const int64_t tasks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        float sums[ROWS * MAX_M];
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
            const int mt = M - m0 < MAX_M ? (int)(M - m0) : MAX_M;
            const uint16_t *xm = x + m0 * K, *wn = w + n0 * K;
            if (rows < ROWS) block_avx2(xm, wn, K, rows, mt, sums); /* the last few rows */
            else if (mt == 1) block_avx2(xm, wn, K, ROWS, 1, sums);
            else if (mt == 2) block_avx2(xm, wn, K, ROWS, 2, sums);
            else if (mt == 3) block_avx2(xm, wn, K, ROWS, 3, sums);
            else block_avx2(xm, wn, K, ROWS, 4, sums);
            store_row_sums(sums, rows, mt, n0, m0, N, bias, y);
        }
    }
}

/* ---------------------------------------------------------------- entry points (called through ctypes) */
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512BF16 = 2 };

int neox_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return ISA_AVX512BF16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_NONE;
}

/* x: M x K, w: N x K, bias: N or NULL, y: M x N; all contiguous bf16. Returns 0, or -1 for an ISA this CPU
 * lacks (the caller checks neox_best_isa first). */
int neox_linear_bf16(int isa, const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K) {
    if (isa == ISA_AVX512BF16) linear_avx512bf16(x, w, bias, y, M, N, K);
    else if (isa == ISA_AVX2) linear_avx2(x, w, bias, y, M, N, K);
    else return -1;
    return 0;
}
