/* cnn_pool.c -- max and average pooling over NHWC activations, forward and backward.

   The references walk one channel at a time; the fast path walks each window once with
   the channels innermost (contiguous in NHWC, so the loops vectorise) and splits output
   rows (forward) or whole images (backward, whose windows may overlap) over threads.
   Both visit a window in the same row-major order, so they give the same bits. */
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* dX of image n from its dY: zeroed, then each window's gradient added. */
static void pool_backward_image(float *dX, const float *dY, const float *X,
                                const cnn_pool2d_shape *s, int64_t n, int avg)
{
    /* image n of dX (in_h, in_w, channels) */
    const int64_t C = s->channels, image = s->in_h * s->in_w * C;
    const float area = (float)(s->size * s->size);
    memset(dX + n * image, 0, (size_t)image * sizeof(float));
    for (int64_t oy = 0; oy < s->out_h; ++oy)
        for (int64_t ox = 0; ox < s->out_w; ++ox) {
            const int64_t base = window_at(s, n, oy, ox);
            const float *d = dY + ((n * s->out_h + oy) * s->out_w + ox) * C;
            for (int64_t c0 = 0; c0 < C; c0 += POOL_CHANNEL_BLOCK) {
                const int64_t nc = C - c0 < POOL_CHANNEL_BLOCK ? C - c0 : POOL_CHANNEL_BLOCK;
                if (avg) {
                    for (int64_t i = 0; i < s->size; ++i)
                        for (int64_t j = 0; j < s->size; ++j) {
                            float *x = dX + base + (i * s->in_w + j) * C + c0;
                            for (int64_t c = 0; c < nc; ++c)
                                x[c] += d[c0 + c] / area;
                        }
                    continue;
                }
                float best[POOL_CHANNEL_BLOCK];
                int64_t at[POOL_CHANNEL_BLOCK];
                for (int64_t c = 0; c < nc; ++c) {
                    best[c] = X[base + c0 + c];
                    at[c] = 0;
                }
                for (int64_t i = 0; i < s->size; ++i)
                    for (int64_t j = 0; j < s->size; ++j) {
                        const int64_t off = (i * s->in_w + j) * C;
                        const float *v = X + base + off + c0;
                        for (int64_t c = 0; c < nc; ++c) {
                            const int take = v[c] > best[c];
                            best[c] = take ? v[c] : best[c];
                            at[c] = take ? off : at[c];
                        }
                    }
                for (int64_t c = 0; c < nc; ++c)
                    dX[base + at[c] + c0 + c] += d[c0 + c];
            }
        }
}

static int pool_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads,
                        int avg)
{
    /* Y (batch, out_h, out_w, channels), output rows split over threads */
    if (cnn_pool2d_shape_check(s) != CNN_OK || n_threads < 1)
        return CNN_ERR_ARG;
    const int64_t rows = s->batch * s->out_h, row = s->out_w * s->channels;
#ifdef _OPENMP
    if (n_threads > 1 && rows > 1 && rows * row * s->size * s->size >= POOL_PARALLEL_MIN) {
#pragma omp parallel num_threads(n_threads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            for (int64_t g = rows * t / T; g < rows * (t + 1) / T; ++g)
                pool_row(Y + g * row, X, s, g, avg);
        }
        return CNN_OK;
    }
#endif
    for (int64_t g = 0; g < rows; ++g)
        pool_row(Y + g * row, X, s, g, avg);
    return CNN_OK;
}

static int pool_backward(float *dX, const float *dY, const float *X, const cnn_pool2d_shape *s,
                         int n_threads, int avg)
{
    /* dX (batch, in_h, in_w, channels), whole images split over threads */
    if (cnn_pool2d_shape_check(s) != CNN_OK || n_threads < 1)
        return CNN_ERR_ARG;
    const int64_t work = s->batch * s->in_h * s->in_w * s->channels;
#ifdef _OPENMP
    if (n_threads > 1 && s->batch > 1 && work >= POOL_PARALLEL_MIN) {
#pragma omp parallel num_threads(n_threads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            for (int64_t n = s->batch * t / T; n < s->batch * (t + 1) / T; ++n)
                pool_backward_image(dX, dY, X, s, n, avg);
        }
        return CNN_OK;
    }
#endif
    (void)work;
    for (int64_t n = 0; n < s->batch; ++n)
        pool_backward_image(dX, dY, X, s, n, avg);
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
    return pool_backward(dX, dY, X, s, n_threads, 0);
}

int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads)
{
    /* Y = window means */
    return pool_forward(Y, X, s, n_threads, 1);
}

int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s, int n_threads)
{
    /* dX = dY / (size * size) spread over each window */
    return pool_backward(dX, dY, NULL, s, n_threads, 1);
}
