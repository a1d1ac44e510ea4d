/* GELU as PyTorch's vectorized CPU kernel computes it, shared by neoxlite's linear kernels. */
#ifndef NEOXLITE_GELU_H
#define NEOXLITE_GELU_H

#include <math.h>

/* GELU(x) = x/2 (1 + erf(x / sqrt 2)) with erf as PyTorch's vectorized CPU kernel computes it (Abramowitz and
 * Stegun 7.1.26, |error| < 1.5e-7), in the same order of operations, so the bf16 results agree with F.gelu. */
#define GELU_P 0.3275911f
#define GELU_A1 0.254829592f
#define GELU_A2 -0.284496736f
#define GELU_A3 1.421413741f
#define GELU_A4 -1.453152027f
#define GELU_A5 1.061405429f
#define SQRT1_2 0.70710678118654752440f

static inline float gelu_scalar(float v) {
    const float a = v * SQRT1_2, t = 1.0f / (GELU_P * fabsf(a) + 1.0f);
    const float r = (((GELU_A5 * t + GELU_A4) * t + GELU_A3) * t + GELU_A2) * t + GELU_A1;
    const float erf_abs = 1.0f - expf(-(a * a)) * t * r;
    return v * 0.5f * (1.0f + copysignf(erf_abs, a));
}

#endif
