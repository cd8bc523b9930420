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
#ifdef _OPENMP
#include <omp.h>
#endif

enum { CONV_CHUNK_FLOATS = 1 << 15 };
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

/* ---- the fast path: patches and the packed GEMM --------------------------------- */

/* How a pass over a shape is cut: R output rows per chunk, and the workspace slots. */
typedef struct conv_plan {
    int64_t K;             /* kernel_h * kernel_w * in_c: one patch */
    int64_t rows;          /* batch * out_h output rows */
    int64_t R;             /* output rows per chunk */
    int64_t patch_floats;  /* one chunk's patch matrix (R out_w, K), rounded up */
    int64_t gemm1;         /* GEMM workspace of a chunk on one thread */
    int64_t gemmT;         /* GEMM workspace of a chunk (or of dW) on n_threads */
    int direct;            /* 1x1 kernel, stride 1, no padding: X is its own patch matrix */
} conv_plan;

static int64_t chunk_gemm_floats(const cnn_conv2d_shape *s, int64_t K, int64_t m, int threads)
{
    /* the largest workspace of Y = P W, dP = dY W^T and dW = P^T dY over m positions */
    const int64_t a = cnn_sgemm_workspace_floats(m, s->out_c, K, threads);
    const int64_t b = cnn_sgemm_workspace_floats(m, K, s->out_c, threads);
    const int64_t c = cnn_sgemm_workspace_floats(K, s->out_c, m, threads);
    return cnn_round_up_floats(max64(a, max64(b, c)));
}

static conv_plan make_plan(const cnn_conv2d_shape *s, int n_threads)
{
    /* (shape, threads) -> plan; R depends on the shape alone */
    conv_plan p;
    p.K = s->kernel_h * s->kernel_w * s->in_c;
    p.rows = s->batch * s->out_h;
    p.R = max64(1, min64(CONV_CHUNK_FLOATS / (s->out_w * p.K), max64(p.rows, 1)));
    p.direct = s->kernel_h == 1 && s->kernel_w == 1 && s->stride == 1 &&
               s->pad_top == 0 && s->pad_left == 0;
    p.patch_floats = cnn_round_up_floats(p.R * s->out_w * p.K);
    p.gemm1 = chunk_gemm_floats(s, p.K, p.R * s->out_w, 1);
    p.gemmT = chunk_gemm_floats(s, p.K, p.R * s->out_w, n_threads);
    return p;
}

int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s, int n_threads)
{
    /* (shape, threads) -> floats: n_threads one-thread slots, or one n_threads slot */
    if (cnn_conv2d_shape_check(s) != CNN_OK || n_threads < 1)
        return -1;
    const conv_plan p = make_plan(s, n_threads);
    return max64(n_threads * (p.patch_floats + p.gemm1), p.patch_floats + p.gemmT);
}

/* P (rows g0 .. g1-1 times out_w, K) = the patches of those output rows. */
static void im2col(float *P, const float *X, const cnn_conv2d_shape *s, int64_t g0, int64_t g1)
{
    /* X (batch, in_h, in_w, in_c) -> P ((g1 - g0) out_w, kernel_h kernel_w in_c) */
    const int64_t C = s->in_c, KW = s->kernel_w * C;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t n = g / s->out_h, oy = g % s->out_h;
        const float *xn = X + n * s->in_h * s->in_w * C;
        for (int64_t ox = 0; ox < s->out_w; ++ox) {
            const int64_t ix0 = ox * s->stride - s->pad_left;
            const int64_t lo = ix0 < 0 ? -ix0 : 0;                   /* first kx inside */
            const int64_t hi = min64(s->kernel_w, s->in_w - ix0);    /* past the last */
            for (int64_t ky = 0; ky < s->kernel_h; ++ky, P += KW) {
                const int64_t iy = oy * s->stride - s->pad_top + ky;
                if (iy < 0 || iy >= s->in_h) {
                    for (int64_t j = 0; j < KW; ++j)
                        P[j] = 0.0f;
                    continue;
                }
                const float *x = xn + (iy * s->in_w + ix0 + lo) * C;
                for (int64_t j = 0; j < lo * C; ++j)
                    P[j] = 0.0f;
                for (int64_t j = 0; j < (hi - lo) * C; ++j)
                    P[lo * C + j] = x[j];
                for (int64_t j = hi * C; j < KW; ++j)
                    P[j] = 0.0f;
            }
        }
    }
}

