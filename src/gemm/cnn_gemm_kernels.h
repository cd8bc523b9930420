/* cnn_gemm_kernels.h -- the micro-kernel families behind the fast GEMM (internal).

   A family is a register-blocked micro-kernel plus the packing routine that lays out
   its operands, and the cache-block sizes tuned for it.  The driver in cnn_gemm.c runs
   the GotoBLAS loops around it:

     for each NC block of columns of C          (jc)
       for each KC block of the reduction       (pc)   pack op(B) block -> B panels
         for each MC block of rows of C         (ic)   pack op(A) block -> A panels
           for each B panel (nr_panel columns)  (jr)
             for each A panel (mr_stride rows)  (ir)   micro-kernel on one C tile

   Packed layouts (all zero-padded past the valid part):
     A panel: kc x mr_stride, element (k, r) at pa[k * mr_stride + r]
     B panel: kc x nr_panel,  element (k, c) at pb[k * nr_panel + c]
   mr_stride <= mr_max is chosen per range of rows so they split into tiles of nearly
   equal height; nr_panel is nr for full panels and the last panel's width rounded up
   to nr_step.  Families with kernel_packb let the first tile of a full B panel read
   row-contiguous op(B) in place and write the packed panel as it goes.

   Every family accumulates each element of a tile over k in increasing order with a
   single accumulator that starts from zero, whatever the tile shape, so the result
   does not depend on how C is split into tiles or threads. */
#ifndef CNN_GEMM_KERNELS_H
#define CNN_GEMM_KERNELS_H

#include <stdint.h>
#include "cnn_core.h"

#if defined(_MSC_VER)
#define CNN_RESTRICT __restrict
#define CNN_INLINE static __inline
#else
#define CNN_RESTRICT restrict
#define CNN_INLINE static inline
#endif

/* Fully unroll a short loop with a constant trip count (register-tile rows). */
#if defined(__clang__)
#define CNN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define CNN_UNROLL _Pragma("GCC unroll 16")
#else
#define CNN_UNROLL
#endif

/* x86-64 SIMD families are compiled with function-level target attributes (none with
   CNN_PORTABLE_ONLY, see cnn_internal.h). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(CNN_PORTABLE_ONLY)
#define CNN_GEMM_X86 1
#endif
/* aarch64 always has Advanced SIMD. */
#if defined(__GNUC__) && defined(__aarch64__)
#define CNN_GEMM_NEON 1
#endif

/* Widest panel any family packs (floats). */
#define CNN_GEMM_NR_LIMIT 32

/* C[0:mr, 0:nr] = alpha * (packed A panel . packed B panel) + beta * C[0:mr, 0:nr]
   over kc steps; pa is (kc, mr_stride), pb is (kc, nr_panel), C has leading dimension
   ldc.  beta == 0 never reads C.  1 <= mr <= mr_stride, 1 <= nr <= nr_panel. */
typedef void (*cnn_gemm_kernel_fn)(float *c, int64_t ldc, const float *pa, const float *pb,
                                   int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                                   float alpha, float beta);

/* Optional: cnn_gemm_kernel_fn that also applies the GEMM's epilogue to the tile, whose
   first element is C(row, col), before storing it (on the last K block).  It handles
   the bias and the identity, relu and leaky_relu as act and grad_act (the driver
   checks), with the arithmetic of the separate pass, so the same bits. */
typedef void (*cnn_gemm_kernel_ep_fn)(float *c, int64_t ldc, const float *pa, const float *pb,
                                      int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                                      float alpha, float beta, const cnn_epilogue *ep,
                                      int64_t row, int64_t col);

/* Pack X(k0 : k0 + kc, x0 : x0 + nx) into ceil(nx / panel) panels: panel p starts at
   dst + p * panel * kc and is (kc, w_p) with w_p = panel, except the last one, whose
   width is min(panel, round_up(nx - p * panel, step)); entries past nx are zero.
   X(k, x) is src[x * ld + k] when xmajor, else src[k * ld + x].
   1 <= step <= panel <= CNN_GEMM_NR_LIMIT. */
