/* fp32 linear layers for CPU decoding: y[m, n] = bias[n] + sum_k x[m, k] * w[n, k], for up to MAX_M input rows.
 *
 * The same streaming loop as linear_bf16.c (four weight rows side by side, each row's next block prefetched into
 * L2 while the current one is read) on fp32 weights: at batch 1 it reads about an eighth faster than MKL's GEMV
 * (bench/decode.py). Sums are fp32, in another order than MKL's, so results differ from nn.Linear's by fp32
 * rounding only. Up to MAX_M input rows are served by one pass over the weights; larger batches stay with MKL.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4
#define MAX_M 4
#define PREFETCH 512

static inline void store_sums(const float *sums, int rows, int mt, int64_t n0, int64_t N, const float *bias,
                              float *y) {
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) y[m * N + n0 + r] = sums[r * MAX_M + m] + (bias ? bias[n0 + r] : 0.0f);
}

__attribute__((target("avx512f"), always_inline)) static inline void
block_avx512(const float *x, const float *w, int64_t K, int rows, int mt, float *sums) {
    __m512 acc[ROWS][MAX_M];
    for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MAX_M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kfull = K / 16 * 16;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = k < kfull ? (__mmask16)0xffff : (__mmask16)((1u << (K - kfull)) - 1u);
        __m512 xv[MAX_M];
        for (int m = 0; m < mt; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const float *p = w + r * K + k;
            _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(p + ROWS * K), _MM_HINT_T1); /* a hint: never faults past the end */
            const __m512 wv = _mm512_maskz_loadu_ps(mask, p);
            for (int m = 0; m < mt; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) sums[r * MAX_M + m] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
block_avx2(const float *x, const float *w, int64_t K, int rows, int mt, float *sums) {
    __m256 acc[ROWS][MAX_M];
    for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MAX_M; ++m) acc[r][m] = _mm256_setzero_ps();
    const int64_t kfull = K / 8 * 8;
    for (int64_t k = 0; k < kfull; k += 8) {
        __m256 xv[MAX_M];
        for (int m = 0; m < mt; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < rows; ++r) {
            const float *p = w + r * K + k;
            if ((k & 15) == 0) { /* once per 64-byte line */
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + ROWS * K), _MM_HINT_T1);
            }
            const __m256 wv = _mm256_loadu_ps(p);
            for (int m = 0; m < mt; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) {
            float s = hsum8(acc[r][m]);
            for (int64_t k = kfull; k < K; ++k) s += w[r * K + k] * x[m * K + k];
            sums[r * MAX_M + m] = s;
        }
}

/* Constant rows and mt let the compiler keep every accumulator in a register. */
#define DISPATCH(block)                                                                                      \
    if (rows < ROWS) block(x, wn, K, rows, mt, sums); /* the last few rows */                              \
    else if (mt == 1) block(x, wn, K, ROWS, 1, sums);                                                        \
    else if (mt == 2) block(x, wn, K, ROWS, 2, sums);                                                        \
    else if (mt == 3) block(x, wn, K, ROWS, 3, sums);                                                        \
    else block(x, wn, K, ROWS, 4, sums);

__attribute__((target("avx512f"))) static void linear_avx512(const float *x, const float *w, const float *bias,
                                                             float *y, int mt, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < (N + ROWS - 1) / ROWS; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        const float *wn = w + n0 * K;
        float sums[ROWS * MAX_M];
        DISPATCH(block_avx512)
        store_sums(sums, rows, mt, n0, N, bias, y);
    }
}

__attribute__((target("avx2,fma"))) static void linear_avx2(const float *x, const float *w, const float *bias,
                                                            float *y, int mt, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < (N + ROWS - 1) / ROWS; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        const float *wn = w + n0 * K;
        float sums[ROWS * MAX_M];
        DISPATCH(block_avx2)
        store_sums(sums, rows, mt, n0, N, bias, y);
    }
}

/* x: M x K (M <= MAX_M), w: N x K, bias: N or NULL, y: M x N; all contiguous fp32. isa: 2 AVX512 (the bf16 ISA
 * level includes AVX512F), 1 AVX2+FMA. Returns 0, or -1 for an unknown ISA or too many rows. */
int neox_linear_f32(int isa, const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                    int64_t K) {
    if (M < 1 || M > MAX_M) return -1;
    if (isa == 2) linear_avx512(x, w, bias, y, (int)M, N, K);
    else if (isa == 1) linear_avx2(x, w, bias, y, (int)M, N, K);
    else return -1;
    return 0;
}
