/* Quantized linear layers for CPU decoding, computed from bitsandbytes' stored formats without a dequantized
 * copy: y[m, n] = bias[n] + sum_k x[m, k] * W[n, k] for a few input rows (decode steps, small batches).
 *
 * Decoding reads every weight once per step, so these loops read each weight byte once for up to four input
 * rows, expand it in registers and multiply in fp32, over tasks of four weight rows (read one after another, a
 * single prefetched stream; the fp32 and AVX512 4-bit loops read them side by side), and OpenMP (torch's libgomp)
 * splits the output columns between threads. bench/quant_kernels.py times each kernel per layer (cycles per 64
 * weights).
 *
 * 4-bit (nf4, fp4): two codes per byte, the first value of a pair in the high nibble, row-major, one scale per
 * 64 values (a row holds whole blocks). The scale is an fp32 absmax, or with double quantization an 8-bit code
 * of it, decoded here per block as bitsandbytes decodes it (code2[q] * absmax2[block / 256], then + offset):
 * no second copy of the scales in memory. Each block's 16-entry table (code * scale) is built in registers and
 * rounded to the compute dtype, which is exactly the weight bitsandbytes' CPU path dequantizes before its matmul;
 * a weight is then one table lookup away: AVX512 vpermps (16 entries); AVX2 in bf16/fp16 two vpshufb over the
 * table's low and high bytes (32 weights), in fp32 two 8-entry vpermps and a blend. The input rows are reordered
 * once per call to the order the lookups produce (lookup_order).
 *
 * int8 (LLM.int8): int8 weights with one fp32 scale per output row (SCB). The input rows are quantized per call
 * as bitsandbytes does (float16, then round(x * 127 / rowmax)), with the columns holding a value >= threshold
 * taken out and multiplied in the compute dtype instead; the int8 products are summed exactly in int32.
 *
 * Sums are fp32 and every rounding is bitsandbytes', so results equal its CPU path up to the order of the fp32
 * sums. Built at first use by neoxlite/cpu_kernels.py; the ISA is picked at run time (AVX512F+BW, or AVX2+FMA).
 */
#pragma GCC optimize("fp-contract=off") /* a * b + c must round twice, as in bitsandbytes' PyTorch ops */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_math.h"
#include "bf16.h"
#include "gelu.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };      /* the compute dtype: input, output, bias */
enum { QISA_NONE = 0, QISA_AVX2 = 1, QISA_AVX512 = 2 };
/* neox_linear_int8 only: the AVX512 loops, and AMX-INT8 tiles from AMX_INT8_FROM input rows (the same int32 sums).
 * Measured on a Sapphire Rapids-class Xeon, 2048 -> 8192, 2 threads, loops / tiles: 2 rows 0.40 / 0.47 ms, 4 rows
 * 0.53 / 0.50, 16 rows 1.87 / 0.90, 32 rows 3.77 / 1.39. */
#define QISA_AMX_INT8 3
#define AMX_INT8_FROM 4

#define QROWS 4       /* weight rows per task, read side by side */
#define QMAX_M 4      /* input rows per pass over the weights */
#define QBLOCK 64     /* 4-bit values per scale (32 bytes) */
#define QPREFETCH 512 /* bytes ahead of each weight row's read position, into L1 */
#define Q4PREFETCH 1024 /* 4-bit bf16/fp16: bytes ahead of the read position (one stream) */
#define Q8PREFETCH 2048 /* int8: bytes ahead of the read position (the rows of a task are read one after another) */
/* loops over weight rows, input rows and vectors fully unrolled: the accumulators then stay in registers */
#define UNROLL _Pragma("GCC unroll 8")
#define AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c"

/* ---------------------------------------------------------------- scalar conversions (F16C for float16) */
__attribute__((target("f16c"))) static float load_value(const void *p, int64_t i, int dt) {
    if (dt == DT_BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    if (dt == DT_F16) return _cvtsh_ss(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

__attribute__((target("f16c"))) static float round_to(float v, int dt) { /* to dt and back, nearest even */
    if (dt == DT_BF16) return bf16_to_float(float_to_bf16(v));
    if (dt == DT_F16) return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

__attribute__((target("f16c"))) static void store_value(void *p, int64_t i, float v, int dt) {
    if (dt == DT_BF16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else if (dt == DT_F16) ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    else ((float *)p)[i] = v;
}

/* 8 values of dtype dt from p (index i) as fp32 */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8(const void *p, int64_t i, int dt) {
    if (dt == DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* the same, rounded to float16 and back (bitsandbytes quantizes x.to(float16) and w.to(float16)) */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8_as_f16(const void *p, int64_t i,
                                                                                         int dt) {
    if (dt == DT_F16) return load8(p, i, dt);
    return _mm256_cvtph_ps(_mm256_cvtps_ph(load8(p, i, dt), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* 8 fp32 values rounded to nearest even and saturated to int8, stored at q */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void store8_int8(int8_t *q, __m256 v) {
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(i16, _mm_setzero_si128()));
}

/* bias, then one rounding to the compute dtype (GELU, where asked, is a pass over the outputs: gelu_outputs) */
static void store_sum(void *y, int64_t i, float sum, const void *bias, int64_t n, int dt) {
    if (bias) sum += load_value(bias, n, dt);
    store_value(y, i, round_to(sum, dt), dt);
}

/* 4 values of dtype dt from p (index i) as fp32 */
__attribute__((target("avx2,f16c"), always_inline)) static inline __m128 load4(const void *p, int64_t i, int dt) {
    if (dt == DT_F32) return _mm_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i));
    return dt == DT_BF16 ? _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h)) : _mm_cvtph_ps(h);
}

/* 4 fp32 values rounded to dt as store_value rounds each (bf16: nearest even, NaN kept quiet), stored at
 * y[i .. i + 3]: one task's outputs for one input row, without four calls */
__attribute__((target("avx2,f16c"))) static void store4(void *y, int64_t i, __m128 v, int dt) {
    if (dt == DT_F32) {
        _mm_storeu_ps((float *)y + i, v);
        return;
    }
    __m128i h;
    if (dt == DT_F16) h = _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else {
        const __m128i u = _mm_castps_si128(v);
        const __m128i odd = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
        const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(odd, _mm_set1_epi32(0x7fff))), 16);
        const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(u, _mm_set1_epi32(0x7fffffff)), _mm_set1_epi32(0x7f800000));
        const __m128i quiet = _mm_or_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(0x40));
        h = _mm_blendv_epi8(rounded, quiet, nan);
        h = _mm_packus_epi32(h, h);
    }
    _mm_storel_epi64((__m128i *)((uint16_t *)y + i), h);
}

/* a task's sums for input row m (sums[r * QMAX_M + m], r < QROWS), bias added, stored as store_sum would */
__attribute__((target("avx2,f16c"))) static void store_sums4(void *y, int64_t i, const float *sums, int m,
                                                             const void *bias, int64_t n, int dt) {
    __m128 v = _mm_setr_ps(sums[m], sums[QMAX_M + m], sums[2 * QMAX_M + m], sums[3 * QMAX_M + m]);
    if (bias) v = _mm_add_ps(v, load4(bias, n, dt));
    store4(y, i, v, dt);
}

/* ---------------------------------------------------------------- GELU, eight values at a time */
/* GELU of 8 values of dtype dt in place (PyTorch's vectorized formula on the value as stored) */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void gelu8(void *y, int64_t i, int dt) {
    const __m256 v = load8(y, i, dt);
    GELU_VECTOR(__m256, _mm256_mul_ps, _mm256_div_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_xor_ps, _mm256_and_ps,
                abs_avx2, _mm256_set1_ps, exp_nonpositive_avx2, v, g);
    if (dt == DT_F32) _mm256_storeu_ps((float *)y + i, g);
    else if (dt == DT_F16)
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else {
        const __m256i b = round_bf16_avx2(g);
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    }
}

#define GELU_RUN 256 /* outputs per OpenMP chunk: whole cache lines in every dtype */

/* GELU over y[0 .. n) in dtype dt, after the products (every output is written before any is activated) */
__attribute__((target("avx2,fma,f16c"))) static void gelu_outputs(void *y, int64_t n, int dt) {
    const size_t size = dt == DT_F32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += GELU_RUN) {
        const int64_t end = n - start < GELU_RUN ? n : start + GELU_RUN;
        int64_t i = start;
        for (; i + 8 <= end; i += 8) gelu8(y, i, dt);
        if (i < end) { /* the last few through the same lanes, so every value gets the one formula */
            float last[8] = {0};
            memcpy(last, (char *)y + i * size, (size_t)(end - i) * size);
            gelu8(last, 0, dt);
            memcpy((char *)y + i * size, last, (size_t)(end - i) * size);
        }
    }
}

