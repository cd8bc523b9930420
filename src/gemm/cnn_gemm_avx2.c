/* cnn_gemm_avx2.c -- AVX2 + FMA GEMM family: 5 x 16 register tile and 8 x 8
   transposing packs.  Compiled with function-level target attributes, so the rest
   of the library keeps the baseline ISA; callers check the CPU first. */
#include "cnn_gemm_kernels.h"

#ifdef CNN_GEMM_X86
#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* Five rows: 10 accumulators, 2 B vectors and a broadcast fit the 16 ymm registers
   without spilling (six rows leave the compiler one register short). */
enum { MR = 5, NR = 16, PACK_GROUP = 8 };

/* Load mask of the low n lanes of 8 (n clamped to [0, 8]). */
AVX2_INLINE __m256i lanes8(int64_t n)
{
    /* n -> (8,) int mask */
    static const int32_t ramp[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
    const int32_t m = n <= 0 ? 0 : (n >= 8 ? 8 : (int32_t)n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m),
                              _mm256_loadu_si256((const __m256i *)ramp));
}

/* C tile (R, nr) = alpha * pa . pb + beta * C ; pa is (kc, stride), pb is (kc, 8 NV):
   only the R rows stored are computed.
   FUSE 0: pb is a packed panel.  FUSE 1: pb is the unpacked source, rows ldpb apart,
   and each row is also stored to the packed panel pbo (kc, 8 NV), so the first tile
   of a panel packs it.  FUSE 2: pb is the unpacked source and nothing is stored. */
AVX2_INLINE void tile(const int R, const int NV, const int FUSE, float *c, int64_t ldc,
                      const float *CNN_RESTRICT pa, int64_t stride,
                      const float *CNN_RESTRICT pb, int64_t ldpb, float *CNN_RESTRICT pbo,
                      int64_t kc, int nr, float alpha, float beta)
{
    /* pa (kc, stride), pb (kc, 8 NV) rows ldpb apart -> C (R, nr), rows ldc apart */
    __m256 acc0[MR], acc1[MR];
    CNN_UNROLL
    for (int i = 0; i < R; ++i) {
        acc0[i] = _mm256_setzero_ps();
        acc1[i] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kc; ++k) {
        const __m256 b0 = _mm256_loadu_ps(pb);
        const __m256 b1 = NV == 2 ? _mm256_loadu_ps(pb + 8) : b0;
        if (FUSE) {
            /* The source rows are ldpb apart: fetch the 64 bytes of the row 8 ahead. */
            _mm_prefetch((const char *)(pb + 8 * ldpb), _MM_HINT_T0);
            _mm_prefetch((const char *)(pb + 8 * ldpb + 15), _MM_HINT_T0);
        }
        if (FUSE == 1) {
            _mm256_storeu_ps(pbo, b0);
            if (NV == 2)
                _mm256_storeu_ps(pbo + 8, b1);
            pbo += 8 * NV;
        }
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            const __m256 a = _mm256_broadcast_ss(pa + i);
            acc0[i] = _mm256_fmadd_ps(a, b0, acc0[i]);
            if (NV == 2)
                acc1[i] = _mm256_fmadd_ps(a, b1, acc1[i]);
        }
        pa += stride;
        pb += FUSE ? ldpb : 8 * NV;
    }
    const __m256 va = _mm256_set1_ps(alpha);
    const __m256 vb = _mm256_set1_ps(beta);
    if (nr == 8 * NV) {
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            float *ci = c + i * ldc;
            __m256 r0 = _mm256_mul_ps(va, acc0[i]);
            __m256 r1 = _mm256_mul_ps(va, acc1[i]);
            if (beta != 0.0f) {
                r0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci), r0);
                if (NV == 2)
                    r1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci + 8), r1);
            }
            _mm256_storeu_ps(ci, r0);
            if (NV == 2)
                _mm256_storeu_ps(ci + 8, r1);
        }
    } else {
        const __m256i m0 = lanes8(nr), m1 = lanes8(nr - 8);
        CNN_UNROLL
        for (int i = 0; i < R; ++i) {
            float *ci = c + i * ldc;
            __m256 r0 = _mm256_mul_ps(va, acc0[i]);
            __m256 r1 = _mm256_mul_ps(va, acc1[i]);
            if (beta != 0.0f) {
                r0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(ci, m0), r0);
                if (NV == 2)
                    r1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(ci + 8, m1), r1);
            }
            _mm256_maskstore_ps(ci, m0, r0);
            if (NV == 2)
                _mm256_maskstore_ps(ci + 8, m1, r1);
        }
    }
}

#define TILE_CASE(R, V, F) \
    case R: tile(R, V, F, c, ldc, pa, mr_stride, pb, ldpb, pbo, kc, nr, alpha, beta); return;
