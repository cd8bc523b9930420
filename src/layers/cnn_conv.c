/* cnn_conv.c -- Conv2D forward and backward over NHWC activations: the plain
   references, and the fast path, which copies the patches of a chunk of output rows
   into a matrix (im2col) and runs the packed GEMM on it.

   Chunks are whole output rows (g = b * out_h + oy, all out_w positions), as many as
   keep the patch matrix near CONV_CHUNK_FLOATS floats, a number that depends on the
   shape alone.  Each row of a GEMM result is computed the same way whatever the rest
   of its GEMM, so the forward pass may hand chunks to threads (one-thread GEMMs), dX
   hands whole images to threads (their rows scatter into their own image only, in the
   same order for any chunking), and dW, a reduction over every row, runs its chunks in
   order with the threads inside each GEMM: the same bits for any thread count. */
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#include "gemm/cnn_gemm_kernels.h"

/* Multiply-adds below which a pass stays on one thread. */
#define CONV_PARALLEL_MIN_MACS (1 << 18)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* a * b, or -1 if either is negative or the product exceeds 2^62. */
static int64_t mul_checked(int64_t a, int64_t b)
{
    /* (a, b) -> a b */
    const int64_t limit = (int64_t)1 << 62;
    if (a < 0 || b < 0)
        return -1;
    if (a != 0 && b > limit / a)
        return -1;
    return a * b;
}

static int64_t product4(int64_t a, int64_t b, int64_t c, int64_t d)
{
    /* (a, b, c, d) -> a b c d, or -1 on overflow */
    return mul_checked(mul_checked(mul_checked(a, b), c), d);
}

int cnn_conv2d_shape_check(const cnn_conv2d_shape *s)
{
    /* s -> CNN_OK / CNN_ERR_ARG */
    if (!s || s->batch < 0)
        return CNN_ERR_ARG;
    if (s->in_h < 1 || s->in_w < 1 || s->in_c < 1 || s->out_h < 1 || s->out_w < 1 ||
        s->out_c < 1 || s->kernel_h < 1 || s->kernel_w < 1 || s->stride < 1)
        return CNN_ERR_ARG;
    if (s->pad_top < 0 || s->pad_top >= s->kernel_h ||
        s->pad_left < 0 || s->pad_left >= s->kernel_w)
        return CNN_ERR_ARG;
    /* every window starts inside the input (so it also ends at most kernel - 1 past it) */
    if (mul_checked(s->out_h - 1, s->stride) < 0 || mul_checked(s->out_w - 1, s->stride) < 0)
        return CNN_ERR_ARG;
    if ((s->out_h - 1) * s->stride - s->pad_top >= s->in_h ||
        (s->out_w - 1) * s->stride - s->pad_left >= s->in_w)
        return CNN_ERR_ARG;
    const int64_t k = product4(s->kernel_h, s->kernel_w, s->in_c, 1);
    if (product4(s->batch, s->in_h, s->in_w, s->in_c) < 0 ||
        product4(s->batch, s->out_h, s->out_w, s->out_c) < 0 ||
        product4(k, s->out_c, 1, 1) < 0 || product4(k, s->out_w, 16, 1) < 0)
        return CNN_ERR_ARG;
    return CNN_OK;
}

/* (out, pad_before) of one spatial axis; same != 0 for TensorFlow's "same". */
static void axis_geometry(int64_t in, int64_t k, int64_t stride, int same,
                          int64_t *out, int64_t *pad)
{
    /* (in, k, stride) -> out, pad */
    if (same) {
        *out = (in + stride - 1) / stride;
        const int64_t total = max64((*out - 1) * stride + k - in, 0);
        *pad = total / 2;
    } else {
        *out = in >= k ? (in - k) / stride + 1 : 0;
        *pad = 0;
    }
}

int cnn_conv2d_shape_init(cnn_conv2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                          int64_t in_c, int64_t out_c, int64_t kernel_h, int64_t kernel_w,
                          int64_t stride, int same_padding)
{
    /* sizes -> *s */
    if (!s)
        return CNN_ERR_ARG;
    memset(s, 0, sizeof *s);
    if (in_h < 1 || in_w < 1 || kernel_h < 1 || kernel_w < 1 || stride < 1 ||
        in_h > ((int64_t)1 << 40) || in_w > ((int64_t)1 << 40) ||
        kernel_h > ((int64_t)1 << 40) || kernel_w > ((int64_t)1 << 40) ||
        stride > ((int64_t)1 << 40))
        return CNN_ERR_ARG;
    s->batch = batch; s->in_h = in_h; s->in_w = in_w; s->in_c = in_c;
    s->out_c = out_c; s->kernel_h = kernel_h; s->kernel_w = kernel_w; s->stride = stride;
    axis_geometry(in_h, kernel_h, stride, same_padding, &s->out_h, &s->pad_top);
    axis_geometry(in_w, kernel_w, stride, same_padding, &s->out_w, &s->pad_left);
    return cnn_conv2d_shape_check(s);
}

/* ---- the plain references ------------------------------------------------------ */

int cnn_conv2d_forward_ref(float *Y, const float *X, const float *W, const float *b,
                           const cnn_conv2d_shape *s, cnn_activation act, float alpha)
{
    /* Y (batch, out_h, out_w, out_c) = act(b + sum over ky, kx, ci of X[.] W[.]) */
    if (cnn_conv2d_shape_check(s) != CNN_OK || act == CNN_ACT_SOFTMAX ||
        act < CNN_ACT_IDENTITY || act > CNN_ACT_TANH)
        return CNN_ERR_ARG;
    const int64_t C = s->in_c, O = s->out_c;
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox)
                for (int64_t o = 0; o < O; ++o) {
                    double acc = b[o];
                    for (int64_t ky = 0; ky < s->kernel_h; ++ky) {
                        const int64_t iy = oy * s->stride - s->pad_top + ky;
                        if (iy < 0 || iy >= s->in_h)
                            continue;
                        for (int64_t kx = 0; kx < s->kernel_w; ++kx) {
                            const int64_t ix = ox * s->stride - s->pad_left + kx;
                            if (ix < 0 || ix >= s->in_w)
                                continue;
                            const float *x = X + ((n * s->in_h + iy) * s->in_w + ix) * C;
                            const float *w = W + (ky * s->kernel_w + kx) * C * O + o;
                            for (int64_t c = 0; c < C; ++c)
                                acc += (double)x[c] * (double)w[c * O];
                        }
                    }
                    Y[((n * s->out_h + oy) * s->out_w + ox) * O + o] = (float)acc;
                }
    return cnn_activation_forward(Y, Y, s->batch * s->out_h * s->out_w * O, O, act, alpha);
}

int cnn_conv2d_backward_ref(float *dX, float *dW, float *db, const float *dY, const float *X,
                            const float *W, const cnn_conv2d_shape *s)
{
    /* dX[n, iy, ix, c] = sum dY[n, oy, ox, o] W[ky, kx, c, o] over the windows holding it;
       dW[ky, kx, c, o] = sum dY[n, oy, ox, o] X[n, iy, ix, c]; db[o] = sum dY[., o] */
    if (cnn_conv2d_shape_check(s) != CNN_OK)
        return CNN_ERR_ARG;
    const int64_t C = s->in_c, O = s->out_c, S = s->stride;
    for (int64_t o = 0; o < O; ++o) {
        double acc = 0.0;
        for (int64_t i = 0; i < s->batch * s->out_h * s->out_w; ++i)
            acc += dY[i * O + o];
        db[o] = (float)acc;
    }
    for (int64_t ky = 0; ky < s->kernel_h; ++ky)
        for (int64_t kx = 0; kx < s->kernel_w; ++kx)
            for (int64_t c = 0; c < C; ++c)
                for (int64_t o = 0; o < O; ++o) {
                    double acc = 0.0;
                    for (int64_t n = 0; n < s->batch; ++n)
                        for (int64_t oy = 0; oy < s->out_h; ++oy) {
                            const int64_t iy = oy * S - s->pad_top + ky;
                            if (iy < 0 || iy >= s->in_h)
                                continue;
                            for (int64_t ox = 0; ox < s->out_w; ++ox) {
                                const int64_t ix = ox * S - s->pad_left + kx;
                                if (ix < 0 || ix >= s->in_w)
                                    continue;
                                acc += (double)X[((n * s->in_h + iy) * s->in_w + ix) * C + c] *
                                       (double)dY[((n * s->out_h + oy) * s->out_w + ox) * O + o];
                            }
                        }
                    dW[((ky * s->kernel_w + kx) * C + c) * O + o] = (float)acc;
                }
    if (!dX)
        return CNN_OK;
    for (int64_t n = 0; n < s->batch; ++n)
        for (int64_t iy = 0; iy < s->in_h; ++iy)
            for (int64_t ix = 0; ix < s->in_w; ++ix)
                for (int64_t c = 0; c < C; ++c) {
                    double acc = 0.0;
                    for (int64_t ky = 0; ky < s->kernel_h; ++ky) {
                        const int64_t ty = iy + s->pad_top - ky, oy = ty / S;
                        if (ty < 0 || ty % S || oy >= s->out_h)
                            continue;
                        for (int64_t kx = 0; kx < s->kernel_w; ++kx) {
                            const int64_t tx = ix + s->pad_left - kx, ox = tx / S;
                            if (tx < 0 || tx % S || ox >= s->out_w)
                                continue;
                            const float *d = dY + ((n * s->out_h + oy) * s->out_w + ox) * O;
                            const float *w = W + ((ky * s->kernel_w + kx) * C + c) * O;
                            for (int64_t o = 0; o < O; ++o)
                                acc += (double)d[o] * (double)w[o];
                        }
                    }
                    dX[((n * s->in_h + iy) * s->in_w + ix) * C + c] = (float)acc;
                }
    return CNN_OK;
}

/* ---- the fast path: register tiles read straight from the (padded) image ---------- */

/* Output channels per register tile: two 8-lane vectors (one when out_c <= 8), with
   MR2 or MR1 pixels (or weight rows, for dW) beside them: 12 or 8 accumulators. */
enum { CONV_MR2 = 6, CONV_MR1 = 8, CONV_MR_MAX = 8, CONV_NR = 16, CONV_DX_VECS = 4,
       CONV_DX_PIXELS = 4,
       CONV_ROW_KW_MAX = 5 };

/* Where a pass finds its operands. */
typedef struct conv_geom {
    int64_t K, span;       /* kernel_h kernel_w in_c ; kernel_w in_c: one patch row   */
    int64_t Hp, Wp;        /* the padded image that holds every window              */
    int64_t ldx;           /* floats between image rows (padded or X's own)         */
    int64_t image;         /* floats of a per-thread slot, rounded up: an image     */
    int64_t list;          /* then, at slot + list, a list of pixels (sparse dW)    */
    int64_t o_pad;         /* out_c rounded up to whole tiles (8 nv)                */
    int64_t span_pad;      /* span rounded up to 8                                  */
    int nv;                /* vectors of output channels per tile: 1 or 2           */
    int mr;                /* pixels (or dW rows) per tile                          */
    int in_place;          /* no padding and every window inside X: read X itself   */
} conv_geom;