/* dX += the patch gradients dP of output rows g0 .. g1-1, scattered back (col2im). */
static void col2im(float *dX, const float *dP, const cnn_conv2d_shape *s, int64_t g0, int64_t g1)
{
    /* dP ((g1 - g0) out_w, K) -> dX (batch, in_h, in_w, in_c), added */
    const int64_t C = s->in_c, KW = s->kernel_w * C;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t n = g / s->out_h, oy = g % s->out_h;
        float *xn = dX + n * s->in_h * s->in_w * C;
        for (int64_t ox = 0; ox < s->out_w; ++ox) {
            const int64_t ix0 = ox * s->stride - s->pad_left;
            const int64_t lo = ix0 < 0 ? -ix0 : 0;
            const int64_t hi = min64(s->kernel_w, s->in_w - ix0);
            for (int64_t ky = 0; ky < s->kernel_h; ++ky, dP += KW) {
                const int64_t iy = oy * s->stride - s->pad_top + ky;
                if (iy < 0 || iy >= s->in_h)
                    continue;
                float *x = xn + (iy * s->in_w + ix0 + lo) * C;
                for (int64_t j = 0; j < (hi - lo) * C; ++j)
                    x[j] += dP[lo * C + j];
            }
        }
    }
}

/* Threads for a pass of `macs` multiply-adds over `units` independent units. */
static int pass_threads(int n_threads, int64_t units, double macs)
{
    /* (threads, units, macs) -> threads */
    int64_t t = min64(n_threads, units);
    t = min64(t, 1 + (int64_t)(macs / CONV_PARALLEL_MIN_MACS));
    return (int)max64(t, 1);
}

/* One pass's operands, handed to each thread's range of units. */
typedef struct conv_call {
    float *out;                /* Y (forward) or dX (backward) */
    const float *in;           /* X (forward) or dY (backward) */
    const float *W;
    const cnn_epilogue *ep;    /* forward only */
    const cnn_conv2d_shape *s;
    const conv_plan *p;
} conv_call;

typedef int (*conv_range)(const conv_call *c, int64_t u0, int64_t u1, float *slot, int threads);

/* Chunks u0 .. u1-1 of Y = act(P W + b), P built in `slot` (GEMM on `threads`). */
static int forward_chunks(const conv_call *c, int64_t u0, int64_t u1, float *slot, int threads)
{
    /* rows [u0 R, u1 R) of Y, chunk by chunk */
    const cnn_conv2d_shape *s = c->s;
    const conv_plan *p = c->p;
    float *gemm_work = slot + p->patch_floats;
    const int64_t g1 = min64(p->rows, u1 * p->R);
    for (int64_t c0 = u0 * p->R; c0 < g1; c0 += p->R) {
        const int64_t c1 = min64(g1, c0 + p->R), m = (c1 - c0) * s->out_w;
        const float *P = c->in + c0 * s->out_w * p->K;
        if (!p->direct) {
            im2col(slot, c->in, s, c0, c1);
            P = slot;
        }
        const int status = cnn_sgemm_ex(c->out + c0 * s->out_w * s->out_c, P, c->W, m,
                                        s->out_c, p->K, s->out_c, p->K, s->out_c, CNN_NO_TRANS,
                                        CNN_NO_TRANS, 1.0f, 0.0f, c->ep, gemm_work, threads);
        if (status != CNN_OK)
            return status;
    }
    return CNN_OK;
}

/* fn over units [0, units): one contiguous range per thread with one-thread GEMMs in its
   own workspace slot, or (T == 1) all of them with the threads inside each GEMM. */
static int run_split(const conv_call *c, conv_range fn, int64_t units, int T, float *work,
                     int n_threads)
{
    /* -> the first failing status, or CNN_OK */
#ifdef _OPENMP
    if (T > 1) {
        int status = CNN_OK;
        const int64_t slot = c->p->patch_floats + c->p->gemm1;
#pragma omp parallel num_threads(T)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int st = fn(c, units * t / nt, units * (t + 1) / nt, work + t * slot, 1);
            if (st != CNN_OK) {
#pragma omp critical(cnn_conv_status)
                status = st;
            }
        }
        return status;
    }
