/* cnn_pool.c -- max and average pooling over NHWC activations, forward and backward.

   The references walk one channel at a time; the fast path walks each window once with
   the channels innermost (contiguous in NHWC, so the loops vectorise) and splits output
   rows (forward) or whole images (backward, whose windows may overlap) over threads.
   Both visit a window in the same row-major order, so they give the same bits. */
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"

/* Channels handled together by the max-pool backward pass (its stack buffers). */
enum { POOL_CHANNEL_BLOCK = 64 };
/* Elements of output below which a pass stays on one thread. */
#define POOL_PARALLEL_MIN (1 << 15)

int cnn_pool2d_shape_check(const cnn_pool2d_shape *s)
{
    /* s -> CNN_OK / CNN_ERR_ARG */
    const int64_t big = (int64_t)1 << 40;
    if (!s || s->batch < 0 || s->in_h < 1 || s->in_w < 1 || s->channels < 1 ||
        s->size < 1 || s->stride < 1 || s->in_h < s->size || s->in_w < s->size)
        return CNN_ERR_ARG;
    if (s->in_h > big || s->in_w > big || s->channels > big || s->stride > big ||
        s->batch > big)
        return CNN_ERR_ARG;
    if (s->out_h != (s->in_h - s->size) / s->stride + 1 ||
        s->out_w != (s->in_w - s->size) / s->stride + 1)
        return CNN_ERR_ARG;
    /* the arrays fit int64 */
    const double n = (double)s->batch * (double)s->in_h * (double)s->in_w * (double)s->channels;
    return n < 4e18 ? CNN_OK : CNN_ERR_ARG;
}

int cnn_pool2d_shape_init(cnn_pool2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                          int64_t channels, int64_t size, int64_t stride)
{
    /* sizes -> *s */
    if (!s)
        return CNN_ERR_ARG;
    memset(s, 0, sizeof *s);
    s->batch = batch; s->in_h = in_h; s->in_w = in_w; s->channels = channels;
    s->size = size; s->stride = stride;
    if (size >= 1 && stride >= 1 && in_h >= size && in_w >= size) {
        s->out_h = (in_h - size) / stride + 1;
        s->out_w = (in_w - size) / stride + 1;
    }
    return cnn_pool2d_shape_check(s);
}

/* ---- references ------------------------------------------------------------------ */

static int64_t window_at(const cnn_pool2d_shape *s, int64_t n, int64_t oy, int64_t ox)
{
    /* -> the index of X[n, oy * stride, ox * stride, 0] */
    return ((n * s->in_h + oy * s->stride) * s->in_w + ox * s->stride) * s->channels;
}

int cnn_maxpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s)
{
    /* Y[n, oy, ox, c] = max of X[n, oy*stride + i, ox*stride + j, c], 0 <= i, j < size */
    if (cnn_pool2d_shape_check(s) != CNN_OK)
        return CNN_ERR_ARG;
    const int64_t C = s->channels;
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox)
                for (int64_t c = 0; c < C; ++c) {
                    const float *x = X + window_at(s, n, oy, ox) + c;
                    float best = x[0];
                    for (int64_t i = 0; i < s->size; ++i)
                        for (int64_t j = 0; j < s->size; ++j) {
                            const float v = x[(i * s->in_w + j) * C];
                            best = v > best ? v : best;
                        }
                    Y[((n * s->out_h + oy) * s->out_w + ox) * C + c] = best;
                }
    return CNN_OK;
}

int cnn_maxpool2d_backward_ref(float *dX, const float *dY, const float *X,
                               const cnn_pool2d_shape *s)
{
    /* dX[first argmax of each window] += dY ; 0 elsewhere */
    if (cnn_pool2d_shape_check(s) != CNN_OK)
        return CNN_ERR_ARG;
    const int64_t C = s->channels;
    memset(dX, 0, (size_t)(s->batch * s->in_h * s->in_w * C) * sizeof(float));
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox)
                for (int64_t c = 0; c < C; ++c) {
                    const int64_t base = window_at(s, n, oy, ox) + c;
                    int64_t at = base;
                    for (int64_t i = 0; i < s->size; ++i)
                        for (int64_t j = 0; j < s->size; ++j) {
                            const int64_t k = base + (i * s->in_w + j) * C;
                            at = X[k] > X[at] ? k : at;
                        }
                    dX[at] += dY[((n * s->out_h + oy) * s->out_w + ox) * C + c];
                }
    return CNN_OK;
}