static conv_geom make_geom(const cnn_conv2d_shape *s)
{
    /* shape -> geometry */
    conv_geom g;
    g.span = s->kernel_w * s->in_c;
    g.K = s->kernel_h * g.span;
    g.Hp = (s->out_h - 1) * s->stride + s->kernel_h;
    g.Wp = (s->out_w - 1) * s->stride + s->kernel_w;
    g.in_place = s->pad_top == 0 && s->pad_left == 0 && g.Hp <= s->in_h && g.Wp <= s->in_w;
    g.ldx = (g.in_place ? s->in_w : g.Wp) * s->in_c;
    /* a padded image, or (in place) the dX rows of the windows, plus the spill of the
       whole-vector dX stores past the last window; then out_h out_w + 8 int64 */
    g.list = cnn_round_up_floats(g.Hp * g.ldx + 8);
    g.image = g.list + cnn_round_up_floats(2 * (s->out_h * s->out_w + 8));
    g.nv = s->out_c > 8 ? 2 : 1;
    g.o_pad = (s->out_c + 8 * g.nv - 1) / (8 * g.nv) * (8 * g.nv);
    g.span_pad = (g.span + 7) / 8 * 8;
    g.mr = g.nv == 2 ? CONV_MR2 : CONV_MR1;
    return g;
}

/* Workspace: packed weights (K, o_pad) for the forward pass, dW accumulators (K, o_pad),
   the weights' transpose per kernel row (kernel_h, out_c, span_pad) for dX, the padded
   bias (o_pad + 16) for the forward pass, the window corner of each output pixel
   (out_h out_w int64) and the masks of dY's nonzero channels (batch out_h out_w
   uint64) for the sparse passes, then one image slot per thread. */
static int64_t shared_floats(const cnn_conv2d_shape *s, const conv_geom *g)
{
    /* -> floats before the per-thread images */
    const int64_t npix = s->out_h * s->out_w;
    return 2 * cnn_round_up_floats(g->K * g->o_pad) +
           cnn_round_up_floats(s->kernel_h * s->out_c * g->span_pad) +
           cnn_round_up_floats(g->o_pad + CONV_NR) + cnn_round_up_floats(2 * npix) +
           cnn_round_up_floats(2 * s->batch * npix);
}

int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s, int n_threads)
{
    /* (shape, threads) -> floats */
    if (cnn_conv2d_shape_check(s) != CNN_OK || n_threads < 1)
        return -1;
    const conv_geom g = make_geom(s);
    return shared_floats(s, &g) + n_threads * g.image;
}

/* dst (Hp, Wp, in_c) = image n of X placed at (pad_top, pad_left) in zeros. */
static void pad_image(float *dst, const float *X, const cnn_conv2d_shape *s,
                      const conv_geom *g, int64_t n)
{
    /* X (batch, in_h, in_w, in_c) -> dst */
    const int64_t C = s->in_c;
    const int64_t left = min64(s->pad_left, g->Wp) * C;
    const int64_t mid = max64(0, min64(s->in_w, g->Wp - s->pad_left)) * C;
    /* zeros, then the image rows */
    memset(dst, 0, (size_t)(g->Hp * g->ldx) * sizeof(float));
    for (int64_t y = s->pad_top; y < min64(g->Hp, s->pad_top + s->in_h); ++y)
        memcpy(dst + y * g->ldx + left, X + ((n * s->in_h + y - s->pad_top) * s->in_w) * C,
               (size_t)mid * sizeof(float));
}

/* Image n of X as the passes read it: X itself, or padded into `slot`. */
static const float *image_of(const float *X, const cnn_conv2d_shape *s, const conv_geom *g,
                             int64_t n, float *slot)
{
    /* -> the image's top-left window corner, rows g->ldx apart */
    if (g->in_place)
        return X + n * s->in_h * s->in_w * s->in_c;
    pad_image(slot, X, s, g, n);
    return slot;
}

/* The kernel families: a forward tile, a dW tile and a dX scatter, each in portable C
   and (x86-64) AVX2+FMA.  Every output accumulates over its terms in one fixed order. */

/* out (MR, 16) = sum over kernel rows ky and j < span of a_i[ky ldx + j] w[(ky span + j)
   ldw + 0:8 NV] ; a holds the MR pixels' window corners. */
CNN_ALWAYS_INLINE void fwd_tile_generic(const int MR, const int NV, float *out,
                                        const float *const *a, int64_t kh, int64_t span,
                                        int64_t ldx, const float *w, int64_t ldw)
{
    /* -> out rows 16 apart */
    float acc[CONV_MR_MAX][CONV_NR] = {{0.0f}};
    for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t j = 0; j < span; ++j) {
            const float *wr = w + (ky * span + j) * ldw;
            for (int i = 0; i < MR; ++i) {
                const float x = a[i][ky * ldx + j];
                for (int v = 0; v < 8 * NV; ++v)
                    acc[i][v] += x * wr[v];
            }
        }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < 8 * NV; ++v)
            out[i * CONV_NR + v] = acc[i][v];
}

/* dw rows 0..MRJ-1 (ldw apart, 8 NV columns) += sum over the pixels of image `img` of
   a_p[jj] dY[p, 0:8 NV] (nvalid of them real) ; a_p = window corner + koff. */
CNN_ALWAYS_INLINE void dw_tile_generic(const int MRJ, const int NV, float *dw, int64_t ldw,
                                       const float *img, int64_t koff,
                                       const cnn_conv2d_shape *s, const conv_geom *g,
                                       const float *dy, int64_t nvalid)
{
    /* dy: image's dY at the tile's first channel, rows out_c apart */
    float acc[CONV_MR_MAX][CONV_NR];
    for (int jj = 0; jj < MRJ; ++jj)
        for (int v = 0; v < 8 * NV; ++v)
            acc[jj][v] = dw[jj * ldw + v];
    for (int64_t oy = 0; oy < s->out_h; ++oy)
        for (int64_t ox = 0; ox < s->out_w; ++ox, dy += s->out_c) {
            const float *a = img + oy * s->stride * g->ldx + ox * s->stride * s->in_c + koff;
            for (int jj = 0; jj < MRJ; ++jj)
                for (int v = 0; v < nvalid; ++v)
                    acc[jj][v] += a[jj] * dy[v];
        }
    for (int jj = 0; jj < MRJ; ++jj)
        for (int v = 0; v < 8 * NV; ++v)
            dw[jj * ldw + v] = acc[jj][v];
}

/* t[0:span] += sum over o of d[o] wt[o span_pad + 0:span] for one pixel and kernel row. */
static void dx_row_generic(float *t, const float *d, const float *wt, int64_t out_c,
                           int64_t span, int64_t span_pad)
{
    /* t (span,), d (out_c,), wt (out_c, span_pad) */
    for (int64_t j0 = 0; j0 < span; j0 += 8 * CONV_DX_VECS) {
        const int64_t n = min64(8 * CONV_DX_VECS, span - j0);
        float acc[8 * CONV_DX_VECS] = {0.0f};
        for (int64_t o = 0; o < out_c; ++o)
            for (int64_t j = 0; j < n; ++j)
                acc[j] += d[o] * wt[o * span_pad + j0 + j];
        for (int64_t j = 0; j < n; ++j)
            t[j0 + j] += acc[j];
    }
}

#ifdef CNN_AVX2_BUILD
#include <immintrin.h>
#define CONV_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

/* Keeps v in a register: without it the compiler folds the load of a vector used by
   two multiply-adds into both, which loads it twice, and the loads then bound the loop. */
#define CONV_IN_REGISTER(v) __asm__("" : "+x"(v))

/* Mask of the low n lanes of 8 (n clamped to [0, 8]). */
CONV_AVX2 __m256i lanes8(int64_t n)
{
    /* n -> (8,) int mask */
    const int32_t m = n <= 0 ? 0 : (n >= 8 ? 8 : (int32_t)n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

CONV_AVX2 void fwd_tile_avx2(const int MR, const int NV, float *out, const float *const *a,
                             int64_t kh, int64_t span, int64_t ldx, const float *w,
                             int64_t ldw)
{
    /* as fwd_tile_generic, with fused multiply-adds */
    __m256 acc0[CONV_MR_MAX], acc1[CONV_MR_MAX];
    CNN_UNROLL
    for (int i = 0; i < MR; ++i)
        acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t ky = 0; ky < kh; ++ky) {
        const float *row[CONV_MR_MAX];
        CNN_UNROLL
        for (int i = 0; i < MR; ++i)
            row[i] = a[i] + ky * ldx;
        const float *wr = w + ky * span * ldw;
        for (int64_t j = 0; j < span; ++j, wr += ldw) {
            const __m256 b0 = _mm256_loadu_ps(wr);
            const __m256 b1 = NV == 2 ? _mm256_loadu_ps(wr + 8) : b0;
            CNN_UNROLL
            for (int i = 0; i < MR; ++i) {
                const __m256 x = _mm256_broadcast_ss(row[i] + j);
                acc0[i] = _mm256_fmadd_ps(x, b0, acc0[i]);
                if (NV == 2)
                    acc1[i] = _mm256_fmadd_ps(x, b1, acc1[i]);
            }
        }
    }
    CNN_UNROLL
    for (int i = 0; i < MR; ++i) {
        _mm256_storeu_ps(out + i * CONV_NR, acc0[i]);
        if (NV == 2)
            _mm256_storeu_ps(out + i * CONV_NR + 8, acc1[i]);
    }
}

CONV_AVX2 void dw_tile_avx2(const int MRJ, const int NV, float *dw, int64_t ldw,
                            const float *img, int64_t koff, const cnn_conv2d_shape *s,
                            const conv_geom *g, const float *dy, int64_t nvalid)
{
    /* as dw_tile_generic, with fused multiply-adds */
    __m256 acc0[CONV_MR_MAX], acc1[CONV_MR_MAX];
    const __m256i m0 = lanes8(nvalid), m1 = lanes8(nvalid - 8);
    CNN_UNROLL
    for (int jj = 0; jj < MRJ; ++jj) {
        acc0[jj] = _mm256_loadu_ps(dw + jj * ldw);
        acc1[jj] = NV == 2 ? _mm256_loadu_ps(dw + jj * ldw + 8) : acc0[jj];
    }
    const int64_t step = s->stride * s->in_c;
    /* at or before the end of this image's dY whatever the tile's first channel */
    const float *dy_end = dy + (s->out_h * s->out_w - 1) * s->out_c;
    for (int64_t oy = 0; oy < s->out_h; ++oy) {
        const float *a = img + oy * s->stride * g->ldx + koff;
        for (int64_t ox = 0; ox < s->out_w; ++ox, a += step, dy += s->out_c) {
            /* lanes past nvalid only reach dW's padding columns: whole loads inside dY */
            const int whole = dy_end - dy >= 8 * NV;
            const __m256 b0 = whole ? _mm256_loadu_ps(dy) : _mm256_maskload_ps(dy, m0);
            const __m256 b1 = NV != 2 ? b0 : whole ? _mm256_loadu_ps(dy + 8)
                                                   : _mm256_maskload_ps(dy + 8, m1);
            CNN_UNROLL
            for (int jj = 0; jj < MRJ; ++jj) {
                const __m256 x = _mm256_broadcast_ss(a + jj);
                acc0[jj] = _mm256_fmadd_ps(x, b0, acc0[jj]);
                if (NV == 2)
                    acc1[jj] = _mm256_fmadd_ps(x, b1, acc1[jj]);
            }
        }
    }
    CNN_UNROLL
    for (int jj = 0; jj < MRJ; ++jj) {
        _mm256_storeu_ps(dw + jj * ldw, acc0[jj]);
        if (NV == 2)
            _mm256_storeu_ps(dw + jj * ldw + 8, acc1[jj]);
    }
}

__attribute__((target("avx2,fma")))
static void dx_row_avx2(float *t, const float *d, const float *wt, int64_t out_c,
                        int64_t span, int64_t span_pad)
{
    /* as dx_row_generic, with fused multiply-adds, CONV_DX_VECS vectors at a time; t
       has room for span_pad floats, and the lanes past span add zeros (wt's padding) */
    for (int64_t j0 = 0; j0 < span; j0 += 8 * CONV_DX_VECS) {
        __m256 acc[CONV_DX_VECS];
        CNN_UNROLL
        for (int v = 0; v < CONV_DX_VECS; ++v)
            acc[v] = _mm256_setzero_ps();
        const float *w = wt + j0;
        for (int64_t o = 0; o < out_c; ++o, w += span_pad) {
            const __m256 x = _mm256_broadcast_ss(d + o);
            CNN_UNROLL
            for (int v = 0; v < CONV_DX_VECS; ++v)
                if (j0 + 8 * v < span_pad)
                    acc[v] = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 8 * v), acc[v]);
        }
        CNN_UNROLL
        for (int v = 0; v < CONV_DX_VECS; ++v) {
            float *tv = t + j0 + 8 * v;
            if (j0 + 8 * v < span)
                _mm256_storeu_ps(tv, _mm256_add_ps(_mm256_loadu_ps(tv), acc[v]));
        }
    }
}

