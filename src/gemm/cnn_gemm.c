/* cnn_gemm.c -- single-precision GEMM: the plain reference, the epilogue, the portable
   micro-kernel family, and the blocked, packed driver (GotoBLAS/BLIS loops) that runs
   whichever family cnn_get_kernel() selects.

   Families (see cnn_gemm_kernels.h): AVX-512F 14 x 32 tiles, AVX2+FMA 5 x 16, NEON
   8 x 12, portable C 4 x 8.  With several threads C is cut into independent blocks
   (tasks of cnn_parallel_for, each packing its own operands, no barrier); K is blocked
   the same way for any split, so results are bit-identical for any n_threads.
   Problems below 256k multiply-adds run on one thread. */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#include "cnn_gemm_kernels.h"

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


CNN_ALWAYS_INLINE void epilogue_rows_body(float *c, int64_t ldc, const cnn_epilogue *ep,
                                         int64_t i, int64_t j0, int64_t rows, int64_t n)
{
    /* c[r, 0:n] <- act'(grad_of[i + r, j0:j0+n]) * act(c[r] + bias[j0:j0+n]) ; c is
       (rows, n), rows ldc apart */
    for (int64_t r = 0; r < rows; ++r, c += ldc) {
        if (ep->bias) {
            const float *b = ep->bias + j0;
            for (int64_t j = 0; j < n; ++j)
                c[j] += b[j];
        }
        /* The same table as cnn_activation_forward / cnn_activation_backward. */
        cnn_activate_in_place(c, n, ep->act, ep->alpha);
        if (ep->grad_of && ep->grad_act != CNN_ACT_IDENTITY)
            cnn_activation_grad(c, c, ep->grad_of + (i + r) * ep->ld_grad_of + j0, n,
                                ep->grad_act, ep->alpha);
    }
}

static void epilogue_rows_generic(float *c, int64_t ldc, const cnn_epilogue *ep, int64_t i,
                                  int64_t j0, int64_t rows, int64_t n)
{
    epilogue_rows_body(c, ldc, ep, i, j0, rows, n);
}

#ifdef CNN_AVX2_BUILD
__attribute__((target("avx2")))
static void epilogue_rows_avx2(float *c, int64_t ldc, const cnn_epilogue *ep, int64_t i,
                               int64_t j0, int64_t rows, int64_t n)
{
    epilogue_rows_body(c, ldc, ep, i, j0, rows, n);
}
#endif

/* The epilogue on rows [i, i + rows) x columns [j0, j0 + n) of C, stored at c with rows
   ldc apart (a tile, a row), in the AVX2 build of the loops when the CPU runs AVX2 code
   (the same bits: see cnn_internal.h); nothing when ep is NULL. */
static void epilogue_rows(float *c, int64_t ldc, const cnn_epilogue *ep, int64_t i,
                          int64_t j0, int64_t rows, int64_t n)
{
    /* C block -> C block */
    if (!ep || n <= 0 || rows <= 0)
        return;
#ifdef CNN_AVX2_BUILD
    if (cnn_use_avx2_build()) {
        epilogue_rows_avx2(c, ldc, ep, i, j0, rows, n);
        return;
    }
#endif
    epilogue_rows_generic(c, ldc, ep, i, j0, rows, n);
}

/* 1 if act is one that a family's kernel_ep applies in registers. */
static int register_activation(cnn_activation act)
{
    /* act -> flag */
    return act == CNN_ACT_IDENTITY || act == CNN_ACT_RELU || act == CNN_ACT_LEAKY_RELU;
}

