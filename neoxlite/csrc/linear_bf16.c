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
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "avx2_math.h"
#include "gelu.h"

#define ROWS 4       /* weight rows per task: their 64-byte chunks are read side by side */
#define MAX_M 4      /* input rows per pass over a weight block (one fp32 accumulator each) */
#define PREFETCH 512 /* bytes ahead of each weight row's read position, into L1 */
/* Each row's next task (the same thread's, under a static schedule) is also prefetched into L2 as the current
 * one is read: the memory system then always has two blocks in flight, which takes one core from about 75% to
 * about 100% of the bandwidth that a plain streaming read reaches (measured on Sapphire Rapids). */

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

/* e^x for x <= 0 (gelu.h's EXP_POLY, then p * 2^n) */
__attribute__((target("avx512f"), always_inline)) static inline __m512 exp_nonpositive_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 is 0 in fp32 already */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP_POLY(__m512, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_set1_ps, x, n, p);
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void gelu_bf16_avx512(uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, y + i));
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        GELU_VECTOR(__m512, _mm512_mul_ps, _mm512_div_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_xor_ps,
                    _mm512_and_ps, _mm512_abs_ps, _mm512_set1_ps, exp_nonpositive_avx512, v, g);
        _mm256_mask_storeu_epi16(y + i, mask, (__m256i)_mm512_cvtneps_pbh(g));
    }
}

/* The output split into per-thread runs for the GELU pass: whole 64-byte lines, so no two threads share one. */
#define GELU_CHUNK 512

/* GELU over y's `outputs` values, shared by the threads of the caller's parallel region (an orphaned omp for:
 * every thread of the region calls it, after the barrier that ends the products) */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void gelu_pass_avx512(uint16_t *y,
                                                                                                    int64_t outputs) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < outputs; i += GELU_CHUNK)
        gelu_bf16_avx512(y + i, outputs - i < GELU_CHUNK ? outputs - i : GELU_CHUNK);
}

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
    if (gelu) gelu_pass_avx512(y, outputs);
    }
}

/* ---------------------------------------------------------------- AMX: 16 x 16 x 32 products per instruction */
/* AMX intrinsics need GCC 11 or Clang 12; with an older compiler (or -DNEOX_NO_AMX, as a test builds it) the rest
 * still builds and neox_has_amx() says 0 */
#if !defined(NEOX_NO_AMX) && ((defined(__clang__) && __clang_major__ >= 12) || \
                              (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define NEOX_AMX 1
#include "amx.h"
/* One tdpbf16ps multiplies a 16 x 32 tile of bf16 by a 32 x 16 one into 16 x 16 fp32 sums. The weights are the
 * left tile, loaded straight from the checkpoint's row-major layout (16 weight rows x 32 values, stride K), so
 * nothing is repacked or copied; the inputs are the right tile, which the instruction wants in pairs of k
 * (row kp holds x[m][2kp], x[m][2kp + 1] for each m): they are packed once per call, up to 16 input rows per
 * tile. With 16 rows or fewer the right tile is as wide as the rows (one row: 4 bytes per k pair, not 64, which
 * keeps the packed inputs in L1); with more, every tile is 16 wide, zeros past the last row. Each output's fp32 sum runs over the 32-value chunks of its row in order, the same
 * whatever the other rows are, so a row gets the same bits at any batch size (continuous batching relies on it).
 * Sums are stored through a 16 x 16 buffer and transposed by gathers. Needs K a multiple of 32 (every GPT-NeoX
 * width is); the caller checks. Linux grants tile use per process (neoxlite.matrix_engine.amx()). */
/* y[m0 + m][n0 + i] = bf16(sums[i * width + m] + bias[n0 + i]) for i < rows, m < mt */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void
amx_store(const float *sums, int width, int rows, int mt, int64_t n0, int64_t m0, int64_t N, const uint16_t *bias,
          uint16_t *y) {
    const __mmask16 mask = (__mmask16)((1u << rows) - 1u);
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(width));
    __m512 b = _mm512_setzero_ps();
    if (bias)
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + n0)), 16));
    for (int m = 0; m < mt; ++m) {
        const __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, _mm512_add_epi32(column, _mm512_set1_epi32(m)),
                                                  sums, 4);
        _mm256_mask_storeu_epi16(y + (m0 + m) * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(s, b)));
    }
}

/* The sum tiles of weight rows n0 .. n0 + rows - 1 (tiles 0 and 1: the first 16, 2 and 3: the rest, when `second`)
 * against input rows m0 .. (tiles 0 and 2: the first `width`, 1 and 3: the next, when `two`) into y. */