/* As dx_row_avx2 for NP pixels whose rows start shift apart (t, t + shift, ...; they
   may overlap) and whose dY start dstride apart (d, d + dstride, ...), when span_pad =
   8 NV <= 32: the weights are loaded once for all, and NP NV independent sums keep both
   FMA units busy.  Each pixel's sums are added to t before the next pixel's, the order
   of calling dx_row_avx2 on each in turn, so the bits are the same. */
CONV_AVX2 void dx_rows_body(const int NP, const int NV, float *t, int64_t shift,
                            const float *d, int64_t dstride, const float *wt,
                            int64_t out_c, int64_t span)
{
    /* t rows += their pixels' dY times the kernel row's weights wt (out_c, 8 NV) */
    __m256 acc[CONV_DX_PIXELS][CONV_DX_VECS];
    CNN_UNROLL
    for (int p = 0; p < NP; ++p)
        CNN_UNROLL
        for (int v = 0; v < NV; ++v)
            acc[p][v] = _mm256_setzero_ps();
    const float *w = wt;
    for (int64_t o = 0; o < out_c; ++o, w += 8 * NV) {
        __m256 wv[CONV_DX_VECS];
        CNN_UNROLL
        for (int v = 0; v < NV; ++v) {
            wv[v] = _mm256_loadu_ps(w + 8 * v);
            CONV_IN_REGISTER(wv[v]);
        }
        CNN_UNROLL
        for (int p = 0; p < NP; ++p) {
            const __m256 x = _mm256_broadcast_ss(d + p * dstride + o);
            CNN_UNROLL
            for (int v = 0; v < NV; ++v)
                acc[p][v] = _mm256_fmadd_ps(x, wv[v], acc[p][v]);
        }
    }
    CNN_UNROLL
    for (int p = 0; p < NP; ++p) {
        float *tp = t + p * shift;
        CNN_UNROLL
        for (int v = 0; v < NV; ++v)
            if (8 * v < span)
                _mm256_storeu_ps(tp + 8 * v, _mm256_add_ps(_mm256_loadu_ps(tp + 8 * v),
                                                           acc[p][v]));
    }
}

#define CONV_DX_CASE(NP, NV) \
    case NV: dx_rows_body(NP, NV, t, shift, d, dstride, wt, out_c, span); break;
#define CONV_DX_SWITCH(NP) \
    switch (span_pad / 8) { CONV_DX_CASE(NP, 1) CONV_DX_CASE(NP, 2) CONV_DX_CASE(NP, 3) \
                            default: CONV_DX_CASE(NP, 4) }

/* dx_rows_body for two pixels. */
__attribute__((target("avx2,fma")))
static void dx_rows2_avx2(float *t, int64_t shift, const float *d, int64_t dstride,
                          const float *wt, int64_t out_c, int64_t span, int64_t span_pad)
{
    /* -> t rows += */
    CONV_DX_SWITCH(2)
}

/* dx_rows_body for four pixels, built with AVX-512VL for its 32 vector registers. */
__attribute__((target("avx2,fma,avx512f,avx512vl")))
static void dx_rows4_avx512vl(float *t, int64_t shift, const float *d, int64_t dstride,
                              const float *wt, int64_t out_c, int64_t span, int64_t span_pad)
{
    /* -> t rows += */
    CONV_DX_SWITCH(CONV_DX_PIXELS)
}

/* ---- dY mostly zeros: its nonzero entries only -------------------------------------
   After max pooling at most one pixel of each window has a nonzero gradient per
   channel, and relu zeroes more: LeNet-5's second convolution's dY is about 92% zeros.
   The sparse passes read, per pixel, a mask of its channels whose dY is nonzero (NaN
   counts as nonzero), and multiply-add only those entries, in the same order as the
   dense tiles: a skipped term is a product with zero, so every output keeps its value
   (a zero may only change sign, and a zero no longer meets a non-finite input or
   weight).  dW is transposed, one channel's kernel rows (at most CONV_SPARSE_KH, of at
   least 16 floats: narrower rows would leave most lanes idle) in registers, 32 columns
   at a time, while its pixels stream past; dX sums a pixel's nonzero channels into its
   window rows, 32 columns at a time (two 16-lane vectors per kernel row; the AVX2
   family's below take 16). */
enum { CONV_SPARSE_KH = 7, CONV_SPARSE_SPAN_MIN = 16, CONV_SPARSE_O = 64 };

#define CONV_TARGET_AVX512 "avx2,fma,avx512f,popcnt"
#define CONV_AVX512 static inline __attribute__((always_inline, target(CONV_TARGET_AVX512)))

/* Mask of the low n lanes of 16 (n clamped to [0, 16]). */
CONV_AVX512 __mmask16 lanes16(int64_t n)
{
    /* n -> (16,) lane mask */
    return (__mmask16)(n <= 0 ? 0 : n >= 16 ? 0xFFFF : (1u << n) - 1);
}

/* m[p] (bit o) = dY[p, o] != 0, for npix pixels of O <= 64 channels. */
__attribute__((target(CONV_TARGET_AVX512)))
static void dy_masks_avx512(uint64_t *m, const float *dy, int64_t npix, int64_t O)
{
    /* dY (npix, O) -> m (npix,) */
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t p = 0; p < npix; ++p, dy += O) {
        uint64_t bits = 0;
        for (int64_t o = 0; o < O; o += 16) {
            const __mmask16 k = lanes16(O - o);
            const __m512 v = _mm512_maskz_loadu_ps(k, dy + o);
            bits |= (uint64_t)_mm512_mask_cmp_ps_mask(k, v, zero, _CMP_NEQ_UQ) << o;
        }
        m[p] = bits;
    }
}

/* list = the pixels p < npix whose mask has bit o, in order; returns their count.
   list has room for npix + 8. */
__attribute__((target(CONV_TARGET_AVX512)))
static int64_t pixels_with_channel(int64_t *list, const uint64_t *m, int64_t npix, int64_t o)
{
    /* masks -> list */
    const __m512i bit = _mm512_set1_epi64((long long)((uint64_t)1 << o));
    const __m512i eight = _mm512_set1_epi64(8);
    __m512i p = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t count = 0;
    for (int64_t p0 = 0; p0 < npix; p0 += 8, p = _mm512_add_epi64(p, eight)) {
        const __mmask8 in = (__mmask8)(npix - p0 >= 8 ? 0xFF : (1u << (npix - p0)) - 1);
        const __mmask8 hits =
            _mm512_mask_test_epi64_mask(in, _mm512_maskz_loadu_epi64(in, m + p0), bit);
        /* compress in a register, then a whole store (cheaper than a compressing store) */
        _mm512_storeu_si512((void *)(list + count), _mm512_maskz_compress_epi64(hits, p));
        count += __builtin_popcount(hits);
    }
    return count;
}

/* dwt (KH rows of `width` <= 32 floats, span apart: columns of one channel's dW
   transposed) += dY[p, o] times the same columns of pixel p's window rows, for the
   listed pixels p of one image in order (img: at the columns' first, dyo = dY + o). */
CONV_AVX512 void dw_sparse_body(const int KH, const int NV, float *dwt, int64_t span,
                                int64_t width, const float *img, int64_t ldx,
                                const int64_t *corner, const int64_t *list, int64_t count,
                                const float *dyo, int64_t O)
{
    /* -> dwt */
    const __mmask16 k0 = lanes16(width), k1 = lanes16(width - 16);
    __m512 acc[CONV_SPARSE_KH][2];
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky) {
        acc[ky][0] = _mm512_maskz_loadu_ps(k0, dwt + ky * span);
        acc[ky][1] = NV == 2 ? _mm512_maskz_loadu_ps(k1, dwt + ky * span + 16) : acc[ky][0];
    }
    for (int64_t i = 0; i < count; ++i) {
        const int64_t p = list[i];
        const __m512 d = _mm512_set1_ps(dyo[p * O]);
        const float *a = img + corner[p];
        CNN_UNROLL
        for (int ky = 0; ky < KH; ++ky) {
            acc[ky][0] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(k0, a + ky * ldx),
                                         acc[ky][0]);
            if (NV == 2)
                acc[ky][1] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(k1, a + ky * ldx + 16),
                                             acc[ky][1]);
        }
    }
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky) {
        _mm512_mask_storeu_ps(dwt + ky * span, k0, acc[ky][0]);
        if (NV == 2)
            _mm512_mask_storeu_ps(dwt + ky * span + 16, k1, acc[ky][1]);
    }
}