int cnn_avgpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s)
{
    /* Y[n, oy, ox, c] = (sum of the window, row-major) / (size * size) */
    if (cnn_pool2d_shape_check(s) != CNN_OK)
        return CNN_ERR_ARG;
    const int64_t C = s->channels;
    const float area = (float)(s->size * s->size);
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox)
                for (int64_t c = 0; c < C; ++c) {
                    const float *x = X + window_at(s, n, oy, ox) + c;
                    float sum = 0.0f;
                    for (int64_t i = 0; i < s->size; ++i)
                        for (int64_t j = 0; j < s->size; ++j)
                            sum += x[(i * s->in_w + j) * C];
                    Y[((n * s->out_h + oy) * s->out_w + ox) * C + c] = sum / area;
                }
    return CNN_OK;
}

int cnn_avgpool2d_backward_ref(float *dX, const float *dY, const cnn_pool2d_shape *s)
{
    /* dX[window] += dY / (size * size) for every window ; 0 elsewhere */
    if (cnn_pool2d_shape_check(s) != CNN_OK)
        return CNN_ERR_ARG;
    const int64_t C = s->channels;
    const float area = (float)(s->size * s->size);
    memset(dX, 0, (size_t)(s->batch * s->in_h * s->in_w * C) * sizeof(float));
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox)
                for (int64_t c = 0; c < C; ++c) {
                    float *x = dX + window_at(s, n, oy, ox) + c;
                    const float g = dY[((n * s->out_h + oy) * s->out_w + ox) * C + c] / area;
                    for (int64_t i = 0; i < s->size; ++i)
                        for (int64_t j = 0; j < s->size; ++j)
                            x[(i * s->in_w + j) * C] += g;
                }
    return CNN_OK;
}

/* ---- the fast path ---------------------------------------------------------------- */

/* One output row (n, oy) of max or average pooling, channels innermost. */
static void pool_row(float *y, const float *X, const cnn_pool2d_shape *s, int64_t g, int avg)
{
    /* g = n * out_h + oy -> y (out_w, channels) */
    const int64_t C = s->channels, n = g / s->out_h, oy = g % s->out_h;
    const float area = (float)(s->size * s->size);
    for (int64_t ox = 0; ox < s->out_w; ++ox, y += C) {
        const float *x = X + window_at(s, n, oy, ox);
        if (avg) {
            for (int64_t c = 0; c < C; ++c)
                y[c] = 0.0f;
        } else {
            for (int64_t c = 0; c < C; ++c)
                y[c] = x[c];
        }
        for (int64_t i = 0; i < s->size; ++i)
            for (int64_t j = 0; j < s->size; ++j) {
                const float *v = x + (i * s->in_w + j) * C;
                if (avg) {
                    for (int64_t c = 0; c < C; ++c)
                        y[c] += v[c];
                } else {
                    for (int64_t c = 0; c < C; ++c)
                        y[c] = v[c] > y[c] ? v[c] : y[c];
                }
            }
        if (avg)
            for (int64_t c = 0; c < C; ++c)
                y[c] /= area;
    }
}

/* Max-pool backward of one image, portable: x, dx (in_h, in_w, channels), dy (out_h,
   out_w, channels).  dx must be zero unless the windows tile the image. */
static void max_backward_image(float *dx, const float *dy, const float *x,
                               const cnn_pool2d_shape *s)
{
    /* dx[first argmax of each window] += dy */
    const int64_t C = s->channels;
    for (int64_t oy = 0; oy < s->out_h; ++oy)
        for (int64_t ox = 0; ox < s->out_w; ++ox, dy += C) {
            const int64_t base = window_at(s, 0, oy, ox);
            for (int64_t c0 = 0; c0 < C; c0 += POOL_CHANNEL_BLOCK) {
                const int64_t nc = C - c0 < POOL_CHANNEL_BLOCK ? C - c0 : POOL_CHANNEL_BLOCK;
                float best[POOL_CHANNEL_BLOCK];
                int64_t at[POOL_CHANNEL_BLOCK];
                for (int64_t c = 0; c < nc; ++c) {
                    best[c] = x[base + c0 + c];
                    at[c] = 0;
                }
                for (int64_t i = 0; i < s->size; ++i)
                    for (int64_t j = 0; j < s->size; ++j) {
                        const int64_t off = (i * s->in_w + j) * C;
                        const float *v = x + base + off + c0;
                        for (int64_t c = 0; c < nc; ++c) {
                            const int take = v[c] > best[c];
                            best[c] = take ? v[c] : best[c];
                            at[c] = take ? off : at[c];
                        }
                    }
                for (int64_t c = 0; c < nc; ++c)
                    dx[base + at[c] + c0 + c] += dy[c0 + c];
            }
        }
}