__attribute__((target("amx-tile,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void
amx_store_tiles(float *sums, int width, int rows, int64_t M, int64_t n0, int64_t m0, int second, int two, int64_t N,
                const uint16_t *bias, uint16_t *y) {
    const int mt0 = M - m0 < width ? (int)(M - m0) : width;
    const int rows0 = rows < AMX_ROWS ? rows : AMX_ROWS;
    _tile_stored(0, sums, 4 * width);
    amx_store(sums, width, rows0, mt0, n0, m0, N, bias, y);
    if (second) {
        _tile_stored(2, sums, 4 * width);
        amx_store(sums, width, rows - AMX_ROWS, mt0, n0 + AMX_ROWS, m0, N, bias, y);
    }
    if (two) {
        const int mt1 = M - m0 - width < width ? (int)(M - m0 - width) : width;
        _tile_stored(1, sums, 4 * width);
        amx_store(sums, width, rows0, mt1, n0, m0 + width, N, bias, y);
        if (second) {
            _tile_stored(3, sums, 4 * width);
            amx_store(sums, width, rows - AMX_ROWS, mt1, n0 + AMX_ROWS, m0 + width, N, bias, y);
        }
    }
}

/* One task: weight rows n0 .. n0 + 31 (or fewer) against every input block. w0, w1: the two 16-row weight tiles'
 * first rows (w1 NULL when the task has 16 rows or fewer); stride: their row stride in bytes. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void
amx_task(const uint16_t *w0, const uint16_t *w1, int64_t stride, const uint32_t *packed, int width, int64_t M,
         int64_t K, int64_t n0, int rows, const uint16_t *bias, uint16_t *y, int64_t N, float *sums) {
    const int64_t chunks = K / AMX_K, blocks = (M + width - 1) / width, block_pairs = K / 2 * width;
    const int64_t tile_pairs = AMX_K / 2 * width;
    for (int64_t b = 0; b < blocks; b += 2) {
        const int two = b + 1 < blocks;
        const uint32_t *x0 = packed + b * block_pairs, *x1 = x0 + block_pairs;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < chunks; ++c) {
            _tile_loadd(6, x0 + c * tile_pairs, 4 * width);
            _tile_loadd(4, w0 + c * AMX_K, stride);
            _tile_dpbf16ps(0, 4, 6);
            if (w1) {
                _tile_loadd(5, w1 + c * AMX_K, stride);
                _tile_dpbf16ps(2, 5, 6);
            }
            if (two) {
                _tile_loadd(7, x1 + c * tile_pairs, 4 * width);
                _tile_dpbf16ps(1, 4, 7);
                if (w1) _tile_dpbf16ps(3, 5, 7);
            }
        }
        amx_store_tiles(sums, width, rows, M, n0, b * width, w1 != NULL, two, N, bias, y);
    }
}

#define AMX_TASK (2 * AMX_ROWS) /* weight rows per task: two left tiles share each right tile */

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static int
linear_amx(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K,
           int gelu) {
    if (M <= 0 || N <= 0) return 0; /* nothing to compute (and no tile width to divide by) */
    if (K % AMX_K) return -3;
    const int64_t tasks = (N + AMX_TASK - 1) / AMX_TASK, outputs = M * N;
    const int width = M < AMX_ROWS ? (int)M : AMX_ROWS;
    const int64_t blocks = (M + width - 1) / width;
    uint32_t *packed = aligned_alloc(64, (size_t)(blocks * width * K / 2 * 4 + 64) / 64 * 64);
    /* the last weight rows when fewer than 16 are left: a zero-padded copy, so no tile reads past the weight */
    const int64_t tail = N % AMX_ROWS, tail_row = N - tail;
    uint16_t *padded = tail ? aligned_alloc(64, (size_t)(AMX_ROWS * K * 2 + 63) / 64 * 64) : NULL;
    if (!packed || (tail && !padded)) {
        free(packed);
        free(padded);
        return -2;
    }
    if (tail) {
        memset(padded, 0, (size_t)AMX_ROWS * K * 2);
        memcpy(padded, w + tail_row * K, (size_t)tail * K * 2);
    }
#pragma omp parallel
    {
        amx_configure(width);
        float sums[AMX_ROWS * AMX_ROWS] __attribute__((aligned(64)));
        amx_pack_inputs(x, packed, M, K / 2, width); /* ends in a barrier: every input packed before any task runs */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t n0 = t * AMX_TASK;
            const int rows = N - n0 < AMX_TASK ? (int)(N - n0) : AMX_TASK;
            const uint16_t *w0 = n0 == tail_row ? padded : w + n0 * K;
            const uint16_t *w1 = rows <= AMX_ROWS ? NULL : n0 + AMX_ROWS == tail_row ? padded : w0 + AMX_ROWS * K;
            const int64_t stride = K * 2;
            amx_task(w0, w1, stride, packed, width, M, K, n0, rows, bias, y, N, sums);
        } /* the implicit barrier here: every output is written before any is activated */
        _tile_release();
        if (gelu) gelu_pass_avx512(y, outputs);
    }
    free(packed);
    free(padded);
    return 0;
}

/* ---------------------------------------------------------------- AMX for 4-bit weights computed in bf16 */
/* A task's 32 weight rows are dequantized into a per-thread bf16 buffer (in L2), exactly the weight bitsandbytes'
 * CPU path dequantizes (table * scale rounded to bf16), and multiplied on the tiles like a bf16 weight: the
 * lookups are paid once per weight for every input row, where the vector kernel repeats them per four input
 * rows. Each 64-value block is stored as its 32 even values, then its 32 odd ones (one lookup each, no
 * interleave), and the inputs are reordered the same way, so each product pairs the same weight and input. The
 * scales: an fp32 absmax per block, or with double quantization code2[q] * absmax2[block / 256] + offset, rounded
 * twice as bitsandbytes does. */
#define Q4_BLOCK 64

/* fp-contract off: code2 * absmax2 + offset rounds twice, as in bitsandbytes */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"), optimize("fp-contract=off"))) static void
dequantize_rows_bf16(const uint8_t *w, const float *code, const float *absmax, const uint8_t *absmax8,
                     const float *code2, const float *absmax2, float offset, int64_t first_row, int rows, int64_t K,
                     int64_t k0, int64_t k1, uint16_t *out, int64_t out_stride) {
    const int64_t blocks = K / Q4_BLOCK;
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i nibble = _mm512_set1_epi16(0x0f);
    for (int r = 0; r < rows; ++r)
        for (int64_t j = k0 / Q4_BLOCK; j < k1 / Q4_BLOCK; ++j) {
            const int64_t b = (first_row + r) * blocks + j;
            const float scale = absmax ? absmax[b] : code2[absmax8[b]] * absmax2[b >> 8] + offset;
            const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(scale));
            const __m512i t16 = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t)); /* nearest even */
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + b * (Q4_BLOCK / 2))));
            uint16_t *o = out + r * out_stride + j * Q4_BLOCK - k0;
            _mm512_storeu_si512(o, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), t16));
            _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), t16));
        }
}

