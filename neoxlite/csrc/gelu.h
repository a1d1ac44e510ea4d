/* GELU as PyTorch's vectorized CPU kernel computes it, shared by neoxlite's linear kernels. */
#ifndef NEOXLITE_GELU_H
#define NEOXLITE_GELU_H

/* GELU(x) = x/2 (1 + erf(x / sqrt 2)) with erf as PyTorch's vectorized CPU kernel computes it (Abramowitz and
 * Stegun 7.1.26, |error| < 1.5e-7), in the same order of operations, so the bf16 results agree with F.gelu. */
#define GELU_P 0.3275911f
#define GELU_A1 0.254829592f
#define GELU_A2 -0.284496736f
#define GELU_A3 1.421413741f
#define GELU_A4 -1.453152027f
#define GELU_A5 1.061405429f
#define SQRT1_2 0.70710678118654752440f

/* The vector kernels' e^x, x <= 0: x = n ln2 + r (ln2 in two parts), |r| <= ln2/2, e^r by Cephes' expf polynomial
 * (within about one ulp; a degree-6 Taylor polynomial, 2 ulp, missed F.gelu's bf16 result on one value in two hundred
 * where 1 + erf cancels), declared as P; the caller scales by 2^n. One text for every vector width: TYPE and the
 * FMADD / FNMADD / MUL / ADD / SET1 intrinsics name it. */
#define EXP_POLY(TYPE, FMADD, FNMADD, MUL, ADD, SET1, X, N, P)                                                  \
    TYPE P##_r = FNMADD(N, SET1(0.693359375f), X);                                                              \
    P##_r = FNMADD(N, SET1(-2.12194440e-4f), P##_r);                                                            \
    TYPE P = SET1(1.9875691500e-4f);                                                                            \
    P = FMADD(P, P##_r, SET1(1.3981999507e-3f));                                                                \
    P = FMADD(P, P##_r, SET1(8.3334519073e-3f));                                                                \
    P = FMADD(P, P##_r, SET1(4.1665795894e-2f));                                                                \
    P = FMADD(P, P##_r, SET1(1.6666665459e-1f));                                                                \
    P = FMADD(P, P##_r, SET1(5.0000001201e-1f));                                                                \
    P = ADD(FMADD(P, MUL(P##_r, P##_r), P##_r), SET1(1.0f))

/* GELU on the lanes of V, declared as G (EXP_NONPOSITIVE: the width's e^x for x <= 0). */
#define GELU_VECTOR(TYPE, MUL, DIV, FMADD, ADD, XOR, AND, ABS, SET1, EXP_NONPOSITIVE, V, G)                       \
    const TYPE G##_one = SET1(1.0f), G##_sign = SET1(-0.0f);                                                     \
    const TYPE G##_a = MUL(V, SET1(SQRT1_2));                                                                   \
    const TYPE G##_t = DIV(G##_one, FMADD(SET1(GELU_P), ABS(G##_a), G##_one));                                  \
    TYPE G##_r = FMADD(SET1(GELU_A5), G##_t, SET1(GELU_A4));                                                    \
    G##_r = FMADD(G##_r, G##_t, SET1(GELU_A3));                                                                 \
    G##_r = FMADD(G##_r, G##_t, SET1(GELU_A2));                                                                 \
    G##_r = FMADD(G##_r, G##_t, SET1(GELU_A1));                                                                 \
    const TYPE G##_e = XOR(G##_sign, EXP_NONPOSITIVE(XOR(G##_sign, MUL(G##_a, G##_a))));                        \
    const TYPE G##_erf = XOR(AND(G##_sign, G##_a), FMADD(MUL(G##_e, G##_t), G##_r, G##_one)); /* 1 - e t r */   \
    const TYPE G = MUL(MUL(V, SET1(0.5f)), ADD(G##_one, G##_erf))

#endif