#ifdef CNN_AVX2_BUILD
#include <immintrin.h>

/* 1 if the windows tile the image exactly: every input in exactly one window. */
static int windows_tile(const cnn_pool2d_shape *s)
{
    /* s -> flag */
    return s->stride == s->size && s->out_h * s->size == s->in_h &&
           s->out_w * s->size == s->in_w;
}

#define POOL_AVX2 static inline __attribute__((always_inline, target("avx2")))

/* Mask of the low n lanes of 8 (n clamped to [0, 8]). */
POOL_AVX2 __m256i pool_lanes(int64_t n)
{
    /* n -> (8,) int mask */
    const int32_t m = n <= 0 ? 0 : (n >= 8 ? 8 : (int32_t)n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The 8 floats at p, or only the lanes of m when fewer than 8 remain before `end`
   (unmasked loads are faster, and the lanes past a pixel's channels are never used). */
POOL_AVX2 __m256 load_before(const float *p, const float *end, __m256i m)
{
    /* -> (8,) */
    return end - p >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}

/* A load of a window whose loads are all whole (checked once for the window, its last
   load 8 floats before end), or else load_before. */
POOL_AVX2 __m256 load_window(const float *p, const float *end, __m256i m, int whole)
{
    /* -> (8,) */
    return whole ? _mm256_loadu_ps(p) : load_before(p, end, m);
}

/* Masked stores are slow on some CPUs (microcoded on AMD), so the vector loops below
   store whole vectors in increasing address order along a row, each store's spill past
   its pixel rewritten by later stores, and mask only stores that would leave the row. */

/* Store g, channels 8 b .. of pixel px of a row of `row` floats (C channels a pixel),
   at p: a whole vector unless it would leave the row. */
POOL_AVX2 void store_in_row(float *p, __m256 g, int64_t px, int64_t b, int64_t row,
                            int64_t C)
{
    if (px * C + 8 * b + 8 <= row)
        _mm256_storeu_ps(p, g);
    else
        _mm256_maskstore_ps(p, pool_lanes(C - 8 * b), g);
}

/* As pool_row for max pooling, eight channels at a time, for windows of SIZE (0: of
   s->size).  _mm256_max_ps(v, y) is exactly v > y ? v : y (NaN and signed zeros
   included), the portable rule. */
POOL_AVX2 void max_row_body(const int SIZE, float *y, const float *X,
                            const cnn_pool2d_shape *s, int64_t g)
{
    /* g = n * out_h + oy -> y (out_w, channels) */
    const int64_t C = s->channels, n = g / s->out_h, oy = g % s->out_h;
    const int64_t size = SIZE ? SIZE : s->size;
    const float *end = X + (n + 1) * s->in_h * s->in_w * C;
    for (int64_t ox = 0; ox < s->out_w; ++ox, y += C) {
        const float *x = X + window_at(s, n, oy, ox);
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
            const __m256i m = pool_lanes(C - c0);
            const float *xc = x + c0;
            const int whole = end - (xc + ((size - 1) * s->in_w + size - 1) * C) >= 8;
            __m256 best = load_window(xc, end, m, whole);
            for (int64_t i = 0; i < size; ++i)
                for (int64_t j = 0; j < size; ++j)
                    best = _mm256_max_ps(load_window(xc + (i * s->in_w + j) * C, end, m, whole),
                                         best);
            store_in_row(y + c0, best, ox, c0 / 8, s->out_w * C, C);
        }
    }
}

/* max_row_body with 2x2 windows at compile time, or any. */
__attribute__((target("avx2")))
static void max_row_avx2(float *y, const float *X, const cnn_pool2d_shape *s, int64_t g)
{
    /* g = n * out_h + oy -> y (out_w, channels) */
    if (s->size == 2)
        max_row_body(2, y, X, s, g);
    else
        max_row_body(0, y, X, s, g);
}

/* Windows handled together by max_backward_image_avx2, and its most channels. */
enum { POOL_WINDOWS = 32, POOL_AVX2_MAX_C = 64 };

/* As max_backward_image when the windows tile the image and channels <= 64, eight
   channels at a time: the first argmax of each of up to 32 windows of a window row
   found in registers, then every input of those windows written once (0 + dy or 0, so
   dx need not be cleared), input row by input row. */
__attribute__((target("avx2")))
static void max_backward_image_avx2(float *dx, const float *dy, const float *x,
                                    const cnn_pool2d_shape *s, int relu)
{
    /* dx (in_h, in_w, channels) = dy routed to the first maxima */
    const int64_t C = s->channels, size = s->size, nb = (C + 7) / 8, row = s->in_w * C;
    const float *end = x + s->in_h * row, *dy_end = dy + s->out_h * s->out_w * C;
    const __m256 zero = _mm256_setzero_ps();
    __m256i at[POOL_WINDOWS * POOL_AVX2_MAX_C / 8];
    __m256 d[POOL_WINDOWS * POOL_AVX2_MAX_C / 8];
    for (int64_t oy = 0; oy < s->out_h; ++oy)
        for (int64_t ox0 = 0; ox0 < s->out_w; ox0 += POOL_WINDOWS) {
            const int64_t nw = s->out_w - ox0 < POOL_WINDOWS ? s->out_w - ox0 : POOL_WINDOWS;
            for (int64_t w = 0; w < nw; ++w) {
                const float *xw = x + window_at(s, 0, oy, ox0 + w);
                const float *dw = dy + (oy * s->out_w + ox0 + w) * C;
                for (int64_t b = 0; b < nb; ++b) {
                    const __m256i m = pool_lanes(C - 8 * b);
                    __m256 best = load_before(xw + 8 * b, end, m);
                    __m256i a = _mm256_setzero_si256();
                    for (int64_t i = 0, k = 0; i < size; ++i)
                        for (int64_t j = 0; j < size; ++j, ++k) {
                            if (k == 0)
                                continue;
                            const __m256 v = load_before(xw + (i * s->in_w + j) * C + 8 * b, end, m);
                            const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
                            best = _mm256_blendv_ps(best, v, gt);
                            a = _mm256_castps_si256(_mm256_blendv_ps(
                                _mm256_castsi256_ps(a),
                                _mm256_castsi256_ps(_mm256_set1_epi32((int)k)), gt));
                        }
                    at[w * nb + b] = a;
                    d[w * nb + b] = _mm256_add_ps(zero, load_before(dw + 8 * b, dy_end, m));
                    if (relu)   /* relu' of the maximum, the one input that gets dy */
                        d[w * nb + b] = _mm256_and_ps(d[w * nb + b],
                                                      _mm256_cmp_ps(best, zero, _CMP_GT_OQ));
                }
            }
            for (int64_t i = 0; i < size; ++i) {
                float *out = dx + (oy * size + i) * row + ox0 * size * C;
                for (int64_t w = 0; w < nw; ++w)
                    for (int64_t j = 0; j < size; ++j, out += C) {
                        const __m256i k = _mm256_set1_epi32((int)(i * size + j));
                        for (int64_t b = 0; b < nb; ++b) {
                            const __m256 g = _mm256_and_ps(
                                _mm256_castsi256_ps(_mm256_cmpeq_epi32(at[w * nb + b], k)),
                                d[w * nb + b]);
                            store_in_row(out + 8 * b, g, (ox0 + w) * size + j, b, row, C);
                        }
                    }
            }
        }
}

/* As max_backward_image_avx2 for 2 x 2 windows with stride 2, one window at a time:
   the four inputs' first maximum found with three compares, each input then written
   with dy or 0 (times relu'(maximum) when relu).  Channels <= 8 or a multiple of 8, so
   a store spills only into a pixel stored later (or not at all). */
__attribute__((target("avx2")))
static void max_backward_2x2_avx2(float *dx, const float *dy, const float *x,
                                  const cnn_pool2d_shape *s, int relu)
{
    /* dx (in_h, in_w, channels) = dy routed to the first maxima */
    const int64_t C = s->channels, nb = (C + 7) / 8, row = s->in_w * C;
    const float *end = x + s->in_h * row, *dy_end = dy + s->out_h * s->out_w * C;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t oy = 0; oy < s->out_h; ++oy)
        for (int64_t ox = 0; ox < s->out_w; ++ox, dy += C) {
            const int64_t top = 2 * oy * row + 2 * ox * C;
            for (int64_t b = 0; b < nb; ++b) {
                const __m256i m = pool_lanes(C - 8 * b);
                const float *p = x + top + 8 * b;
                const int whole = end - (p + row + C) >= 8;
                const __m256 v0 = load_window(p, end, m, whole);
                const __m256 v1 = load_window(p + C, end, m, whole);
                const __m256 v2 = load_window(p + row, end, m, whole);
                const __m256 v3 = load_window(p + row + C, end, m, whole);
                /* the sequential rule: a later input wins only if strictly greater */
                const __m256 g1 = _mm256_cmp_ps(v1, v0, _CMP_GT_OQ);
                __m256 best = _mm256_blendv_ps(v0, v1, g1);
                const __m256 g2 = _mm256_cmp_ps(v2, best, _CMP_GT_OQ);
                best = _mm256_blendv_ps(best, v2, g2);
                const __m256 g3 = _mm256_cmp_ps(v3, best, _CMP_GT_OQ);
                best = _mm256_blendv_ps(best, v3, g3);
                __m256 d = _mm256_add_ps(zero, load_before(dy + 8 * b, dy_end, m));
                if (relu)
                    d = _mm256_and_ps(d, _mm256_cmp_ps(best, zero, _CMP_GT_OQ));
                /* d goes to input 3 if g3, else 2 if g2, else 1 if g1, else 0 */
                const __m256 d3 = _mm256_and_ps(g3, d), r3 = _mm256_andnot_ps(g3, d);
                const __m256 d2 = _mm256_and_ps(g2, r3), r2 = _mm256_andnot_ps(g2, r3);
                const __m256 d1 = _mm256_and_ps(g1, r2), d0 = _mm256_andnot_ps(g1, r2);
                float *q = dx + top + 8 * b;
                store_in_row(q, d0, 2 * ox, b, row, C);
                store_in_row(q + C, d1, 2 * ox + 1, b, row, C);
                store_in_row(q + row, d2, 2 * ox, b, row, C);
                store_in_row(q + row + C, d3, 2 * ox + 1, b, row, C);
            }
        }
}
#endif

/* Max-pool backward of one image with the selected family: dx zeroed where needed.
   relu: x is a relu's output, and dx may be multiplied by relu'(x) here (returns 1 if
   it was: only the maxima get a nonzero gradient, so relu'(maximum) is all it takes). */
static int max_backward_any(float *dx, const float *dy, const float *x,
                            const cnn_pool2d_shape *s, int relu)
{
    /* dx (in_h, in_w, channels) = dy routed to the first maxima -> relu' applied */
    const int64_t image = s->in_h * s->in_w * s->channels;
#ifdef CNN_AVX2_BUILD
    if (cnn_use_avx2_build() && windows_tile(s) && s->size == 2 &&
        (s->channels <= 8 || s->channels % 8 == 0)) {
        max_backward_2x2_avx2(dx, dy, x, s, relu);
        return relu;
    }
    if (cnn_use_avx2_build() && windows_tile(s) && s->channels <= POOL_AVX2_MAX_C) {
        max_backward_image_avx2(dx, dy, x, s, relu);
        return relu;
    }
#endif
    (void)relu;
    memset(dx, 0, (size_t)image * sizeof(float));
    max_backward_image(dx, dy, x, s);
    return 0;
}

/* dX of image n from its dY, times act'(act_y) (act_y: the activation output that was
   pooled; CNN_ACT_IDENTITY: no factor), computed while the image is in cache. */
static void pool_backward_image(float *dX, const float *dY, const float *X,
                                const float *act_y, const cnn_pool2d_shape *s, int64_t n,
                                int avg, cnn_activation act, float alpha)
{
    /* image n of dX (in_h, in_w, channels) */
    const int64_t C = s->channels, image = s->in_h * s->in_w * C;
    const float area = (float)(s->size * s->size);
    float *dx = dX + n * image;
    const float *dy = dY + n * s->out_h * s->out_w * C;
    if (!avg) {
        /* the pooled values are the activation's outputs when act_y is X */
        if (max_backward_any(dx, dy, X + n * image, s, act == CNN_ACT_RELU && act_y == X))
            return;
    } else {
        memset(dx, 0, (size_t)image * sizeof(float));
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox, dy += C) {
                const int64_t base = window_at(s, 0, oy, ox);
                for (int64_t i = 0; i < s->size; ++i)
                    for (int64_t j = 0; j < s->size; ++j) {
                        float *x = dx + base + (i * s->in_w + j) * C;
                        for (int64_t c = 0; c < C; ++c)
                            x[c] += dy[c] / area;
                    }
            }
    }
    if (act != CNN_ACT_IDENTITY)
        cnn_activation_grad(dx, dx, act_y + n * image, image, act, alpha);
}

