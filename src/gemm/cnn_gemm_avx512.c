/* cnn_gemm_avx512.c -- AVX-512F GEMM family: 14 x 32 register tile and 16 x 16
   transposing packs.  Compiled with function-level target attributes, so the rest
   of the library keeps the baseline ISA; callers check the CPU first. */
#include "cnn_gemm_kernels.h"

#ifdef CNN_GEMM_X86
#include <immintrin.h>

#define AVX512_FN __attribute__((target("avx512f")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f")))

/* Panels packed together by the row-contiguous pack (see pack_avx512). */
enum { MR = 14, NR = 32, PACK_GROUP = 8 };

/* Mask of the low n lanes (n clamped to [0, 16]). */
AVX512_INLINE __mmask16 lanes(int64_t n)
{
    /* n -> (16,) lane mask */
    if (n <= 0)
        return 0;
    if (n >= 16)
        return (__mmask16)0xFFFF;
    return (__mmask16)((1u << n) - 1u);
}

/* r with the epilogue ep applied for C(i, j .. j + 15) (lanes past m are don't-care):
   the operations of epilogue_rows_body (cnn_gemm.c) on the identity, relu and
   leaky_relu, in the same order.  max(r, 0) is r > 0 ? r : 0 exactly (NaN and -0 give
   +0: max returns its second operand unless the first is greater). */
AVX512_INLINE __m512 epilogue(__m512 r, const cnn_epilogue *ep, int64_t i, int64_t j,
                              __mmask16 m)
{
    /* r -> act'(grad_of) * act(r + bias) */
    const __m512 zero = _mm512_setzero_ps(), slope = _mm512_set1_ps(ep->alpha);
    if (ep->bias)
        r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, ep->bias + j));
    if (ep->act == CNN_ACT_RELU)
        r = _mm512_max_ps(r, zero);
    else if (ep->act == CNN_ACT_LEAKY_RELU)
        r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, zero, _CMP_GT_OQ),
                                 _mm512_mul_ps(slope, r), r);
    if (ep->grad_of && ep->grad_act != CNN_ACT_IDENTITY) {
        const __m512 y = _mm512_maskz_loadu_ps(m, ep->grad_of + i * ep->ld_grad_of + j);
        const __mmask16 pos = _mm512_cmp_ps_mask(y, zero, _CMP_GT_OQ);
        r = ep->grad_act == CNN_ACT_RELU ? _mm512_maskz_mov_ps(pos, r)
                                         : _mm512_mask_blend_ps(pos, _mm512_mul_ps(slope, r), r);
    }
    return r;
}

/* C tile (R, nr) = alpha * pa . pb + beta * C ; pa is (kc, stride), pb is (kc, 16 NV).
   Only the R rows stored are computed: a short last tile of a block (its panel padded
   to the block's stride) costs its own rows, not a full tile's.
   FUSE 0: pb is a packed panel.  FUSE 1: pb is the unpacked source, rows ldpb apart,
   and each row is also stored to the packed panel pbo (kc, 16 NV), so the first tile
   of a panel packs it.  FUSE 2: pb is the unpacked source and nothing is stored.
   FUSE 3: pa is compacted, its step k pairs with row ks[k] of the packed panel pb.
   With ep, the epilogue is applied to the tile (C(row, col) its first element). */