/* Up to 32 input rows (two input tiles): the sums stay in tiles across the whole row, so the weights can be
 * dequantized Q4_CHUNK values at a time into L1-sized buffers (32 rows x Q4_CHUNK bf16, 16 KiB each) and used at
 * once, instead of being written out to L2 and read back. */
#define Q4_CHUNK 256

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void
amx_task_4bit(const uint8_t *w, const float *code, const float *absmax, const uint8_t *absmax8, const float *code2,
              const float *absmax2, float offset, const uint32_t *packed, int width, int64_t M, int64_t K,
              int64_t n0, int rows, const uint16_t *bias, uint16_t *y, int64_t N, float *sums, uint16_t *tile) {
    const int two = M > width, second = rows > AMX_ROWS;
    const int64_t block_pairs = K / 2 * width, tile_pairs = AMX_K / 2 * width;
    const uint32_t *x0 = packed, *x1 = packed + block_pairs;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    /* the next task's rows (this thread's, under a static schedule) are fetched into L2 a chunk at a time as this
     * task's are read: a hint, which never faults past the weight's end */
    const uint8_t *next = w + (n0 + AMX_TASK) * (K / 2);
    /* two chunk buffers: a chunk is dequantized while the tiles read the one before it, whose stores have left
     * the store buffer by then (a tile load waits for the stores it reads) */
    dequantize_rows_bf16(w, code, absmax, absmax8, code2, absmax2, offset, n0, rows, K, 0,
                         K < Q4_CHUNK ? K : Q4_CHUNK, tile, Q4_CHUNK);
    for (int64_t k0 = 0; k0 < K; k0 += Q4_CHUNK) {
        const int64_t k1 = K - k0 < Q4_CHUNK ? K : k0 + Q4_CHUNK;
        const uint16_t *chunk = tile + (k0 / Q4_CHUNK % 2) * AMX_TASK * Q4_CHUNK, *w1 = chunk + AMX_ROWS * Q4_CHUNK;
        for (int r = 0; r < AMX_TASK; ++r)
            for (int64_t line = k0 / 2; line < k1 / 2; line += 64) {
                _mm_prefetch((const char *)(next + r * (K / 2) + line), _MM_HINT_T1);
                _mm_prefetch((const char *)(w + (n0 + r) * (K / 2) + line + Q4_CHUNK), _MM_HINT_T0);
            }
        if (k1 < K)
            dequantize_rows_bf16(w, code, absmax, absmax8, code2, absmax2, offset, n0, rows, K, k1,
                                 K - k1 < Q4_CHUNK ? K : k1 + Q4_CHUNK,
                                 tile + (k1 / Q4_CHUNK % 2) * AMX_TASK * Q4_CHUNK, Q4_CHUNK);
        for (int64_t k = k0; k < k1; k += AMX_K) {
            const int64_t c = k / AMX_K;
            _tile_loadd(6, x0 + c * tile_pairs, 4 * width);
            _tile_loadd(4, chunk + (k - k0), Q4_CHUNK * 2);
            _tile_dpbf16ps(0, 4, 6);
            if (second) {
                _tile_loadd(5, w1 + (k - k0), Q4_CHUNK * 2);
                _tile_dpbf16ps(2, 5, 6);
            }
            if (two) {
                _tile_loadd(7, x1 + c * tile_pairs, 4 * width);
                _tile_dpbf16ps(1, 4, 7);
                if (second) _tile_dpbf16ps(3, 5, 7);
            }
        }
    }
    amx_store_tiles(sums, width, rows, M, n0, 0, second, two, N, bias, y);
}

