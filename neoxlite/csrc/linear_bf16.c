/* bf16 linear layers for CPU decoding: y[m, n] = bias[n] + sum_k x[m, k] * w[n, k].
 *
 * At batch 1 a decode step is a chain of matrix-vector products, so its speed is how fast the weights stream
 * from memory. These loops read each weight row once for up to four input rows, in the checkpoint's own
 * row-major layout (nothing to reorder, no second copy), accumulate in fp32 and round once to bf16, as
 * nn.Linear does. Threads: OpenMP, which resolves to the libgomp that torch has already loaded, so the
 * threads are torch's threads and torch.set_num_threads() applies.
 *
 * The MLP's first linear can apply GELU to its bf16 result in the same call (one pass less over the
 * activations, one dispatch less per layer), with the formula PyTorch's vectorized CPU GELU uses.
 *
 * Built at first use by neoxlite/cpu_kernels.py; the ISA is picked at run time (AVX512-BF16, else AVX2+FMA).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "gelu.h"

#define ROWS 4       /* weight rows per task: their 64-byte chunks are read side by side */
#define MAX_M 4      /* input rows per pass over a weight block (one fp32 accumulator each) */
#define PREFETCH 512 /* bytes ahead of each weight row's read position, into L1 */
/* Each row's next task (the same thread's, under a static schedule) is also prefetched into L2 as the current
 * one is read: the memory system then always has two blocks in flight, which takes one core from about 75% to
 * about 100% of the bandwidth that a plain streaming read reaches (measured on Sapphire Rapids). */

static void gelu_bf16_scalar(uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(gelu_scalar(bf16_to_float(y[i])));
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
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"), always_inline)) static inline void
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

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7) */
__attribute__((target("avx512f"), always_inline)) static inline __m512 exp_nonpositive_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 is 0 in fp32 already */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void gelu_bf16_avx512(uint16_t *y, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), sign_bit = _mm512_set1_ps(-0.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, y + i));
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        const __m512 a = _mm512_mul_ps(v, _mm512_set1_ps(SQRT1_2));
        const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(GELU_P), _mm512_abs_ps(a), one));
        __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(GELU_A5), t, _mm512_set1_ps(GELU_A4));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(GELU_A3));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(GELU_A2));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(GELU_A1));
        const __m512 e = _mm512_xor_ps(sign_bit, exp_nonpositive_avx512(_mm512_xor_ps(sign_bit, _mm512_mul_ps(a, a))));
        const __m512 erf_abs = _mm512_fmadd_ps(_mm512_mul_ps(e, t), r, one); /* 1 - e t r */
        const __m512 erf = _mm512_xor_ps(_mm512_and_ps(sign_bit, a), erf_abs);
        const __m512 g = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
        _mm256_mask_storeu_epi16(y + i, mask, (__m256i)_mm512_cvtneps_pbh(g));
    }
}

/* The output split into per-thread runs for the GELU pass: whole 64-byte lines, so no two threads share one. */
#define GELU_CHUNK 512

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void
linear_avx512bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                  int64_t K, int gelu) {
    const int64_t tasks = (N + ROWS - 1) / ROWS, outputs = M * N;
#pragma omp parallel
    {
#pragma omp for schedule(static)
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
    } /* the implicit barrier here: every output is written before any is activated */
    if (gelu) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < outputs; i += GELU_CHUNK)
            gelu_bf16_avx512(y + i, outputs - i < GELU_CHUNK ? outputs - i : GELU_CHUNK);
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
            int64_t K, int gelu) {
    const int64_t tasks = (N + ROWS - 1) / ROWS, outputs = M * N;
#pragma omp parallel
    {
#pragma omp for schedule(static)
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
    if (gelu) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < outputs; i += GELU_CHUNK)
            gelu_bf16_scalar(y + i, outputs - i < GELU_CHUNK ? outputs - i : GELU_CHUNK);
    }
    }
}

/* ---------------------------------------------------------------- entry points (called through ctypes) */
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512BF16 = 2 };

int neox_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) return ISA_AVX512BF16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_NONE;
}

/* x: M x K, w: N x K, bias: N or NULL, y: M x N; all contiguous bf16; gelu: 1 to apply GELU to y. Returns 0,
 * or -1 for an ISA this CPU lacks (the caller checks neox_best_isa first). */
int neox_linear_bf16(int isa, const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int gelu) {
    if (isa == ISA_AVX512BF16) linear_avx512bf16(x, w, bias, y, M, N, K, gelu);
    else if (isa == ISA_AVX2) linear_avx2(x, w, bias, y, M, N, K, gelu);
    else return -1;
    return 0;
}
