/* One decode step of GPT-NeoX attention for bf16 on the CPU, for every head of every row at once.
 *
 * At batch 1 the PyTorch version of this step is about fifteen small operations per layer (split q/k/v, rotate
 * half of q and k, write the cache, scaled dot-product attention, merge the heads), each a dispatch and a pass
 * over a few kilobytes that the weight stream has just pushed out of the caches; together they cost about a
 * quarter of a decode step. Here they are one call. The rotary step rounds to bf16 where PyTorch does (after
 * each product and after the sum), so q and the cached k and v are the same bits; attention is computed in fp32
 * (scores, softmax weights, weighted sum) and rounded once. PyTorch's CPU attention also rounds the softmax
 * weights to bf16 before the weighted sum, so this is slightly closer to the exact result than the reference.
 *
 * The attention itself runs on AVX2 (the library needs it): eight keys' scores at a time, the softmax weights'
 * e^x eight at a time, and the weighted sum of the values with four 16-value groups of accumulators in registers.
 * Every row and head adds in one fixed order, so a row's result has the same bits whatever the batch around it.
 * Measured on two Zen 3 cores with pythia-410m's heads (bench/attention.py, two runs): one row over 1001 cached
 * positions 0.08-0.11 ms a layer against 0.23-0.32 ms for the scalar loop this replaced and 1.2-1.6 ms for PyTorch's
 * ops; 16 rows over 129 positions 0.23 against 0.70 ms; 16 rows over 1001 positions 2.8-3.1 ms, bound by the cache
 * (256 bytes a position and head) streaming from RAM.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "avx2_math.h"
#include "bf16.h"

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* x[i] for the head's first `rot` dims rotated as NeoX does: x * cos + rotate_half(x) * sin, rounded like
 * PyTorch's bf16 ops; the other dims copied. */
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t hs, int64_t rot,
                   uint16_t *out) {
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < rot; ++i) {
        const float partner = i < half ? -bf16_to_float(x[i + half]) : bf16_to_float(x[i - half]);
        const float a = round_bf16(bf16_to_float(x[i]) * bf16_to_float(cos[i]));
        const float b = round_bf16(partner * bf16_to_float(sin[i]));
        out[i] = float_to_bf16(a + b);
    }
    memcpy(out + rot, x + rot, (size_t)(hs - rot) * sizeof(uint16_t));
}

/* Scores are computed SCORE_BLOCK positions at a time into a per-thread buffer; past that many positions the
 * second pass computes a block's scores again (the same function, so the same bits) instead of keeping them all. */
#define SCORE_BLOCK 2048

/* q * k_j for eight keys j0.. j0+7 (`n` of them real; the other lanes repeat key j0 and are ignored), times
 * `scale`. qs: q split as the keys are widened (per 16 values, the 8 even ones, then the 8 odd ones; the last
 * hs % 16 values as they are). Each lane: the even then odd products of each 16 values in order, then
 * hsum8x8_avx2's order, then the last values one at a time. */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256
scores8_avx2(const float *qs, const uint16_t *kc, int64_t j0, int64_t n, int64_t hs, float scale) {
    const int64_t hs16 = hs / 16 * 16;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const uint16_t *k[8];
    __m256 acc[8];
    for (int jj = 0; jj < 8; ++jj) {
        k[jj] = kc + (j0 + (jj < n ? jj : 0)) * hs;
        acc[jj] = _mm256_setzero_ps();
    }
    for (int64_t t = 0; t < hs16; t += 16) {
        const __m256 qe = _mm256_loadu_ps(qs + t), qo = _mm256_loadu_ps(qs + t + 8);
        for (int jj = 0; jj < 8; ++jj) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(k[jj] + t));
            acc[jj] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), qe, acc[jj]);
            acc[jj] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), qo, acc[jj]);
        }
    }
    __m256 sums = hsum8x8_avx2(acc);
    if (hs16 < hs) {
        float lanes[8];
        _mm256_storeu_ps(lanes, sums);
        for (int jj = 0; jj < 8; ++jj)
            for (int64_t i = hs16; i < hs; ++i) lanes[jj] = fmaf(qs[i], bf16_to_float(k[jj][i]), lanes[jj]);
        sums = _mm256_loadu_ps(lanes);
    }
    return _mm256_mul_ps(sums, _mm256_set1_ps(scale));
}

/* acc (NT groups of 16 values, split as qs is) += p[j] * v_j for the n positions from v0 (stride hs): the groups'
 * 2 NT accumulators stay in registers for the whole run of positions. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
weigh_values_avx2(const float *p, const uint16_t *v0, int64_t n, int64_t hs, float *acc, const int NT) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a[8];
    for (int i = 0; i < 2 * NT; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
    for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const uint16_t *v = v0 + j * hs;
        for (int g = 0; g < NT; ++g) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(v + 16 * g));
            a[2 * g] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), pj, a[2 * g]);
            a[2 * g + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high)), pj, a[2 * g + 1]);
        }
    }
    for (int i = 0; i < 2 * NT; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

/* A block's scores, and their running maximum; lanes past `length` are left out of the maximum. */
__attribute__((target("avx2,fma"))) static void block_scores_avx2(const float *qs, const uint16_t *kc, int64_t b0,
                                                                 int64_t length, int64_t hs, float scale,
                                                                 float *scores, __m256 *best) {
    const int64_t end = length - b0 < SCORE_BLOCK ? length : b0 + SCORE_BLOCK;
    for (int64_t j = b0; j < end; j += 8) {
        const __m256 s = scores8_avx2(qs, kc, j, end - j, hs, scale);
        _mm256_storeu_ps(scores + (j - b0), s);
        const __m256 real = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_ps((float)(end - j)), _CMP_LT_OQ);
        *best = _mm256_max_ps(*best, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, real));
    }
}