/* KH rows of t, ldx apart, += the sum over the channels o in `bits` (in order) of
   d[o] times the kernel rows' weights wt[(ky O + o) span_pad ..], `width` <= 32 floats
   each (a block of columns: t and wt at its first). */
CONV_AVX512 void dx_sparse_body(const int KH, const int NV, float *t, int64_t ldx,
                                const float *wt, int64_t width, int64_t span_pad,
                                const float *d, uint64_t bits, int64_t O)
{
    /* -> t rows += */
    const __mmask16 k0 = lanes16(width), k1 = lanes16(width - 16);
    __m512 acc[CONV_SPARSE_KH][2];
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky)
        acc[ky][0] = acc[ky][1] = _mm512_setzero_ps();
    while (bits) {
        const int64_t o = __builtin_ctzll(bits);
        bits &= bits - 1;
        const __m512 x = _mm512_set1_ps(d[o]);
        const float *w = wt + o * span_pad;
        CNN_UNROLL
        for (int ky = 0; ky < KH; ++ky) {
            acc[ky][0] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k0, w + ky * O * span_pad),
                                         acc[ky][0]);
            if (NV == 2)
                acc[ky][1] = _mm512_fmadd_ps(
                    x, _mm512_maskz_loadu_ps(k1, w + ky * O * span_pad + 16), acc[ky][1]);
        }
    }
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky) {
        float *r = t + ky * ldx;
        _mm512_mask_storeu_ps(r, k0, _mm512_add_ps(_mm512_maskz_loadu_ps(k0, r), acc[ky][0]));
        if (NV == 2)
            _mm512_mask_storeu_ps(r + 16, k1, _mm512_add_ps(_mm512_maskz_loadu_ps(k1, r + 16),
                                                            acc[ky][1]));
    }
}

#define CONV_SPARSE_CASE(F, KH, ...) \
    case KH: if (nv == 2) F(KH, 2, __VA_ARGS__); else F(KH, 1, __VA_ARGS__); break;
#define CONV_SPARSE_SWITCH(F, ...)                                                          \
    switch (kh) { CONV_SPARSE_CASE(F, 1, __VA_ARGS__) CONV_SPARSE_CASE(F, 2, __VA_ARGS__) \
                  CONV_SPARSE_CASE(F, 3, __VA_ARGS__) CONV_SPARSE_CASE(F, 4, __VA_ARGS__) \
                  CONV_SPARSE_CASE(F, 5, __VA_ARGS__) CONV_SPARSE_CASE(F, 6, __VA_ARGS__) \
                  default: CONV_SPARSE_CASE(F, 7, __VA_ARGS__) }

/* dw_sparse_body for kh (1..CONV_SPARSE_KH) kernel rows of span floats, in blocks of
   32 columns. */
__attribute__((target(CONV_TARGET_AVX512)))
static void dw_sparse_avx512(float *dwt, int64_t kh, int64_t span, const float *img,
                             int64_t ldx, const int64_t *corner, const int64_t *list,
                             int64_t count, const float *dyo, int64_t O)
{
    /* -> dwt */
    for (int64_t j0 = 0; j0 < span; j0 += 32) {
        const int64_t width = min64(32, span - j0);
        const int nv = width > 16 ? 2 : 1;
        CONV_SPARSE_SWITCH(dw_sparse_body, dwt + j0, span, width, img + j0, ldx, corner, list,
                           count, dyo, O)
    }
}

/* dx_sparse_body for kh (1..CONV_SPARSE_KH) kernel rows of span floats, in blocks of 32
   columns. */
__attribute__((target(CONV_TARGET_AVX512)))
static void dx_sparse_avx512(float *t, int64_t kh, int64_t ldx, const float *wt,
                             int64_t span, int64_t span_pad, const float *d, uint64_t bits,
                             int64_t O)
{
    /* -> t rows += */
    for (int64_t j0 = 0; j0 < span; j0 += 32) {
        const int64_t width = min64(32, span - j0);
        const int nv = width > 16 ? 2 : 1;
        CONV_SPARSE_SWITCH(dx_sparse_body, t + j0, ldx, wt + j0, width, span_pad, d, bits, O)
    }
}

/* The sparse passes for the AVX2 family: the same terms in the same order, 16 columns
   of every kernel row at a time (two 8-lane vectors each: 14 sums fit its 16
   registers).  Inside the loops whole vectors are loaded; the lanes past a block's
   columns only reach sums that are never stored (dW, which masks its last vector) or
   add the weights' zero padding (dX, whose slot has room for that spill). */

/* m[p] (bit o) = dY[p, o] != 0, for npix pixels of O <= 64 channels. */
__attribute__((target("avx2,fma")))
static void dy_masks_avx2(uint64_t *m, const float *dy, int64_t npix, int64_t O)
{
    /* dY (npix, O) -> m (npix,) */
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t p = 0; p < npix; ++p, dy += O) {
        uint64_t bits = 0;
        for (int64_t o = 0; o < O; o += 8) {
            const __m256 v = o + 8 <= O ? _mm256_loadu_ps(dy + o)
                                        : _mm256_maskload_ps(dy + o, lanes8(O - o));
            bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(
                        _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)) << o;
        }
        m[p] = bits;
    }
}

/* As pixels_with_channel, without a branch per pixel. */
static int64_t pixels_with_channel_scalar(int64_t *list, const uint64_t *m, int64_t npix,
                                          int64_t o)
{
    /* masks -> list */
    int64_t count = 0;
    for (int64_t p = 0; p < npix; ++p) {
        list[count] = p;
        count += (int64_t)((m[p] >> o) & 1);
    }
    return count;
}

/* As dw_sparse_body for `width` <= 16 columns; a window row's load that would pass
   x_end (the end of the images it reads) is masked. */
CONV_AVX2 void dw_sparse_avx2_body(const int KH, const int NV, float *dwt, int64_t span,
                                   int64_t width, const float *img, int64_t ldx,
                                   const int64_t *corner, const int64_t *list, int64_t count,
                                   const float *dyo, int64_t O, const float *x_end)
{
    /* -> dwt */
    const __m256i m0 = lanes8(width), m1 = lanes8(width - 8);
    __m256 acc[CONV_SPARSE_KH][2];
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky) {
        acc[ky][0] = _mm256_maskload_ps(dwt + ky * span, m0);
        acc[ky][1] = NV == 2 ? _mm256_maskload_ps(dwt + ky * span + 8, m1) : acc[ky][0];
    }
    for (int64_t i = 0; i < count; ++i) {
        const int64_t p = list[i];
        const __m256 d = _mm256_set1_ps(dyo[p * O]);
        const float *a = img + corner[p];
        const int whole = a + (KH - 1) * ldx + 8 * NV <= x_end;
        CNN_UNROLL
        for (int ky = 0; ky < KH; ++ky)
            CNN_UNROLL
            for (int v = 0; v < NV; ++v) {
                const float *r = a + ky * ldx + 8 * v;
                const __m256 xv = whole || ky + 1 < KH ? _mm256_loadu_ps(r)
                                : _mm256_maskload_ps(r, v ? m1 : m0);
                acc[ky][v] = _mm256_fmadd_ps(d, xv, acc[ky][v]);
            }
    }
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky) {
        _mm256_maskstore_ps(dwt + ky * span, m0, acc[ky][0]);
        if (NV == 2)
            _mm256_maskstore_ps(dwt + ky * span + 8, m1, acc[ky][1]);
    }
}

/* As dx_sparse_body for `width` <= 16 columns (rounded up to whole vectors: t has room,
   and wt's padding adds zeros). */
CONV_AVX2 void dx_sparse_avx2_body(const int KH, const int NV, float *t, int64_t ldx,
                                   const float *wt, int64_t span_pad, const float *d,
                                   uint64_t bits, int64_t O)
{
    /* -> t rows += */
    __m256 acc[CONV_SPARSE_KH][2];
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky)
        acc[ky][0] = acc[ky][1] = _mm256_setzero_ps();
    while (bits) {
        const int64_t o = __builtin_ctzll(bits);
        bits &= bits - 1;
        const __m256 x = _mm256_set1_ps(d[o]);
        const float *w = wt + o * span_pad;
        CNN_UNROLL
        for (int ky = 0; ky < KH; ++ky)
            CNN_UNROLL
            for (int v = 0; v < NV; ++v)
                acc[ky][v] = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + ky * O * span_pad + 8 * v),
                                             acc[ky][v]);
    }
    CNN_UNROLL
    for (int ky = 0; ky < KH; ++ky)
        CNN_UNROLL
        for (int v = 0; v < NV; ++v) {
            float *r = t + ky * ldx + 8 * v;
            _mm256_storeu_ps(r, _mm256_add_ps(_mm256_loadu_ps(r), acc[ky][v]));
        }
}

/* dw_sparse_avx2_body for kh (1..CONV_SPARSE_KH) kernel rows of span floats, in blocks
   of 16 columns. */
__attribute__((target("avx2,fma")))
static void dw_sparse_avx2(float *dwt, int64_t kh, int64_t span, const float *img,
                           int64_t ldx, const int64_t *corner, const int64_t *list,
                           int64_t count, const float *dyo, int64_t O, const float *x_end)
{
    /* -> dwt */
    for (int64_t j0 = 0; j0 < span; j0 += 16) {
        const int64_t width = min64(16, span - j0);
        const int nv = width > 8 ? 2 : 1;
        CONV_SPARSE_SWITCH(dw_sparse_avx2_body, dwt + j0, span, width, img + j0, ldx, corner,
                           list, count, dyo, O, x_end)
    }
}

/* dx_sparse_avx2_body for kh (1..CONV_SPARSE_KH) kernel rows of span floats, in blocks
   of 16 columns. */
__attribute__((target("avx2,fma")))
static void dx_sparse_avx2(float *t, int64_t kh, int64_t ldx, const float *wt,
                           int64_t span, int64_t span_pad, const float *d, uint64_t bits,
                           int64_t O)
{
    /* -> t rows += */
    for (int64_t j0 = 0; j0 < span; j0 += 16) {
        const int nv = span - j0 > 8 ? 2 : 1;
        CONV_SPARSE_SWITCH(dx_sparse_avx2_body, t + j0, ldx, wt + j0, span_pad, d, bits, O)
    }
}

/* y (mr, O), rows O apart, = relu or identity of tile (mr, 16) + bias, for O <= 16
   (one tile holds every channel).  Whole-vector stores in increasing order, each
   one's spill past its row rewritten by the next row, or by a later tile: the caller
   writes y in increasing order up to y + room.  What would pass y + room goes through
   a buffer.  _mm256_max_ps(v, 0) is exactly v > 0 ? v : 0. */
