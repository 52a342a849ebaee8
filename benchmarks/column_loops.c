/* The columns layout's inner loops in plain C, timed in isolation: what bounds them on this
 * CPU, apart from the kernels' calls, merges and threads (benchmarks/RESULTS.md, "Column tiles
 * in registers").  Not part of fastbn; the kernels' own loops live in fastbn/_engine.
 *
 *   gcc -O3 -mavx512f -mavx512vl -mfma -o /tmp/column_loops benchmarks/column_loops.c
 *   /tmp/column_loops N C [y_offset_floats] [coefficient_offset_floats]
 *
 * (-mavx2 -mfma for the AVX2 build.)  Each line is the best of 50 runs over an (N, C) float32
 * matrix, one thread:
 *
 *   moments, 8-row sweeps    the float64 sums of x - shift and its square per column, eight
 *                            rows per sweep across a tile of 256 columns, the sums loaded and
 *                            stored once per sweep (tile_moments_rows' loop)
 *   moments, strips          the same sums with a strip of 16 columns' sums held in registers
 *                            down 64 rows at a time (the register-blocked tiles of the issue),
 *                            without and with a prefetch of the strip's next rows
 *   affine, one row          y = (x - center) * scale + shift, every column its own
 *                            coefficients, a row at a time (affine_row)
 *   affine, four rows        the same four rows at a time, coefficients loaded once for the
 *                            four (fastbn_affine_rows4, without its choice of direction)
 *   copy                     memcpy of the same bytes (the floor)
 *
 * y_offset and coefficient_offset place y and the coefficient rows that many floats past x's
 * address modulo 4 KiB, to show 4K aliasing.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { TILE = 256, BLOCK = 512, STRIP = 16, STRIP_ROWS = 64, RUNS = 50 };

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void moments_sweeps(const float *x, long stride, long nrows, long width,
                           const double *shift, double *s1, double *s2) {
    long r, j;
    for (r = 0; r + 8 <= nrows; r += 8) {
        const float *row = x + r * stride;
        for (j = 0; j < width; j++) {
            double k = shift[j], a, b, d, e, f, h;
            d = row[j] - k; e = row[stride + j] - k; f = row[2 * stride + j] - k; h = row[3 * stride + j] - k;
            a = s1[j] + ((d + e) + (f + h));
            b = s2[j] + ((d * d + e * e) + (f * f + h * h));
            d = row[4 * stride + j] - k; e = row[5 * stride + j] - k; f = row[6 * stride + j] - k; h = row[7 * stride + j] - k;
            s1[j] = a + ((d + e) + (f + h));
            s2[j] = b + ((d * d + e * e) + (f * f + h * h));
        }
    }
}

static void moments_strip(const float *x, long stride, long nrows, long fetch,
                          const double *shift, double *s1, double *s2) {
    double k[STRIP], a[STRIP], b[STRIP];
    long r, j;
    for (j = 0; j < STRIP; j++) { k[j] = shift[j]; a[j] = s1[j]; b[j] = s2[j]; }
    for (r = 0; r + 4 <= nrows; r += 4) {
        const float *row = x + r * stride;
        if (r < fetch)
            for (j = 0; j < 4; j++)
                __builtin_prefetch(row + (nrows + j) * stride, 0, 3);
        for (j = 0; j < STRIP; j++) {
            double d = row[j] - k[j], e = row[stride + j] - k[j];
            double f = row[2 * stride + j] - k[j], h = row[3 * stride + j] - k[j];
            a[j] += (d + e) + (f + h);
            b[j] += (d * d + e * e) + (f * f + h * h);
        }
    }
    for (j = 0; j < STRIP; j++) { s1[j] = a[j]; s2[j] = b[j]; }
}

static void moments_strips(const float *x, long stride, long nrows, long width, int prefetch,
                           const double *shift, double *s1, double *s2) {
    long r, j;
    for (r = 0; r < nrows; r += STRIP_ROWS) {
        long m = nrows - r < STRIP_ROWS ? nrows - r : STRIP_ROWS, left = nrows - r - m;
        for (j = 0; j + STRIP <= width; j += STRIP)
            moments_strip(x + r * stride + j, stride, m, prefetch ? (left < m ? left : m) : 0,
                          shift + j, s1 + j, s2 + j);
    }
}

static void affine_row(const float *x, float *y, long n, const float *c, const float *s,
                       const float *b) {
    long i;
    for (i = 0; i < n; i++)
        y[i] = (x[i] - c[i]) * s[i] + b[i];
}

static void affine_rows4(const float *x, float *y, long stride, long n, const float *c,
                         const float *s, const float *b) {
    long i;
    int r;
#if defined(__AVX512F__)
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v[4], cc = _mm512_loadu_ps(c + i), ss = _mm512_loadu_ps(s + i), bb = _mm512_loadu_ps(b + i);
        for (r = 0; r < 4; r++) v[r] = _mm512_loadu_ps(x + r * stride + i);
        for (r = 0; r < 4; r++) _mm512_storeu_ps(y + r * stride + i, _mm512_fmadd_ps(_mm512_sub_ps(v[r], cc), ss, bb));
    }
#else
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 v[4], cc = _mm256_loadu_ps(c + i), ss = _mm256_loadu_ps(s + i), bb = _mm256_loadu_ps(b + i);
        for (r = 0; r < 4; r++) v[r] = _mm256_loadu_ps(x + r * stride + i);
        for (r = 0; r < 4; r++) _mm256_storeu_ps(y + r * stride + i, _mm256_fmadd_ps(_mm256_sub_ps(v[r], cc), ss, bb));
    }
#endif
    for (; i < n; i++)
        for (r = 0; r < 4; r++)
            y[r * stride + i] = (x[r * stride + i] - c[i]) * s[i] + b[i];
}

static float *page_offset(long n, long offset) {
    /* n floats starting `offset` floats past a 4 KiB boundary (leaked: one run); the size a
       multiple of the alignment, as C11 asks of aligned_alloc */
    size_t bytes = (size_t)(n + offset) * sizeof(float);
    char *raw = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (raw == NULL) { fprintf(stderr, "out of memory\n"); exit(1); }
    return (float *)raw + offset;
}