/* ---------------------------------------------------------------- 4-bit: scales and input reordering */
typedef struct {
    const float *absmax;    /* one fp32 scale per block, or NULL with double quantization: */
    const uint8_t *absmax8; /* the block scales' 8-bit codes, */
    const float *code2;     /* their 256-entry code, */
    const float *absmax2;   /* one scale per 256 blocks, */
    float offset;           /* and the mean added back */
} scales_t;

static inline float block_scale(const scales_t *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    const float v = s->code2[s->absmax8[b]] * s->absmax2[b >> 8];
    return v + s->offset;
}

/* Where each of a block's 64 inputs goes in the order the lookups produce their weights: order[slot] = the
 * value's index in the block (a packed byte j holds values 2j, high nibble, and 2j + 1). */
static void lookup_order(int isa, int dt, int order[QBLOCK]) {
    int slot = 0;
    if (isa == QISA_AVX512 || dt == DT_F32) { /* groups of 16 (AVX512: 32) bytes' values: the even, then the odd */
        const int group = isa == QISA_AVX512 ? 32 : 16;
        for (int g = 0; g < QBLOCK; g += group)
            for (int odd = 0; odd < 2; ++odd)
                for (int t = 0; t < group / 2; ++t) order[slot++] = g + 2 * t + odd;
        return;
    }
    /* AVX2 bf16/fp16 (byte-plane lookups, block4_planes_avx2): the high nibbles' weights, then the low ones'; each
     * as four vectors of eight bytes' values, taken from the two 128-bit lanes as the unpacks leave them */
    static const int bf16_bytes[4][8] = {{0, 2, 4, 6, 16, 18, 20, 22}, {1, 3, 5, 7, 17, 19, 21, 23},
                                         {8, 10, 12, 14, 24, 26, 28, 30}, {9, 11, 13, 15, 25, 27, 29, 31}};
    static const int f16_bytes[4][8] = {{0, 1, 2, 3, 4, 5, 6, 7}, {16, 17, 18, 19, 20, 21, 22, 23},
                                        {8, 9, 10, 11, 12, 13, 14, 15}, {24, 25, 26, 27, 28, 29, 30, 31}};
    const int(*bytes)[8] = dt == DT_BF16 ? bf16_bytes : f16_bytes;
    for (int odd = 0; odd < 2; ++odd)
        for (int v = 0; v < 4; ++v)
            for (int t = 0; t < 8; ++t) order[slot++] = 2 * bytes[v][t] + odd;
}

/* x (M x K, dtype) to fp32, each block of 64 in the lookup order */
__attribute__((target("avx2,fma,f16c"))) static void reorder_input(const void *x, int dt, int64_t M, int64_t K,
                                                                  const int order[QBLOCK], float *out) {
    float block[QBLOCK];
    for (int64_t i = 0; i < M * K; i += QBLOCK) {
        for (int j = 0; j < QBLOCK; j += 8) _mm256_storeu_ps(block + j, load8(x, i + j, dt));
        for (int slot = 0; slot < QBLOCK; ++slot) out[i + slot] = block[order[slot]];
    }
}

/* ---------------------------------------------------------------- AVX2 + FMA */
__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) static inline int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* fp32 compute (the weight is code * scale, unrounded): x reordered in groups of 16; w: the task's first weight
 * row; 8 packed bytes give 16 weights per step, each from two vpermps and a blend */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
block4_avx2(const float *x, const uint8_t *w, const float *code, const scales_t *sc, int64_t first_block,
            int64_t K, int rows, int mt, float *sums) {
    __m256 acc[QROWS][QMAX_M];
    for (int r = 0; r < QROWS; ++r)
        for (int m = 0; m < QMAX_M; ++m) acc[r][m] = _mm256_setzero_ps();
    const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
    const int64_t blocks = K / QBLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        UNROLL for (int r = 0; r < rows; ++r) {
            const uint8_t *p = w + (r * K + b * QBLOCK) / 2;
            if ((b & 1) == 0) { /* once per 64-byte line */
                _mm_prefetch((const char *)p + QPREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + QROWS * K / 2), _MM_HINT_T1); /* a hint: never faults */
            }
            const __m256 s = _mm256_set1_ps(block_scale(sc, first_block + r * blocks + b));
            const __m256 lo = _mm256_mul_ps(code_lo, s), hi = _mm256_mul_ps(code_hi, s);
            UNROLL for (int c = 0; c < 4; ++c) {
                /* vpermps reads bits 0-2 of each lane; bit 3 picks the table half through the sign bit */
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * c)));
                const __m256i vh = _mm256_srli_epi32(v, 4);
                const __m256 w_odd = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, v), _mm256_permutevar8x32_ps(hi, v),
                                                      _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
                const __m256 w_even = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, vh),
                                                       _mm256_permutevar8x32_ps(hi, vh),
                                                       _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
                const float *xb = x + b * QBLOCK + 16 * c;
                UNROLL for (int m = 0; m < mt; ++m) {
                    acc[r][m] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xb + m * K), acc[r][m]);
                    acc[r][m] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xb + m * K + 8), acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) sums[r * QMAX_M + m] = hsum_avx2(acc[r][m]);
}