AVX512_INLINE void tile(const int R, const int NV, const int FUSE, float *c, int64_t ldc,
                        const float *CNN_RESTRICT pa, int64_t stride,
                        const float *CNN_RESTRICT pb, int64_t ldpb, float *CNN_RESTRICT pbo,
                        const int32_t *ks, int64_t kc, int nr, float alpha, float beta,
                        const cnn_epilogue *ep, int64_t row, int64_t col)
{
    /* pa (kc, stride), pb (kc, 16 NV) rows ldpb apart -> C (R, nr), rows ldc apart */
    __m512 acc0[MR], acc1[MR];
    CNN_UNROLL
    for (int i = 0; i < R; ++i) {
        acc0[i] = _mm512_setzero_ps();
        acc1[i] = _mm512_setzero_ps();
    }
    CNN_UNROLL
    for (int i = 0; i < R; ++i) {
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 16 * NV - 1), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < kc; ++k) {
        const float *pbk = FUSE == 3 ? pb + (int64_t)ks[k] * (16 * NV) : pb;
        const __m512 b0 = _mm512_loadu_ps(pbk);
        const __m512 b1 = NV == 2 ? _mm512_loadu_ps(pbk + 16) : b0;
        if (FUSE == 1 || FUSE == 2) {
            /* The source rows are ldpb apart: fetch the 128 bytes of the row 8 ahead. */
            _mm_prefetch((const char *)(pb + 8 * ldpb), _MM_HINT_T0);
            _mm_prefetch((const char *)(pb + 8 * ldpb + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(pb + 8 * ldpb + 31), _MM_HINT_T0);
        }
        if (FUSE == 1) {
            _mm512_storeu_ps(pbo, b0);
            if (NV == 2)
                _mm512_storeu_ps(pbo + 16, b1);
            pbo += 16 * NV;
        }
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            const __m512 a = _mm512_set1_ps(pa[i]);
            acc0[i] = _mm512_fmadd_ps(a, b0, acc0[i]);
            if (NV == 2)
                acc1[i] = _mm512_fmadd_ps(a, b1, acc1[i]);
        }
        pa += stride;
        if (FUSE != 3)
            pb += FUSE ? ldpb : 16 * NV;
    }
    const __m512 va = _mm512_set1_ps(alpha);
    const __m512 vb = _mm512_set1_ps(beta);
    if (nr == 16 * NV) {
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            float *ci = c + i * ldc;
            __m512 r0 = _mm512_mul_ps(va, acc0[i]);
            __m512 r1 = _mm512_mul_ps(va, acc1[i]);
            if (beta != 0.0f) {
                r0 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci), r0);
                if (NV == 2)
                    r1 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + 16), r1);
            }
            if (ep) {
                r0 = epilogue(r0, ep, row + i, col, 0xffff);
                if (NV == 2)
                    r1 = epilogue(r1, ep, row + i, col + 16, 0xffff);
            }
            _mm512_storeu_ps(ci, r0);
            if (NV == 2)
                _mm512_storeu_ps(ci + 16, r1);
        }
    } else {
        const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            float *ci = c + i * ldc;
            __m512 r0 = _mm512_mul_ps(va, acc0[i]);
            __m512 r1 = _mm512_mul_ps(va, acc1[i]);
            if (beta != 0.0f) {
                r0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, ci), r0);
                if (NV == 2)
                    r1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16), r1);
            }
            if (ep) {
                r0 = epilogue(r0, ep, row + i, col, m0);
                if (NV == 2)
                    r1 = epilogue(r1, ep, row + i, col + 16, m1);
            }
            _mm512_mask_storeu_ps(ci, m0, r0);
            if (NV == 2)
                _mm512_mask_storeu_ps(ci + 16, m1, r1);
        }
    }
}

#define TILE_CASE(R, V, F) \
    case R:                                                                        \
        tile(R, V, F, c, ldc, pa, mr_stride, pb, ldpb, pbo, ks, kc, nr, alpha, beta, ep, row, \
             col);                                                                 \
        return;
#define TILE_SWITCH(V, F)                                                          \
    switch (mr) {                                                                  \
        TILE_CASE(1, V, F) TILE_CASE(2, V, F) TILE_CASE(3, V, F)                   \
        TILE_CASE(4, V, F) TILE_CASE(5, V, F) TILE_CASE(6, V, F)                   \
        TILE_CASE(7, V, F) TILE_CASE(8, V, F) TILE_CASE(9, V, F)                   \
        TILE_CASE(10, V, F) TILE_CASE(11, V, F) TILE_CASE(12, V, F)                \
        TILE_CASE(13, V, F) TILE_CASE(14, V, F)                                    \
        default: return;                                                           \
    }

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa (kc, mr_stride), pb (kc, nr_panel). */
static AVX512_FN void kernel_avx512(float *c, int64_t ldc, const float *pa, const float *pb,
                                    int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                                    float alpha, float beta)
{
    /* pa (kc, mr_stride), pb (kc, nr_panel) -> C (mr, nr) */
    const int64_t ldpb = nr_panel, row = 0, col = 0;
    float *pbo = 0;
    const int32_t *ks = 0;
    const cnn_epilogue *ep = 0;
    if (nr_panel == 32) {
        TILE_SWITCH(2, 0)
    } else {
        TILE_SWITCH(1, 0)
    }
}

/* kernel_avx512 with the epilogue ep applied to the tile (see cnn_gemm_kernel_ep_fn). */
static AVX512_FN void kernel_ep_avx512(float *c, int64_t ldc, const float *pa, const float *pb,
                                       int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                                       float alpha, float beta, const cnn_epilogue *ep,
                                       int64_t row, int64_t col)
{
    /* pa (kc, mr_stride), pb (kc, nr_panel) -> C (mr, nr) */
    const int64_t ldpb = nr_panel;
    float *pbo = 0;
    const int32_t *ks = 0;
    if (nr_panel == 32) {
        TILE_SWITCH(2, 0)
    } else {
        TILE_SWITCH(1, 0)
    }
}