typedef void (*cnn_gemm_pack_fn)(float *dst, const float *src, int64_t ld, int xmajor,
                                 int64_t k0, int64_t kc, int64_t x0, int64_t nx,
                                 int panel, int step);

/* Optional: the kernel on a full nr-column B panel read straight from row-contiguous
   op(B) rows (bsrc, rows ldb apart) that also writes the packed panel pbo (kc, nr), so
   the first tile of each panel does the packing while it computes.  With pbo NULL the
   panel is only read (for panels that a single tile uses). */
typedef void (*cnn_gemm_kernel_packb_fn)(float *c, int64_t ldc, const float *pa,
                                         const float *bsrc, int64_t ldb, float *pbo,
                                         int64_t kc, int mr_stride, int mr,
                                         float alpha, float beta);

/* Optional: drop, in place, the steps k of a packed A panel (kc, mrs) whose mrs entries
   are all zero; the kept steps stay in order, their k go to ks (kc,); returns how many. */
typedef int64_t (*cnn_gemm_compact_fn)(float *pa, int64_t kc, int mrs, int32_t *ks);

/* Optional: cnn_gemm_kernel_fn over a compacted A panel: pa is (terms, mr_stride), its
   step t pairs with row ks[t] of the packed B panel pb (kc, nr_panel).  The skipped
   steps only multiplied zeros, so the result equals the kernel's on the full panel. */
typedef void (*cnn_gemm_kernel_sparse_fn)(float *c, int64_t ldc, const float *pa,
                                          const float *pb, const int32_t *ks, int64_t terms,
                                          int mr_stride, int mr, int nr_panel, int nr,
                                          float alpha, float beta);

/* Optional: C[0:1, 0:N] = alpha * a . B + beta * C for ONE row a of op(A) (K entries,
   a[k * a_step], K <= CNN_GEMM_ROW_MAX_K) and row-contiguous op(B) (K, N) rows ldb apart,
   read in place -- the no-packing path for tiny M (a single inference).  Terms whose a[k]
   is zero are skipped, as reference BLAS does, so only the rows of B that matter are
   read (images and ReLU outputs are mostly zeros).  Each element is otherwise
   accumulated exactly as the family's tile kernel does (one accumulator from zero, k
   increasing), so both paths give equal results: the same bits, except that a zero
   may differ in sign and a zero a[k] meeting an infinite or NaN B[k, j] is not NaN. */
typedef void (*cnn_gemm_row_fn)(float *c, const float *a, int64_t a_step, const float *b,
                                int64_t ldb, int64_t N, int64_t K, float alpha, float beta);

/* Optional, with row_terms: the nonzero entries of a (n,) in order, values to vals and
   indices (first + position) to ks; returns how many.  vals and ks hold n + 16. */
typedef int64_t (*cnn_gemm_terms_fn)(const float *a, int64_t n, int32_t first, float *vals,
                                     int32_t *ks);

/* Optional: cnn_gemm_row_fn from the terms of a: c[0:N] = alpha * sum_t vals[t] *
   B[ks[t], 0:N] + beta * c, ks increasing. */
typedef void (*cnn_gemm_row_terms_fn)(float *c, const float *vals, const int32_t *ks,
                                      int64_t terms, const float *b, int64_t ldb, int64_t N,
                                      float alpha, float beta);

/* Longest reduction a row function takes: every family's kc is at most this. */
#define CNN_GEMM_ROW_MAX_K 512

/* The nonzero terms of a (K,) stride a_step, in order: values into vals, indices
   into ks; returns how many.  (Branch-free; NaN counts as nonzero.) */
CNN_INLINE int64_t cnn_row_terms(const float *a, int64_t a_step, int64_t K, float *vals,
                                 int32_t *ks)
{
    /* a (K,) -> vals (n,), ks (n,) */
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
        const float v = a[k * a_step];
        vals[n] = v;
        ks[n] = (int32_t)k;
        n += v != 0.0f;
    }
    return n;
}