__attribute__((target("avx2")))
static void tile_epilogue_avx2(float *y, const float *tile, const float *bias, int64_t mr,
                               int64_t O, int64_t room, int relu)
{
    /* -> y */
    const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < mr; ++i) {
        __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(tile + i * CONV_NR), b0);
        __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(tile + i * CONV_NR + 8), b1);
        if (relu) {
            v0 = _mm256_max_ps(v0, zero);
            v1 = _mm256_max_ps(v1, zero);
        }
        float *row = y + i * O;
        if (i * O + (O > 8 ? 16 : 8) <= room) {
            _mm256_storeu_ps(row, v0);
            if (O > 8)
                _mm256_storeu_ps(row + 8, v1);
        } else {
            float buf[CONV_NR];
            _mm256_storeu_ps(buf, v0);
            _mm256_storeu_ps(buf + 8, v1);
            memcpy(row, buf, (size_t)O * sizeof(float));
        }
    }
}
#endif

#ifdef CNN_AVX2_BUILD
/* The rows [box[0], box[1]) and columns [box[2], box[3]) that hold every nonzero value
   of an image of h rows of w floats, ldx apart (one channel); an empty box (box[0] ==
   box[1]) for an all-zero image.  NaN counts as nonzero.  The first layer's row tiles
   skip the kernel rows and tiles whose windows see only zeros outside it (a
   handwritten digit fills about 20 of 28 rows): the terms they skip are products with
   zero, so every output keeps its value (a zero may only change sign, and a zero no
   longer meets a non-finite weight or dY). */
__attribute__((target("avx2,fma")))
static void nonzero_box(const float *img, int64_t h, int64_t w, int64_t ldx, int64_t box[4])
{
    /* image -> box */
    const __m256 zero = _mm256_setzero_ps();
    box[0] = h; box[1] = 0; box[2] = w; box[3] = 0;
    for (int64_t r = 0; r < h; ++r) {
        const float *p = img + r * ldx;
        int64_t lo = -1, hi = 0;
        for (int64_t c0 = 0; c0 < w; c0 += 64) {
            uint64_t nz = 0;   /* bit i: column c0 + i is nonzero */
            for (int64_t c = c0; c < min64(w, c0 + 64); c += 8) {
                const __m256 v = _mm256_maskload_ps(p + c, lanes8(w - c));
                const int m = _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ));
                nz |= (uint64_t)(uint32_t)m << (c - c0);
            }
            if (nz) {
                lo = lo < 0 ? c0 + __builtin_ctzll(nz) : lo;
                hi = c0 + 64 - __builtin_clzll(nz);
            }
        }
        if (lo < 0)
            continue;
        box[0] = min64(box[0], r);
        box[1] = r + 1;
        box[2] = min64(box[2], lo);
        box[3] = max64(box[3], hi);
    }
    if (box[1] == 0)
        box[0] = 0;
}

/* As fwd_tile_avx2 with NV = 1 for MR consecutive pixels of one output row when
   in_c = 1 and stride = 1 (a first layer on grey images), kernel width KW: pixel i's
   window row is x[i .. i + KW), so each input value is broadcast once per kernel row
   and multiplies the weights of every pixel whose window holds it.  The generic tile
   broadcasts once per pixel and tap, and those loads, not the multiply-adds, bound it
   when one vector holds every channel.  Each output gets the same terms in the same
   order (kernel row, then tap), so the bits are the same. */
CONV_AVX2 void fwd_row_tile_avx2(const int MR, const int KW, float *out, const float *a,
                                 int64_t kh, int64_t ldx, const float *w, int64_t ldw)
{
    /* -> out (MR, 16) */
    __m256 acc[CONV_MR1];
    CNN_UNROLL
    for (int i = 0; i < MR; ++i)
        acc[i] = _mm256_setzero_ps();
    for (int64_t ky = 0; ky < kh; ++ky, a += ldx, w += KW * ldw) {
        __m256 wv[CONV_ROW_KW_MAX];
        CNN_UNROLL
        for (int j = 0; j < KW; ++j)
            wv[j] = _mm256_loadu_ps(w + j * ldw);
        CNN_UNROLL
        for (int m = 0; m < MR + KW - 1; ++m) {
            const __m256 x = _mm256_broadcast_ss(a + m);
            CNN_UNROLL
            for (int j = 0; j < KW; ++j)
                if (m - j >= 0 && m - j < MR)
                    acc[m - j] = _mm256_fmadd_ps(x, wv[j], acc[m - j]);
        }
    }
    CNN_UNROLL
    for (int i = 0; i < MR; ++i)
        _mm256_storeu_ps(out + i * CONV_NR, acc[i]);
}

#define CONV_ROW_CASE(R, KW) \
    case R: fwd_row_tile_avx2(R, KW, out, a, kh, ldx, w, ldw); break;
#define CONV_ROW_SWITCH(KW) \
    switch (mr) { CONV_ROW_CASE(1, KW) CONV_ROW_CASE(2, KW) CONV_ROW_CASE(3, KW) \
                  CONV_ROW_CASE(4, KW) CONV_ROW_CASE(5, KW) CONV_ROW_CASE(6, KW) \
                  CONV_ROW_CASE(7, KW) default: CONV_ROW_CASE(8, KW) }

/* fwd_row_tile_avx2 for mr (1..8) pixels and kernel width kw (3 or 5). */
__attribute__((target("avx2,fma")))
static void fwd_row_tile(float *out, const float *a, int64_t kh, int64_t kw, int64_t ldx,
                         const float *w, int64_t ldw, int64_t mr)
{
    /* -> out (mr, 16) */
    if (kw == 3) {
        CONV_ROW_SWITCH(3)
    } else {
        CONV_ROW_SWITCH(5)
    }
}
#endif

#ifdef CNN_AVX2_BUILD
/* The dW rows of NK kernel rows (KW taps each) += one image's terms, for the layers
   fwd_row_tile serves: along each output row, each input value is broadcast once per
   kernel row and multiplies the dY of the KW pixels whose windows hold it, kept in
   registers as they slide along the row (dw_tile_avx2 broadcasts once per pixel and
   tap, and those loads bound it).  Each dW entry sums its terms in pixel order, as
   dw_tile_avx2 does, plus zeros: at the ends of a row an input value also meets the
   zero dY of the pixels before the first and after the last (products with zero, which
   change a sum only if the input is not finite).
   Only the terms that meet the image's nonzero box are added (the others are products
   with zero).  img: the image's window corner at the first kernel row, box its nonzero
   box (see nonzero_box) in img's coordinates; dy: the image's dY, rows out_c apart, at
   most 8 of whose floats from dy_end on are read. */
CONV_AVX2 void dw_row_tile_avx2(const int KW, const int NK, float *dw, int64_t ldw,
                                const float *img, int64_t ldx, const cnn_conv2d_shape *s,
                                const float *dy, const float *dy_end, const int64_t *box)
{
    /* dw rows r KW + kx (r < NK, kx < KW), ldw apart -> += the image's terms */
    __m256 acc[2][CONV_ROW_KW_MAX];
    CNN_UNROLL
    for (int r = 0; r < NK; ++r)
        CNN_UNROLL
        for (int kx = 0; kx < KW; ++kx)
            acc[r][kx] = _mm256_loadu_ps(dw + (r * KW + kx) * ldw);
    const __m256i lanes = lanes8(s->out_c);
    const __m256 zero = _mm256_setzero_ps();
    const int64_t W = s->out_w;
    /* the output rows whose kernel rows meet the nonzero box, and its window positions
       (input columns): the first a multiple of KW, the dY slots' phase */
    const int64_t oy0 = max64(0, box[0] - NK + 1), oy1 = min64(s->out_h, box[1]);
    const int64_t m_first = box[2] / KW * KW, M = box[3];
    for (int64_t oy = oy0; oy < oy1; ++oy) {
        const float *x0 = img + oy * ldx, *x1 = x0 + ldx, *d = dy + oy * W * s->out_c;
        /* pixels of the row whose dY loads of 8 floats end by dy_end */
        const int64_t whole = dy_end - d >= 8 ? min64(W, (dy_end - d - 8) / s->out_c + 1) : 0;
        __m256 dv[CONV_ROW_KW_MAX];   /* dY of pixel m - kx at slot (m - kx) mod KW */
        CNN_UNROLL
        for (int u = 1; u < KW; ++u) {   /* pixels m_first - u, before the first position */
            const int64_t q = m_first - u;
            dv[KW - u] = q < 0 || q >= W ? zero : q < whole ? _mm256_loadu_ps(d + q * s->out_c)
                         : _mm256_maskload_ps(d + q * s->out_c, lanes);
        }
        dv[0] = zero;
#define CONV_DW_ROW_STEP(LOAD)                                                              \
        {                                                                                   \
            dv[u] = LOAD;                                                                   \
            const __m256 a = _mm256_broadcast_ss(x0 + m);                                   \
            CNN_UNROLL                                                                      \
            for (int kx = 0; kx < KW; ++kx)                                                 \
                acc[0][kx] = _mm256_fmadd_ps(a, dv[(u - kx + KW) % KW], acc[0][kx]);       \
            if (NK == 2) {                                                                  \
                const __m256 b = _mm256_broadcast_ss(x1 + m);                               \
                CNN_UNROLL                                                                  \
                for (int kx = 0; kx < KW; ++kx)                                             \
                    acc[1][kx] = _mm256_fmadd_ps(b, dv[(u - kx + KW) % KW], acc[1][kx]);   \
            }                                                                               \
        }
        int64_t m0 = m_first;
        for (; m0 + KW <= min64(whole, M); m0 += KW)
            CNN_UNROLL
            for (int u = 0; u < KW; ++u) {
                const int64_t m = m0 + u;
                CONV_DW_ROW_STEP(_mm256_loadu_ps(d + m * s->out_c))
            }
        /* the row's last pixels (masked loads near dy_end) and the window positions
           past its last pixel */
        for (; m0 < M; m0 += KW)
            CNN_UNROLL
            for (int u = 0; u < KW; ++u) {
                const int64_t m = m0 + u;
                if (m >= M)
                    break;
                CONV_DW_ROW_STEP(m >= W ? zero : m < whole ? _mm256_loadu_ps(d + m * s->out_c)
                                 : _mm256_maskload_ps(d + m * s->out_c, lanes))
            }
#undef CONV_DW_ROW_STEP
    }
    CNN_UNROLL
    for (int r = 0; r < NK; ++r)
        CNN_UNROLL
        for (int kx = 0; kx < KW; ++kx)
            _mm256_storeu_ps(dw + (r * KW + kx) * ldw, acc[r][kx]);
}