#endif
    (void)T;
    return fn(c, 0, units, work, n_threads);
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
    const conv_plan p = make_plan(s, n_threads);
    cnn_epilogue ep = {0};
    ep.bias = b;
    ep.act = act;
    ep.grad_act = CNN_ACT_IDENTITY;
    ep.alpha = alpha;
    const conv_call c = { Y, X, W, &ep, s, &p };
    const int64_t n_chunks = (p.rows + p.R - 1) / p.R;
    const int T = pass_threads(n_threads, n_chunks, (double)p.rows * s->out_w * p.K * s->out_c);
    return run_split(&c, forward_chunks, n_chunks, T, work, n_threads);
}

/* dX of images n0 .. n1-1: zeroed, then every chunk's dP = dY W^T scattered in. */
static int backward_data(const conv_call *c, int64_t n0, int64_t n1, float *slot, int threads)
{
    /* images [n0, n1) of dX */
    const cnn_conv2d_shape *s = c->s;
    const conv_plan *p = c->p;
    float *dX = c->out;
    const float *dY = c->in, *W = c->W;
    const int64_t image = s->in_h * s->in_w * s->in_c;
    float *gemm_work = slot + p->patch_floats;
    if (!p->direct)
        memset(dX + n0 * image, 0, (size_t)((n1 - n0) * image) * sizeof(float));
    const int64_t g1 = n1 * s->out_h;
    for (int64_t c0 = n0 * s->out_h; c0 < g1; c0 += p->R) {
        const int64_t c1 = min64(g1, c0 + p->R), m = (c1 - c0) * s->out_w;
        float *dP = p->direct ? dX + c0 * s->out_w * p->K : slot;
        const int status = cnn_sgemm_ex(dP, dY + c0 * s->out_w * s->out_c, W, m, p->K,
                                        s->out_c, p->K, s->out_c, s->out_c, CNN_NO_TRANS,
                                        CNN_TRANS, 1.0f, 0.0f, NULL, gemm_work, threads);
        if (status != CNN_OK)
            return status;
        if (!p->direct)
            col2im(dX, dP, s, c0, c1);
    }
    return CNN_OK;
}

int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                        const float *W, const cnn_conv2d_shape *s, float *work, int n_threads)
{
    /* dX (batch, in_h, in_w, in_c), dW (kernel_h, kernel_w, in_c, out_c), db (out_c,) */
    if (cnn_conv2d_shape_check(s) != CNN_OK || n_threads < 1 || !dW || !db)
        return CNN_ERR_ARG;
    const int64_t K = s->kernel_h * s->kernel_w * s->in_c;
    if (s->batch == 0) {
        memset(dW, 0, (size_t)(K * s->out_c) * sizeof(float));
        memset(db, 0, (size_t)s->out_c * sizeof(float));
        return CNN_OK;
    }
    if (!dY || !X || !W || !work)
        return CNN_ERR_ARG;
    const conv_plan p = make_plan(s, n_threads);
    cnn_bias_backward(db, dY, p.rows * s->out_w, s->out_c);

    /* dW: the chunks in order, accumulated; the threads work inside each GEMM */
    for (int64_t c0 = 0; c0 < p.rows; c0 += p.R) {
        const int64_t c1 = min64(p.rows, c0 + p.R), m = (c1 - c0) * s->out_w;
        const float *P = X + c0 * s->out_w * K;
        if (!p.direct) {
            im2col(work, X, s, c0, c1);
            P = work;
        }
        const int status = cnn_sgemm_ex(dW, P, dY + c0 * s->out_w * s->out_c, K, s->out_c, m,
                                        s->out_c, K, s->out_c, CNN_TRANS, CNN_NO_TRANS, 1.0f,
                                        c0 == 0 ? 0.0f : 1.0f, NULL, work + p.patch_floats,
                                        n_threads);
        if (status != CNN_OK)
            return status;
    }
    if (!dX)
        return CNN_OK;

    /* dX: whole images per thread */
    const conv_call c = { dX, dY, W, NULL, s, &p };
    const int T = pass_threads(n_threads, s->batch, (double)p.rows * s->out_w * K * s->out_c);
    return run_split(&c, backward_data, s->batch, T, work, n_threads);
}