/* The body of a family's cnn_gemm_row_terms_fn: blocks of 8 W columns (W per vector),
   each by the family's row_block(c, vals, ks, terms, b, ldb, n, alpha, beta, NV, MASKED)
   with the vector count NV fixed at compile time: 8 whole vectors, or NV with the last
   masked. */
#define CNN_GEMM_ROW_TERMS(W)                                                          \
    for (int64_t j0 = 0; j0 < N; j0 += 8 * (W)) {                                      \
        const int64_t n = N - j0 < 8 * (W) ? N - j0 : 8 * (W);                         \
        float *cj = c + j0;                                                            \
        const float *bj = b + j0;                                                      \
        switch (n == 8 * (W) ? 0 : (n + (W) - 1) / (W)) {                              \
        case 0: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 8, 0); break;  \
        case 1: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 1, 1); break;  \
        case 2: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 2, 1); break;  \
        case 3: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 3, 1); break;  \
        case 4: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 4, 1); break;  \
        case 5: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 5, 1); break;  \
        case 6: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 6, 1); break;  \
        case 7: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 7, 1); break;  \
        default: row_block(cj, vals, ks, terms, bj, ldb, n, alpha, beta, 8, 1); break; \
        }                                                                              \
    }

/* cnn_gemm_terms_fn in plain C, for families without a vector form. */
int64_t cnn_gemm_terms_generic(const float *a, int64_t n, int32_t first, float *vals,
                               int32_t *ks);

typedef struct cnn_gemm_family {
    cnn_kernel id;
    int mr_max;        /* tallest tile (rows of C) */
    int nr;            /* widest tile (columns of C), a multiple of nr_step */
    int nr_step;       /* SIMD width in floats: panel widths are multiples of it */
    int64_t kc;        /* reduction block */
    int64_t mc;        /* rows of C per packed A block */
    int64_t nc;        /* columns of C per packed B block */
    cnn_gemm_kernel_fn kernel;
    cnn_gemm_pack_fn pack;
    cnn_gemm_kernel_packb_fn kernel_packb;  /* NULL when the family has none */
    cnn_gemm_row_fn row;                    /* NULL when the family has none */
    cnn_gemm_compact_fn compact;            /* NULL (with kernel_sparse) when none */
    cnn_gemm_kernel_sparse_fn kernel_sparse;
    cnn_gemm_terms_fn terms;                /* NULL (with row_terms) when none */
    cnn_gemm_row_terms_fn row_terms;
    cnn_gemm_kernel_ep_fn kernel_ep;        /* NULL when the family has none */
} cnn_gemm_family;

/* The family for a kernel id, or NULL when this build has no such family.
   (Whether the CPU can run it is cnn_runtime.c's business.) */
const cnn_gemm_family *cnn_gemm_family_for(cnn_kernel kernel);

/* Per-ISA families; each returns NULL when its ISA is not compiled in. */
const cnn_gemm_family *cnn_gemm_family_generic(void);
const cnn_gemm_family *cnn_gemm_family_avx2(void);
const cnn_gemm_family *cnn_gemm_family_avx512(void);
const cnn_gemm_family *cnn_gemm_family_neon(void);

/* Portable packing routine (a cnn_gemm_pack_fn). */
void cnn_gemm_pack_generic(float *dst, const float *src, int64_t ld, int xmajor,
                           int64_t k0, int64_t kc, int64_t x0, int64_t nx,
                           int panel, int step);

/* Width of the last of the panels of cnn_gemm_pack_fn holding the final `rest`
   (1 <= rest <= panel) entries. */
CNN_INLINE int cnn_gemm_last_width(int64_t rest, int panel, int step)
{
    /* (rest, panel, step) -> width */
    const int64_t w = (rest + step - 1) / step * step;
    return (int)(w < panel ? w : panel);
}

#endif