/* dw_row_tile_avx2 for NK kernel rows of width kw (3 or 5), compiled for TARGET. */
#define CONV_DW_ROWS(NAME, NK, TARGET)                                                    \
    __attribute__((target(TARGET)))                                                       \
    static void NAME(float *dw, int64_t ldw, const float *img, int64_t ldx,               \
                     const cnn_conv2d_shape *s, const float *dy, const float *dy_end,     \
                     int64_t kw, const int64_t *box)                                      \
    {                                                                                     \
        if (kw == 3)                                                                      \
            dw_row_tile_avx2(3, NK, dw, ldw, img, ldx, s, dy, dy_end, box);               \
        else                                                                              \
            dw_row_tile_avx2(5, NK, dw, ldw, img, ldx, s, dy, dy_end, box);               \
    }
/* one kernel row: five sums, five dY and the broadcasts fit AVX2's 16 registers */
CONV_DW_ROWS(dw_row_tile_one, 1, "avx2,fma")
/* two kernel rows: AVX-512VL's 32 registers (ten sums, five dY, the broadcasts) */
CONV_DW_ROWS(dw_row_tile_two, 2, "avx2,fma,avx512f,avx512vl")
#undef CONV_DW_ROWS

/* The dW rows of nk (1 or 2) kernel rows += the image's terms that meet its nonzero box
   (in the coordinates of img, the window corner at the tile's first kernel row); two
   rows only with AVX-512VL (the caller checks the CPU). */
static void dw_row_tile(float *dw, int64_t ldw, const float *img, int64_t ldx,
                        const cnn_conv2d_shape *s, const float *dy, const float *dy_end,
                        int64_t kw, int64_t nk, const int64_t *box)
{
    /* -> dw rows += the image's terms */
    if (nk == 2)
        dw_row_tile_two(dw, ldw, img, ldx, s, dy, dy_end, kw, box);
    else
        dw_row_tile_one(dw, ldw, img, ldx, s, dy, dy_end, kw, box);
}
#endif

/* Compile-time tile sizes for the bodies above. */
#define CONV_DW_CASE(F, R, NV) \
    case R: F(R, NV, dw, ldw, img, koff, s, g, dy, nvalid); break;
#define CONV_DW_SWITCH(F, NV) \
    switch (mrj) { CONV_DW_CASE(F, 1, NV) CONV_DW_CASE(F, 2, NV) CONV_DW_CASE(F, 3, NV) \
                   CONV_DW_CASE(F, 4, NV) CONV_DW_CASE(F, 5, NV) CONV_DW_CASE(F, 6, NV) \
                   CONV_DW_CASE(F, 7, NV) default: F(8, NV, dw, ldw, img, koff, s, g, dy, \
                                                     nvalid); break; }
/* One family's fwd_tile and dw_tile: the tile bodies at their compile-time sizes. */
#define CONV_FAMILY(ATTR, FWD, DW, NAME)                                                   \
    ATTR static void fwd_tile_##NAME(float *out, const float *const *a, int64_t kh,       \
                                     int64_t span, int64_t ldx, const float *w,           \
                                     int64_t ldw, int nv)                                 \
    {                                                                                      \
        /* -> out (mr, 16) */                                                              \
        if (nv == 2)                                                                       \
            FWD(CONV_MR2, 2, out, a, kh, span, ldx, w, ldw);                               \
        else                                                                               \
            FWD(CONV_MR1, 1, out, a, kh, span, ldx, w, ldw);                               \
    }                                                                                      \
    ATTR static void dw_tile_##NAME(float *dw, int64_t ldw, const float *img, int64_t koff, \
                                    const cnn_conv2d_shape *s, const conv_geom *g,         \
                                    const float *dy, int64_t nvalid, int mrj)              \
    {                                                                                      \
        /* mrj (<= g->mr) rows of dw += this image's terms */                             \
        if (g->nv == 2) {                                                                  \
            CONV_DW_SWITCH(DW, 2)                                                          \
        } else {                                                                           \
            CONV_DW_SWITCH(DW, 1)                                                          \
        }                                                                                  \
    }

CONV_FAMILY(, fwd_tile_generic, dw_tile_generic, portable)
#ifdef CNN_AVX2_BUILD
CONV_FAMILY(__attribute__((target("avx2,fma"))), fwd_tile_avx2, dw_tile_avx2, x86)
#endif

static void fwd_tile(float *out, const float *const *a, int64_t kh, int64_t span,
                     int64_t ldx, const float *w, int64_t ldw, int nv, int avx2)
{
    /* -> out (mr, 16) with the selected family */
#ifdef CNN_AVX2_BUILD
    if (avx2) {
        fwd_tile_x86(out, a, kh, span, ldx, w, ldw, nv);
        return;
    }
#endif
    (void)avx2;
    fwd_tile_portable(out, a, kh, span, ldx, w, ldw, nv);
}

static void dw_tile(float *dw, int64_t ldw, const float *img, int64_t koff,
                    const cnn_conv2d_shape *s, const conv_geom *g, const float *dy,
                    int64_t nvalid, int mrj, int avx2)
{
    /* mrj rows of dw += this image's terms, with the selected family */
#ifdef CNN_AVX2_BUILD
    if (avx2) {
        dw_tile_x86(dw, ldw, img, koff, s, g, dy, nvalid, mrj);
        return;
    }
#endif
    (void)avx2;
    dw_tile_portable(dw, ldw, img, koff, s, g, dy, nvalid, mrj);
}

/* Most floats of the period of conv_bias_grad's vector sums. */
enum { CONV_DB_PERIOD_MAX = 64 };

#ifdef CNN_AVX2_BUILD
/* acc (8 NV) += the sum of `blocks` blocks of 8 NV floats from dY, the blocks in order,
   in registers (a plain loop kept the sums in memory). */
CONV_AVX2 void block_sums_body(const int NV, float *acc, const float *dY, int64_t blocks)
{
    /* -> acc */
    __m256 a[CONV_DB_PERIOD_MAX / 8];
    CNN_UNROLL
    for (int v = 0; v < NV; ++v)
        a[v] = _mm256_loadu_ps(acc + 8 * v);
    for (int64_t b = 0; b < blocks; ++b, dY += 8 * NV)
        CNN_UNROLL
        for (int v = 0; v < NV; ++v)
            a[v] = _mm256_add_ps(a[v], _mm256_loadu_ps(dY + 8 * v));
    CNN_UNROLL
    for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(acc + 8 * v, a[v]);
}

#define CONV_DB_CASE(NV) case NV: block_sums_body(NV, acc, dY, blocks); break;

/* block_sums_body for nv (1..8) vectors a block. */
__attribute__((target("avx2,fma")))
static void block_sums_avx2(float *acc, const float *dY, int64_t blocks, int64_t nv)
{
    /* -> acc */
    switch (nv) {
    CONV_DB_CASE(1) CONV_DB_CASE(2) CONV_DB_CASE(3) CONV_DB_CASE(4)
    CONV_DB_CASE(5) CONV_DB_CASE(6) CONV_DB_CASE(7) default: CONV_DB_CASE(8)
    }
}
#endif

/* db (O,) = column sums of dY (M, O), read as a flat array in blocks of L = lcm(O, 8)
   floats (whole vectors, O's columns at fixed lanes) when L <= 64: lane l of the block
   sums collect column l mod O, added up in lane order at the end.  One fixed order,
   whatever the threads. */
static void conv_bias_grad(float *db, const float *dY, int64_t M, int64_t O)
{
    /* -> db */
    int64_t L = O;
    while (L % 8)
        L += O;
    if (L > CONV_DB_PERIOD_MAX) {
        cnn_bias_backward(db, dY, M, O);
        return;
    }
    float acc[CONV_DB_PERIOD_MAX] = {0.0f};
    const int64_t n = M * O, blocks = n / L;
#ifdef CNN_AVX2_BUILD
    if (cnn_use_avx2_build())
        block_sums_avx2(acc, dY, blocks, L / 8);
    else
#endif
        for (int64_t b = 0; b < blocks; ++b)
            for (int64_t l0 = 0; l0 < L; l0 += 8)
                for (int v = 0; v < 8; ++v)
                    acc[l0 + v] += dY[b * L + l0 + v];
    for (int64_t l = 0; l < n - blocks * L; ++l)
        acc[l] += dY[blocks * L + l];
    for (int64_t o = 0; o < O; ++o)
        db[o] = 0.0f;
    for (int64_t l = 0; l < L; ++l)
        db[l % O] += acc[l];
}

/* Everything a pass needs, shared by its threads. */
typedef struct conv_ctx {
    const cnn_conv2d_shape *s;
    conv_geom g;
    const float *X, *dY;
    float *Y, *dX;
    const float *wpk;     /* (K, o_pad) */
    float *wt;            /* (kernel_h, out_c, span_pad) */
    float *dwp;           /* (K, o_pad) */
    float *bias_pad;      /* (o_pad + 16): the bias, then zeros */
    cnn_activation act;
    float alpha;
    float *images;        /* n_threads padded images */
    int avx2;
    int row_tiles;        /* forward tiles along output rows (fwd_row_tile) */
    int dw_rows;          /* kernel rows per dW tile along output rows (dw_row_tile):
                             2 with AVX-512VL's registers, 1 with AVX2's; 0: none */
    int avx512;           /* the AVX-512 family runs on a CPU with AVX-512VL, so the
                             kernels built for its 32 registers may run too */
    int sparse_dy;        /* the backward passes take dY's nonzero entries only */
    int64_t *corner;      /* (out_h out_w): each output pixel's window corner */
    uint64_t *masks;      /* (batch, out_h out_w): dY's nonzero channels */
} conv_ctx;

/* Bias and activation of a forward tile (mr pixels from pixel q of image n, channels
   o0 ..) into Y. */
static void store_tile(const conv_ctx *x, float *tile, int64_t n, int64_t q, int64_t mr,
                       int64_t o0)
{
    /* tile (mr, 16) -> Y */
    const cnn_conv2d_shape *s = x->s;
    const int64_t O = s->out_c, no = min64(8 * x->g.nv, O - o0);
    /* bias, then the activation, over the tile's pixels at once (what the GEMM epilogue
       does per row): in Y itself when one tile holds all channels (Y's rows then follow
       each other), else in the tile */
    const float *bias = x->bias_pad + o0;
    float *y = x->Y + (n * s->out_h * s->out_w + q) * O + o0;
#ifdef CNN_AVX2_BUILD
    if (no == O && x->avx2 && (x->act == CNN_ACT_RELU || x->act == CNN_ACT_IDENTITY)) {
        /* the image's later pixels are written after this tile, by this thread */
        tile_epilogue_avx2(y, tile, bias, mr, O, (s->out_h * s->out_w - q) * O,
                           x->act == CNN_ACT_RELU);
        return;
    }
#endif
    if (no == O) {
        for (int64_t i = 0; i < mr; ++i)
            for (int64_t v = 0; v < O; ++v)
                y[i * O + v] = tile[i * CONV_NR + v] + bias[v];
        cnn_activate_in_place(y, mr * O, x->act, x->alpha);
        return;
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int v = 0; v < CONV_NR; ++v)
            tile[i * CONV_NR + v] += bias[v];
    cnn_activate_in_place(tile, mr * CONV_NR, x->act, x->alpha);
    for (int64_t i = 0; i < mr; ++i, y += O)
        for (int64_t v = 0; v < no; ++v)
            y[v] = tile[i * CONV_NR + v];
}