/* x (M x K bf16) with each block of 64 as its even values, then its odd ones */
static void reorder_blocks(const uint16_t *x, int64_t M, int64_t K, uint16_t *out) {
    for (int64_t i = 0; i < M * K; i += Q4_BLOCK)
        for (int j = 0; j < Q4_BLOCK / 2; ++j) {
            out[i + j] = x[i + 2 * j];
            out[i + Q4_BLOCK / 2 + j] = x[i + 2 * j + 1];
        }
}

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) int
neox_linear_4bit_amx(const uint16_t *x, const uint8_t *w, const float *code, const float *absmax,
                     const uint8_t *absmax8, const float *code2, const float *absmax2, float offset,
                     const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int gelu) {
    if (M <= 0 || N <= 0) return 0; /* nothing to compute (and no tile width to divide by) */
    if (K % Q4_BLOCK) return -3;
    const int64_t tasks = (N + AMX_TASK - 1) / AMX_TASK, outputs = M * N;
    const int width = M < AMX_ROWS ? (int)M : AMX_ROWS;
    const int64_t blocks = (M + width - 1) / width;
    uint16_t *xr = malloc((size_t)(M * K) * 2);
    uint32_t *packed = aligned_alloc(64, (size_t)(blocks * width * K / 2 * 4 + 64) / 64 * 64);
    int failed = !xr || !packed;
    if (!failed) reorder_blocks(x, M, K, xr);
#pragma omp parallel if (!failed)
    {
        /* a thread's 32 dequantized rows: a chunk of them (up to 32 input rows), or whole (more); rows past the
         * weight's end stay zero */
        const int64_t tile_values = M <= 2 * AMX_ROWS ? 2 * AMX_TASK * Q4_CHUNK : AMX_TASK * K;
        uint16_t *tile = failed ? NULL : aligned_alloc(64, (size_t)(tile_values * 2 + 63) / 64 * 64);
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(tile, 0, (size_t)tile_values * 2);
        }
#pragma omp barrier
        if (!failed) {
            amx_configure(width);
            float sums[AMX_ROWS * AMX_ROWS] __attribute__((aligned(64)));
            amx_pack_inputs(xr, packed, M, K / 2, width); /* ends in a barrier */
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; ++t) {
                const int64_t n0 = t * AMX_TASK;
                const int rows = N - n0 < AMX_TASK ? (int)(N - n0) : AMX_TASK;
                if (M <= 2 * AMX_ROWS) {
                    amx_task_4bit(w, code, absmax, absmax8, code2, absmax2, offset, packed, width, M, K, n0, rows,
                                  bias, y, N, sums, tile);
                } else {
                    dequantize_rows_bf16(w, code, absmax, absmax8, code2, absmax2, offset, n0, rows, K, 0, K, tile, K);
                    amx_task(tile, rows > AMX_ROWS ? tile + AMX_ROWS * K : NULL, K * 2, packed, width, M, K, n0,
                             rows, bias, y, N, sums);
                }
            }
            _tile_release();
            if (gelu) gelu_pass_avx512(y, outputs);
        }
        free(tile);
    }
    free(xr);
    free(packed);
    return failed ? -2 : 0;
}

#else
#define NEOX_AMX 0
static int linear_amx(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                      int64_t K, int gelu) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)gelu;
    return -1;
}
int neox_linear_4bit_amx(const uint16_t *x, const uint8_t *w, const float *code, const float *absmax,
                         const uint8_t *absmax8, const float *code2, const float *absmax2, float offset,
                         const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int gelu) {
    (void)x, (void)w, (void)code, (void)absmax, (void)absmax8, (void)code2, (void)absmax2, (void)offset;
    (void)bias, (void)y, (void)M, (void)N, (void)K, (void)gelu;
    return -1;
}
#endif

/* 1 where this build has the AMX kernels (the compiler knew the instructions) */
int neox_has_amx(void) { return NEOX_AMX; }

/* ---------------------------------------------------------------- AVX2 + FMA: widen bf16 to fp32, then FMA */
/* One 256-bit load holds 16 bf16 values; a shift and a mask widen its even and its odd values to fp32 (two
 * instructions per 16 weights). The input rows are widened the same way once per call, so each output lane
 * accumulates w[k] x[k] for k = 16t + 2i, then 16t + 2i + 1, in order of t: one summation order for every
 * tiling below, so a row's result has the same bits whatever the batch around it (continuous batching relies
 * on it).
 *
 * With more input rows the work becomes multiply-adds rather than memory. A task is TILE_R weight rows against
 * every input row, in tiles of TILE_R x TILE_M (twelve accumulators: two multiply-adds per accumulator per step
 * keep the FMA pipes' latency covered); three rows left over take a 3 x 3 tile, one or two the C loop. The weights
 * are walked in chunks of CHUNK values: the first tile of a chunk brings its rows from memory (and fetches the
 * next task's into L2), the later tiles find them in L1. Measured on a Zen 3 core (93 GFLOP/s FMA peak),
 * pythia-410m's 97 linears at 16 rows with every weight read from RAM: 3 x 4 tiles 138 GFLOP/s on two cores,
 * 1.16x the 3 x 3 tiles (1.07x at 8 rows, 1.25x at 4; 150 GFLOP/s, 81% of the peak, with the weights in cache);
 * arranging the tasks in panels that share an L1-sized chunk of the inputs measured slower, so the inputs come
 * from L2. */
#define TILE_R 3       /* weight rows per task (read side by side, as above) */
#define TILE_M 4       /* input rows per tile */
#define CHUNK 1024     /* weight values per row and pass: 3 rows x 2 KiB stay in L1 */


