/* One decode step of GPT-NeoX attention for bf16 on the CPU, for every head of every row at once.
 *
 * At batch 1 the PyTorch version of this step is about fifteen small operations per layer (split q/k/v, rotate
 * half of q and k, write the cache, scaled dot-product attention, merge the heads), each a dispatch and a pass
 * over a few kilobytes that the weight stream has just pushed out of the caches; together they cost about a
 * quarter of a decode step. Here they are one call. The rotary step rounds to bf16 where PyTorch does (after
 * each product and after the sum), so q and the cached k and v are the same bits; attention is computed in fp32
 * (scores, softmax weights, weighted sum) and rounded once. PyTorch's CPU attention also rounds the softmax
 * weights to bf16 before the weighted sum, so this is slightly closer to the exact result than the reference.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* qkv: (B, heads * 3 * hs), each head's slice [q | k | v]; cos, sin: (B, rot) with row strides;
 * keys, values: (slots, heads, capacity, hs). Row b writes position p of slot s and attends to positions 0..p of
 * slot s, where s = slots_of[b], p = positions[b] for continuous batching (each row its own sequence), or s = b,
 * p = past for one batch of equal lengths when slots_of is NULL. The caller checks s < slots, p < capacity.
 * out: (B, heads * hs). `scale` multiplies the scores (1/sqrt(hs) by default in PyTorch). */
__attribute__((target_clones("avx512f", "avx2", "default"))) /* vector dot products where the CPU has them */
void neox_decode_attention_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, int64_t trig_stride,
                                uint16_t *keys, uint16_t *values, uint16_t *out, int64_t B, int64_t heads,
                                int64_t hs, int64_t rot, int64_t capacity, int64_t past, const int64_t *slots_of,
                                const int64_t *positions, float scale) {
#pragma omp parallel
    {
        float scores_stack[2048], acc_stack[512];
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const int64_t slot = slots_of ? slots_of[b] : b, pos = slots_of ? positions[b] : past;
            const int64_t length = pos + 1;
            const uint16_t *head = qkv + (b * heads + h) * 3 * hs;
            const uint16_t *c = cos + b * trig_stride, *s = sin + b * trig_stride;
            const int64_t base = (slot * heads + h) * capacity * hs;
            uint16_t *kc = keys + base, *vc = values + base;
            uint16_t q[512];
            rotate(head, c, s, hs, rot, q);
            rotate(head + hs, c, s, hs, rot, kc + pos * hs);
            memcpy(vc + pos * hs, head + 2 * hs, (size_t)hs * sizeof(uint16_t));

            float *scores = length <= 2048 ? scores_stack : NULL;
            float *acc = acc_stack;
            float qf[512];
            for (int64_t i = 0; i < hs; ++i) qf[i] = bf16_to_float(q[i]);
            float best = -INFINITY;
            /* two passes over the keys when the scores do not fit the stack buffer: max first, then the rest */
            for (int64_t j = 0; j < length; ++j) {
                const uint16_t *k = kc + j * hs;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < hs; ++i) dot += qf[i] * bf16_to_float(k[i]);
                dot *= scale;
                if (scores) scores[j] = dot;
                if (dot > best) best = dot;
            }
            for (int64_t i = 0; i < hs; ++i) acc[i] = 0.0f;
            float total = 0.0f;
            for (int64_t j = 0; j < length; ++j) {
                float score;
                if (scores) {
                    score = scores[j];
                } else {
                    const uint16_t *k = kc + j * hs;
                    score = 0.0f;
#pragma omp simd reduction(+ : score)
                    for (int64_t i = 0; i < hs; ++i) score += qf[i] * bf16_to_float(k[i]);
                    score *= scale;
                }
                const float p = expf(score - best);
                total += p;
                const uint16_t *v = vc + j * hs;
                for (int64_t i = 0; i < hs; ++i) acc[i] += p * bf16_to_float(v[i]);
            }
            uint16_t *o = out + (b * heads + h) * hs;
            for (int64_t i = 0; i < hs; ++i) o[i] = float_to_bf16(acc[i] / total);
        }
    }
}