/* bf16/fp16: the block's 16 weights (table * scale, rounded) as two 16-byte planes (low and high bytes of each
 * 16-bit value), in both lanes; then vpshufb looks up 32 weights' bytes at once. This loop is bound by the count
 * of vector instructions (about three a cycle on Zen 3), so the rounding uses compares and adds (no shifts) and
 * two vpshufb take the rounded bf16 bytes straight out of the fp32 lanes (no pack). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
block_planes_avx2(__m256 code_a, __m256 code_b, __m256 s, int dt, __m256i *low, __m256i *high) {
    __m256i bytes; /* per lane: 8 low bytes, 8 high bytes (lane 0 of entries 0-7, lane 1 of entries 8-15) */
    if (dt == DT_BF16) { /* code_a = entries 0-3 and 8-11, code_b = 4-7 and 12-15 */
        const __m256i ua = _mm256_castps_si256(_mm256_mul_ps(code_a, s));
        const __m256i ub = _mm256_castps_si256(_mm256_mul_ps(code_b, s));
        /* nearest even on the top 16 bits: + 0x7fff, + 1 more where bit 16 is set (the compare gives -1) */
        const __m256i bit16 = _mm256_set1_epi32(0x10000), bias = _mm256_set1_epi32(0x7fff);
        const __m256i ra = _mm256_sub_epi32(_mm256_add_epi32(ua, bias),
                                            _mm256_cmpeq_epi32(_mm256_and_si256(ua, bit16), bit16));
        const __m256i rb = _mm256_sub_epi32(_mm256_add_epi32(ub, bias),
                                            _mm256_cmpeq_epi32(_mm256_and_si256(ub, bit16), bit16));
        const __m256i take_a = _mm256_setr_epi8(2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1,
                                                2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1);
        const __m256i take_b = _mm256_setr_epi8(-1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15,
                                                -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15);
        bytes = _mm256_or_si256(_mm256_shuffle_epi8(ra, take_a), _mm256_shuffle_epi8(rb, take_b));
    } else { /* code_a = entries 0-7, code_b = 8-15 */
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m256i halves = _mm256_set_m128i(_mm256_cvtps_ph(_mm256_mul_ps(code_b, s), rnd),
                                                _mm256_cvtps_ph(_mm256_mul_ps(code_a, s), rnd));
        const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                               0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        bytes = _mm256_shuffle_epi8(halves, split);
    }
    *low = _mm256_permute4x64_epi64(bytes, 0x88);  /* qwords 0, 2, 0, 2 */
    *high = _mm256_permute4x64_epi64(bytes, 0xdd); /* qwords 1, 3, 1, 3 */
}

/* 32 weights from 32 nibble indices: four vectors of 8 fp32 (in lookup_order's order) */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
lookup32_avx2(__m256i idx, __m256i low, __m256i high, int dt, __m256 out[4]) {
    const __m256i lo = _mm256_shuffle_epi8(low, idx), hi = _mm256_shuffle_epi8(high, idx);
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi); /* 16-bit values */
    if (dt == DT_BF16) { /* a bf16 value is the high half of its fp32: the even 16-bit lanes shifted up, the odd
                          * ones masked (ALU work instead of four more shuffles beside the lookups) */
        const __m256i high_half = _mm256_set1_epi32((int)0xffff0000u);
        out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
        out[1] = _mm256_castsi256_ps(_mm256_and_si256(a, high_half));
        out[2] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
        out[3] = _mm256_castsi256_ps(_mm256_and_si256(b, high_half));
    } else {
        out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
        out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
        out[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(b));
        out[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1));
    }
}

/* Double quantization: the 256 scales the 8-bit codes stand for in one group of 256 blocks (code2[q] *
 * absmax2[group], then + offset: two roundings, as bitsandbytes decodes them), kept by each thread across its
 * tasks: the weight rows are read one after another, so a group's table is built about once and a block's scale
 * is then one load. */
typedef struct {
    int64_t group; /* -1: none yet */
    _Alignas(32) float table[256];
} scale_table_t;

__attribute__((target("avx2,fma"))) static void scale_table_fill(const scales_t *s, int64_t group, scale_table_t *t) {
    const __m256 a2 = _mm256_set1_ps(s->absmax2[group]), offset = _mm256_set1_ps(s->offset);
    for (int q = 0; q < 256; q += 8)
        _mm256_store_ps(t->table + q, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s->code2 + q), a2), offset));
    t->group = group;
}

/* bf16/fp16: the 64 weights of the block at p (scale s) as eight vectors, in lookup_order's order */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
block_weights_avx2(const uint8_t *p, __m256 code_a, __m256 code_b, __m256 s, int dt, __m256 wv[8]) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    __m256i low, high;
    block_planes_avx2(code_a, code_b, s, dt, &low, &high);
    const __m256i packed = _mm256_loadu_si256((const __m256i *)p);
    lookup32_avx2(_mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), low, high, dt, wv); /* even */
    lookup32_avx2(_mm256_and_si256(packed, nibble), low, high, dt, wv + 4);                   /* odd */
}