int main(int argc, char **argv) {
    long n_rows, c, y_offset, k_offset, i, b0, c0, r;
    int kind, run;
    float *x, *y, *k;
    double *shift, *s1, *s2, sink = 0.0;
    static const char *names[] = {"moments, 8-row sweeps", "moments, strips",
                                  "moments, strips + prefetch", "affine, one row",
                                  "affine, four rows", "copy"};
    if (argc < 3) {
        fprintf(stderr, "usage: %s N C [y_offset_floats] [coefficient_offset_floats]\n", argv[0]);
        return 2;
    }
    n_rows = atol(argv[1]);
    c = atol(argv[2]);
    y_offset = argc > 3 ? atol(argv[3]) : 0;
    k_offset = argc > 4 ? atol(argv[4]) : 0;
    if (n_rows < 8 || c < TILE || c % TILE != 0 || y_offset < 0 || k_offset < 0) {
        fprintf(stderr, "N >= 8, C a multiple of %d, offsets >= 0\n", TILE);
        return 2;
    }
    x = page_offset(n_rows * c, 0);
    y = page_offset(n_rows * c, y_offset);
    k = page_offset(3 * c, k_offset);
    shift = calloc((size_t)c, sizeof(double));
    s1 = calloc((size_t)c, sizeof(double));
    s2 = calloc((size_t)c, sizeof(double));
    for (i = 0; i < n_rows * c; i++)
        x[i] = (float)(rand() % 1000) * 0.01f;
    for (i = 0; i < c; i++) { k[i] = 1.0f; k[c + i] = 0.5f; k[2 * c + i] = 0.25f; }
    for (kind = 0; kind < 6; kind++) {
        double best = 1e30;
        for (run = 0; run < RUNS; run++) {
            double t = seconds();
            if (kind < 3) {
                for (b0 = 0; b0 < n_rows; b0 += BLOCK)
                    for (c0 = 0; c0 < c; c0 += TILE) {
                        long m = n_rows - b0 < BLOCK ? n_rows - b0 : BLOCK;
                        if (kind == 0)
                            moments_sweeps(x + b0 * c + c0, c, m - m % 8, TILE, shift + c0, s1 + c0, s2 + c0);
                        else
                            moments_strips(x + b0 * c + c0, c, m - m % 8, TILE, kind == 2, shift + c0, s1 + c0, s2 + c0);
                    }
            } else if (kind == 3) {
                for (r = 0; r < n_rows; r++)
                    affine_row(x + r * c, y + r * c, c, k, k + c, k + 2 * c);
            } else if (kind == 4) {
                for (r = 0; r + 4 <= n_rows; r += 4)
                    affine_rows4(x + r * c, y + r * c, c, c, k, k + c, k + 2 * c);
                for (; r < n_rows; r++)
                    affine_row(x + r * c, y + r * c, c, k, k + c, k + 2 * c);
            } else {
                memcpy(y, x, (size_t)(n_rows * c) * sizeof(float));
            }
            t = seconds() - t;
            best = t < best ? t : best;
            sink += s1[1] + y[n_rows * c - 1];
        }
        printf("%-28s %9.1f us  %6.1f GB/s of x\n", names[kind], best * 1e6,
               (double)(n_rows * c) * sizeof(float) / best * 1e-9);
    }
    return sink == 12345.0;  /* (keeps the results alive) */
}
