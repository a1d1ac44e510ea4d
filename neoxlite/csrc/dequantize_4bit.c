/* bitsandbytes' 4-bit weights (nf4, fp4; with or without double quantization) dequantized a few rows at a time
 * into a caller's buffer, for the many-row path (neoxlite/quant_matmul.py): each tile of rows is dequantized
 * here, then multiplied by PyTorch's matmul (oneDNN, on AMX where the CPU has it), so no whole dequantized weight
 * is ever held and the block scales are decoded in place on every call, never converted into a second copy.
 *
 * The weights are exactly those bitsandbytes' CPU dequantize_4bit gives: table[index] * scale in fp32, rounded
 * (nearest even) to the output dtype; the scale is the block's fp32 absmax or, with double quantization,
 * code2[q] * absmax2[block / 256] + offset, rounded twice (bitsandbytes multiplies in its kernel, then adds the
 * offset with a PyTorch op). The layout is the one neoxlite/csrc/linear_quant.c reads: two codes per byte, the
 * first value in the high nibble, row-major, one scale per 64 values, whole blocks per row.
 *
 * One AVX2 loop serves AVX2 and AVX512 CPUs: a tile's dequantization is a small share of the matmul it feeds
 * (one pass over rows x K values against 2 x M x rows x K flops), so a wider loop would not show.
 */
#pragma GCC optimize("fp-contract=off") /* code2 * absmax2 + offset must round twice, as in bitsandbytes */
#include <immintrin.h>
#include <stdint.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 }; /* the output dtype, as in linear_quant.c */
enum { QISA_AVX2 = 1, QISA_AVX512 = 2 };

#define QBLOCK 64 /* values per scale: 32 bytes */

/* the 16 weights of one block (table * scale) rounded to dt and widened back to fp32, as two 8-entry halves */
__attribute__((target("avx2,f16c"), always_inline)) static inline __m256 round_dt(__m256 v, int dt) {
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    if (dt == DT_BF16) { /* nearest even on the top 16 bits (the table holds no NaN: finite codes and scales) */
        const __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
        return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    }
    return v;
}

/* 16 weights of 8 bytes (hi0, lo0, hi1, lo1, ...) looked up in the two table halves, written to out in dt */
__attribute__((target("avx2,f16c"), always_inline)) static inline void
expand8_avx2(const uint8_t *bytes, __m256 low_half, __m256 high_half, void *out, int64_t at, int out_dt) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    const __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, _mm256_set1_epi32(15));
    const __m256i a = _mm256_unpacklo_epi32(hi, lo), b = _mm256_unpackhi_epi32(hi, lo); /* per 128-bit lane */
    const __m256i idx[2] = {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};
    __m256 w[2];
    for (int h = 0; h < 2; ++h) { /* index bit 3 picks the half: moved to the sign bit for blendv */
        const __m256 from_low = _mm256_permutevar8x32_ps(low_half, idx[h]);
        const __m256 from_high = _mm256_permutevar8x32_ps(high_half, idx[h]);
        w[h] = _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(idx[h], 28)));
    }
    if (out_dt == DT_F32) {
        _mm256_storeu_ps((float *)out + at, w[0]);
        _mm256_storeu_ps((float *)out + at + 8, w[1]);
    } else if (out_dt == DT_F16) { /* exact: the values are already float16's */
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_cvtps_ph(w[0], _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at + 8), _mm256_cvtps_ph(w[1], _MM_FROUND_TO_NEAREST_INT));
    } else { /* exact: the low 16 bits are zero; packus works per lane, permute4x64 puts the lanes in order */
        const __m256i p = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(w[0]), 16),
                                              _mm256_srli_epi32(_mm256_castps_si256(w[1]), 16));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm256_permute4x64_epi64(p, 0xD8));
    }
}

__attribute__((target("avx2,f16c"))) static void
dequantize_rows_avx2(const uint8_t *w, const float *code, const float *absmax, const uint8_t *absmax8,
                     const float *code2, const float *absmax2, float offset, void *out, int64_t first_row,
                     int64_t rows, int64_t K, int dt, int out_dt) {
    const int64_t blocks = K / QBLOCK;
    const __m256 code_low = _mm256_loadu_ps(code), code_high = _mm256_loadu_ps(code + 8);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < blocks; ++j) {
            const int64_t b = (first_row + r) * blocks + j; /* the block's index in the whole weight */
            float scale = absmax ? absmax[b] : code2[absmax8[b]] * absmax2[b >> 8];
            if (!absmax) scale = scale + offset;
            const __m256 s = _mm256_set1_ps(scale);
            const __m256 low = round_dt(_mm256_mul_ps(code_low, s), dt);
            const __m256 high = round_dt(_mm256_mul_ps(code_high, s), dt);
            const uint8_t *bytes = w + b * (QBLOCK / 2);
            for (int g = 0; g < QBLOCK / 2; g += 8)
                expand8_avx2(bytes + g, low, high, out, r * K + j * QBLOCK + 2 * g, out_dt);
        }
    }
}

/* w: the whole packed weight (N * K / 2 bytes); code: the 16 values; absmax: one fp32 scale per block, or NULL
 * and (absmax8, code2, absmax2, offset) with double quantization; out: rows x K, rows first_row ..
 * first_row + rows - 1 of the weight, rounded to dt and stored in out_dt (dt, or fp32: exact). K must be a
 * multiple of 64. Returns 0; -1 for an ISA this CPU lacks. */
int neox_dequantize_4bit(int isa, int dt, int out_dt, const uint8_t *w, const float *code, const float *absmax,
                         const uint8_t *absmax8, const float *code2, const float *absmax2, float offset, void *out,
                         int64_t first_row, int64_t rows, int64_t K) {
    if (isa != QISA_AVX2 && isa != QISA_AVX512) return -1;
    if (out_dt != dt && out_dt != DT_F32) return -1;
    dequantize_rows_avx2(w, code, absmax, absmax8, code2, absmax2, offset, out, first_row, rows, K, dt, out_dt);
    return 0;
}