/* bf16/fp16 compute: vpshufb lookups, 32 weights per pair of shuffles (fewer instructions than vpermps). The
 * task's weight rows are read one after another (one sequential stream), each block's weights used for every input
 * row; two accumulators per input row and the loop's constants fit in the 16 registers (reading the four weight
 * rows side by side spilled, and took a third more time at one and at four input rows). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
planes_loop_avx2(const float *x, const uint8_t *w, const float *code, const scales_t *sc, scale_table_t *table,
                 int64_t first_block, int64_t K, int rows, int mt, int dt, int nested, float *sums) {
    __m256 code_a, code_b;
    if (dt == DT_BF16) {
        code_a = _mm256_setr_ps(code[0], code[1], code[2], code[3], code[8], code[9], code[10], code[11]);
        code_b = _mm256_setr_ps(code[4], code[5], code[6], code[7], code[12], code[13], code[14], code[15]);
    } else {
        code_a = _mm256_loadu_ps(code);
        code_b = _mm256_loadu_ps(code + 8);
    }
    const int64_t blocks = K / QBLOCK;
    for (int r = 0; r < rows; ++r) {
        __m256 acc[QMAX_M][2];
        for (int m = 0; m < QMAX_M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t *p = w + (r * K + b * QBLOCK) / 2;
            if ((b & 1) == 0) _mm_prefetch((const char *)p + Q4PREFETCH, _MM_HINT_T0);
            const int64_t g = first_block + r * blocks + b;
            if (nested && g >> 8 != table->group) scale_table_fill(sc, g >> 8, table);
            __m256 wv[8];
            block_weights_avx2(p, code_a, code_b,
                               _mm256_broadcast_ss(nested ? &table->table[sc->absmax8[g]] : sc->absmax + g), dt, wv);
            UNROLL for (int m = 0; m < mt; ++m)
                UNROLL for (int v = 0; v < 8; ++v)
                    acc[m][v & 1] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + m * K + b * QBLOCK + 8 * v), acc[m][v & 1]);
        }
        for (int m = 0; m < mt; ++m) sums[r * QMAX_M + m] = hsum_avx2(_mm256_add_ps(acc[m][0], acc[m][1]));
    }
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
block4_planes_avx2(const float *x, const uint8_t *w, const float *code, const scales_t *sc, scale_table_t *table,
                   int64_t first_block, int64_t K, int rows, int mt, int dt, float *sums) {
    if (sc->absmax) planes_loop_avx2(x, w, code, sc, table, first_block, K, rows, mt, dt, 0, sums);
    else planes_loop_avx2(x, w, code, sc, table, first_block, K, rows, mt, dt, 1, sums);
}

#define DISPATCH_M(BLOCK, rows, mt, ...)                                                                          \
    do {                                                                                                        \
        if ((rows) < QROWS) BLOCK(__VA_ARGS__, rows, mt);                                                       \
        else if ((mt) == 1) BLOCK(__VA_ARGS__, QROWS, 1);                                                       \
        else if ((mt) == 2) BLOCK(__VA_ARGS__, QROWS, 2);                                                       \
        else if ((mt) == 3) BLOCK(__VA_ARGS__, QROWS, 3);                                                       \
        else BLOCK(__VA_ARGS__, QROWS, 4);                                                                      \
    } while (0)

#define CALL4_AVX2(x, w, code, sc, table, fb, K, dt, sums, rows, mt) block4_avx2(x, w, code, sc, fb, K, rows, mt, sums)
#define CALL4_PLANES(x, w, code, sc, table, fb, K, dt, sums, rows, mt)                                            \
    block4_planes_avx2(x, w, code, sc, table, fb, K, rows, mt, dt, sums)

/* The 4-bit linear over tasks of QROWS output rows, QMAX_M input rows per pass; one BLOCK call macro per compute
 * dtype, each called with constant dtype, rows and mt so every accumulator can live in a register. */
#define LINEAR4(NAME, TARGET, CALL_BF16, CALL_F16, CALL_F32)                                                    \
    __attribute__((target(TARGET))) static void NAME(const float *x, const uint8_t *w, const float *code,        \
                                                     const scales_t *sc, const void *bias, void *y, int64_t M,  \
                                                     int64_t N, int64_t K, int dt) {                            \
        const int64_t tasks = (N + QROWS - 1) / QROWS;                                                          \
        _Pragma("omp parallel") {                                                                               \
        scale_table_t table = {.group = -1}; /* this thread's (the AVX512 and fp32 loops decode scales inline) */ \
        (void)table;                                                                                            \
        _Pragma("omp for schedule(static)") for (int64_t t = 0; t < tasks; ++t) {                                \
            const int64_t n0 = t * QROWS;                                                                       \
            const int rows = N - n0 < QROWS ? (int)(N - n0) : QROWS;                                            \
            const uint8_t *wn = w + n0 * K / 2;                                                                 \
            float sums[QROWS * QMAX_M];                                                                         \
            for (int64_t m0 = 0; m0 < M; m0 += QMAX_M) {                                                        \
                const int mt = M - m0 < QMAX_M ? (int)(M - m0) : QMAX_M;                                        \
                const float *xm = x + m0 * K;                                                                   \
                const int64_t fb = n0 * (K / QBLOCK);                                                           \
                if (dt == DT_BF16) DISPATCH_M(CALL_BF16, rows, mt, xm, wn, code, sc, &table, fb, K, DT_BF16, sums); \
                else if (dt == DT_F16) DISPATCH_M(CALL_F16, rows, mt, xm, wn, code, sc, &table, fb, K, DT_F16, sums); \
                else DISPATCH_M(CALL_F32, rows, mt, xm, wn, code, sc, &table, fb, K, DT_F32, sums);             \
                if (rows == QROWS)                                                                              \
                    for (int m = 0; m < mt; ++m) store_sums4(y, (m0 + m) * N + n0, sums, m, bias, n0, dt);         \
                else                                                                                            \
                    for (int r = 0; r < rows; ++r)                                                              \
                        for (int m = 0; m < mt; ++m)                                                            \
                            store_sum(y, (m0 + m) * N + n0 + r, sums[r * QMAX_M + m], bias, n0 + r, dt);        \
            }                                                                                                   \
        }                                                                                                       \
        }                                                                                                       \
    }

LINEAR4(linear4_avx2, "avx2,fma,f16c", CALL4_PLANES, CALL4_PLANES, CALL4_AVX2)

/* x: int8 rows; |x| <= 127, so |w| * (+-x) pairs never saturate vpmaddubsw (w = -128 included). The task's
 * rows are read one after another, so the weights are one sequential stream (four interleaved short streams read
 * at about two thirds of the speed at one input row: the prefetchers lose each stream at its row's end) */
__attribute__((target("avx2"), always_inline)) static inline void
block8_avx2(const int8_t *x, const int8_t *w, int64_t K, int rows, int mt, int32_t *sums) {
    __m256i acc[QROWS][QMAX_M];
    for (int r = 0; r < QROWS; ++r)
        for (int m = 0; m < QMAX_M; ++m) acc[r][m] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t kfull = K / 32 * 32;
    UNROLL for (int r = 0; r < rows; ++r) {
        const int8_t *row = w + r * K;
        _Pragma("GCC unroll 2") for (int64_t k = 0; k < kfull; k += 32) { /* unrolled: no prefetch branch */
            const int8_t *p = row + k;
            if ((k & 63) == 0) _mm_prefetch((const char *)p + Q8PREFETCH, _MM_HINT_T0);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)p);
            const __m256i aw = _mm256_abs_epi8(wv);
            UNROLL for (int m = 0; m < mt; ++m) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + m * K + k));
                const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) {
            int32_t s = hsum_epi32_avx2(acc[r][m]);
            for (int64_t k = kfull; k < K; ++k) s += (int32_t)w[r * K + k] * x[m * K + k];
            sums[r * QMAX_M + m] = s;
        }
}