/* Forward pass over images n0 .. n1-1 (slot: this thread's padded image). */
static void forward_images(const conv_ctx *x, int64_t n0, int64_t n1, float *slot)
{
    /* Y images [n0, n1) */
    const cnn_conv2d_shape *s = x->s;
    const conv_geom *g = &x->g;
    const int64_t npix = s->out_h * s->out_w, O = s->out_c;
    float tile[CONV_MR_MAX * CONV_NR];
    for (int64_t n = n0; n < n1; ++n) {
        const float *img = image_of(x->X, s, g, n, slot);
#ifdef CNN_AVX2_BUILD
        if (x->row_tiles) {
            /* tiles along each output row, over the kernel rows that meet the image's
               nonzero box (none for a tile whose windows miss its columns) */
            const int64_t kw = s->kernel_w;
            int64_t box[4];
            nonzero_box(img, g->Hp, g->Wp, g->ldx, box);
            for (int64_t oy = 0; oy < s->out_h; ++oy) {
                const int64_t k0 = max64(0, box[0] - oy), k1 = min64(s->kernel_h, box[1] - oy);
                for (int64_t ox0 = 0; ox0 < s->out_w; ox0 += CONV_MR1) {
                    const int64_t mr = min64(CONV_MR1, s->out_w - ox0);
                    if (k0 < k1 && ox0 < box[3] && ox0 + mr + kw - 1 > box[2])
                        fwd_row_tile(tile, img + (oy + k0) * g->ldx + ox0, k1 - k0, kw,
                                     g->ldx, x->wpk + k0 * kw * g->o_pad, g->o_pad, mr);
                    else
                        memset(tile, 0, (size_t)(mr * CONV_NR) * sizeof(float));
                    store_tile(x, tile, n, oy * s->out_w + ox0, mr, 0);
                }
            }
            continue;
        }
#endif
        int64_t oy0 = 0, ox0 = 0;   /* the position of pixel q0 */
        for (int64_t q0 = 0; q0 < npix; q0 += g->mr) {
            const int64_t mr = min64(g->mr, npix - q0);
            const float *a[CONV_MR_MAX];
            for (int64_t i = 0, oy = oy0, ox = ox0; i < g->mr; ++i) {
                a[i] = img + oy * s->stride * g->ldx + ox * s->stride * s->in_c;
                if (i + 1 < mr && ++ox == s->out_w) {   /* a short tile repeats its last */
                    ox = 0;
                    ++oy;
                }
            }
            ox0 += g->mr;
            while (ox0 >= s->out_w && oy0 < s->out_h) {
                ox0 -= s->out_w;
                ++oy0;
            }
            for (int64_t o0 = 0; o0 < O; o0 += 8 * g->nv) {
                fwd_tile(tile, a, s->kernel_h, g->span, g->ldx, x->wpk + o0, g->o_pad, g->nv,
                         x->avx2);
                store_tile(x, tile, n, q0, mr, o0);
            }
        }
    }
}

/* dW tiles t0 .. t1-1 (kernel row, block of dW rows, block of channels) over every image. */
static void weight_tiles(const conv_ctx *x, int64_t t0, int64_t t1, float *slot)
{
    /* dwp rows of tiles [t0, t1) */
    const cnn_conv2d_shape *s = x->s;
    const conv_geom *g = &x->g;
#ifdef CNN_AVX2_BUILD
    if (x->dw_rows) {
        /* tile t: kernel rows R t .. R t + R - 1 */
        const int64_t kw = s->kernel_w, npix = s->out_h * s->out_w, R = x->dw_rows;
        for (int64_t k = R * t0 * kw; k < min64(R * t1, s->kernel_h) * kw; ++k)
            memset(x->dwp + k * g->o_pad, 0, 8 * sizeof(float));
        for (int64_t n = 0; n < s->batch; ++n) {
            const float *img = image_of(x->X, s, g, n, slot);
            const float *dy = x->dY + n * npix * s->out_c;
            int64_t box[4];
            nonzero_box(img, g->Hp, g->Wp, g->ldx, box);
            for (int64_t t = t0; t < t1 && box[0] < box[1]; ++t) {
                /* the box seen from the tile's first kernel row */
                const int64_t tbox[4] = { box[0] - R * t, box[1] - R * t, box[2], box[3] };
                dw_row_tile(x->dwp + R * t * kw * g->o_pad, g->o_pad, img + R * t * g->ldx,
                            g->ldx, s, dy, dy + (npix - 1) * s->out_c, kw,
                            min64(R, s->kernel_h - R * t), tbox);
            }
        }
        return;
    }
#endif
    const int64_t nj = (g->span + g->mr - 1) / g->mr, no = (s->out_c + 8 * g->nv - 1) / (8 * g->nv);
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t ky = t / (nj * no), j0 = (t / no) % nj * g->mr, o0 = t % no * 8 * g->nv;
        float *dw = x->dwp + (ky * g->span + j0) * g->o_pad + o0;
        for (int64_t jj = 0; jj < min64(g->mr, g->span - j0); ++jj)
            memset(dw + jj * g->o_pad, 0, 8 * (size_t)g->nv * sizeof(float));
    }
    for (int64_t n = 0; n < s->batch; ++n) {
        const float *img = image_of(x->X, s, g, n, slot);
        const float *dy = x->dY + n * s->out_h * s->out_w * s->out_c;
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t ky = t / (nj * no), j0 = (t / no) % nj * g->mr, o0 = t % no * 8 * g->nv;
            dw_tile(x->dwp + (ky * g->span + j0) * g->o_pad + o0, g->o_pad, img,
                    ky * g->ldx + j0, s, g, dy + o0, min64(8 * g->nv, s->out_c - o0),
                    (int)min64(g->mr, g->span - j0), x->avx2);
        }
    }
}

#ifdef CNN_AVX2_BUILD
/* The masks of dY's nonzero channels for images n0 .. n1-1. */
static void mask_images(const conv_ctx *x, int64_t n0, int64_t n1, float *slot)
{
    /* -> masks of images [n0, n1) */
    (void)slot;
    const int64_t npix = x->s->out_h * x->s->out_w, O = x->s->out_c;
    if (x->avx512)
        dy_masks_avx512(x->masks + n0 * npix, x->dY + n0 * npix * O, (n1 - n0) * npix, O);
    else
        dy_masks_avx2(x->masks + n0 * npix, x->dY + n0 * npix * O, (n1 - n0) * npix, O);
}

/* Sparse dW of channels o0 .. o1-1 over every image in order, transposed: channel o's
   kernel rows at dwp + o K. */
static void weight_channels(const conv_ctx *x, int64_t o0, int64_t o1, float *slot)
{
    /* dwp channels [o0, o1) */
    const cnn_conv2d_shape *s = x->s;
    const conv_geom *g = &x->g;
    const int64_t npix = s->out_h * s->out_w, O = s->out_c;
    const int64_t image = s->in_h * s->in_w * s->in_c;
    memset(x->dwp + o0 * g->K, 0, (size_t)((o1 - o0) * g->K) * sizeof(float));
    for (int64_t n = 0; n < s->batch; ++n) {
        const float *img = image_of(x->X, s, g, n, slot);
        int64_t *list = (int64_t *)(void *)(slot + g->list);
        for (int64_t o = o0; o < o1; ++o) {
            const uint64_t *m = x->masks + n * npix;
            const float *dyo = x->dY + n * npix * O + o;
            if (x->avx512)
                dw_sparse_avx512(x->dwp + o * g->K, s->kernel_h, g->span, img, g->ldx,
                                 x->corner, list, pixels_with_channel(list, m, npix, o),
                                 dyo, O);
            else
                dw_sparse_avx2(x->dwp + o * g->K, s->kernel_h, g->span, img, g->ldx,
                               x->corner, list, pixels_with_channel_scalar(list, m, npix, o),
                               dyo, O, g->in_place ? x->X + s->batch * image : slot + g->list);
        }
    }
}

#endif

/* dX of images n0 .. n1-1: each pixel's dY times the weights added to its window, in
   the thread's slot (whole-vector stores may run past a window row, adding zeros), then
   copied out. */
static void data_images(const conv_ctx *x, int64_t n0, int64_t n1, float *slot)
{
    /* dX images [n0, n1) */
    const cnn_conv2d_shape *s = x->s;
    const conv_geom *g = &x->g;
    const int64_t C = s->in_c, image = s->in_h * s->in_w * C;
    for (int64_t n = n0; n < n1; ++n) {
        float *t = slot;
        memset(t, 0, (size_t)g->image * sizeof(float));
        const float *dy = x->dY + n * s->out_h * s->out_w * s->out_c;
#ifdef CNN_AVX2_BUILD
        /* pixel by pixel, over the channels whose dY is nonzero */
        for (int64_t p = 0; x->sparse_dy && p < s->out_h * s->out_w; ++p) {
            const uint64_t bits = x->masks[n * s->out_h * s->out_w + p];
            if (bits && x->avx512)
                dx_sparse_avx512(t + x->corner[p], s->kernel_h, g->ldx, x->wt, g->span,
                                 g->span_pad, dy + p * s->out_c, bits, s->out_c);
            else if (bits)
                dx_sparse_avx2(t + x->corner[p], s->kernel_h, g->ldx, x->wt, g->span,
                               g->span_pad, dy + p * s->out_c, bits, s->out_c);
        }
#endif
        for (int64_t oy = 0; oy < s->out_h && !x->sparse_dy; ++oy) {
#ifdef CNN_AVX2_BUILD
            /* rows of output pixels together (four with AVX-512VL's registers), pixel by
               pixel: their window rows lie image rows apart, so (unless an image row is
               shorter than 32 floats) a pixel's additions do not read what the one
               before just stored, which would wait for those stores */
            const int64_t np = !x->avx2 || g->span > 32 ? 1 : x->avx512 && oy + 3 < s->out_h ? 4
                             : oy + 1 < s->out_h ? 2 : 1;
            if (np > 1) {
                const int64_t row = s->out_w * s->out_c;   /* dY floats per output row */
                for (int64_t ox = 0; ox < s->out_w; ++ox, dy += s->out_c) {
                    float *corner = t + oy * s->stride * g->ldx + ox * s->stride * C;
                    for (int64_t ky = 0; ky < s->kernel_h; ++ky) {
                        const float *wt = x->wt + ky * s->out_c * g->span_pad;
                        if (np == 4)
                            dx_rows4_avx512vl(corner + ky * g->ldx, s->stride * g->ldx, dy,
                                              row, wt, s->out_c, g->span, g->span_pad);
                        else
                            dx_rows2_avx2(corner + ky * g->ldx, s->stride * g->ldx, dy, row,
                                          wt, s->out_c, g->span, g->span_pad);
                    }
                }
                dy += (np - 1) * row;
                oy += np - 1;
                continue;
            }
#endif
            for (int64_t ox = 0; ox < s->out_w; ++ox, dy += s->out_c) {
                float *corner = t + oy * s->stride * g->ldx + ox * s->stride * C;
                for (int64_t ky = 0; ky < s->kernel_h; ++ky) {
                    const float *wt = x->wt + ky * s->out_c * g->span_pad;
#ifdef CNN_AVX2_BUILD
                    if (x->avx2) {
                        dx_row_avx2(corner + ky * g->ldx, dy, wt, s->out_c, g->span, g->span_pad);
                        continue;
                    }
#endif
                    dx_row_generic(corner + ky * g->ldx, dy, wt, s->out_c, g->span, g->span_pad);
                }
            }
        }
        if (g->in_place) {
            /* slot rows are image rows: the windows' rows, then zeros */
            memcpy(x->dX + n * image, t, (size_t)(g->Hp * g->ldx) * sizeof(float));
            memset(x->dX + n * image + g->Hp * g->ldx, 0,
                   (size_t)(image - g->Hp * g->ldx) * sizeof(float));
            continue;
        }
        /* the part of the padded gradient that lies on the image */
        const int64_t mid = max64(0, min64(s->in_w, g->Wp - s->pad_left)) * C;
        for (int64_t iy = 0; iy < s->in_h; ++iy) {
            float *d = x->dX + n * image + iy * s->in_w * C;
            const int64_t y = iy + s->pad_top;
            if (y < g->Hp)
                memcpy(d, t + y * g->ldx + s->pad_left * C, (size_t)mid * sizeof(float));
            memset(d + (y < g->Hp ? mid : 0), 0,
                   (size_t)(s->in_w * C - (y < g->Hp ? mid : 0)) * sizeof(float));
        }
    }
}