/* As kernel_avx512 over a compacted A panel (see cnn_gemm_kernel_sparse_fn). */
static AVX512_FN void kernel_sparse_avx512(float *c, int64_t ldc, const float *pa,
                                           const float *pb, const int32_t *ks, int64_t terms,
                                           int mr_stride, int mr, int nr_panel, int nr,
                                           float alpha, float beta)
{
    /* pa (terms, mr_stride), pb (kc, nr_panel) rows ks -> C (mr, nr) */
    const int64_t ldpb = nr_panel, kc = terms, row = 0, col = 0;
    const cnn_epilogue *ep = 0;
    float *pbo = 0;
    if (nr_panel == 32) {
        TILE_SWITCH(2, 3)
    } else {
        TILE_SWITCH(1, 3)
    }
}

/* Drop the all-zero steps of a packed A panel (see cnn_gemm_compact_fn); branch-free. */
static AVX512_FN int64_t compact_avx512(float *pa, int64_t kc, int mrs, int32_t *ks)
{
    /* pa (kc, mrs) -> pa (n, mrs), ks (n,) */
    const __mmask16 m = lanes(mrs);
    int64_t n = 0;
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 v = _mm512_maskz_loadu_ps(m, pa + k * mrs);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(m, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        _mm512_mask_storeu_ps(pa + n * mrs, m, v);
        ks[n] = (int32_t)k;
        n += nz != 0;
    }
    return n;
}

/* As kernel_avx512 on a full 32-column panel read from the source rows bsrc (ldb apart),
   storing the packed panel to pbo (kc, 32) on the way unless pbo is NULL. */
static AVX512_FN void kernel_packb_avx512(float *c, int64_t ldc, const float *pa,
                                          const float *bsrc, int64_t ldb, float *pbo,
                                          int64_t kc, int mr_stride, int mr, float alpha,
                                          float beta)
{
    /* pa (kc, mr_stride), bsrc (kc, 32) rows ldb apart -> C (mr, 32), pbo (kc, 32) */
    const float *pb = bsrc;
    const int64_t ldpb = ldb, row = 0, col = 0;
    const cnn_epilogue *ep = 0;
    const int nr = NR;
    const int32_t *ks = 0;
    if (pbo) {
        TILE_SWITCH(2, 1)
    } else {
        TILE_SWITCH(2, 2)
    }
}