/* ---------------------------------------------------------------- AVX512F + BW */
__attribute__((target(AVX512_TARGET), always_inline)) static inline __m512 round_avx512(__m512 v, int dt) {
    if (dt == DT_BF16) {
        /* u + 0x7fff, or + 0x8000 where bit 16 is set (ties to even): four ops, once per block */
        const __m512i u = _mm512_castps_si512(v);
        const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
        const __m512i r = _mm512_mask_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd, u,
                                                _mm512_set1_epi32(0x8000));
        return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (dt == DT_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

/* one row's 64 weights of a block (32 packed bytes at p, table t) against the inputs xb (reordered in groups of
 * 32): 16 packed bytes give 32 weights per step, one vpermps per 16 */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void
block4_row_avx512(const uint8_t *p, __m512 t, const float *xb, int64_t K, int mt, __m512 acc[QMAX_M]) {
    UNROLL for (int c = 0; c < 2; ++c) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * c)));
        const __m512 w_odd = _mm512_permutexvar_ps(v, t); /* reads bits 0-3 of each lane */
        const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
        UNROLL for (int m = 0; m < mt; ++m) {
            acc[m] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xb + m * K + 32 * c), acc[m]);
            acc[m] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xb + m * K + 32 * c + 16), acc[m]);
        }
    }
}

/* a block's table: code * scale rounded to dt (the scale broadcast from memory: no shuffle-port op) */
__attribute__((target(AVX512_TARGET), always_inline)) static inline __m512 block_table_avx512(__m512 code,
                                                                                            const float *scale,
                                                                                            int dt) {
    return round_avx512(_mm512_mul_ps(code, _mm512_set1_ps(*scale)), dt);
}

#define SCALE_RUN 16 /* double-quantized scales decoded per row at a time */

/* Double quantization: the scales of blocks sb .. sb + n - 1 (n <= 16) decoded as block_scale decodes each
 * (code2[q] * absmax2[block / 256], then + offset), 16 at a time with two gathers, into out. */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void decode_scales_avx512(const scales_t *sc,
                                                                                             int64_t sb, int n,
                                                                                             float *out) {
    const __mmask16 mask = n >= SCALE_RUN ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, sc->absmax8 + sb));
    const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, q, sc->code2, 4);
    /* each block's group of 256 relative to sb's: 0 or 1 */
    const __m512i group = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(sb & 255)), lane), 8);
    const __m512 a2 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, group, sc->absmax2 + (sb >> 8), 4);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(c, a2), _mm512_set1_ps(sc->offset)));
}

/* Blocks two at a time (one prefetch per row per 64 bytes, no branch), and the scale format fixed per
 * instantiation: the loop's scalar work (addresses, scale decoding) competes with the vector ops for issue slots.
 * Each accumulator sums its products in the same order as one block at a time would. */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void
block4_avx512_scales(const float *x, const uint8_t *w, const float *code, const scales_t *sc, int64_t first_block,
                     int64_t K, int rows, int mt, int dt, int dq, float *sums) {
    __m512 acc[QROWS][QMAX_M];
    for (int r = 0; r < QROWS; ++r)
        for (int m = 0; m < QMAX_M; ++m) acc[r][m] = _mm512_setzero_ps();
    const __m512 table = _mm512_loadu_ps(code);
    const int64_t blocks = K / QBLOCK, row_bytes = K / 2;
    float decoded[QROWS][SCALE_RUN]; /* dq: the rows' scales of the current run of blocks */
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const uint8_t *wb = w + b * (QBLOCK / 2);
        const float *xb = x + b * QBLOCK;
        if (dq && b % SCALE_RUN == 0) {
            const int n = blocks - b < SCALE_RUN ? (int)(blocks - b) : SCALE_RUN;
            UNROLL for (int r = 0; r < rows; ++r) decode_scales_avx512(sc, first_block + r * blocks + b, n, decoded[r]);
        }
        UNROLL for (int r = 0; r < rows; ++r) {
            const uint8_t *p = wb + r * row_bytes;
            _mm_prefetch((const char *)p + QPREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(p + QROWS * row_bytes), _MM_HINT_T1);
            const float *scale = dq ? decoded[r] + b % SCALE_RUN : sc->absmax + first_block + r * blocks + b;
            block4_row_avx512(p, block_table_avx512(table, scale, dt), xb, K, mt, acc[r]);
            block4_row_avx512(p + QBLOCK / 2, block_table_avx512(table, scale + 1, dt), xb + QBLOCK, K, mt, acc[r]);
        }
    }
    if (b < blocks) /* an odd block count: the last one */
        UNROLL for (int r = 0; r < rows; ++r) {
            const float scale = block_scale(sc, first_block + r * blocks + b);
            block4_row_avx512(w + b * (QBLOCK / 2) + r * row_bytes, block_table_avx512(table, &scale, dt),
                              x + b * QBLOCK, K, mt, acc[r]);
        }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) sums[r * QMAX_M + m] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target(AVX512_TARGET), always_inline)) static inline void
block4_avx512(const float *x, const uint8_t *w, const float *code, const scales_t *sc, int64_t first_block,
              int64_t K, int rows, int mt, int dt, float *sums) {
    if (sc->absmax) block4_avx512_scales(x, w, code, sc, first_block, K, rows, mt, dt, 0, sums);
    else block4_avx512_scales(x, w, code, sc, first_block, K, rows, mt, dt, 1, sums);
}

#define CALL4_AVX512(x, w, code, sc, table, fb, K, dt, sums, rows, mt)                                            \
    block4_avx512(x, w, code, sc, fb, K, rows, mt, dt, sums)

LINEAR4(linear4_avx512, AVX512_TARGET, CALL4_AVX512, CALL4_AVX512, CALL4_AVX512)