/* Output row g of pooling with the selected family. */
static void pool_row_any(float *y, const float *X, const cnn_pool2d_shape *s, int64_t g,
                         int avg)
{
    /* g = n * out_h + oy -> y (out_w, channels) */
#ifdef CNN_AVX2_BUILD
    if (!avg && cnn_use_avx2_build()) {
        max_row_avx2(y, X, s, g);
        return;
    }
#endif
    pool_row(y, X, s, g, avg);
}

/* A threaded pooling pass: `parts` equal ranges of output rows (forward) or images
   (backward), four per thread, claimed one at a time. */
typedef struct pool_job {
    float *out;
    const float *dY, *X, *act_y;
    const cnn_pool2d_shape *s;
    int avg;
    cnn_activation act;
    float alpha;
    int64_t units, parts;
} pool_job;

static void forward_task(void *arg, int64_t part, int thread)
{
    /* output rows of range `part` */
    const pool_job *j = (const pool_job *)arg;
    const int64_t row = j->s->out_w * j->s->channels;
    (void)thread;
    for (int64_t g = j->units * part / j->parts; g < j->units * (part + 1) / j->parts; ++g)
        pool_row_any(j->out + g * row, j->X, j->s, g, j->avg);
}

static void backward_task(void *arg, int64_t part, int thread)
{
    /* images of range `part` */
    const pool_job *j = (const pool_job *)arg;
    (void)thread;
    for (int64_t n = j->units * part / j->parts; n < j->units * (part + 1) / j->parts; ++n)
        pool_backward_image(j->out, j->dY, j->X, j->act_y, j->s, n, j->avg, j->act, j->alpha);
}