/* In-register transpose of a 16 x 16 block: r[i][j] -> r[j][i]. */
AVX512_INLINE void transpose16(__m512 r[16])
{
    /* r: 16 rows of 16 floats, transposed in place */
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
        const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
        r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    /* r[4g + j] now holds, in 128-bit lane L, column 4L + j of rows 4g .. 4g + 3. */
    for (int j = 0; j < 4; ++j) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
        const __m512 u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
        const __m512 v0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(u0, v0, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(u0, v0, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(u1, v1, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(u1, v1, 0xDD);
    }
    for (int i = 0; i < 16; ++i)
        r[i] = t[i];
}

/* One panel of columns-contiguous X: dst (kc, width) = X(k0 + k, x0 + x), zero past nx,
   where X(k, x) = src[x * ld + k]; 16 x 16 blocks are transposed in registers. */
static AVX512_FN void pack_xmajor(float *dst, const float *src, int64_t ld, int64_t k0,
                                  int64_t kc, int64_t x0, int64_t nx, int width)
{
    /* src rows x0 .. x0 + nx - 1 -> dst (kc, width) */
    if (width == 1) {
        /* A single row is already in the packed order. */
        const float *s = src + x0 * ld + k0;
        for (int64_t k = 0; k < kc; k += 16) {
            const __mmask16 km = lanes(kc - k);
            const __m512 v = nx ? _mm512_maskz_loadu_ps(km, s + k) : _mm512_setzero_ps();
            _mm512_mask_storeu_ps(dst + k, km, v);
        }
        return;
    }
    for (int g = 0; g < width; g += 16) {
        const int64_t vx = nx - g < 0 ? 0 : (nx - g > 16 ? 16 : nx - g);
        const __mmask16 sm = lanes(width - g);
        if (vx == 0) {
            for (int64_t k = 0; k < kc; ++k)
                _mm512_mask_storeu_ps(dst + k * width + g, sm, _mm512_setzero_ps());
            continue;
        }
        const float *s = src + (x0 + g) * ld + k0;
        for (int64_t k = 0; k < kc; k += 16) {
            const int64_t mk = kc - k < 16 ? kc - k : 16;
            const __mmask16 km = lanes(mk);
            __m512 r[16];
            if (mk == 16) {
                for (int v = 0; v < 16; ++v)
                    r[v] = v < vx ? _mm512_loadu_ps(s + v * ld + k) : _mm512_setzero_ps();
            } else {
                for (int v = 0; v < 16; ++v)
                    r[v] = v < vx ? _mm512_maskz_loadu_ps(km, s + v * ld + k)
                                  : _mm512_setzero_ps();
            }
            transpose16(r);
            float *d = dst + k * width + g;
            if (sm == 0xFFFF) {
                for (int64_t kk = 0; kk < mk; ++kk)
                    _mm512_storeu_ps(d + kk * width, r[kk]);
            } else {
                for (int64_t kk = 0; kk < mk; ++kk)
                    _mm512_mask_storeu_ps(d + kk * width, sm, r[kk]);
            }
        }
    }
}

/* Copy nx (<= 32) floats from s to d and zero d up to width (<= 32). */
AVX512_INLINE void copy_row(float *d, const float *s, __mmask16 l0, __mmask16 l1,
                            __mmask16 s0, __mmask16 s1)
{
    /* s (nx,) -> d (width,) with precomputed load masks l and store masks s */
    _mm512_mask_storeu_ps(d, s0, _mm512_maskz_loadu_ps(l0, s));
    if (s1)
        _mm512_mask_storeu_ps(d + 16, s1, _mm512_maskz_loadu_ps(l1, s + 16));
}

/* Panels of X(k0 : k0 + kc, x0 : x0 + nx) ; see cnn_gemm_pack_fn. */
static AVX512_FN void pack_avx512(float *dst, const float *src, int64_t ld, int xmajor,
                                  int64_t k0, int64_t kc, int64_t x0, int64_t nx,
                                  int panel, int step)
{
    /* X (kc, nx) -> ceil(nx / panel) panels (kc, panel), the last (kc, last_w) */
    const int64_t n_full = nx / panel, rest = nx - n_full * panel;
    const int last_w = rest ? cnn_gemm_last_width(rest, panel, step) : 0;
    const int64_t pstride = (int64_t)panel * kc;
    if (xmajor) {
        for (int64_t p = 0; p < n_full; ++p)
            pack_xmajor(dst + p * pstride, src, ld, k0, kc, x0 + p * panel, panel, panel);
        if (rest)
            pack_xmajor(dst + n_full * pstride, src, ld, k0, kc, x0 + n_full * panel, rest,
                        last_w);
        return;
    }
    /* Rows of X are contiguous: walk k outermost over groups of a few panels, so each
       source row streams in long runs while only a few destination streams are open
       (panels can be a multiple of 4 KiB apart and would share cache sets). */
    const __mmask16 fl0 = lanes(panel), fl1 = lanes(panel - 16);
    const __mmask16 tl0 = lanes(rest), tl1 = lanes(rest - 16);
    const __mmask16 ts0 = lanes(last_w), ts1 = lanes(last_w - 16);
    const int64_t n_panels = n_full + (rest ? 1 : 0);
    for (int64_t p0 = 0; p0 < n_panels; p0 += PACK_GROUP) {
        const int64_t p1 = p0 + PACK_GROUP < n_full ? p0 + PACK_GROUP : n_full;
        const int tail = p0 + PACK_GROUP >= n_panels && rest;
        const float *s = src + k0 * ld + x0;
        float *dt = dst + n_full * pstride;
        for (int64_t k = 0; k < kc; ++k, s += ld) {
            if (panel == 32) {
                for (int64_t p = p0; p < p1; ++p) {
                    float *d = dst + p * pstride + k * 32;
                    _mm512_storeu_ps(d, _mm512_loadu_ps(s + p * 32));
                    _mm512_storeu_ps(d + 16, _mm512_loadu_ps(s + p * 32 + 16));
                }
            } else {
                for (int64_t p = p0; p < p1; ++p)
                    copy_row(dst + p * pstride + k * panel, s + p * panel, fl0, fl1, fl0, fl1);
            }
            if (tail)
                copy_row(dt + k * last_w, s + n_full * panel, tl0, tl1, ts0, ts1);
        }
    }
}

/* One row of C: alpha * a . B (+ beta C), 8 accumulators of 16 columns at a time. */
/* acc[0:NV] += ak * B row bk (the last vector masked to `last` when MASKED). */
AVX512_INLINE void row_fma(__m512 *acc, __m512 ak, const float *bk, __mmask16 last,
                           const int NV, const int MASKED)
{
    CNN_UNROLL
    for (int v = 0; v < NV - MASKED; ++v)
        acc[v] = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 16 * v), acc[v]);
    if (MASKED)
        acc[NV - 1] = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(last, bk + 16 * (NV - 1)),
                                      acc[NV - 1]);
}