#define TILE_SWITCH(V, F)                                                          \
    switch (mr) {                                                                  \
        TILE_CASE(1, V, F) TILE_CASE(2, V, F) TILE_CASE(3, V, F)                   \
        TILE_CASE(4, V, F) TILE_CASE(5, V, F)                                      \
        default: return;                                                           \
    }

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa (kc, mr_stride), pb (kc, nr_panel). */
static AVX2_FN void kernel_avx2(float *c, int64_t ldc, const float *pa, const float *pb,
                                int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                                float alpha, float beta)
{
    /* pa (kc, mr_stride), pb (kc, nr_panel) -> C (mr, nr) */
    const int64_t ldpb = nr_panel;
    float *pbo = 0;
    if (nr_panel == 16) {
        TILE_SWITCH(2, 0)
    } else {
        TILE_SWITCH(1, 0)
    }
}

/* As kernel_avx2 on a full 16-column panel read from the source rows bsrc (ldb apart),
   storing the packed panel to pbo (kc, 16) on the way unless pbo is NULL. */
static AVX2_FN void kernel_packb_avx2(float *c, int64_t ldc, const float *pa,
                                      const float *bsrc, int64_t ldb, float *pbo,
                                      int64_t kc, int mr_stride, int mr, float alpha,
                                      float beta)
{
    /* pa (kc, mr_stride), bsrc (kc, 16) rows ldb apart -> C (mr, 16), pbo (kc, 16) */
    const float *pb = bsrc;
    const int64_t ldpb = ldb;
    const int nr = NR;
    if (pbo) {
        TILE_SWITCH(2, 1)
    } else {
        TILE_SWITCH(2, 2)
    }
}