/* GELU of 8 bf16 values in place, the formula of gelu_bf16_avx512 on 8 lanes */
__attribute__((target("avx2,fma"), always_inline)) static inline void gelu8_bf16_avx2(uint16_t *y) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)y));
    const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    GELU_VECTOR(__m256, _mm256_mul_ps, _mm256_div_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_xor_ps, _mm256_and_ps,
                abs_avx2, _mm256_set1_ps, exp_nonpositive_avx2, v, g);
    const __m256i b = round_bf16_avx2(g);
    _mm_storeu_si128((__m128i *)y, _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

__attribute__((target("avx2,fma"))) static void gelu_bf16_avx2(uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) gelu8_bf16_avx2(y + i);
    if (i < n) { /* the last few through the same lanes, so every value gets the one formula */
        uint16_t last[8] = {0};
        memcpy(last, y + i, (size_t)(n - i) * 2);
        gelu8_bf16_avx2(last);
        memcpy(y + i, last, (size_t)(n - i) * 2);
    }
}

/* floats from one widened input row to the next: a cache line more than the row, so that rows never lie a
 * multiple of 4 KiB apart (such loads contend for the same L1 sets) */
static inline int64_t split_stride(int64_t K) { return K / 16 * 16 + 16; }

/* x (M x K bf16) to fp32: per 16 values, the 8 even ones, then the 8 odd ones (the first K16 values of a row) */
__attribute__((target("avx2,fma"))) static void split_input_avx2(const uint16_t *x, int64_t M, int64_t K, float *xs) {
    const int64_t k16 = K / 16 * 16, ldx = split_stride(K);
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < k16; k += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(x + m * K + k));
            _mm256_storeu_si256((__m256i *)(xs + m * ldx + k), _mm256_slli_epi32(v, 16));
            _mm256_storeu_si256((__m256i *)(xs + m * ldx + k + 8), _mm256_and_si256(v, high));
        }
}

/* acc[r * TILE_M + m] += the products of weight row r and input row m over values [k0, k1) (multiples of 16).
 * `prefetch`: for a few rows, where the loop waits on memory, each row's next lines are fetched ahead; with more
 * rows the loop is compute-bound and the prefetches only take issue slots (measured 20% slower with them). */
__attribute__((target("avx2,fma"), always_inline)) static inline void
tile_avx2(const float *xs, int64_t ldx, const uint16_t *w, int64_t K, int64_t k0, int64_t k1, int rows, int mt,
          int prefetch, __m256 *acc_out) {
    __m256 acc[TILE_R][TILE_M];
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) acc[r][m] = acc_out[r * TILE_M + m];
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = k0; k < k1; k += 16) {
        for (int r = 0; r < rows; ++r) {
            const uint16_t *p = w + r * K + k;
            if (prefetch && (k & 31) == 0) /* once per 64-byte line */
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
            if (prefetch && r == 0 && (k & 31) == 0) {
                /* The next task's rows into L2 as one sequential stream, as far through them as this task is
                 * through its own (hints: never fault past the end). Measured against each row's line at the
                 * same offset: a one-row step's linears 1.08x (0.98-1.14x over five pairs). */
                const char *next = (const char *)(w + TILE_R * K) + k * 2 * TILE_R;
                for (int line = 0; line < TILE_R * 64; line += 64) _mm_prefetch(next + line, _MM_HINT_T1);
            }
            const __m256i v = _mm256_loadu_si256((const __m256i *)p);
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int m = 0; m < mt; ++m) {
                acc[r][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + m * ldx + k), acc[r][m]);
                acc[r][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + m * ldx + k + 8), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) acc_out[r * TILE_M + m] = acc[r][m];
}

/* The 3 x 3 tile (three input rows left over), the same arithmetic as tile_avx2 in the same order, written out
 * in assembly: nine accumulators (ymm0-8), the three rows' widened weights (ymm9-14) and one input vector at a
 * time (ymm15) fill the sixteen registers, so each input vector is loaded once for three multiply-adds and each
 * weight vector once for six. A 4 x 3 tile, its inputs read as memory operands (28 loads per 24 multiply-adds),
 * ran 15% slower on a Zen 3 core, and the compiler's own version of either spills accumulators to the stack. */
#define WIDEN_ROW(ADDR, EVEN, ODD)                                                                              \
    "vmovdqu " ADDR ", %%ymm" #EVEN "\n\t"                                                                      \
    "vpand %[mask], %%ymm" #EVEN ", %%ymm" #ODD "\n\t"                                                          \
    "vpslld $16, %%ymm" #EVEN ", %%ymm" #EVEN "\n\t"
#define FMA3(X, W0, W1, W2, A0, A1, A2)                                                                         \
    "vmovaps " X ", %%ymm15\n\t"                                                                               \
    "vfmadd231ps %%ymm15, %%ymm" #W0 ", %%ymm" #A0 "\n\t"                                                       \
    "vfmadd231ps %%ymm15, %%ymm" #W1 ", %%ymm" #A1 "\n\t"                                                       \
    "vfmadd231ps %%ymm15, %%ymm" #W2 ", %%ymm" #A2 "\n\t"