/* Columns [0, n) of one row, n <= 16 NV, from the terms (vals, ks): NV accumulators,
   the last one masked when MASKED.  Inlined with constant NV and MASKED, so the loops
   over v unroll. */
AVX512_INLINE void row_block(float *c, const float *vals, const int32_t *ks, int64_t terms,
                             const float *b, int64_t ldb, int64_t n, float alpha, float beta,
                             const int NV, const int MASKED)
{
    /* terms of a, B (K, n) rows ldb apart -> c (n,) */
    const __mmask16 last = lanes(n - 16 * (NV - 1));
    __m512 acc[8];
    CNN_UNROLL
    for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_setzero_ps();
    if (terms > 0 && ks[terms - 1] == terms - 1) {
        /* Nothing skipped: walk the rows in order (cheaper addressing, easier to prefetch). */
        for (int64_t t = 0; t < terms; ++t, b += ldb)
            row_fma(acc, _mm512_set1_ps(vals[t]), b, last, NV, MASKED);
    } else {
        for (int64_t t = 0; t < terms; ++t)
            row_fma(acc, _mm512_set1_ps(vals[t]), b + ks[t] * ldb, last, NV, MASKED);
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    CNN_UNROLL
    for (int v = 0; v < NV; ++v) {
        const __mmask16 m = v == NV - 1 ? last : (__mmask16)0xffff;
        __m512 r = _mm512_mul_ps(va, acc[v]);
        if (beta != 0.0f)
            r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + 16 * v), r);
        _mm512_mask_storeu_ps(c + 16 * v, m, r);
    }
}

/* The nonzero entries of a (n,), in order (see cnn_gemm_terms_fn): compressed 16 at a
   time in registers (the register form is fast on every AVX-512 core). */
static AVX512_FN int64_t terms_avx512(const float *a, int64_t n, int32_t first, float *vals,
                                      int32_t *ks)
{
    /* a (n,) -> vals, ks (count,) */
    int64_t count = 0;
    __m512i k16 = _mm512_add_epi32(_mm512_set1_epi32(first),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int64_t k = 0; k < n; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(lanes(n - k), a + k);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(lanes(n - k), v, _mm512_setzero_ps(),
                                                      _CMP_NEQ_UQ);
        _mm512_storeu_ps(vals + count, _mm512_maskz_compress_ps(nz, v));
        _mm512_storeu_si512((void *)(ks + count), _mm512_maskz_compress_epi32(nz, k16));
        count += __builtin_popcount(nz);
        k16 = _mm512_add_epi32(k16, _mm512_set1_epi32(16));
    }
    return count;
}

/* One row of C from the terms of a (see cnn_gemm_row_terms_fn), 128 columns at a time. */
static AVX512_FN void row_terms_avx512(float *c, const float *vals, const int32_t *ks,
                                       int64_t terms, const float *b, int64_t ldb, int64_t N,
                                       float alpha, float beta)
{
    /* terms of a, B (K, N) rows ldb apart -> c (N,) */
    CNN_GEMM_ROW_TERMS(16)
}

static AVX512_FN void row_avx512(float *c, const float *a, int64_t a_step, const float *b,
                                 int64_t ldb, int64_t N, int64_t K, float alpha, float beta)
{
    /* a (K,) stride a_step, B (K, N) rows ldb apart -> c (N,) */
    float vals[CNN_GEMM_ROW_MAX_K + 16];
    int32_t ks[CNN_GEMM_ROW_MAX_K + 16];
    const int64_t terms = a_step == 1 ? terms_avx512(a, K, 0, vals, ks)
                                      : cnn_row_terms(a, a_step, K, vals, ks);
    row_terms_avx512(c, vals, ks, terms, b, ldb, N, alpha, beta);
}

static const cnn_gemm_family family_avx512 = {
    CNN_KERNEL_AVX512, MR, NR, 16,
    512, 168, 4096,
    kernel_avx512, pack_avx512, kernel_packb_avx512, row_avx512,
    compact_avx512, kernel_sparse_avx512, terms_avx512, row_terms_avx512, kernel_ep_avx512
};

const cnn_gemm_family *cnn_gemm_family_avx512(void) { return &family_avx512; }

#else

const cnn_gemm_family *cnn_gemm_family_avx512(void) { return 0; }

#endif