/* In-register transpose of an 8 x 8 block: r[i][j] -> r[j][i]. */
AVX2_INLINE void transpose8(__m256 r[8])
{
    /* r: 8 rows of 8 floats, transposed in place */
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 8; g += 4) {
        s[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
        s[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
        s[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        s[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
    }
}

/* One panel of columns-contiguous X: dst (kc, width) = X(k0 + k, x0 + x), zero past nx,
   where X(k, x) = src[x * ld + k]; 8 x 8 blocks are transposed in registers. */
static AVX2_FN void pack_xmajor(float *dst, const float *src, int64_t ld, int64_t k0,
                                int64_t kc, int64_t x0, int64_t nx, int width)
{
    /* src rows x0 .. x0 + nx - 1 -> dst (kc, width) */
    for (int g = 0; g < width; g += 8) {
        const int64_t vx = nx - g < 0 ? 0 : (nx - g > 8 ? 8 : nx - g);
        const int64_t wg = width - g < 8 ? width - g : 8;
        if (vx == 0) {
            for (int64_t k = 0; k < kc; ++k)
                for (int64_t x = 0; x < wg; ++x)
                    dst[k * width + g + x] = 0.0f;
            continue;
        }
        const float *s = src + (x0 + g) * ld + k0;
        const __m256i sm = lanes8(wg);
        int64_t k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 r[8];
            for (int v = 0; v < 8; ++v)
                r[v] = v < vx ? _mm256_loadu_ps(s + v * ld + k) : _mm256_setzero_ps();
            transpose8(r);
            float *d = dst + k * width + g;
            if (wg == 8) {
                for (int kk = 0; kk < 8; ++kk)
                    _mm256_storeu_ps(d + kk * width, r[kk]);
            } else {
                for (int kk = 0; kk < 8; ++kk)
                    _mm256_maskstore_ps(d + kk * width, sm, r[kk]);
            }
        }
        for (; k < kc; ++k) {
            for (int64_t x = 0; x < wg; ++x)
                dst[k * width + g + x] = x < vx ? s[x * ld + k] : 0.0f;
        }
    }
}

/* Copy up to 16 floats from s to d (load masks l0, l1) and zero d up to its width
   (store masks s0, s1; s1 all-zero when the width is at most 8). */
AVX2_INLINE void copy_row(float *d, const float *s, __m256i l0, __m256i l1, __m256i s0,
                          __m256i s1, int two)
{
    /* s (nx,) -> d (width,) */
    _mm256_maskstore_ps(d, s0, _mm256_maskload_ps(s, l0));
    if (two)
        _mm256_maskstore_ps(d + 8, s1, _mm256_maskload_ps(s + 8, l1));
}

/* Panels of X(k0 : k0 + kc, x0 : x0 + nx) ; see cnn_gemm_pack_fn. */
static AVX2_FN void pack_avx2(float *dst, const float *src, int64_t ld, int xmajor,
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
    if (panel > 16) {
        cnn_gemm_pack_generic(dst, src, ld, xmajor, k0, kc, x0, nx, panel, step);
        return;
    }
    /* Rows of X are contiguous: walk k outermost over groups of a few panels, so each
       source row streams in long runs while only a few destination streams are open
       (panels can be a multiple of 4 KiB apart and would share cache sets). */
    const __m256i fl0 = lanes8(panel), fl1 = lanes8(panel - 8);
    const __m256i tl0 = lanes8(rest), tl1 = lanes8(rest - 8);
    const __m256i ts0 = lanes8(last_w), ts1 = lanes8(last_w - 8);
    const int64_t n_panels = n_full + (rest ? 1 : 0);
    for (int64_t p0 = 0; p0 < n_panels; p0 += PACK_GROUP) {
        const int64_t p1 = p0 + PACK_GROUP < n_full ? p0 + PACK_GROUP : n_full;
        const int tail = p0 + PACK_GROUP >= n_panels && rest;
        const float *s = src + k0 * ld + x0;
        float *dt = dst + n_full * pstride;
        for (int64_t k = 0; k < kc; ++k, s += ld) {
            if (panel == 16) {
                for (int64_t p = p0; p < p1; ++p) {
                    float *d = dst + p * pstride + k * 16;
                    _mm256_storeu_ps(d, _mm256_loadu_ps(s + p * 16));
                    _mm256_storeu_ps(d + 8, _mm256_loadu_ps(s + p * 16 + 8));
                }
            } else {
                for (int64_t p = p0; p < p1; ++p)
                    copy_row(dst + p * pstride + k * panel, s + p * panel, fl0, fl1, fl0, fl1,
                             panel > 8);
            }
            if (tail)
                copy_row(dt + k * last_w, s + n_full * panel, tl0, tl1, ts0, ts1, last_w > 8);
        }
    }
}

/* Columns [0, n) of one row of C from the terms of a, n <= 8 NV (MASKED: the last
   vector holds n - 8 (NV - 1) columns). */
AVX2_INLINE void row_block(float *c, const float *vals, const int32_t *ks, int64_t terms,
                           const float *b, int64_t ldb, int64_t n, float alpha, float beta,
                           const int NV, const int MASKED)
{
    /* terms of a, B (K, n) rows ldb apart -> c (n,) */
    const __m256i last = lanes8(MASKED ? n - 8 * (NV - 1) : 8);
    __m256 acc[8];
    CNN_UNROLL
    for (int v = 0; v < NV; ++v)
        acc[v] = _mm256_setzero_ps();
    for (int64_t t = 0; t < terms; ++t) {
        const __m256 ak = _mm256_set1_ps(vals[t]);
        const float *bk = b + ks[t] * ldb;
        CNN_UNROLL
        for (int v = 0; v < NV; ++v) {
            const __m256 bv = MASKED && v == NV - 1 ? _mm256_maskload_ps(bk + 8 * v, last)
                                                    : _mm256_loadu_ps(bk + 8 * v);
            acc[v] = _mm256_fmadd_ps(ak, bv, acc[v]);
        }
    }
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    CNN_UNROLL
    for (int v = 0; v < NV; ++v) {
        const int part = MASKED && v == NV - 1;
        __m256 r = _mm256_mul_ps(va, acc[v]);
        if (beta != 0.0f)
            r = _mm256_fmadd_ps(vb, part ? _mm256_maskload_ps(c + 8 * v, last)
                                         : _mm256_loadu_ps(c + 8 * v), r);
        if (part)
            _mm256_maskstore_ps(c + 8 * v, last, r);
        else
            _mm256_storeu_ps(c + 8 * v, r);
    }
}

/* One row of C from the terms of a (see cnn_gemm_row_terms_fn), 64 columns at a time. */
static AVX2_FN void row_terms_avx2(float *c, const float *vals, const int32_t *ks,
                                   int64_t terms, const float *b, int64_t ldb, int64_t N,
                                   float alpha, float beta)
{
    /* terms of a, B (K, N) rows ldb apart -> c (N,) */
    CNN_GEMM_ROW_TERMS(8)
}

/* One row of C: alpha * a . B (+ beta C) (see cnn_gemm_row_fn). */
static AVX2_FN void row_avx2(float *c, const float *a, int64_t a_step, const float *b,
                             int64_t ldb, int64_t N, int64_t K, float alpha, float beta)
{
    /* a (K,) stride a_step, B (K, N) rows ldb apart -> c (N,) */
    float vals[CNN_GEMM_ROW_MAX_K];
    int32_t ks[CNN_GEMM_ROW_MAX_K];
    row_terms_avx2(c, vals, ks, cnn_row_terms(a, a_step, K, vals, ks), b, ldb, N, alpha, beta);
}

static const cnn_gemm_family family_avx2 = {
    CNN_KERNEL_AVX2, MR, NR, 8,
    256, 144, 4096,
    kernel_avx2, pack_avx2, kernel_packb_avx2, row_avx2, 0, 0, cnn_gemm_terms_generic,
    row_terms_avx2, 0
};

const cnn_gemm_family *cnn_gemm_family_avx2(void) { return &family_avx2; }

#else

const cnn_gemm_family *cnn_gemm_family_avx2(void) { return 0; }

#endif