static int pool_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads,
                        int avg)
{
    /* Y (batch, out_h, out_w, channels), output rows split over threads */
    if (cnn_pool2d_shape_check(s) != CNN_OK || n_threads < 1)
        return CNN_ERR_ARG;
    const int64_t rows = s->batch * s->out_h, row = s->out_w * s->channels;
    if (n_threads > 1 && rows > 1 && rows * row * s->size * s->size >= POOL_PARALLEL_MIN) {
        const int64_t parts = rows < 4 * n_threads ? rows : 4 * n_threads;
        pool_job j = { Y, NULL, X, NULL, s, avg, CNN_ACT_IDENTITY, 0.0f, rows, parts };
        cnn_parallel_for(n_threads, parts, forward_task, &j);
        return CNN_OK;
    }
    for (int64_t g = 0; g < rows; ++g)
        pool_row_any(Y + g * row, X, s, g, avg);
    return CNN_OK;
}

int cnn_pool2d_backward_act(float *dX, const float *dY, const float *X, const float *act_y,
                            const cnn_pool2d_shape *s, int avg, cnn_activation act,
                            float alpha, int n_threads)
{
    /* dX (batch, in_h, in_w, channels), whole images split over threads */
    if (cnn_pool2d_shape_check(s) != CNN_OK || n_threads < 1 ||
        !cnn_is_elementwise_activation(act) || (act != CNN_ACT_IDENTITY && !act_y))
        return CNN_ERR_ARG;
    const int64_t work = s->batch * s->in_h * s->in_w * s->channels;
    if (n_threads > 1 && s->batch > 1 && work >= POOL_PARALLEL_MIN) {
        const int64_t parts = s->batch < 4 * n_threads ? s->batch : 4 * n_threads;
        pool_job j = { dX, dY, X, act_y, s, avg, act, alpha, s->batch, parts };
        cnn_parallel_for(n_threads, parts, backward_task, &j);
        return CNN_OK;
    }
    for (int64_t n = 0; n < s->batch; ++n)
        pool_backward_image(dX, dY, X, act_y, s, n, avg, act, alpha);
    return CNN_OK;
}

int cnn_maxpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads)
{
    /* Y = window maxima */
    return pool_forward(Y, X, s, n_threads, 0);
}

int cnn_maxpool2d_backward(float *dX, const float *dY, const float *X, const cnn_pool2d_shape *s,
                           int n_threads)
{
    /* dX = dY routed to each window's first maximum */
    return cnn_pool2d_backward_act(dX, dY, X, NULL, s, 0, CNN_ACT_IDENTITY, 0.0f, n_threads);
}

int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads)
{
    /* Y = window means */
    return pool_forward(Y, X, s, n_threads, 1);
}

int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s, int n_threads)
{
    /* dX = dY / (size * size) spread over each window */
    return cnn_pool2d_backward_act(dX, dY, NULL, NULL, s, 1, CNN_ACT_IDENTITY, 0.0f,
                                   n_threads);
}