/* an input row (X: its address) against the three weight rows, into acc[0..2][m] = ymm A0, A1, A2 (3r + m) */
#define INPUT_ROW(X, A0, A1, A2) FMA3(X, 9, 11, 13, A0, A1, A2) FMA3("32" X, 10, 12, 14, A0, A1, A2)
/* the accumulators in memory: acc[r * TILE_M + m], 32 bytes each */
#define ACC9(OP)                                                                                                \
    OP(0, 0) OP(32, 1) OP(64, 2) OP(128, 3) OP(160, 4) OP(192, 5) OP(256, 6) OP(288, 7) OP(320, 8)
#define ACC12(OP)                                                                                               \
    OP(0, 0) OP(32, 1) OP(64, 2) OP(96, 3) OP(128, 4) OP(160, 5) OP(192, 6) OP(224, 7) OP(256, 8) OP(288, 9)    \
    OP(320, 10) OP(352, 11)
#define ACC_LOAD(OFFSET, R) "vmovaps " #OFFSET "(%[acc]), %%ymm" #R "\n\t"
#define ACC_STORE(OFFSET, R) "vmovaps %%ymm" #R ", " #OFFSET "(%[acc])\n\t"

/* PREFETCHES: the asm text that fetches weight lines ahead, or nothing */
#define TILE3X3(NAME, PREFETCHES)                                                                               \
    __attribute__((target("avx2,fma"))) static void NAME(const float *xs, int64_t ldx, const uint16_t *w,       \
                                                         int64_t K, int64_t k0, int64_t k1, __m256 *acc) {      \
        const uint16_t *wk = w + k0;                                                                            \
        const float *x = xs + k0;                                                                               \
        const int64_t sw = K * 2, sx = ldx * 4;                                                                 \
        int64_t n = (k1 - k0) / 16;                                                                             \
        if (n <= 0) return;                                                                                     \
        __asm__ volatile(                                                                                       \
            ACC9(ACC_LOAD)                                                                                   \
            "1:\n\t"                                                                                           \
            PREFETCHES                                                                                          \
            WIDEN_ROW("(%[w])", 9, 10) WIDEN_ROW("(%[w],%[sw])", 11, 12) WIDEN_ROW("(%[w],%[sw],2)", 13, 14)    \
            INPUT_ROW("(%[x])", 0, 3, 6) INPUT_ROW("(%[x],%[sx])", 1, 4, 7)                                    \
            INPUT_ROW("(%[x],%[sx],2)", 2, 5, 8)                                                                \
            "add $32, %[w]\n\t"                                                                                \
            "add $64, %[x]\n\t"                                                                                \
            "dec %[n]\n\t"                                                                                     \
            "jnz 1b\n\t"                                                                                       \
            ACC9(ACC_STORE)                                                                                  \
            : [w] "+r"(wk), [x] "+r"(x), [n] "+r"(n)                                                            \
            : [sw] "r"(sw), [sw3] "r"(3 * sw), [sw5] "r"(5 * sw), [sx] "r"(sx), [acc] "r"(acc),                 \
              [mask] "m"(*(const __m256i *)HIGH_HALVES)                                                         \
            : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",   \
              "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");                                            \
    }

static const uint32_t HIGH_HALVES[8] __attribute__((aligned(32))) = {
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u};
#define STR(x) #x
#define XSTR(x) STR(x)
/* The first pass over a chunk reads the weights from memory: each row is fetched ahead into L1, and the next
 * task's three rows (rows 3-5 from here: the same thread's next task) into L2, a task ahead of their use. */
#define FETCH_AHEAD                                                                                             \
    "prefetcht0 " XSTR(PREFETCH) "(%[w])\n\t" "prefetcht0 " XSTR(PREFETCH) "(%[w],%[sw])\n\t"                   \
    "prefetcht0 " XSTR(PREFETCH) "(%[w],%[sw],2)\n\t"                                                          \
    "prefetcht1 (%[w],%[sw3])\n\t" "prefetcht1 (%[w],%[sw],4)\n\t" "prefetcht1 (%[w],%[sw5])\n\t"
TILE3X3(tile3x3_fetch_avx2, FETCH_AHEAD)
/* the later passes find them in L1 */
TILE3X3(tile3x3_avx2, "")

/* The 3 x 4 tile: twelve accumulators (ymm0-11, acc[r][m] in ymm 4r + m), the three rows' weights for one half
 * (the even, then the odd values) in ymm12-14, one input vector in ymm15. Each 16 values widen the weights with the
 * same six operations as the 3 x 3 tile but feed 24 multiply-adds instead of 18 (the odd half reloads the weights
 * from L1: no register is left to keep them). The same products added in the same order, so the same bits. */
#define EVEN_ROWS                                                                                               \
    "vmovdqu (%[w]), %%ymm12\n\t" "vpslld $16, %%ymm12, %%ymm12\n\t"                                            \
    "vmovdqu (%[w],%[sw]), %%ymm13\n\t" "vpslld $16, %%ymm13, %%ymm13\n\t"                                      \
    "vmovdqu (%[w],%[sw],2), %%ymm14\n\t" "vpslld $16, %%ymm14, %%ymm14\n\t"
#define ODD_ROWS                                                                                                \
    "vmovdqu (%[w]), %%ymm12\n\t" "vpand %[mask], %%ymm12, %%ymm12\n\t"                                        \
    "vmovdqu (%[w],%[sw]), %%ymm13\n\t" "vpand %[mask], %%ymm13, %%ymm13\n\t"                                  \
    "vmovdqu (%[w],%[sw],2), %%ymm14\n\t" "vpand %[mask], %%ymm14, %%ymm14\n\t"
/* the four input rows (at offset OFF: 0 for the even values, 32 for the odd) against the half in ymm12-14 */
#define FOUR_INPUTS(OFF)                                                                                        \
    FMA3(OFF "(%[x])", 12, 13, 14, 0, 4, 8) FMA3(OFF "(%[x],%[sx])", 12, 13, 14, 1, 5, 9)                       \
    FMA3(OFF "(%[x],%[sx],2)", 12, 13, 14, 2, 6, 10) FMA3(OFF "(%[x],%[sx3])", 12, 13, 14, 3, 7, 11)
#define TILE3X4(NAME, PREFETCHES)                                                                               \
    __attribute__((target("avx2,fma"))) static void NAME(const float *xs, int64_t ldx, const uint16_t *w,       \
                                                         int64_t K, int64_t k0, int64_t k1, __m256 *acc) {      \
        const uint16_t *wk = w + k0;                                                                            \
        const float *x = xs + k0;                                                                               \
        const int64_t sw = K * 2, sx = ldx * 4;                                                                 \
        int64_t n = (k1 - k0) / 16;                                                                             \
        if (n <= 0) return;                                                                                     \
        __asm__ volatile(                                                                                       \
            ACC12(ACC_LOAD)                                                                                     \
            "1:\n\t"                                                                                           \
            PREFETCHES                                                                                          \
            EVEN_ROWS FOUR_INPUTS("") ODD_ROWS FOUR_INPUTS("32")                                                \
            "add $32, %[w]\n\t"                                                                                \
            "add $64, %[x]\n\t"                                                                                \
            "dec %[n]\n\t"                                                                                     \
            "jnz 1b\n\t"                                                                                       \
            ACC12(ACC_STORE)                                                                                    \
            : [w] "+r"(wk), [x] "+r"(x), [n] "+r"(n)                                                            \
            : [sw] "r"(sw), [sw3] "r"(3 * sw), [sw5] "r"(5 * sw), [sx] "r"(sx), [sx3] "r"(3 * sx),             \
              [acc] "r"(acc), [mask] "m"(*(const __m256i *)HIGH_HALVES)                                         \
            : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",   \
              "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");                                            \
    }

TILE3X4(tile3x4_fetch_avx2, FETCH_AHEAD)
TILE3X4(tile3x4_avx2, "")

/* constant rows, mt and prefetch let the compiler keep every accumulator in a register */
#define TILE_DISPATCH(rows, mt, prefetch, first, ...)                                                                  \
    do {                                                                                                        \
        if ((rows) == TILE_R && (mt) == 4 && (first)) tile3x4_fetch_avx2(__VA_ARGS__, acc);                     \
        else if ((rows) == TILE_R && (mt) == 4) tile3x4_avx2(__VA_ARGS__, acc);                                 \
        else if ((rows) == TILE_R && (mt) == 3 && (first)) tile3x3_fetch_avx2(__VA_ARGS__, acc);                \
        else if ((rows) == TILE_R && (mt) == 3) tile3x3_avx2(__VA_ARGS__, acc);                                 \
        else if ((rows) == TILE_R && (mt) == 2 && (prefetch)) tile_avx2(__VA_ARGS__, TILE_R, 2, 1, acc);        \
        else if ((rows) == TILE_R && (mt) == 2) tile_avx2(__VA_ARGS__, TILE_R, 2, 0, acc);                      \
        else if ((rows) == TILE_R && (prefetch)) tile_avx2(__VA_ARGS__, TILE_R, 1, 1, acc);                     \
        else if ((rows) == TILE_R) tile_avx2(__VA_ARGS__, TILE_R, 1, 0, acc);                                   \
        else tile_avx2(__VA_ARGS__, rows, mt, 0, acc); /* the last few weight rows */                         \
    } while (0)

/* One task's products over weight values [k0, k1): TILE_R weight rows (fewer at the end) against every input row.
 * sums: the task's accumulators, TILE_R x TILE_M per group of TILE_M input rows. */
__attribute__((target("avx2,fma"))) static void accumulate_avx2(const float *xs, const uint16_t *w, int64_t M,
                                                               int64_t K, int rows, int64_t k0, int64_t k1,
                                                               __m256 *sums) {
    const int64_t ldx = split_stride(K);
    for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
        const int mt = M - m0 < TILE_M ? (int)(M - m0) : TILE_M;
        __m256 *acc = sums + (m0 / TILE_M) * TILE_R * TILE_M;
        TILE_DISPATCH(rows, mt, M <= 2, m0 == 0, xs + m0 * ldx, ldx, w, K, k0, k1);
    }
}

/* A task's outputs from its accumulators: the sums, the last K % 16 products, the bias, one rounding to bf16 */
__attribute__((target("avx2,fma"))) static void store_avx2(const __m256 *sums, const uint16_t *x, const uint16_t *w,
                                                          const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                                                          int64_t K, int rows) {
    const int64_t k16 = K / 16 * 16;
    const int used = 8 / TILE_R * TILE_R; /* lane j: weight row j % TILE_R of input row m + j / TILE_R */
    __m256 b = _mm256_setzero_ps();
    if (bias) {
        float lanes[8] = {0};
        for (int j = 0; j < used; ++j) lanes[j] = j % TILE_R < rows ? bf16_to_float(bias[j % TILE_R]) : 0.0f;
        b = _mm256_loadu_ps(lanes);
    }
    for (int64_t m = 0; m < M; m += 8 / TILE_R) {
        __m256 v[8];
        for (int j = 0; j < 8; ++j) {
            const int64_t row = m + j / TILE_R;
            const int r = j % TILE_R;
            v[j] = j < used && r < rows && row < M
                       ? sums[(row / TILE_M) * TILE_R * TILE_M + r * TILE_M + row % TILE_M] : _mm256_setzero_ps();
        }
        __m256 s = hsum8x8_avx2(v);
        if (k16 < K) { /* the last K % 16 products, one at a time */
            float lanes[8];
            _mm256_storeu_ps(lanes, s);
            for (int j = 0; j < used; ++j) {
                const int64_t row = m + j / TILE_R;
                const int r = j % TILE_R;
                if (r < rows && row < M)
                    for (int64_t k = k16; k < K; ++k)
                        lanes[j] = fmaf(bf16_to_float(w[r * K + k]), bf16_to_float(x[row * K + k]), lanes[j]);
            }
            s = _mm256_loadu_ps(lanes);
        }
        if (bias) s = _mm256_add_ps(s, b);
        const __m256i h = round_bf16_avx2(s);
        uint16_t out[8];
        _mm_storeu_si128((__m128i *)out, _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        for (int j = 0; j < 8 / TILE_R && m + j < M; ++j) memcpy(y + (m + j) * N, out + TILE_R * j, (size_t)rows * 2);
    }
}

/* The widened input rows of a decode step: a buffer per calling thread, kept between calls (a step calls this per
 * layer); a prefill's, larger than SPLIT_KEEP floats, is allocated for the call alone. */
#define SPLIT_KEEP (32 * 8192)
static float *split_buffer(int64_t values) {
    static __thread float *buffer;
    static __thread int64_t capacity;
    if (values > SPLIT_KEEP) return aligned_alloc(64, (size_t)((values * 4 + 63) / 64 * 64));
    if (values > capacity) {
        float *fresh = aligned_alloc(64, (size_t)SPLIT_KEEP * 4);
        if (!fresh) return NULL;
        free(buffer);
        buffer = fresh;
        capacity = SPLIT_KEEP;
    }
    return buffer;
}

static void release_split_buffer(float *xs, int64_t values) {
    if (values > SPLIT_KEEP) free(xs);
}

__attribute__((target("avx2,fma"))) static int
linear_avx2(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
            int64_t K, int gelu) {
    float *xs = split_buffer(M * split_stride(K));
    if (!xs) return -2;
    split_input_avx2(x, M, K, xs);
    const int64_t tasks = (N + TILE_R - 1) / TILE_R, outputs = M * N, k16 = K / 16 * 16;
    int status = 0;
#pragma omp parallel
    {
    __m256 *sums = aligned_alloc(32, (size_t)((M + TILE_M - 1) / TILE_M * TILE_R * TILE_M) * sizeof(__m256));
    if (!sums) {
#pragma omp atomic write
        status = -2;
    }
#pragma omp barrier
    if (status == 0) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t n0 = t * TILE_R;
            const int rows = N - n0 < TILE_R ? (int)(N - n0) : TILE_R;
            memset(sums, 0, (size_t)((M + TILE_M - 1) / TILE_M * TILE_R * TILE_M) * sizeof(__m256));
            for (int64_t k0 = 0; k0 < k16; k0 += CHUNK)
                accumulate_avx2(xs, w + n0 * K, M, K, rows, k0, k16 - k0 < CHUNK ? k16 : k0 + CHUNK, sums);
            store_avx2(sums, x, w + n0 * K, bias ? bias + n0 : NULL, y + n0, M, N, K, rows);
        } /* the implicit barrier here: every output is written before any is activated */
        if (gelu) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < outputs; i += GELU_CHUNK)
                gelu_bf16_avx2(y + i, outputs - i < GELU_CHUNK ? outputs - i : GELU_CHUNK);
        }
    }
    free(sums);
    }
    release_split_buffer(xs, M * split_stride(K));
    return status;
}

/* ---------------------------------------------------------------- entry points (called through ctypes) */
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512BF16 = 2, ISA_AMX = 3 };

int neox_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) return ISA_AVX512BF16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_NONE;
}

/* x: M x K, w: N x K, bias: N or NULL, y: M x N; all contiguous bf16; gelu: 1 to apply GELU to y. Returns 0,
 * -1 for an ISA this CPU lacks (the caller checks neox_best_isa first), or -2 when out of memory. */
int neox_linear_bf16(int isa, const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int gelu) {
    if (M <= 0 || N <= 0) return 0; /* an empty batch: nothing to compute, no buffer to allocate */
    if (isa == ISA_AVX512BF16) linear_avx512bf16(x, w, bias, y, M, N, K, gelu);
    else if (isa == ISA_AMX) return linear_amx(x, w, bias, y, M, N, K, gelu);
    else if (isa == ISA_AVX2) return linear_avx2(x, w, bias, y, M, N, K, gelu);
    else return -1;
    return 0;
}
