/* Throughput of the AVX512 instructions the 4-bit decode loop could be built from, on this core: how many of each
 * issue per cycle, alone and beside an FMA. The nf4 loop (neoxlite/csrc/linear_quant.c) is bound by its vector
 * issue slots, so whether another instruction mix is faster is a question about these figures (an instruction
 * that takes two slots shows as two cycles per pair with an FMA, where a one-slot instruction shows one).
 *
 *     cc -O2 -o /tmp/vector_ports bench/vector_ports.c && taskset -c 1 /tmp/vector_ports
 *
 * Cycles come from a chain of dependent 64-bit multiplies (three cycles each on x86 cores of the last decade; a
 * chain of adds would not do: recent Intel cores fold add-immediate chains at rename), so the figures do not
 * depend on the TSC's rate. Each loop body holds eight instructions with no dependency between iterations but the
 * FMA accumulators (eight of them), so the figures are issue throughput, not latency. Instructions the CPU lacks
 * (AVX512-BF16, say) are skipped. */
#include <stdio.h>
#include <x86intrin.h>

#define ITERATIONS 20000000L
#define CLOBBERS "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm16", "xmm17", "xmm18", "xmm19", \
                 "xmm20", "xmm21", "xmm22", "xmm23", "k1", "memory"
#define EIGHT(ins) ins "\n" ins "\n" ins "\n" ins "\n" ins "\n" ins "\n" ins "\n" ins "\n"
/* eight instructions into eight accumulators (an FMA's or a dot product's), zmm16-23 */
#define EIGHT_SUMS(ins)                                                                                         \
    ins " %%zmm16\n" ins " %%zmm17\n" ins " %%zmm18\n" ins " %%zmm19\n"                                            \
    ins " %%zmm20\n" ins " %%zmm21\n" ins " %%zmm22\n" ins " %%zmm23\n"
/* four pairs: `sum` into an accumulator (zmm16-19) beside `other` into a scratch register (zmm3-6) */
#define FOUR_WITH(sum, other)                                                                                   \
    sum " %%zmm16\n" other " %%zmm3\n" sum " %%zmm17\n" other " %%zmm4\n"                                        \
    sum " %%zmm18\n" other " %%zmm5\n" sum " %%zmm19\n" other " %%zmm6\n"
#define FMA "vfmadd231ps %%zmm1, %%zmm2,"
#define LOOP(name, isa, body)                                                                                   \
    __attribute__((target(isa))) static void name(long n) {                                                  \
        for (long i = 0; i < n; ++i) __asm__ volatile(body ::: CLOBBERS);                                       \
    }

static void scalar_chain(long n) { /* eight dependent 64-bit multiplies per iteration, three cycles each */
    long v = 3;
    const long factor = 5;
    for (long i = 0; i < n; ++i)
        __asm__ volatile(EIGHT("imulq %1, %0") : "+r"(v) : "r"(factor));
}