typedef void (*conv_range)(const conv_ctx *x, int64_t u0, int64_t u1, float *slot);

/* One of `parts` equal ranges of units of a threaded pass. */
typedef struct conv_job {
    const conv_ctx *x;
    conv_range fn;
    int64_t units, parts;
} conv_job;

static void conv_task(void *arg, int64_t part, int thread)
{
    /* fn over range `part`, with the running thread's slot */
    const conv_job *j = (const conv_job *)arg;
    j->fn(j->x, j->units * part / j->parts, j->units * (part + 1) / j->parts,
          j->x->images + thread * j->x->g.image);
}

/* fn over units [0, units) in equal ranges claimed by n_threads threads, each range
   with the running thread's slot. */
static void run_split(const conv_ctx *x, conv_range fn, int64_t units, int n_threads)
{
    /* -> fn called over a partition of [0, units) */
    const int T = (int)min64(n_threads, units);
    if (T > 1) {
        /* more parts than threads, claimed one at a time: a descheduled thread holds
           up only the part it claimed */
        const int64_t parts = min64(units, 4 * (int64_t)T);
        conv_job j = { x, fn, units, parts };
        cnn_parallel_for(T, parts, conv_task, &j);
        return;
    }
    fn(x, 0, units, x->images);
}

/* Threads worth waking for `macs` multiply-adds. */
static int pass_threads(int n_threads, double macs)
{
    /* (threads, macs) -> threads */
    return (int)max64(1, min64(n_threads, 1 + (int64_t)(macs / CONV_PARALLEL_MIN_MACS)));
}

#ifdef CNN_AVX2_BUILD
/* Whether the backward passes should take dY's nonzero entries only (the masks then
   hold them): with the AVX2 or AVX-512 family, for the kernel sizes the sparse tiles
   take, when at most half of dY is nonzero.  The same answer for any thread count. */
__attribute__((target("popcnt")))
static int use_sparse_dy(conv_ctx *x, int n_threads)
{
    /* -> 0 / 1, with x->corner and x->masks filled when 1 */
    const cnn_conv2d_shape *s = x->s;
    if (!x->avx2 || s->kernel_h > CONV_SPARSE_KH || x->g.span < CONV_SPARSE_SPAN_MIN ||
        s->out_c > CONV_SPARSE_O)
        return 0;
    const int64_t npix = s->out_h * s->out_w;
    run_split(x, mask_images, s->batch,
              pass_threads(n_threads, (double)s->batch * npix * s->out_c));
    int64_t nonzero = 0;
    for (int64_t i = 0; i < s->batch * npix; ++i)
        nonzero += __builtin_popcountll(x->masks[i]);
    if (2 * nonzero > s->batch * npix * s->out_c)
        return 0;
    for (int64_t p = 0; p < npix; ++p)
        x->corner[p] = (p / s->out_w * x->g.ldx + p % s->out_w * s->in_c) * s->stride;
    return 1;
}
#endif

static conv_ctx make_ctx(const cnn_conv2d_shape *s, float *work)
{
    /* shape, workspace -> context with the workspace carved */
    conv_ctx x;
    memset(&x, 0, sizeof x);
    x.s = s;
    x.g = make_geom(s);
    x.wpk = work;
    x.dwp = work + cnn_round_up_floats(x.g.K * x.g.o_pad);
    x.wt = x.dwp + cnn_round_up_floats(x.g.K * x.g.o_pad);
    x.images = work + shared_floats(s, &x.g);
    x.bias_pad = x.wt + cnn_round_up_floats(s->kernel_h * s->out_c * x.g.span_pad);
    x.corner = (int64_t *)(void *)(x.bias_pad + cnn_round_up_floats(x.g.o_pad + CONV_NR));
    x.masks = (uint64_t *)(void *)(x.corner +
                                   cnn_round_up_floats(2 * s->out_h * s->out_w) / 2);
#ifdef CNN_AVX2_BUILD
    x.avx2 = cnn_use_avx2_build();
    x.row_tiles = x.avx2 && s->in_c == 1 && s->stride == 1 && x.g.nv == 1 &&
                  (s->kernel_w == 3 || s->kernel_w == 5);
    __builtin_cpu_init();
    x.avx512 = cnn_get_kernel() == CNN_KERNEL_AVX512 && __builtin_cpu_supports("avx512vl");
    x.dw_rows = x.row_tiles ? (x.avx512 ? 2 : 1) : 0;
#endif
    return x;
}

int cnn_conv2d_forward(float *Y, const float *X, const float *W, const float *b,
                       const cnn_conv2d_shape *s, cnn_activation act, float alpha,
                       float *work, int n_threads)
{
    /* Y (batch, out_h, out_w, out_c) = act(conv(X, W) + b) */
    if (cnn_conv2d_shape_check(s) != CNN_OK || n_threads < 1 ||
        act < CNN_ACT_IDENTITY || act > CNN_ACT_TANH)
        return CNN_ERR_ARG;
    if (s->batch == 0)
        return CNN_OK;
    if (!Y || !X || !W || !b || !work)
        return CNN_ERR_ARG;
    conv_ctx x = make_ctx(s, work);
    x.act = act;
    x.alpha = alpha;
    x.X = X;
    x.Y = Y;
    /* weights with out_c padded to whole vectors by zeros, and the bias likewise */
    float *wpk = work;
    for (int64_t k = 0; k < x.g.K; ++k) {
        memcpy(wpk + k * x.g.o_pad, W + k * s->out_c, (size_t)s->out_c * sizeof(float));
        memset(wpk + k * x.g.o_pad + s->out_c, 0,
               (size_t)(x.g.o_pad - s->out_c) * sizeof(float));
    }
    memcpy(x.bias_pad, b, (size_t)s->out_c * sizeof(float));
    memset(x.bias_pad + s->out_c, 0, (size_t)(x.g.o_pad + CONV_NR - s->out_c) * sizeof(float));
    const double macs = (double)s->batch * s->out_h * s->out_w * x.g.K * s->out_c;
    run_split(&x, forward_images, s->batch, pass_threads(n_threads, macs));
    return CNN_OK;
}

int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                        const float *W, const cnn_conv2d_shape *s, float *work, int n_threads)
{
    /* dX (batch, in_h, in_w, in_c), dW (kernel_h, kernel_w, in_c, out_c), db (out_c,) */
    if (cnn_conv2d_shape_check(s) != CNN_OK || n_threads < 1 || !dW || !db)
        return CNN_ERR_ARG;
    const int64_t K = s->kernel_h * s->kernel_w * s->in_c, O = s->out_c;
    if (s->batch == 0) {
        memset(dW, 0, (size_t)(K * O) * sizeof(float));
        memset(db, 0, (size_t)O * sizeof(float));
        return CNN_OK;
    }
    if (!dY || !X || !W || !work)
        return CNN_ERR_ARG;
    conv_ctx x = make_ctx(s, work);
    x.X = X;
    x.dY = dY;
    x.dX = dX;
    conv_bias_grad(db, dY, s->batch * s->out_h * s->out_w, O);
    const double macs = (double)s->batch * s->out_h * s->out_w * K * O;

    const conv_geom *g = &x.g;
#ifdef CNN_AVX2_BUILD
    x.sparse_dy = use_sparse_dy(&x, n_threads);
    if (x.sparse_dy) {
        /* dW: channels per thread, every image in order; then transposed */
        run_split(&x, weight_channels, O, pass_threads(n_threads, macs / 4));
        for (int64_t k = 0; k < K; ++k)
            for (int64_t o = 0; o < O; ++o)
                dW[k * O + o] = x.dwp[o * K + k];
    }
#endif
    /* dW: tiles of (kernel row, dW rows, channels) per thread, every image in order */
    const int64_t n_tiles = x.dw_rows ? (s->kernel_h + x.dw_rows - 1) / x.dw_rows :
                            s->kernel_h * ((g->span + g->mr - 1) / g->mr) *
                            ((O + 8 * g->nv - 1) / (8 * g->nv));
    if (!x.sparse_dy) {
        run_split(&x, weight_tiles, n_tiles, pass_threads(n_threads, macs));
        for (int64_t k = 0; k < K; ++k)
            memcpy(dW + k * O, x.dwp + k * g->o_pad, (size_t)O * sizeof(float));
    }
    if (!dX)
        return CNN_OK;

    /* dX: whole images per thread; the weights transposed per kernel row */
    float *wt = x.wt;
    for (int64_t ky = 0; ky < s->kernel_h; ++ky)
        for (int64_t o = 0; o < O; ++o) {
            float *row = wt + (ky * O + o) * g->span_pad;
            for (int64_t j = 0; j < g->span; ++j)
                row[j] = W[(ky * g->span + j) * O + o];
            for (int64_t j = g->span; j < g->span_pad; ++j)
                row[j] = 0.0f;
        }
    run_split(&x, data_images, s->batch, pass_threads(n_threads, macs));
    return CNN_OK;
}