/* the same products as block8_avx2, 64 at a time; a masked load zero-fills the row's tail */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void
block8_avx512(const int8_t *x, const int8_t *w, int64_t K, int rows, int mt, int32_t *sums) {
    __m512i acc[QROWS][QMAX_M];
    for (int r = 0; r < QROWS; ++r)
        for (int m = 0; m < QMAX_M; ++m) acc[r][m] = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
    const int64_t kfull = K / 64 * 64;
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 mask = k < kfull ? ~(__mmask64)0 : (((__mmask64)1 << (K - kfull)) - 1);
        __m512i xv[QMAX_M];
        for (int m = 0; m < mt; ++m) xv[m] = _mm512_maskz_loadu_epi8(mask, x + m * K + k);
        UNROLL for (int r = 0; r < rows; ++r) {
            const int8_t *p = w + r * K + k;
            _mm_prefetch((const char *)p + QPREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(p + QROWS * K), _MM_HINT_T1);
            const __m512i wv = _mm512_maskz_loadu_epi8(mask, p);
            const __m512i aw = _mm512_abs_epi8(wv);
            const __mmask64 negative = _mm512_movepi8_mask(wv);
            UNROLL for (int m = 0; m < mt; ++m) {
                const __m512i sx = _mm512_mask_sub_epi8(xv[m], negative, zero, xv[m]); /* x * sign(w) */
                acc[r][m] = _mm512_add_epi32(acc[r][m], _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), ones));
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int m = 0; m < mt; ++m) sums[r * QMAX_M + m] = _mm512_reduce_add_epi32(acc[r][m]);
}

/* ---------------------------------------------------------------- int8: activations and outputs */
typedef struct {
    int8_t *q;          /* M x K: round(x16 * 127 / rowmax), outlier columns zero */
    float *row_max;     /* M: max |x16| over the values below the threshold */
    int64_t *cols;      /* the outlier columns, */
    float *outliers;    /* M x ncols: their inputs in the compute dtype, */
    int64_t ncols;
} act8_t;

/* bitsandbytes' int8_vectorwise_quant(x.to(float16), threshold): x16 = x rounded to float16; values with
 * |x16| >= threshold mark their column as an outlier and do not count toward the row's max. x16: M x K scratch. */
__attribute__((target("avx2,fma,f16c"))) static void quantize_activations(const void *x, int dt, int64_t M, int64_t K,
                                                                         float threshold, uint8_t *is_outlier,
                                                                         float *x16, act8_t *a) {
    const int outlying = threshold > 0.0f;
    const float limit = round_to(threshold, DT_F16); /* the comparison is made in float16 */
    const int64_t kfull = K / 8 * 8;
    const __m256 sign = _mm256_set1_ps(-0.0f), vlimit = _mm256_set1_ps(limit);
    memset(is_outlier, 0, (size_t)K);
    for (int64_t m = 0; m < M; ++m) {
        float *row = x16 + m * K;
        __m256 top = _mm256_setzero_ps();
        for (int64_t k = 0; k < kfull; k += 8) {
            const __m256 v = load8_as_f16(x, m * K + k, dt), mag = _mm256_andnot_ps(sign, v);
            _mm256_storeu_ps(row + k, v);
            const __m256 big = outlying ? _mm256_cmp_ps(mag, vlimit, _CMP_GE_OQ) : _mm256_setzero_ps();
            if (_mm256_movemask_ps(big))
                for (int j = 0; j < 8; ++j) is_outlier[k + j] |= fabsf(row[k + j]) >= limit;
            top = _mm256_max_ps(_mm256_andnot_ps(big, mag), top); /* outliers count as 0; NaN is skipped */
        }
        float lanes[8], row_max = 0.0f;
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; ++j) row_max = lanes[j] > row_max ? lanes[j] : row_max;
        for (int64_t k = kfull; k < K; ++k) {
            row[k] = round_to(load_value(x, m * K + k, dt), DT_F16);
            const float v = fabsf(row[k]);
            if (outlying && v >= limit) is_outlier[k] = 1;
            else if (v > row_max) row_max = v;
        }
        a->row_max[m] = row_max;
    }
    a->ncols = 0;
    for (int64_t k = 0; k < K; ++k)
        if (is_outlier[k]) a->cols[a->ncols++] = k;
    for (int64_t m = 0; m < M; ++m) {
        /* PyTorch computes `127.0 / row_max` (a scalar over a tensor) as reciprocal(row_max) * 127 */
        const float scale = (1.0f / a->row_max[m]) * 127.0f;
        const float *row = x16 + m * K;
        int8_t *q = a->q + m * K;
        if (a->row_max[m] == 0.0f) memset(q, 0, (size_t)K);
        else {
            const __m256 s = _mm256_set1_ps(scale);
            for (int64_t k = 0; k < kfull; k += 8) store8_int8(q + k, _mm256_mul_ps(_mm256_loadu_ps(row + k), s));
            for (int64_t k = kfull; k < K; ++k) q[k] = (int8_t)nearbyintf(row[k] * scale);
        }
        for (int64_t j = 0; j < a->ncols; ++j) {
            q[a->cols[j]] = 0;
            a->outliers[m * a->ncols + j] = load_value(x, m * K + a->cols[j], dt);
        }
    }
}

/* int8_mm_dequant: sum * (rowmax * SCB) / 127^2 + bias, rounded to the compute dtype; then, as addmm does, the
 * outlier columns' products with the dequantized weights (SCB / 127 * w, in the compute dtype) added in fp32
 * and rounded again. */
static void store_int8(void *y, int64_t i, int32_t sum, const act8_t *a, int64_t m, const int8_t *w_row,
                       float scb, const void *bias, int64_t n, int dt) {
    float v = (float)sum * (a->row_max[m] * scb);
    v = v * 6.200124e-05f;
    if (bias) v += load_value(bias, n, dt);
    if (a->ncols) {
        float extra = 0.0f;
        for (int64_t j = 0; j < a->ncols; ++j) {
            const float w = (float)w_row[a->cols[j]] * scb;
            extra += a->outliers[m * a->ncols + j] * round_to(w * 7.874015718698502e-3f, dt);
        }
        v = round_to(v, dt) + extra;
    }
    store_value(y, i, round_to(v, dt), dt);
}

/* store_int8 for a task's four outputs of input row m (sums[r * QMAX_M + mi]) when no column is an outlier */
__attribute__((target("avx2,f16c"))) static void store_int8x4(void *y, int64_t i, const int32_t *sums,
                                                              const act8_t *a, int64_t m, int mi, const float *scb,
                                                              const void *bias, int64_t n, int dt) {
    const __m128i s = _mm_setr_epi32(sums[mi], sums[QMAX_M + mi], sums[2 * QMAX_M + mi], sums[3 * QMAX_M + mi]);
    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(s), _mm_mul_ps(_mm_set1_ps(a->row_max[m]), _mm_loadu_ps(scb)));
    v = _mm_mul_ps(v, _mm_set1_ps(6.200124e-05f));
    if (bias) v = _mm_add_ps(v, load4(bias, n, dt));
    store4(y, i, v, dt);
}

#define CALL8(BLOCK, x, w, K, sums, rows, mt) BLOCK(x, w, K, rows, mt, sums)

