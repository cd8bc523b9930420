/* cnn_gemm.c -- single-precision GEMM: the plain reference, the epilogue, the portable
   micro-kernel family, and the blocked, packed, threaded driver (GotoBLAS/BLIS loops)
   that runs whichever family cnn_get_kernel() selects. */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#include "cnn_gemm_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

void cnn_sgemm_ref(float *C, const float *A, const float *B,
                   int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                   cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)
{
    /* C = alpha op(A) op(B) + beta C ; op(A) (M, K), op(B) (K, N), C (M, N) */
    for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
            double acc = 0.0;
            for (int64_t p = 0; p < K; ++p) {
                float a = trans_a ? A[p * lda + i] : A[i * lda + p];
                float b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
                acc += (double)a * (double)b;
            }
            float c = alpha * (float)acc;
            C[i * ldc + j] = beta == 0.0f ? c : c + beta * C[i * ldc + j];
        }
    }
}

/* ---- epilogue ------------------------------------------------------------ */

/* Numerically stable logistic function of one value. */
CNN_INLINE float sigmoid1(float x)
{
    /* scalar -> scalar */
    if (x >= 0.0f)
        return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

void cnn_epilogue_row(float *c, const cnn_epilogue *ep, int64_t i, int64_t j0, int64_t n)
{
    /* c[0:n] <- act'(grad_of[i, j0:j0+n]) * act(c + bias[j0:j0+n]) ; c is (n,) */
    if (!ep || n <= 0)
        return;
    if (ep->bias) {
        const float *b = ep->bias + j0;
        for (int64_t j = 0; j < n; ++j)
            c[j] += b[j];
    }
    switch (ep->act) {
    case CNN_ACT_RELU:
        for (int64_t j = 0; j < n; ++j)
            c[j] = c[j] < 0.0f ? 0.0f : c[j];
        break;
    case CNN_ACT_LEAKY_RELU: {
        const float a = ep->alpha;
        for (int64_t j = 0; j < n; ++j)
            c[j] = c[j] > 0.0f ? c[j] : a * c[j];
        break;
    }
    case CNN_ACT_SIGMOID:
        for (int64_t j = 0; j < n; ++j)
            c[j] = sigmoid1(c[j]);
        break;
    case CNN_ACT_TANH:
        for (int64_t j = 0; j < n; ++j)
            c[j] = tanhf(c[j]);
        break;
    default:
        break;
    }
    if (ep->grad_of && ep->grad_act != CNN_ACT_IDENTITY) {
        const float *y = ep->grad_of + i * ep->ld_grad_of + j0;
        switch (ep->grad_act) {
        case CNN_ACT_RELU:
            for (int64_t j = 0; j < n; ++j)
                c[j] *= y[j] > 0.0f ? 1.0f : 0.0f;
            break;
        case CNN_ACT_LEAKY_RELU: {
            const float a = ep->alpha;
            for (int64_t j = 0; j < n; ++j)
                c[j] *= y[j] > 0.0f ? 1.0f : a;
            break;
        }
        case CNN_ACT_SIGMOID:
            for (int64_t j = 0; j < n; ++j)
                c[j] *= y[j] * (1.0f - y[j]);
            break;
        case CNN_ACT_TANH:
            for (int64_t j = 0; j < n; ++j)
                c[j] *= 1.0f - y[j] * y[j];
            break;
        default:
            break;
        }
    }
}

/* 1 if `ep` is usable for an (M, N) GEMM result (NULL is). */
static int epilogue_ok(const cnn_epilogue *ep, int64_t N)
{
    /* ep -> flag */
    if (!ep)
        return 1;
    if (ep->act < CNN_ACT_IDENTITY || ep->act > CNN_ACT_TANH)
        return 0;
    if (ep->grad_act < CNN_ACT_IDENTITY || ep->grad_act > CNN_ACT_TANH)
        return 0;
    if (ep->grad_act != CNN_ACT_IDENTITY && (!ep->grad_of || ep->ld_grad_of < N))
        return 0;
    return 1;
}

/* ---- portable family ------------------------------------------------------ */

enum { GEN_MR = 4, GEN_NR = 8 };

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa (kc, MRS), pb (kc, GEN_NR). */
CNN_INLINE void generic_tile(const int MRS, float *c, int64_t ldc,
                             const float *CNN_RESTRICT pa, const float *CNN_RESTRICT pb,
                             int64_t kc, int mr, int nr, float alpha, float beta)
{
    float acc[GEN_MR][GEN_NR];
    for (int i = 0; i < MRS; ++i)
        for (int j = 0; j < GEN_NR; ++j)
            acc[i][j] = 0.0f;
    for (int64_t k = 0; k < kc; ++k) {
        for (int i = 0; i < MRS; ++i) {
            const float a = pa[i];
            for (int j = 0; j < GEN_NR; ++j)
                acc[i][j] += a * pb[j];
        }
        pa += MRS;
        pb += GEN_NR;
    }
    for (int i = 0; i < mr; ++i) {
        float *ci = c + i * ldc;
        if (beta == 0.0f) {
            for (int j = 0; j < nr; ++j)
                ci[j] = alpha * acc[i][j];
        } else {
            for (int j = 0; j < nr; ++j)
                ci[j] = alpha * acc[i][j] + beta * ci[j];
        }
    }
}

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa (kc, mr_stride), pb (kc, nr_panel). */
static void kernel_generic(float *c, int64_t ldc, const float *pa, const float *pb,
                           int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                           float alpha, float beta)
{
    (void)nr_panel;
    switch (mr_stride) {
    case 1: generic_tile(1, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    case 2: generic_tile(2, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    case 3: generic_tile(3, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    default: generic_tile(4, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    }
}

void cnn_gemm_pack_generic(float *dst, const float *src, int64_t ld, int xmajor,
                           int64_t k0, int64_t kc, int64_t x0, int64_t nx, int width)
{
    /* dst (kc, width) = X(k0 + k, x0 + x), zero past nx */
    if (xmajor) {
        for (int64_t k = 0; k < kc; ++k)
            for (int64_t x = nx; x < width; ++x)
                dst[k * width + x] = 0.0f;
        for (int64_t x = 0; x < nx; ++x) {
            const float *s = src + (x0 + x) * ld + k0;
            for (int64_t k = 0; k < kc; ++k)
                dst[k * width + x] = s[k];
        }
    } else {
        const float *s = src + k0 * ld + x0;
        for (int64_t k = 0; k < kc; ++k, s += ld, dst += width) {
            for (int64_t x = 0; x < nx; ++x)
                dst[x] = s[x];
            for (int64_t x = nx; x < width; ++x)
                dst[x] = 0.0f;
        }
    }
}

static const cnn_gemm_family family_generic = {
    CNN_KERNEL_GENERIC, GEN_MR, GEN_NR, GEN_NR,
    256, 128, 2048,
    kernel_generic, cnn_gemm_pack_generic
};

const cnn_gemm_family *cnn_gemm_family_generic(void) { return &family_generic; }

const cnn_gemm_family *cnn_gemm_family_for(cnn_kernel kernel)
{
    /* kernel id -> family compiled into this build, or NULL */
    switch (kernel) {
    case CNN_KERNEL_GENERIC: return cnn_gemm_family_generic();
    case CNN_KERNEL_AVX2: return cnn_gemm_family_avx2();
    case CNN_KERNEL_AVX512: return cnn_gemm_family_avx512();
    case CNN_KERNEL_NEON: return cnn_gemm_family_neon();
    }
    return NULL;
}

/* ---- blocking plan --------------------------------------------------------- */

CNN_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
CNN_INLINE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
CNN_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Below this many multiply-adds a GEMM runs on one thread. */
#define CNN_GEMM_PARALLEL_MIN_FMAS 65536.0

/* How C is split into independent parts, one per thread: a tm x tn grid of blocks of
   ms rows and ns columns (the last row / column of blocks may be smaller). */
typedef struct gemm_grid {
    int tm, tn;
    int64_t ms, ns;
} gemm_grid;

/* Estimated cycles for one part of ms x ns x K: micro-tiles (with padding) at 32
   multiply-adds per cycle, plus packing its slices of op(A) and op(B); transposing
   packs cost about four times a straight copy. */
static double part_cost(int64_t ms, int64_t ns, int64_t K, int a_xmajor, int b_xmajor)
{
    /* (ms, ns, K) -> cycles */
    const int64_t n_tiles = ceil_div(ms, 14);
    const int64_t mrs = ceil_div(ms, n_tiles);
    const double rows = (double)n_tiles * (double)(mrs < 6 ? 6 : mrs);
    const double cols = (double)round_up(ns, 16);
    const double fma = rows * cols * (double)K / 32.0;
    const double pack = (double)ms * (double)K * (a_xmajor ? 0.25 : 0.06)
                      + (double)ns * (double)K * (b_xmajor ? 0.25 : 0.06);
    return fma + pack + 64.0 * (double)(n_tiles * ceil_div(ns, 32));
}

/* Split (M, N) over at most n_threads parts, never splitting K. */
static gemm_grid choose_grid(int64_t M, int64_t N, int64_t K, int n_threads,
                             cnn_trans trans_a, cnn_trans trans_b)
{
    /* (M, N, K, threads) -> grid */
    gemm_grid g = { 1, 1, M, N };
    if (n_threads <= 1 || M <= 0 || N <= 0 || K <= 0 ||
        (double)M * (double)N * (double)K < CNN_GEMM_PARALLEL_MIN_FMAS)
        return g;
    const int a_x = trans_a == CNN_NO_TRANS, b_x = trans_b == CNN_TRANS;
    double best = part_cost(M, N, K, a_x, b_x);
    for (int tm = 1; tm <= n_threads; ++tm) {
        const int tn = n_threads / tm;
        if (tm * tn < 2)
            continue;
        const int64_t ms = ceil_div(M, tm);
        const int64_t ns = round_up(ceil_div(N, tn), 16);
        if (ms * (tm - 1) >= M || ns * (tn - 1) >= N)
            continue; /* some part would be empty */
        const double cost = part_cost(ms, ns, K, a_x, b_x) + 2000.0;
        if (cost < best) {
            best = cost;
            g.tm = tm;
            g.tn = tn;
            g.ms = ms;
            g.ns = ns;
        }
    }
    return g;
}

/* Floats of packed A and packed B one part of (ms, ns, K) needs with family f. */
static void part_buffers(const cnn_gemm_family *f, int64_t ms, int64_t ns, int64_t K,
                         int64_t *a_floats, int64_t *b_floats)
{
    /* (f, ms, ns, K) -> buffer sizes */
    /* Upper bounds of the balanced block sizes gemm_part picks for any part of at
       most ms x ns (kc <= K, kc <= f->kc; mc <= ms, mc <= f->mc; likewise nc). */
    const int64_t kc = min64(K, f->kc);
    const int64_t mc = min64(ms, f->mc);
    const int64_t nc = round_up(min64(ns, f->nc), f->nr);
    *a_floats = cnn_round_up_floats((mc + f->mr_max) * kc);
    *b_floats = cnn_round_up_floats(nc * kc);
}

/* Floats of workspace per part: the most any compiled family needs. */
static int64_t part_floats(int64_t ms, int64_t ns, int64_t K)
{
    /* (ms, ns, K) -> floats */
    static const cnn_kernel ids[4] = { CNN_KERNEL_GENERIC, CNN_KERNEL_AVX2,
                                       CNN_KERNEL_AVX512, CNN_KERNEL_NEON };
    int64_t most = 0;
    for (int t = 0; t < 4; ++t) {
        const cnn_gemm_family *f = cnn_gemm_family_for(ids[t]);
        if (!f)
            continue;
        int64_t a, b;
        part_buffers(f, ms, ns, K, &a, &b);
        if (a + b > most)
            most = a + b;
    }
    return most;
}

int64_t cnn_sgemm_workspace_floats(int64_t M, int64_t N, int64_t K, int n_threads)
{
    /* (M, N, K, threads) -> floats of workspace for cnn_sgemm_ex */
    if (M <= 0 || N <= 0 || K <= 0)
        return 0;
    /* The grid does not depend on the transposes enough to matter for sizing: take
       the larger part over the four cases. */
    int64_t most = 0;
    for (int t = 0; t < 4; ++t) {
        const gemm_grid g = choose_grid(M, N, K, n_threads < 1 ? 1 : n_threads,
                                        (cnn_trans)(t & 1), (cnn_trans)(t >> 1));
        const int64_t need = (int64_t)g.tm * g.tn * part_floats(g.ms, g.ns, K);
        if (need > most)
            most = need;
    }
    return most + CNN_ALIGN / (int64_t)sizeof(float); /* slack to align the start */
}

/* ---- driver ---------------------------------------------------------------- */

typedef struct gemm_args {
    float *C;
    const float *A, *B;
    int64_t M, N, K, ldc, lda, ldb;
    int a_xmajor, b_xmajor;
    float alpha, beta;
    const cnn_epilogue *ep;
} gemm_args;

/* The five loops over the block C[m0:m0+m, n0:n0+n], with packing buffers abuf
   (packed op(A) block) and bbuf (packed op(B) block). */
static void gemm_part(const cnn_gemm_family *f, const gemm_args *g, int64_t m0, int64_t m,
                      int64_t n0, int64_t n, float *abuf, float *bbuf)
{
    /* C[m0:m0+m, n0:n0+n] = ep(alpha op(A)[m0:m0+m, :] op(B)[:, n0:n0+n] + beta C) */
    const int64_t K = g->K, nr = f->nr;
    const int64_t nk = ceil_div(K, f->kc);
    const int64_t mcb = ceil_div(m, ceil_div(m, f->mc));
    const int64_t ncb = round_up(ceil_div(n, ceil_div(n, f->nc)), nr);
    for (int64_t jc = 0; jc < n; jc += ncb) {
        const int64_t nc = min64(ncb, n - jc);
        const int64_t npb = ceil_div(nc, nr);
        for (int64_t b = 0; b < nk; ++b) {
            const int64_t k0 = b * K / nk, kc = (b + 1) * K / nk - k0;
            for (int64_t p = 0; p < npb; ++p) {
                const int64_t w = min64(nr, nc - p * nr);
                f->pack(bbuf + p * nr * kc, g->B, g->ldb, g->b_xmajor, k0, kc,
                        n0 + jc + p * nr, w, (int)round_up(w, f->nr_step));
            }
            const float beta = b == 0 ? g->beta : 1.0f;
            const cnn_epilogue *ep = b == nk - 1 ? g->ep : NULL;
            for (int64_t ic = 0; ic < m; ic += mcb) {
                const int64_t mc = min64(mcb, m - ic);
                const int64_t mrs = ceil_div(mc, ceil_div(mc, f->mr_max));
                const int64_t npa = ceil_div(mc, mrs);
                for (int64_t q = 0; q < npa; ++q)
                    f->pack(abuf + q * mrs * kc, g->A, g->lda, g->a_xmajor, k0, kc,
                            m0 + ic + q * mrs, min64(mrs, mc - q * mrs), (int)mrs);
                for (int64_t p = 0; p < npb; ++p) {
                    const int64_t j = n0 + jc + p * nr;
                    const int64_t w = min64(nr, nc - p * nr);
                    const int width = (int)round_up(w, f->nr_step);
                    const float *pb = bbuf + p * nr * kc;
                    for (int64_t q = 0; q < npa; ++q) {
                        const int64_t i = m0 + ic + q * mrs;
                        const int64_t h = min64(mrs, mc - q * mrs);
                        float *c = g->C + i * g->ldc + j;
                        f->kernel(c, g->ldc, abuf + q * mrs * kc, pb, kc, (int)mrs, (int)h,
                                  width, (int)w, g->alpha, beta);
                        if (ep)
                            for (int64_t r = 0; r < h; ++r)
                                cnn_epilogue_row(c + r * g->ldc, ep, i + r, j, w);
                    }
                }
            }
        }
    }
}

/* C = ep(beta C) when there is nothing to multiply (K == 0 or alpha == 0). */
static void scale_only(const gemm_args *g)
{
    /* C (M, N) */
    for (int64_t i = 0; i < g->M; ++i) {
        float *c = g->C + i * g->ldc;
        if (g->beta == 0.0f)
            memset(c, 0, (size_t)g->N * sizeof(float));
        else if (g->beta != 1.0f)
            for (int64_t j = 0; j < g->N; ++j)
                c[j] *= g->beta;
        if (g->ep)
            cnn_epilogue_row(c, g->ep, i, 0, g->N);
    }
}

int cnn_sgemm_ex(float *C, const float *A, const float *B,
                 int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                 cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta,
                 const cnn_epilogue *epilogue, float *work, int n_threads)
{
    /* C = epilogue(alpha op(A) op(B) + beta C) ; op(A) (M, K), op(B) (K, N), C (M, N) */
    if (M < 0 || N < 0 || K < 0 || n_threads < 1)
        return CNN_ERR_ARG;
    if ((trans_a != CNN_NO_TRANS && trans_a != CNN_TRANS) ||
        (trans_b != CNN_NO_TRANS && trans_b != CNN_TRANS))
        return CNN_ERR_ARG;
    if (ldc < N || lda < (trans_a ? M : K) || ldb < (trans_b ? K : N))
        return CNN_ERR_ARG;
    if (!epilogue_ok(epilogue, N))
        return CNN_ERR_ARG;
    if (M == 0 || N == 0)
        return CNN_OK;
    if (!C)
        return CNN_ERR_ARG;

    gemm_args g;
    g.C = C; g.A = A; g.B = B;
    g.M = M; g.N = N; g.K = K; g.ldc = ldc; g.lda = lda; g.ldb = ldb;
    g.a_xmajor = trans_a == CNN_NO_TRANS;
    g.b_xmajor = trans_b == CNN_TRANS;
    g.alpha = alpha; g.beta = beta; g.ep = epilogue;

    if (K == 0 || alpha == 0.0f) {
        scale_only(&g);
        return CNN_OK;
    }
    if (!A || !B || !work)
        return CNN_ERR_ARG;

    const cnn_gemm_family *f = cnn_gemm_family_for(cnn_get_kernel());
    if (!f)
        f = cnn_gemm_family_generic();
    const gemm_grid grid = choose_grid(M, N, K, n_threads, trans_a, trans_b);
    const int64_t per_part = part_floats(grid.ms, grid.ns, K);
    float *base = (float *)(((uintptr_t)work + CNN_ALIGN - 1) & ~(uintptr_t)(CNN_ALIGN - 1));
    const int n_parts = grid.tm * grid.tn;

#ifdef _OPENMP
#pragma omp parallel for num_threads(n_parts) schedule(static, 1) if (n_parts > 1)
#endif
    for (int part = 0; part < n_parts; ++part) {
        const int64_t m0 = (int64_t)(part / grid.tn) * grid.ms;
        const int64_t n0 = (int64_t)(part % grid.tn) * grid.ns;
        const int64_t m = min64(grid.ms, M - m0), n = min64(grid.ns, N - n0);
        if (m > 0 && n > 0) {
            int64_t a_floats, b_floats;
            part_buffers(f, grid.ms, grid.ns, K, &a_floats, &b_floats);
            float *abuf = base + (int64_t)part * per_part;
            gemm_part(f, &g, m0, m, n0, n, abuf, abuf + a_floats);
        }
    }
    return CNN_OK;
}

int cnn_sgemm(float *C, const float *A, const float *B,
              int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
              cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)
{
    /* C = alpha op(A) op(B) + beta C, allocating the workspace for the call */
    int n_threads = cnn_max_threads();
    if (n_threads < 1)
        n_threads = 1;
    int64_t n_work = cnn_sgemm_workspace_floats(M, N, K, n_threads);
    float *work = NULL;
    if (n_work > 0) {
        work = cnn_aligned_alloc_floats(n_work);
        if (!work)
            return CNN_ERR_ALLOC;
    }
    int status = cnn_sgemm_ex(C, A, B, M, N, K, ldc, lda, ldb, trans_a, trans_b,
                              alpha, beta, NULL, work, n_threads);
    cnn_aligned_free(work);
    return status;
}