/* softmax(q K^T * scale) V for one head over positions 0..length-1, rounded once to bf16 into o */
__attribute__((target("avx2,fma"))) static void attend_avx2(const uint16_t *q, const uint16_t *kc, const uint16_t *vc,
                                                           int64_t length, int64_t hs, float scale, uint16_t *o) {
    const int64_t hs16 = hs / 16 * 16;
    float qs[512], acc[512], scores[SCORE_BLOCK];
    for (int64_t t = 0; t < hs16; t += 16)
        for (int i = 0; i < 8; ++i) {
            qs[t + i] = bf16_to_float(q[t + 2 * i]);
            qs[t + 8 + i] = bf16_to_float(q[t + 2 * i + 1]);
        }
    for (int64_t i = hs16; i < hs; ++i) qs[i] = bf16_to_float(q[i]);

    __m256 best_lanes = _mm256_set1_ps(-INFINITY);
    for (int64_t b0 = 0; b0 < length; b0 += SCORE_BLOCK)
        block_scores_avx2(qs, kc, b0, length, hs, scale, scores, &best_lanes);
    float lanes[8];
    _mm256_storeu_ps(lanes, best_lanes);
    float best = lanes[0];
    for (int i = 1; i < 8; ++i) best = lanes[i] > best ? lanes[i] : best;
    /* (a NaN score needs no check: its weight e^NaN is NaN, and so is every output, as in PyTorch) */

    memset(acc, 0, (size_t)hs * sizeof(float));
    __m256 total = _mm256_setzero_ps();
    const __m256 top = _mm256_set1_ps(best);
    for (int64_t b0 = 0; b0 < length; b0 += SCORE_BLOCK) {
        const int64_t n = length - b0 < SCORE_BLOCK ? length - b0 : SCORE_BLOCK;
        if (length > SCORE_BLOCK) {
            __m256 ignored = _mm256_set1_ps(-INFINITY);
            block_scores_avx2(qs, kc, b0, length, hs, scale, scores, &ignored);
        }
        for (int64_t j = 0; j < n; j += 8) { /* the weights e^(s - best), in place of the scores */
            const __m256 real = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)(n - j)),
                                              _CMP_LT_OQ);
            const __m256 e = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
            const __m256 p = _mm256_and_ps(e, real);
            _mm256_storeu_ps(scores + j, p);
            total = _mm256_add_ps(total, p);
        }
        const uint16_t *v0 = vc + b0 * hs;
        int64_t t = 0;
        for (; t + 64 <= hs16; t += 64) weigh_values_avx2(scores, v0 + t, n, hs, acc + t, 4);
        switch ((hs16 - t) / 16) {
        case 3: weigh_values_avx2(scores, v0 + t, n, hs, acc + t, 3); break;
        case 2: weigh_values_avx2(scores, v0 + t, n, hs, acc + t, 2); break;
        case 1: weigh_values_avx2(scores, v0 + t, n, hs, acc + t, 1); break;
        default: break;
        }
        for (int64_t j = 0; j < n; ++j)
            for (int64_t i = hs16; i < hs; ++i) acc[i] = fmaf(scores[j], bf16_to_float(v0[j * hs + i]), acc[i]);
    }
    _mm256_storeu_ps(lanes, total);
    const float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t t = 0; t < hs16; t += 16)
        for (int i = 0; i < 8; ++i) {
            o[t + 2 * i] = float_to_bf16(acc[t + i] / sum);
            o[t + 2 * i + 1] = float_to_bf16(acc[t + 8 + i] / sum);
        }
    for (int64_t i = hs16; i < hs; ++i) o[i] = float_to_bf16(acc[i] / sum);
}

/* qkv: (B, heads * 3 * hs), each head's slice [q | k | v]; cos, sin: (B, rot) with row strides;
 * keys, values: (slots, heads, capacity, hs). Row b writes position p of slot s and attends to positions 0..p of
 * slot s, where s = slots_of[b], p = positions[b] for continuous batching (each row its own sequence), or s = b,
 * p = past for one batch of equal lengths when slots_of is NULL. The caller checks s < slots, p < capacity,
 * hs <= 512. out: (B, heads * hs). `scale` multiplies the scores (1/sqrt(hs) by default in PyTorch). */
void neox_decode_attention_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, int64_t trig_stride,
                                uint16_t *keys, uint16_t *values, uint16_t *out, int64_t B, int64_t heads,
                                int64_t hs, int64_t rot, int64_t capacity, int64_t past, const int64_t *slots_of,
                                const int64_t *positions, float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * heads; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const int64_t slot = slots_of ? slots_of[b] : b, pos = slots_of ? positions[b] : past;
        const uint16_t *head = qkv + (b * heads + h) * 3 * hs;
        const uint16_t *c = cos + b * trig_stride, *s = sin + b * trig_stride;
        const int64_t base = (slot * heads + h) * capacity * hs;
        uint16_t *kc = keys + base, *vc = values + base;
        uint16_t q[512];
        rotate(head, c, s, hs, rot, q);
        rotate(head + hs, c, s, hs, rot, kc + pos * hs);
        memcpy(vc + pos * hs, head + 2 * hs, (size_t)hs * sizeof(uint16_t));
        attend_avx2(q, kc, vc, pos + 1, hs, scale, out + (b * heads + h) * hs);
    }
}