#define LINEAR8(NAME, TARGET, BLOCK)                                                                            \
    __attribute__((target(TARGET))) static void NAME(const act8_t *a, const int8_t *w, const float *scb,         \
                                                     const void *bias, void *y, int64_t M, int64_t N, int64_t K, \
                                                     int dt) {                                                   \
        const int64_t tasks = (N + QROWS - 1) / QROWS;                                                          \
        _Pragma("omp parallel for schedule(static)") for (int64_t t = 0; t < tasks; ++t) {                       \
            const int64_t n0 = t * QROWS;                                                                       \
            const int rows = N - n0 < QROWS ? (int)(N - n0) : QROWS;                                            \
            int32_t sums[QROWS * QMAX_M];                                                                       \
            for (int64_t m0 = 0; m0 < M; m0 += QMAX_M) {                                                        \
                const int mt = M - m0 < QMAX_M ? (int)(M - m0) : QMAX_M;                                        \
                DISPATCH_M(CALL8, rows, mt, BLOCK, a->q + m0 * K, w + n0 * K, K, sums);                         \
                if (rows == QROWS && a->ncols == 0)                                                             \
                    for (int m = 0; m < mt; ++m) store_int8x4(y, (m0 + m) * N + n0, sums, a, m0 + m, m, scb + n0,   \
                                                              bias, n0, dt);                                        \
                else                                                                                            \
                    for (int r = 0; r < rows; ++r)                                                              \
                        for (int m = 0; m < mt; ++m)                                                            \
                            store_int8(y, (m0 + m) * N + n0 + r, sums[r * QMAX_M + m], a, m0 + m,               \
                                       w + (n0 + r) * K, scb[n0 + r], bias, n0 + r, dt);                        \
            }                                                                                                   \
        }                                                                                                       \
    }

LINEAR8(linear8_avx2, "avx2,fma,f16c", block8_avx2)
LINEAR8(linear8_avx512, AVX512_TARGET, block8_avx512)

/* ---------------------------------------------------------------- int8 on AMX (tdpbssd) */
/* The same exact int32 sums as the loops above, so the same bits: a 16 x 64 int8 tile of weight rows (straight
 * from the row-major weight) times the quantized inputs packed in quads of k, 16 x 16 x 64 products per
 * instruction. Used from AMX_INT8_FROM input rows, where the vector loops become bound by their multiply-adds;
 * K a multiple of 64. Outlier columns and every rounding are store_int8's, as in the vector loops. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#if !defined(NEOX_NO_AMX)
#define NEOX_AMX_INT8 1
#include "amx.h"
#define AMX_INT8_K 64 /* int8 values per tile row */

__attribute__((target("amx-tile,amx-int8,avx2,fma,f16c"))) static int linear8_amx(const act8_t *a, const int8_t *w,
                                                                                   const float *scb, const void *bias,
                                                                                   void *y, int64_t M, int64_t N,
                                                                                   int64_t K, int dt) {
    if (M <= 0 || N <= 0) return 0; /* nothing to compute (and no tile width to divide by) */
    const int width = M < AMX_ROWS ? (int)M : AMX_ROWS;
    const int64_t blocks = (M + width - 1) / width, quads = K / 4, tasks = (N + 2 * AMX_ROWS - 1) / (2 * AMX_ROWS);
    const int64_t tail = N % AMX_ROWS, tail_row = N - tail;
    uint32_t *packed = aligned_alloc(64, (size_t)(blocks * width * quads * 4 + 63) / 64 * 64);
    int8_t *padded = tail ? aligned_alloc(64, (size_t)(AMX_ROWS * K + 63) / 64 * 64) : NULL;
    if (!packed || (tail && !padded)) {
        free(packed);
        free(padded);
        return -2;
    }
    if (tail) { /* the last rows when fewer than 16 are left: a zero-padded copy, so no tile reads past the weight */
        memset(padded, 0, (size_t)AMX_ROWS * K);
        memcpy(padded, w + tail_row * K, (size_t)(tail * K));
    }
#pragma omp parallel
    {
        amx_configure(width);
        int32_t sums[AMX_ROWS * AMX_ROWS] __attribute__((aligned(64)));
        amx_pack_inputs(a->q, packed, M, quads, width); /* ends in a barrier */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t n0 = t * 2 * AMX_ROWS;
            const int rows = N - n0 < 2 * AMX_ROWS ? (int)(N - n0) : 2 * AMX_ROWS;
            const int8_t *w0 = n0 == tail_row ? padded : w + n0 * K;
            const int8_t *w1 = rows <= AMX_ROWS ? NULL : n0 + AMX_ROWS == tail_row ? padded : w0 + AMX_ROWS * K;
            for (int64_t b = 0; b < blocks; b += 2) {
                const int two = b + 1 < blocks;
                const uint32_t *x0 = packed + b * quads * width, *x1 = x0 + quads * width;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t k = 0; k < K; k += AMX_INT8_K) {
                    const int64_t unit = k / 4 * width;
                    _tile_loadd(6, x0 + unit, 4 * width);
                    _tile_loadd(4, w0 + k, K);
                    _tile_dpbssd(0, 4, 6);
                    if (w1) {
                        _tile_loadd(5, w1 + k, K);
                        _tile_dpbssd(2, 5, 6);
                    }
                    if (two) {
                        _tile_loadd(7, x1 + unit, 4 * width);
                        _tile_dpbssd(1, 4, 7);
                        if (w1) _tile_dpbssd(3, 5, 7);
                    }
                }
                for (int tile = 0; tile < 4; ++tile) {
                    const int upper = tile >= 2, second = tile & 1;
                    if ((upper && !w1) || (second && !two)) continue;
                    if (tile == 0) _tile_stored(0, sums, 4 * width);
                    else if (tile == 1) _tile_stored(1, sums, 4 * width);
                    else if (tile == 2) _tile_stored(2, sums, 4 * width);
                    else _tile_stored(3, sums, 4 * width);
                    const int64_t m0 = (b + second) * width, r0 = n0 + upper * AMX_ROWS;
                    const int mt = M - m0 < width ? (int)(M - m0) : width;
                    const int rt = rows - upper * AMX_ROWS < AMX_ROWS ? rows - upper * AMX_ROWS : AMX_ROWS;
                    for (int m = 0; m < mt; ++m) {
                        int r = 0;
                        if (a->ncols == 0) /* four outputs at a time, as the loops store them */
                            for (; r + QROWS <= rt; r += QROWS) {
                                int32_t four[QROWS * QMAX_M];
                                for (int j = 0; j < QROWS; ++j) four[j * QMAX_M] = sums[(r + j) * width + m];
                                store_int8x4(y, (m0 + m) * N + r0 + r, four, a, m0 + m, 0, scb + r0 + r, bias, r0 + r,
                                             dt);
                            }
                        for (; r < rt; ++r)
                            store_int8(y, (m0 + m) * N + r0 + r, sums[r * width + m], a, m0 + m, w + (r0 + r) * K,
                                       scb[r0 + r], bias, r0 + r, dt);
                    }
                }
            }
        }
        _tile_release();
    }
    free(packed);
    free(padded);
    return 0;
}
#endif
#endif
#ifndef NEOX_AMX_INT8
#define NEOX_AMX_INT8 0
static int linear8_amx(const act8_t *a, const int8_t *w, const float *scb, const void *bias, void *y, int64_t M,
                       int64_t N, int64_t K, int dt) {
    (void)a, (void)w, (void)scb, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)dt;
    return -1;
}
#endif

