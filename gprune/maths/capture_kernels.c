/* Fused CPU kernels of the capture stage (gprune.maths.native compiles and loads them).
 *
 * The pure-torch path in gprune/maths/moments.py is the reference: these compute the same
 * statistics in one pass over the activations instead of about nine ATen passes, with every
 * sum accumulated in double. Inputs are float32 rows of a row-major matrix (row stride given,
 * channels contiguous), optionally selected through an int64 row index (the non-padding
 * tokens); NULL selects rows 0..n-1. NaN and inf propagate into the sums, never into counts.
 */
#include <math.h>
#include <stdint.h>

#define ROW_BLOCK 32   /* rows swept together over one channel tile (rows stay in L2) */
#define CHANNEL_TILE 256 /* channels whose four accumulators stay in L1 meanwhile */

static inline const float *selected_row(const float *base, int64_t stride,
                                        const int64_t *index, int64_t r) {
    return base + (index ? index[r] : r) * stride;
}

static double row_sum_of_squares(const float *restrict row, int64_t width) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < width; ++c) total += (double)row[c] * (double)row[c];
    return total;
}

/* totals: (4, channels) double, row-major, added to in place:
 *   [0] sum x   [1] sum |x|   [2] sum x^2   [3] count of tokens with x^2 > tau2 * mean_c x^2
 * (|x| > tau * RMS of the token's own vector). */
void gprune_channel_moments(const float *x, int64_t stride, const int64_t *index, int64_t n,
                            int64_t channels, double tau2, double *totals) {
    double *restrict sum = totals, *restrict sum_abs = totals + channels;
    double *restrict sumsq = totals + 2 * channels, *restrict active = totals + 3 * channels;
    const float *rows[ROW_BLOCK];
    double thresholds[ROW_BLOCK];
    for (int64_t start = 0; start < n; start += ROW_BLOCK) {
        const int64_t block = n - start < ROW_BLOCK ? n - start : ROW_BLOCK;
        for (int64_t i = 0; i < block; ++i) {
            rows[i] = selected_row(x, stride, index, start + i);
            thresholds[i] = tau2 * row_sum_of_squares(rows[i], channels) / (double)channels;
        }
        for (int64_t tile = 0; tile < channels; tile += CHANNEL_TILE) {
            const int64_t end = channels - tile < CHANNEL_TILE ? channels : tile + CHANNEL_TILE;
            for (int64_t i = 0; i < block; ++i) {
                const float *restrict row = rows[i];
                const double threshold = thresholds[i];
#pragma omp simd
                for (int64_t c = tile; c < end; ++c) {
                    const double v = row[c], v2 = v * v;
                    sum[c] += v;
                    sum_abs[c] += fabs(v);
                    sumsq[c] += v2;
                    active[c] += v2 > threshold ? 1.0 : 0.0;
                }
            }
        }
    }
}

/* Sum over the selected rows r of cos(a_r, b_r); a and b are (n, width) float32 matrices
 * selected by the same index. A zero vector's cosine is 0. */
double gprune_cosine_sum(const float *a, int64_t a_stride, const float *b, int64_t b_stride,
                         const int64_t *index, int64_t n, int64_t width) {
    double total = 0.0;
    for (int64_t r = 0; r < n; ++r) {
        const float *restrict ra = selected_row(a, a_stride, index, r);
        const float *restrict rb = selected_row(b, b_stride, index, r);
        double dot = 0.0, aa = 0.0, bb = 0.0;
#pragma omp simd reduction(+ : dot, aa, bb)
        for (int64_t c = 0; c < width; ++c) {
            const double va = ra[c], vb = rb[c];
            dot += va * vb;
            aa += va * va;
            bb += vb * vb;
        }
        const double norms = sqrt(aa) * sqrt(bb);
        total += dot / (norms > 0.0 ? norms : 1.0); /* norms NaN: the dot is NaN too */
    }
    return total;
}