/* 1 if `ep` is usable for an (M, N) GEMM result (NULL is). */
static int epilogue_ok(const cnn_epilogue *ep, int64_t N)
{
    /* ep -> flag */
    if (!ep)
        return 1;
    if (!cnn_is_elementwise_activation(ep->act) || !cnn_is_elementwise_activation(ep->grad_act))
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
    /* pa (kc, MRS), pb (kc, GEN_NR) -> C (mr, nr), rows ldc apart */
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
    /* pa (kc, mr_stride), pb (kc, GEN_NR) -> C (mr, nr) */
    (void)nr_panel;
    switch (mr_stride) {
    case 1: generic_tile(1, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    case 2: generic_tile(2, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    case 3: generic_tile(3, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    default: generic_tile(4, c, ldc, pa, pb, kc, mr, nr, alpha, beta); break;
    }
}

void cnn_gemm_pack_generic(float *dst, const float *src, int64_t ld, int xmajor,
                           int64_t k0, int64_t kc, int64_t x0, int64_t nx,
                           int panel, int step)
{
    /* X(k0 : k0 + kc, x0 : x0 + nx) -> ceil(nx / panel) panels (kc, w_p) */
    const int64_t pstride = (int64_t)panel * kc;
    for (int64_t p = 0; p * panel < nx; ++p) {
        const int64_t rest = nx - p * panel, n = rest < panel ? rest : panel;
        const int64_t w = rest >= panel ? panel : cnn_gemm_last_width(rest, panel, step);
        float *d = dst + p * pstride;
        if (xmajor) {
            for (int64_t k = 0; k < kc; ++k)
                for (int64_t x = n; x < w; ++x)
                    d[k * w + x] = 0.0f;
            for (int64_t x = 0; x < n; ++x) {
                const float *s = src + (x0 + p * panel + x) * ld + k0;
                for (int64_t k = 0; k < kc; ++k)
                    d[k * w + x] = s[k];
            }
        } else {
            const float *s = src + k0 * ld + x0 + p * panel;
            for (int64_t k = 0; k < kc; ++k, s += ld, d += w) {
                for (int64_t x = 0; x < n; ++x)
                    d[x] = s[x];
                for (int64_t x = n; x < w; ++x)
                    d[x] = 0.0f;
            }
        }
    }
}

int64_t cnn_gemm_terms_generic(const float *a, int64_t n, int32_t first, float *vals,
                               int32_t *ks)
{
    /* a (n,) -> vals, ks (count,) */
    const int64_t count = cnn_row_terms(a, 1, n, vals, ks);
    for (int64_t t = 0; t < count; ++t)
        ks[t] += first;
    return count;
}

/* One row of C from the terms of a, 64 columns at a time (see cnn_gemm_row_terms_fn). */
static void row_terms_generic(float *c, const float *vals, const int32_t *ks, int64_t terms,
                              const float *b, int64_t ldb, int64_t N, float alpha, float beta)
{
    /* terms of a, B (K, N) rows ldb apart -> c (N,) */
    enum { W = 64 };
    for (int64_t j0 = 0; j0 < N; j0 += W) {
        const int64_t n = N - j0 < W ? N - j0 : W;
        float acc[W];
        for (int64_t j = 0; j < n; ++j)
            acc[j] = 0.0f;
        for (int64_t t = 0; t < terms; ++t) {
            const float ak = vals[t];
            const float *bk = b + ks[t] * ldb + j0;
            for (int64_t j = 0; j < n; ++j)
                acc[j] += ak * bk[j];
        }
        for (int64_t j = 0; j < n; ++j)
            c[j0 + j] = beta == 0.0f ? alpha * acc[j] : alpha * acc[j] + beta * c[j0 + j];
    }
}

/* One row of C: alpha * a . B (+ beta C) (see cnn_gemm_row_fn). */
static void row_generic(float *c, const float *a, int64_t a_step, const float *b,
                        int64_t ldb, int64_t N, int64_t K, float alpha, float beta)
{
    /* a (K,) stride a_step, B (K, N) rows ldb apart -> c (N,) */
    float vals[CNN_GEMM_ROW_MAX_K];
    int32_t ks[CNN_GEMM_ROW_MAX_K];
    row_terms_generic(c, vals, ks, cnn_row_terms(a, a_step, K, vals, ks), b, ldb, N, alpha,
                      beta);
}

static const cnn_gemm_family family_generic = {
    CNN_KERNEL_GENERIC, GEN_MR, GEN_NR, GEN_NR,
    256, 128, 2048,
    kernel_generic, cnn_gemm_pack_generic, 0, row_generic, 0, 0, cnn_gemm_terms_generic,
    row_terms_generic, 0
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

/* ---- blocks, tasks, workspace ------------------------------------------------ */

CNN_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
CNN_INLINE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
CNN_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
CNN_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Below this many multiply-adds a GEMM runs on one thread. */
#define CNN_GEMM_PARALLEL_MIN_FMAS 262144.0
/* op(B) rows at least this many floats apart are packed separately, not in the kernel. */
#define CNN_GEMM_FUSE_MAX_LDB 1024
/* Up to this many rows of C, families with a row kernel skip packing altogether. */
#define CNN_GEMM_ROW_MAX_M 2
/* Below this many multiply-adds the row path runs on one thread. */
#define CNN_GEMM_ROW_PARALLEL_MIN_FMAS 131072.0
/* Columns of C are handed to tasks in units of this many (one AVX-512 vector). */
#define CNN_GEMM_COL_UNIT 16
/* Most row blocks and column blocks a parallel GEMM is cut into. */
#define CNN_GEMM_MAX_BLOCKS 8
/* Rough cycles per float of an op(B) that fits in a core's L2 cache (at most
   CNN_GEMM_SHARED_B_MAX floats) for every thread beyond the first that reads it: see
   shared_b_cycles. */
#define CNN_GEMM_SHARED_B_CYCLES 1.5
#define CNN_GEMM_SHARED_B_MAX 262144.0

/* How a parallel GEMM cuts C into tasks: blocks of `rows` rows (a multiple of the
   family's tallest tile) by `cols` columns (a multiple of CNN_GEMM_COL_UNIT), row-major.
   Each task computes its block over all of K from its own packed copies of op(A) and
   op(B): no data is shared, so no task waits for another, and every element of C is
   accumulated over the same K blocks whatever the split. */
typedef struct gemm_split {
    int64_t rows, cols, n_rows, n_cols; /* block sizes; blocks down and across */
} gemm_split;

/* What the split needs to know about the operands: whether packing op(A) / op(B)
   transposes (the source is x-major), and whether the micro-kernel packs the B panels
   on the fly (fused). */
typedef struct gemm_shape {
    int64_t M, N, K;
    int a_xmajor, b_xmajor, b_fused, a_sparse;
} gemm_shape;

/* Rough share of the multiply-adds the sparse micro-kernel still does on a compacted
   op(A) panel of image rows (a step is skipped only when all the panel's rows are zero
   there).  The first tile of a block does them all: it packs the B panels. */
#define CNN_GEMM_SPARSE_SHARE 0.5

/* Rough cycles for packing n floats: a transposing pack, a straight copy, or a copy
   folded into the first tile of a panel. */
static double pack_cycles(double n, int xmajor, int fused)
{
    /* (floats, kind) -> cycles */
    return n * (fused ? 0.05 : (xmajor ? 0.4 : 0.3));
}

/* Rough cycles for one task: an (m, n) block of C over K with family f's tiles
   (rows rounded up to whole tiles, as the NEON and generic tiles compute them; two
   vector FMAs a cycle), plus packing its operands. */
static double block_cycles(const cnn_gemm_family *f, const gemm_shape *sh, int64_t m,
                           int64_t n)
{
    /* (f, shape, block) -> cycles */
    const double K = (double)sh->K, first = (double)min64(m, f->mr_max);
    double rows = (double)round_up(m, f->mr_max);
    const double cols = (double)round_up(n, f->nr_step);
    if (sh->a_sparse)
        rows = first + (rows - first) * CNN_GEMM_SPARSE_SHARE;
    return rows * cols * K / (2.0 * f->nr_step) + pack_cycles((double)m * K, sh->a_xmajor, 0) +
           pack_cycles((double)n * K, sh->b_xmajor, sh->b_fused) + 1000.0;
}

/* Rough cycles that a split costs later by leaving op(B) in several cores' caches.
   In a training step op(B) is a layer's weights (forward X W, backward dY W^T), which
   the optimizer rewrites right after; a store to a line that another core also holds
   waits for that copy to be invalidated, and on a 2-core VM writing 400 KB that both
   cores had read took 10 times (up to 50 times) as long as writing it from one core.
   op(B) is read by one thread per column block when there is a single row block and
   no more column blocks than threads (the caller claims the first task, a worker the
   next, the same each step); otherwise every thread reads all of it, sooner or later.
   Weights larger than a core's L2 are streamed from the shared cache anyway. */
static double shared_b_cycles(const gemm_shape *sh, int64_t n_rows, int64_t n_cols,
                              int n_threads)
{
    /* (shape, split, threads) -> cycles */
    const double floats = (double)sh->K * (double)sh->N;
    if (floats > CNN_GEMM_SHARED_B_MAX || (n_rows == 1 && n_cols <= n_threads))
        return 0.0;
    return CNN_GEMM_SHARED_B_CYCLES * floats * (double)(min64(n_threads, n_rows * n_cols) - 1);
}

/* The split of C for n_threads threads that finishes soonest by a small cost model:
   the work of all tasks shared out, plus half a task for the last one to finish (tasks
   are claimed one at a time, so a late or descheduled thread costs at most one), plus
   shared_b_cycles.  One block (serial) when nothing beats it. */
static gemm_split choose_split(const cnn_gemm_family *f, const gemm_shape *sh, int n_threads)
{
    /* (f, shape, threads) -> split */
    const int64_t M = sh->M, N = sh->N;
    gemm_split best = { M, N, 1, 1 };
    if (n_threads <= 1 || (double)M * (double)N * (double)sh->K < CNN_GEMM_PARALLEL_MIN_FMAS)
        return best;
    double best_cost = block_cycles(f, sh, M, N);
    for (int64_t r = 1; r <= CNN_GEMM_MAX_BLOCKS; ++r) {
        const int64_t rows = round_up(ceil_div(M, r), f->mr_max), n_rows = ceil_div(M, rows);
        if (n_rows != r)
            continue;
        for (int64_t c = 1; c <= CNN_GEMM_MAX_BLOCKS; ++c) {
            const int64_t cols = round_up(ceil_div(N, c), CNN_GEMM_COL_UNIT);
            const int64_t n_cols = ceil_div(N, cols);
            if (n_cols != c || r * c < 2)
                continue;
            const double task = block_cycles(f, sh, rows, cols);
            const double cost = task * (double)(r * c) / (double)min64(n_threads, r * c) +
                                0.5 * task + shared_b_cycles(sh, r, c, n_threads);
            if (cost < best_cost) {
                best_cost = cost;
                best.rows = rows; best.cols = cols; best.n_rows = r; best.n_cols = c;
            }
        }
    }
    return best;
}

#if defined(_MSC_VER)
#define CNN_THREAD_LOCAL __declspec(thread)
#else
#define CNN_THREAD_LOCAL __thread
#endif

/* The splits this thread chose last: a training step asks for the same few shapes over
   and over, and the search costs microseconds, as much as a small GEMM's packing. */
typedef struct split_memo {
    const cnn_gemm_family *f;
    gemm_shape sh;
    int n_threads;
    gemm_split split;
} split_memo;
#define CNN_SPLIT_MEMOS 16
static CNN_THREAD_LOCAL split_memo split_memos[CNN_SPLIT_MEMOS];
static CNN_THREAD_LOCAL unsigned split_memo_next;

static gemm_split remembered_split(const cnn_gemm_family *f, const gemm_shape *sh,
                                   int n_threads)
{
    /* choose_split(f, sh, n_threads), looked up first */
    for (int i = 0; i < CNN_SPLIT_MEMOS; ++i) {
        const split_memo *m = &split_memos[i];
        if (m->f == f && m->n_threads == n_threads && m->sh.M == sh->M && m->sh.N == sh->N &&
            m->sh.K == sh->K && m->sh.a_xmajor == sh->a_xmajor &&
            m->sh.b_xmajor == sh->b_xmajor && m->sh.b_fused == sh->b_fused &&
            m->sh.a_sparse == sh->a_sparse)
            return m->split;
    }
    split_memo *m = &split_memos[split_memo_next++ % CNN_SPLIT_MEMOS];
    m->f = f;
    m->sh = *sh;
    m->n_threads = n_threads;
    m->split = choose_split(f, sh, n_threads);
    return m->split;
}

/* Threads for the row path: each reads its own columns of op(B), so two threads halve
   the time once op(B) is large enough to outweigh waking them. */
static int row_threads(int64_t M, int64_t N, int64_t K, int n_threads)
{
    /* (M, N, K, n_threads) -> threads */
    const double fmas = (double)M * (double)N * (double)K;
    const int64_t most = ceil_div(N, CNN_GEMM_COL_UNIT);
    if (fmas < CNN_GEMM_ROW_PARALLEL_MIN_FMAS || most < 2)
        return 1;
    return (int)min64(min64(n_threads, most), 1 + (int64_t)(fmas / CNN_GEMM_ROW_PARALLEL_MIN_FMAS));
}

/* How a range of m rows is cut into tiles of mrs rows (the last may be shorter),
   grouped into blocks of at most tpb tiles that are packed together. */
typedef struct row_tiling {
    int64_t mrs, tiles, tpb, blocks;
} row_tiling;

static row_tiling tile_rows(const cnn_gemm_family *f, int64_t m)
{
    /* (f, m) -> tiling */
    row_tiling r = { 1, 0, 1, 0 };
    if (m <= 0)
        return r;
    r.tiles = ceil_div(m, f->mr_max);
    r.mrs = ceil_div(m, r.tiles);
    r.tiles = ceil_div(m, r.mrs);
    r.tpb = max64(1, f->mc / r.mrs);
    r.blocks = ceil_div(r.tiles, r.tpb);
    r.tpb = ceil_div(r.tiles, r.blocks);
    return r;
}

/* Floats of one packed op(A) block for m rows, and of one packed op(B) block for n
   columns (upper bounds for any range of at most m rows / n columns). */
static int64_t a_panels_floats(const cnn_gemm_family *f, int64_t m, int64_t K)
{
    /* (f, m, K) -> floats; a block has tpb * mrs <= min(2 m, mc + mr_max) rows */
    return cnn_round_up_floats(min64(2 * m, f->mc + f->mr_max) * min64(K, f->kc));
}

/* A packed op(A) block is followed, for families that compact panels, by one index
   record per tile: the number of steps kept (-1: not compacted), then their k. */
static int64_t a_index_ints(const cnn_gemm_family *f, int64_t m)
{
    /* (f, m) -> int32 entries; tiles per block <= 2 rows / mr_max + 2 (mrs >= mr_max / 2) */
    if (!f->compact)
        return 0;
    return (2 * min64(2 * m, f->mc + f->mr_max) / f->mr_max + 2) * (f->kc + 1);
}

static int64_t a_block_floats(const cnn_gemm_family *f, int64_t m, int64_t K)
{
    /* (f, m, K) -> floats of panels and index records */
    return a_panels_floats(f, m, K) + cnn_round_up_floats(a_index_ints(f, m));
}

static int64_t b_block_floats(const cnn_gemm_family *f, int64_t n, int64_t K)
{
    /* (f, n, K) -> floats; a block has at most round_up(min(n, nc), nr) columns */
    return cnn_round_up_floats(round_up(min64(n, f->nc), f->nr) * min64(K, f->kc));
}

/* Floats of one thread's scratch for the blocks of a split: one packed op(A) block and
   one packed op(B) block. */
static int64_t split_slot_floats(const cnn_gemm_family *f, const gemm_split *s, int64_t K)
{
    /* (f, split, K) -> floats */
    return a_block_floats(f, s->rows, K) + b_block_floats(f, s->cols, K);
}

/* Rows of op(A) handled together on the sparse row path. */
#define CNN_GEMM_SPARSE_ROWS 16

/* Floats of one thread's buffer on the sparse row path: CNN_GEMM_SPARSE_ROWS
   rows of op(A) over one K block packed in 32 wide panels, then their terms (values and
   indices, CNN_GEMM_ROW_MAX_K + 16 of each per row). */
static int64_t sparse_rows_floats(int64_t K)
{
    /* K -> floats */
    return CNN_GEMM_SPARSE_ROWS * (round_up(min64(K, CNN_GEMM_ROW_MAX_K), 32) +
                                   2 * (CNN_GEMM_ROW_MAX_K + 16));
}

/* Floats of one thread's slot for family f and a split (tiled blocks, or the sparse
   path, which uses the same slots). */
static int64_t slot_floats(const cnn_gemm_family *f, const gemm_split *s, int64_t K)
{
    /* (f, split, K) -> floats, a multiple of 16 */
    return cnn_round_up_floats(max64(split_slot_floats(f, s, K), sparse_rows_floats(K)));
}

int64_t cnn_sgemm_workspace_floats(int64_t M, int64_t N, int64_t K, int n_threads)
{
    /* (M, N, K, threads) -> floats of workspace for cnn_sgemm_ex */
    static const cnn_kernel ids[4] = { CNN_KERNEL_GENERIC, CNN_KERNEL_AVX2,
                                       CNN_KERNEL_AVX512, CNN_KERNEL_NEON };
    if (M <= 0 || N <= 0 || K <= 0)
        return 0;
    const int T = n_threads < 1 ? 1 : n_threads;
    /* One slot per thread that the split of any compiled family and transpose case
       can keep busy (a call runs min(n_threads, tasks) threads). */
    int64_t most = 0;
    for (int i = 0; i < 4; ++i) {
        const cnn_gemm_family *f = cnn_gemm_family_for(ids[i]);
        if (!f)
            continue;
        for (int c = 0; c < 16; ++c) {
            const gemm_shape sh = { M, N, K, c & 1, (c >> 1) & 1, (c >> 2) & 1, c >> 3 };
            const gemm_split s = choose_split(f, &sh, T);
            const int64_t threads = min64(T, max64(s.n_rows * s.n_cols,
                                                   ceil_div(M, CNN_GEMM_SPARSE_ROWS)));
            most = max64(most, threads * slot_floats(f, &s, K));
        }
    }
    /* 16 floats of slack let the start be aligned to 64 bytes. */
    return most + CNN_ALIGN / (int64_t)sizeof(float);
}

/* ---- driver ---------------------------------------------------------------- */

typedef struct gemm_ctx {
    const cnn_gemm_family *f;
    float *C;
    const float *A, *B;
    int64_t M, N, K, ldc, lda, ldb;
    int a_xmajor, b_xmajor;
    int b_fused;       /* the kernel may pack full B panels (kernel_packb) */
    float alpha, beta;
    const cnn_epilogue *ep;
    int a_sparse;      /* compact packed A panels (op(A) is mostly zeros) */
    int64_t a_index;   /* floats from a packed A block to its index records */
    float *work;       /* 64-byte aligned; thread t's slot is work + t * slot */
    int64_t slot;
    gemm_split split;  /* tiled path */
    int64_t units;     /* row path: columns per task; sparse path unused */
} gemm_ctx;

/* Pack panels [p0, p1) of the op(B) block (kc, nc) at column j, K offset k0; with
   fused, only the last panel if it is partial (the kernel packs the full ones). */
CNN_INLINE void pack_b(const gemm_ctx *x, float *buf, int64_t p0, int64_t p1, int64_t j,
                       int64_t nc, int64_t k0, int64_t kc, int fused)
{
    /* op(B)[k0 : k0 + kc, j + p0 nr : ...] -> buf panels p0 .. p1 - 1 */
    const cnn_gemm_family *f = x->f;
    int64_t lo = p0 * f->nr;
    const int64_t hi = min64(nc, p1 * f->nr);
    if (fused)
        lo = max64(lo, nc / f->nr * f->nr);
    if (hi > lo)
        f->pack(buf + lo * kc, x->B, x->ldb, x->b_xmajor, k0, kc, j + lo, hi - lo, f->nr,
                f->nr_step);
}

/* The index record of tile q of the packed A block buf (see a_index_ints). */
CNN_INLINE int32_t *a_record(const gemm_ctx *x, const float *buf, int64_t q)
{
    /* (buf, q) -> record: count, then k of each kept step */
    return (int32_t *)(buf + x->a_index) + q * (x->f->kc + 1);
}

/* Pack tiles [q0, q1) of the op(A) block (mc rows, tiles of mrs) at row i, K offset k0;
   when A is sparse, compact each tile's panel, except tile 0 when keep_first (the
   kernel that packs B panels reads it whole). */
CNN_INLINE void pack_a(const gemm_ctx *x, float *buf, int64_t q0, int64_t q1, int64_t mrs,
                       int64_t i, int64_t mc, int64_t k0, int64_t kc, int keep_first)
{
    /* op(A)[i + q0 mrs : ..., k0 : k0 + kc] -> buf panels q0 .. q1 - 1 */
    const int64_t lo = q0 * mrs, hi = min64(mc, q1 * mrs);
    if (hi <= lo)
        return;
    x->f->pack(buf + lo * kc, x->A, x->lda, x->a_xmajor, k0, kc, i + lo, hi - lo,
               (int)mrs, (int)mrs);
    if (!x->a_sparse)
        return;
    for (int64_t q = q0; q * mrs < hi; ++q) {
        int32_t *rec = a_record(x, buf, q);
        rec[0] = q == 0 && keep_first ? -1
                 : (int32_t)x->f->compact(buf + q * mrs * kc, kc, (int)mrs, rec + 1);
    }
}

/* Run the micro-kernel over every tile of C[i : i + mc, j : j + nc] from the packed
   blocks abuf (tiles of mrs rows) and bbuf; ep is applied after the final K block. */
static void macro_kernel(const gemm_ctx *x, const float *abuf, float *bbuf,
                         const float *bsrc, int direct, int64_t i, int64_t mc, int64_t mrs,
                         int64_t j, int64_t nc, int64_t kc, float beta,
                         const cnn_epilogue *ep)
{
    /* C[i : i + mc, j : j + nc] = alpha A_block B_block + beta C[...]; when bsrc is set
       (op(B) rows at column j), full B panels are packed by their first tile, or only
       read from bsrc when direct (a single tile uses them) */
    const cnn_gemm_family *f = x->f;
    const int64_t nr = f->nr, ldc = x->ldc;
    /* plain tiles apply ep in registers when the family can */
    const int in_kernel = ep && f->kernel_ep && register_activation(ep->act) &&
                          register_activation(ep->grad_act);
    for (int64_t jr = 0; jr < nc; jr += nr) {
        const int64_t w = min64(nr, nc - jr);
        const int width = w == nr ? (int)nr : cnn_gemm_last_width(w, (int)nr, f->nr_step);
        float *pb = bbuf + jr * kc;
        for (int64_t ir = 0; ir < mc; ir += mrs) {
            const int64_t h = min64(mrs, mc - ir);
            float *c = x->C + (i + ir) * ldc + j + jr;
            const int32_t *rec = x->a_sparse ? a_record(x, abuf, ir / mrs) : NULL;
            if (bsrc && ir == 0 && w == nr)
                f->kernel_packb(c, ldc, abuf, bsrc + jr, x->ldb, direct ? NULL : pb, kc,
                                (int)mrs, (int)h, x->alpha, beta);
            else if (rec && rec[0] >= 0)
                f->kernel_sparse(c, ldc, abuf + ir * kc, pb, rec + 1, rec[0], (int)mrs,
                                 (int)h, width, (int)w, x->alpha, beta);
            else if (in_kernel) {
                f->kernel_ep(c, ldc, abuf + ir * kc, pb, kc, (int)mrs, (int)h, width, (int)w,
                             x->alpha, beta, ep, i + ir, j + jr);
                continue;
            } else
                f->kernel(c, ldc, abuf + ir * kc, pb, kc, (int)mrs, (int)h, width, (int)w,
                          x->alpha, beta);
            epilogue_rows(c, ldc, ep, i + ir, j + jr, h, w);
        }
    }
}

/* K block b of nk: [k0, k0 + kc), sizes balanced and independent of threads. */
CNN_INLINE void k_block(int64_t K, int64_t nk, int64_t b, int64_t *k0, int64_t *kc)
{
    /* (K, nk, b) -> range */
    *k0 = b * K / nk;
    *kc = (b + 1) * K / nk - *k0;
}

/* Columns [j0, j1) of the few rows of C on the row path: op(B) read in place, one row
   of C at a time, over the same K blocks as the tiled path so that both give the same
   bits (and the same bits for any split of the columns). */
static void run_row_cols(const gemm_ctx *x, int64_t j0, int64_t j1)
{
    /* C[:, j0:j1] */
    const int64_t K = x->K, nk = ceil_div(K, x->f->kc), a_step = x->a_xmajor ? 1 : x->lda;
    if (j1 <= j0)
        return;
    for (int64_t i = 0; i < x->M; ++i) {
        const float *a = x->a_xmajor ? x->A + i * x->lda : x->A + i;
        float *c = x->C + i * x->ldc + j0;
        for (int64_t b = 0; b < nk; ++b) {
            int64_t k0, kc;
            k_block(K, nk, b, &k0, &kc);
            x->f->row(c, a + k0 * a_step, a_step, x->B + k0 * x->ldb + j0, x->ldb, j1 - j0,
                      kc, x->alpha, b == 0 ? x->beta : 1.0f);
        }
        epilogue_rows(c, x->ldc, x->ep, i, j0, 1, j1 - j0);
    }
}

/* Rows [i0, i1) of C when op(A) is mostly zeros (an image batch X W, or a weight
   gradient X^T dY): each row of C is computed by the row kernel from only the nonzero
   entries of its row of op(A), gathered 16 rows at a time -- straight from A when those
   rows are contiguous, else (A^T: strided columns of A) after the family's pack has
   transposed them into buf -- over the same K blocks as the tiled path, so the values
   are the same.  The 16 rows take one 128 column block of op(B) at a time, which then
   stays in the L1 or L2 cache. */
static void run_sparse_rows(const gemm_ctx *x, int64_t i0, int64_t i1, float *buf)
{
    /* C[i0:i1, :] */
    const cnn_gemm_family *f = x->f;
    const int64_t K = x->K, N = x->N, nk = ceil_div(K, f->kc), stride = CNN_GEMM_ROW_MAX_K + 16;
    float *vals = buf + CNN_GEMM_SPARSE_ROWS * round_up(min64(K, CNN_GEMM_ROW_MAX_K), 32);
    int32_t *ks = (int32_t *)(vals + CNN_GEMM_SPARSE_ROWS * stride);
    int64_t terms[CNN_GEMM_SPARSE_ROWS];
    for (int64_t ib = i0; ib < i1; ib += CNN_GEMM_SPARSE_ROWS) {
        const int64_t P = min64(CNN_GEMM_SPARSE_ROWS, i1 - ib);
        for (int64_t b = 0; b < nk; ++b) {
            int64_t k0, kc;
            k_block(K, nk, b, &k0, &kc);
            if (x->a_xmajor) {
                for (int64_t p = 0; p < P; ++p)
                    terms[p] = f->terms(x->A + (ib + p) * x->lda + k0, kc, 0,
                                        vals + p * stride, ks + p * stride);
            } else {
                /* buf: panels of 32 steps, each (P, width) with op(A) row p at p * width */
                f->pack(buf, x->A, x->lda, 1, ib, P, k0, kc, 32, f->nr_step);
                for (int64_t p = 0; p < P; ++p) {
                    terms[p] = 0;
                    for (int64_t q = 0; q * 32 < kc; ++q) {
                        const int64_t width = min64(32, round_up(kc - q * 32, f->nr_step));
                        terms[p] += f->terms(buf + q * 32 * P + p * width, width,
                                             (int32_t)(q * 32), vals + p * stride + terms[p],
                                             ks + p * stride + terms[p]);
                    }
                }
            }
            for (int64_t j = 0; j < N; j += 128)
                for (int64_t p = 0; p < P; ++p)
                    f->row_terms(x->C + (ib + p) * x->ldc + j, vals + p * stride, ks + p * stride,
                                 terms[p], x->B + k0 * x->ldb + j, x->ldb, min64(128, N - j),
                                 x->alpha, b == 0 ? x->beta : 1.0f);
        }
        epilogue_rows(x->C + ib * x->ldc, x->ldc, x->ep, ib, 0, P, N);
    }
}

/* The block C[i0:i1, j0:j1] on one thread, from its own packed blocks: abuf holds one
   op(A) block (index records at a_index), bbuf one op(B) block. */
static void run_block(const gemm_ctx *x, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                      float *abuf, float *bbuf)
{
    /* C[i0:i1, j0:j1] */
    const cnn_gemm_family *f = x->f;
    const int64_t K = x->K, nr = f->nr, n = j1 - j0;
    const row_tiling rt = tile_rows(f, i1 - i0);
    const int64_t nk = ceil_div(K, f->kc);
    const int64_t ncb = round_up(ceil_div(n, ceil_div(n, f->nc)), nr);
    /* The first tile of each B panel can pack it, and when there is only one tile of
       rows, that tile can read the panel where it is. */
    const int fuse = x->b_fused, direct = fuse && rt.tiles == 1;
    for (int64_t jc = j0; jc < j1; jc += ncb) {
        const int64_t nc = min64(ncb, j1 - jc);
        for (int64_t b = 0; b < nk; ++b) {
            int64_t k0, kc;
            k_block(K, nk, b, &k0, &kc);
            pack_b(x, bbuf, 0, ceil_div(nc, nr), jc, nc, k0, kc, fuse);
            const float beta = b == 0 ? x->beta : 1.0f;
            const cnn_epilogue *ep = b == nk - 1 ? x->ep : NULL;
            for (int64_t blk = 0; blk < rt.blocks; ++blk) {
                const int64_t i = i0 + blk * rt.tpb * rt.mrs;
                const int64_t mc = min64(rt.tpb * rt.mrs, i1 - i);
                const float *bsrc = fuse && blk == 0 ? x->B + k0 * x->ldb + jc : NULL;
                pack_a(x, abuf, 0, rt.tpb, rt.mrs, i, mc, k0, kc, bsrc != NULL);
                macro_kernel(x, abuf, bbuf, bsrc, direct, i, mc, rt.mrs, jc, nc, kc, beta,
                             ep);
            }
        }
    }
}

/* Task: block `task` of the split (row-major over the blocks). */
static void block_task(void *arg, int64_t task, int thread)
{
    /* C block */
    const gemm_ctx *x = (const gemm_ctx *)arg;
    const gemm_split *s = &x->split;
    const int64_t i0 = task / s->n_cols * s->rows, j0 = task % s->n_cols * s->cols;
    float *abuf = x->work + thread * x->slot;
    run_block(x, i0, min64(x->M, i0 + s->rows), j0, min64(x->N, j0 + s->cols), abuf,
              abuf + a_block_floats(x->f, s->rows, x->K));
}

/* Task: columns [task units, (task + 1) units) of the row path. */
static void row_task(void *arg, int64_t task, int thread)
{
    /* C[:, columns] */
    const gemm_ctx *x = (const gemm_ctx *)arg;
    (void)thread;
    run_row_cols(x, min64(x->N, task * x->units), min64(x->N, (task + 1) * x->units));
}

/* Task: rows [16 task, 16 task + 16) of the sparse row path. */
static void sparse_task(void *arg, int64_t task, int thread)
{
    /* C[rows, :] */
    const gemm_ctx *x = (const gemm_ctx *)arg;
    const int64_t i0 = task * CNN_GEMM_SPARSE_ROWS;
    run_sparse_rows(x, i0, min64(x->M, i0 + CNN_GEMM_SPARSE_ROWS),
                          x->work + thread * x->slot);
}

/* C = ep(beta C) when there is nothing to multiply (K == 0 or alpha == 0). */
static void scale_only(const gemm_ctx *x)
{
    /* C (M, N) */
    for (int64_t i = 0; i < x->M; ++i) {
        float *c = x->C + i * x->ldc;
        if (x->beta == 0.0f)
            memset(c, 0, (size_t)x->N * sizeof(float));
        else if (x->beta != 1.0f)
            for (int64_t j = 0; j < x->N; ++j)
                c[j] *= x->beta;
        if (x->ep)
            epilogue_rows(c, x->ldc, x->ep, i, 0, 1, x->N);
    }
}

/* Whether op(A) is mostly zeros (an image batch, not dense activations), judged from
   a grid of at most 16 x 32 of its stored entries. */
static int mostly_zeros(const float *A, int64_t rows, int64_t cols, int64_t lda)
{
    /* stored A (rows, cols) -> 1 if at least 75% of the sampled entries are zero (images:
       about 80%; ReLU outputs, whose panels rarely have an all-zero step: 50-65%) */
    const int64_t sr = min64(rows, 16), sc = min64(cols, 32);
    int64_t col[32], zeros = 0;
    /* the columns once: a 64-bit division per sampled entry cost more than a small
       GEMM's arithmetic */
    for (int64_t c = 0; c < sc; ++c)
        col[c] = c * cols / sc;
    for (int64_t r = 0; r < sr; ++r) {
        const float *a = A + r * rows / sr * lda;
        for (int64_t c = 0; c < sc; ++c)
            zeros += a[col[c]] == 0.0f;
    }
    return 4 * zeros >= 3 * sr * sc;
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

    gemm_ctx x;
    memset(&x, 0, sizeof x);
    x.C = C; x.A = A; x.B = B;
    x.M = M; x.N = N; x.K = K; x.ldc = ldc; x.lda = lda; x.ldb = ldb;
    x.a_xmajor = trans_a == CNN_NO_TRANS;
    x.b_xmajor = trans_b == CNN_TRANS;
    x.alpha = alpha; x.beta = beta; x.ep = epilogue;

    if (K == 0 || alpha == 0.0f) {
        scale_only(&x);
        return CNN_OK;
    }
    if (!A || !B || !work)
        return CNN_ERR_ARG;

    x.f = cnn_gemm_family_for(cnn_get_kernel());
    if (!x.f)
        x.f = cnn_gemm_family_generic();
    x.work = (float *)(((uintptr_t)work + CNN_ALIGN - 1) & ~(uintptr_t)(CNN_ALIGN - 1));
    if (M <= CNN_GEMM_ROW_MAX_M && !x.b_xmajor && x.f->row && x.f->kc <= CNN_GEMM_ROW_MAX_K) {
        /* A few rows (single inferences): read op(B) in place, no packing; tasks take
           ranges of columns. */
        const int T = row_threads(M, N, K, n_threads);
        const int64_t units = ceil_div(N, CNN_GEMM_COL_UNIT);
        x.units = ceil_div(units, min64(units, 2 * T)) * CNN_GEMM_COL_UNIT; /* no scratch */
        cnn_parallel_for(T, ceil_div(N, x.units), row_task, &x);
        return CNN_OK;
    }
    /* Fuse B packing into the kernel for row-contiguous op(B) whose rows are less than
       a page apart; farther apart, every row is a new page for the kernel and the
       separate pack, which streams along each row, is faster. */
    x.b_fused = x.f->kernel_packb != NULL && !x.b_xmajor && ldb < CNN_GEMM_FUSE_MAX_LDB;
    const int rows_path = !x.b_xmajor && x.f->terms && x.f->row_terms &&
                          x.f->kc <= CNN_GEMM_ROW_MAX_K;
    x.a_sparse = (rows_path || (x.f->compact && x.f->kernel_sparse)) &&
                 mostly_zeros(A, x.a_xmajor ? M : K, x.a_xmajor ? K : M, lda);
    if (x.a_sparse && rows_path) {
        /* Tasks take groups of rows of C. */
        x.slot = cnn_round_up_floats(sparse_rows_floats(K));
        const int T = (double)M * (double)N * (double)K < CNN_GEMM_PARALLEL_MIN_FMAS ? 1 : n_threads;
        cnn_parallel_for(T, ceil_div(M, CNN_GEMM_SPARSE_ROWS), sparse_task, &x);
        return CNN_OK;
    }
    const gemm_shape sh = { M, N, K, x.a_xmajor, x.b_xmajor, x.b_fused, x.a_sparse };
    x.split = remembered_split(x.f, &sh, n_threads);
    x.slot = slot_floats(x.f, &x.split, K);
    x.a_index = a_panels_floats(x.f, x.split.rows, K);
    cnn_parallel_for(n_threads, x.split.n_rows * x.split.n_cols, block_task, &x);
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