/* ---------------------------------------------------------------- int8 weight quantization (loading) */
/* Row i of w (N x K, dtype dt): scales[i] = max |w16|, q = round(w16 * (127 / max)) with PyTorch's arithmetic
 * (the reciprocal times 127, then nearest even); an all-zero row gives zeros. */
__attribute__((target("avx2,fma,f16c"))) static int quantize_rows_int8(int dt, const void *w, int8_t *q,
                                                                        float *scales, int64_t N, int64_t K) {
    const int64_t kfull = K / 8 * 8;
    int overflow = 0;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int64_t row = n * K;
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 top = _mm256_setzero_ps();
        for (int64_t k = 0; k < kfull; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, load8_as_f16(w, row + k, dt)));
        float lanes[8], mx = 0.0f;
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
        for (int64_t k = kfull; k < K; ++k) {
            const float v = fabsf(round_to(load_value(w, row + k, dt), DT_F16));
            mx = v > mx ? v : mx;
        }
        scales[n] = mx;
        if (!isfinite(mx)) { /* a value beyond float16's range (or NaN): left to PyTorch's own arithmetic */
#pragma omp atomic write
            overflow = 1;
        }
        const float scale = (1.0f / mx) * 127.0f;
        const __m256 s = _mm256_set1_ps(scale);
        for (int64_t k = 0; k < kfull; k += 8) {
            store8_int8(q + row + k, mx == 0.0f ? _mm256_setzero_ps() : _mm256_mul_ps(load8_as_f16(w, row + k, dt), s));
        }
        for (int64_t k = kfull; k < K; ++k)
            q[row + k] = mx == 0.0f ? 0 : (int8_t)nearbyintf(round_to(load_value(w, row + k, dt), DT_F16) * scale);
    }
    return overflow;
}

/* ---------------------------------------------------------------- entry points (called through ctypes) */
int neox_quant_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) return QISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QISA_AVX2;
    return QISA_NONE;
}

/* x: M x K in dtype `dt`; w: N * K / 2 packed bytes; code: the 16 values; absmax: N * K / 64 fp32 scales, or
 * NULL and (absmax8, code2, absmax2, offset) with double quantization; bias: N in `dt` or NULL; y: M x N in
 * `dt`. K must be a multiple of 64. Returns 0; -1 for an ISA this CPU lacks; -2 when out of memory. */
int neox_linear_4bit(int isa, int dt, const void *x, const uint8_t *w, const float *code, const float *absmax,
                     const uint8_t *absmax8, const float *code2, const float *absmax2, float offset,
                     const void *bias, void *y, int64_t M, int64_t N, int64_t K, int gelu) {
    if (isa != QISA_AVX2 && isa != QISA_AVX512) return -1;
    float *xr = malloc((size_t)(M * K) * sizeof(float));
    if (!xr) return -2;
    const scales_t sc = {absmax, absmax8, code2, absmax2, offset};
    int order[QBLOCK];
    lookup_order(isa, dt, order);
    reorder_input(x, dt, M, K, order, xr);
    if (isa == QISA_AVX512) linear4_avx512(xr, w, code, &sc, bias, y, M, N, K, dt);
    else linear4_avx2(xr, w, code, &sc, bias, y, M, N, K, dt);
    free(xr);
    if (gelu) gelu_outputs(y, M * N, dt);
    return 0;
}

/* the input rows from which neox_linear_int8 with QISA_AMX_INT8 takes the tiles */
int neox_amx_int8_from(void) { return AMX_INT8_FROM; }

/* x: M x K in `dt`; w: N x K int8; scb: N fp32; threshold: LLM.int8's outlier threshold (0: none); bias: N in
 * `dt` or NULL; y: M x N in `dt`. Returns 0; -1 for an ISA this CPU lacks; -2 when out of memory. */
int neox_linear_int8(int isa, int dt, const void *x, const int8_t *w, const float *scb, float threshold,
                     const void *bias, void *y, int64_t M, int64_t N, int64_t K, int gelu) {
    if (isa != QISA_AVX2 && isa != QISA_AVX512 && !(isa == QISA_AMX_INT8 && NEOX_AMX_INT8)) return -1;
    act8_t a;
    a.q = malloc((size_t)(M * K));
    a.row_max = malloc((size_t)M * sizeof(float));
    a.cols = malloc((size_t)K * sizeof(int64_t));
    a.outliers = malloc((size_t)(M * K) * sizeof(float));
    uint8_t *is_outlier = malloc((size_t)K);
    float *x16 = malloc((size_t)(M * K) * sizeof(float));
    int status = -2;
    if (a.q && a.row_max && a.cols && a.outliers && is_outlier && x16) {
        quantize_activations(x, dt, M, K, threshold, is_outlier, x16, &a);
        status = 0;
        if (isa == QISA_AMX_INT8 && M >= AMX_INT8_FROM && K % 64 == 0) status = linear8_amx(&a, w, scb, bias, y, M, N, K, dt);
        else if (isa == QISA_AVX512 || isa == QISA_AMX_INT8) linear8_avx512(&a, w, scb, bias, y, M, N, K, dt);
        else linear8_avx2(&a, w, scb, bias, y, M, N, K, dt);
        if (gelu && status == 0) gelu_outputs(y, M * N, dt);
    }
    free(a.q);
    free(a.row_max);
    free(a.cols);
    free(a.outliers);
    free(is_outlier);
    free(x16);
    return status;
}

/* w: N x K in `dt`; q: N x K int8; scales: N fp32. bitsandbytes' Int8Params quantization, bit for bit. Returns 0;
 * 1 when a row's max is not finite in float16 (q is then not bitsandbytes'); -1 for an ISA this CPU lacks (both
 * ISAs run the AVX2 loop: it is bound by memory). */
int neox_quantize_int8(int isa, int dt, const void *w, int8_t *q, float *scales, int64_t N, int64_t K) {
    if (isa != QISA_AVX2 && isa != QISA_AVX512) return -1;
    return quantize_rows_int8(dt, w, q, scales, N, K);
}