LOOP(fmas, "avx512f", EIGHT_SUMS(FMA))
LOOP(vpermps, "avx512f", EIGHT("vpermps %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpermw, "avx512f,avx512bw", EIGHT("vpermw %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpshufb, "avx512f,avx512bw", EIGHT("vpshufb %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpslld, "avx512f", EIGHT("vpslld $16, %%zmm1, %%zmm3"))
LOOP(vpandd, "avx512f", EIGHT("vpandd %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpaddd, "avx512f", EIGHT("vpaddd %%zmm1, %%zmm2, %%zmm3"))
LOOP(vptestmd, "avx512f", EIGHT("vptestmd %%zmm1, %%zmm2, %%k1"))
LOOP(vmulps, "avx512f", EIGHT("vmulps %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpunpcklwd, "avx512f,avx512bw", EIGHT("vpunpcklwd %%zmm1, %%zmm2, %%zmm3"))
LOOP(vpmovzxbd, "avx512f", EIGHT("vpmovzxbd %%xmm1, %%zmm3"))
LOOP(vpmovzxbw, "avx512f,avx512bw", EIGHT("vpmovzxbw %%ymm1, %%zmm3"))
LOOP(vcvtne2ps2bf16, "avx512f,avx512bf16", EIGHT("vcvtne2ps2bf16 %%zmm1, %%zmm2, %%zmm3"))
LOOP(vdpbf16ps, "avx512f,avx512bf16", EIGHT_SUMS("vdpbf16ps %%zmm1, %%zmm2,"))
LOOP(vpermps_fma, "avx512f", FOUR_WITH(FMA, "vpermps %%zmm1, %%zmm2,"))
LOOP(vpermw_fma, "avx512f,avx512bw", FOUR_WITH(FMA, "vpermw %%zmm1, %%zmm2,"))
LOOP(vpslld_fma, "avx512f", FOUR_WITH(FMA, "vpslld $16, %%zmm1,"))
/* which ports the two-slot conversions and dot products occupy */
LOOP(dp_vpermps, "avx512f,avx512bf16", FOUR_WITH("vdpbf16ps %%zmm1, %%zmm2,", "vpermps %%zmm1, %%zmm2,"))
LOOP(dp_vpslld, "avx512f,avx512bf16", FOUR_WITH("vdpbf16ps %%zmm1, %%zmm2,", "vpslld $16, %%zmm1,"))
LOOP(cvt_vpermps, "avx512f,avx512bf16", FOUR_WITH("vcvtne2ps2bf16 %%zmm1, %%zmm2,", "vpermps %%zmm1, %%zmm2,"))
LOOP(cvt_vpslld, "avx512f,avx512bf16", FOUR_WITH("vcvtne2ps2bf16 %%zmm1, %%zmm2,", "vpslld $16, %%zmm1,"))
LOOP(vpermw_vpslld, "avx512f,avx512bw", FOUR_WITH("vpermw %%zmm1, %%zmm2,", "vpslld $16, %%zmm1,"))
LOOP(vpermw_vpermps, "avx512f,avx512bw", FOUR_WITH("vpermw %%zmm1, %%zmm2,", "vpermps %%zmm1, %%zmm2,"))

static double ticks(void (*loop)(long)) {
    loop(ITERATIONS / 20); /* warm up (and lift the clock) */
    double best = 1e300;
    for (int repeat = 0; repeat < 3; ++repeat) {
        const unsigned long long start = __rdtsc();
        loop(ITERATIONS);
        const double elapsed = (double)(__rdtsc() - start);
        if (elapsed < best) best = elapsed;
    }
    return best;
}

int main(void) {
    __builtin_cpu_init();
    const double cycle = ticks(scalar_chain) / (24.0 * ITERATIONS); /* TSC ticks per core cycle */
    const int f = __builtin_cpu_supports("avx512f"), bw = f && __builtin_cpu_supports("avx512bw");
    const int bf16 = bw && __builtin_cpu_supports("avx512bf16");
    const struct {
        const char *name;
        int supported;
        void (*loop)(long);
        int pairs; /* 1: four pairs of instructions per iteration */
    } rows[] = {
        {"vfmadd231ps", f, fmas, 0},        {"vpermps", f, vpermps, 0},     {"vpermw", bw, vpermw, 0},
        {"vpshufb", bw, vpshufb, 0},        {"vpslld", f, vpslld, 0},       {"vpandd", f, vpandd, 0},
        {"vpaddd", f, vpaddd, 0},           {"vptestmd", f, vptestmd, 0},   {"vmulps", f, vmulps, 0},
        {"vpunpcklwd", bw, vpunpcklwd, 0},  {"vpmovzxbd", f, vpmovzxbd, 0}, {"vpmovzxbw", bw, vpmovzxbw, 0},
        {"vcvtne2ps2bf16", bf16, vcvtne2ps2bf16, 0}, {"vdpbf16ps", bf16, vdpbf16ps, 0},
        {"vpermps + FMA", f, vpermps_fma, 1}, {"vpermw + FMA", bw, vpermw_fma, 1}, {"vpslld + FMA", f, vpslld_fma, 1},
        {"vdpbf16ps + vpermps", bf16, dp_vpermps, 1}, {"vdpbf16ps + vpslld", bf16, dp_vpslld, 1},
        {"vcvtne2ps2bf16 + vpermps", bf16, cvt_vpermps, 1}, {"vcvtne2ps2bf16 + vpslld", bf16, cvt_vpslld, 1},
        {"vpermw + vpslld", bw, vpermw_vpslld, 1}, {"vpermw + vpermps", bw, vpermw_vpermps, 1},
    };
    printf("# zmm instructions per core cycle (TSC ticks per cycle: %.3f)\n", cycle);
    for (unsigned i = 0; i < sizeof rows / sizeof rows[0]; ++i) {
        if (!rows[i].supported) {
            printf("%-26s skipped: this CPU lacks it\n", rows[i].name);
            continue;
        }
        const double cycles = ticks(rows[i].loop) / cycle / ITERATIONS;
        if (rows[i].pairs) printf("%-26s %.2f cycles per pair\n", rows[i].name, cycles / 4);
        else printf("%-26s %.2f per cycle\n", rows[i].name, 8 / cycles);
    }
    return 0;
}
