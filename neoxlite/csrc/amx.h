/* AMX tile set-up shared by neoxlite's kernels (linear_bf16.c: bf16 and 4-bit weights; linear_quant.c: int8).
 * Include only inside an `#if NEOX_AMX` block: the instructions need GCC 11 or Clang 12. */
#ifndef NEOXLITE_AMX_H
#define NEOXLITE_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AMX_ROWS 16 /* weight rows per tile, input rows per tile */
#define AMX_K 32    /* bf16 values per tile row */

struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-3: sums (16 weight rows x `width` input rows, fp32 or int32); 4-5: weights (16 rows x 64 bytes: 32 bf16
 * or 64 int8); 6-7: inputs (16 groups of k, pairs of bf16 or quads of int8, x `width` input rows). */
__attribute__((target("amx-tile"))) static void amx_configure(int width) {
    struct amx_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = AMX_ROWS;
        config.colsb[t] = (uint16_t)(t == 4 || t == 5 ? 64 : 4 * width);
    }
    _tile_loadconfig(&config);
}

/* x (M rows of `units` 32-bit groups: pairs of bf16 k, or quads of int8 k) per block of `width` input rows, as
 * the right tile wants them: packed[block][unit][m] */
static void amx_pack_inputs(const void *x, uint32_t *packed, int64_t M, int64_t units, int width) {
    const int64_t pairs = units, blocks = (M + width - 1) / width;
    const uint32_t *x32 = (const uint32_t *)x;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t kp = 0; kp < pairs; ++kp)
            for (int m = 0; m < width; ++m) {
                const int64_t row = b * width + m;
                packed[(b * pairs + kp) * width + m] = row < M ? x32[row * pairs + kp] : 0u;
            }
}

#endif
