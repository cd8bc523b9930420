/* cnn_gemm_neon.c -- AArch64 Advanced SIMD GEMM family: 8 x 12 register tile.
   Advanced SIMD is part of the AArch64 base ISA, so no target attributes are needed. */
#include "cnn_gemm_kernels.h"

#ifdef CNN_GEMM_NEON
#include <arm_neon.h>

enum { MR = 8, NR = 12 };

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa is (kc, MRS), pb is (kc, 4 NV). */
static inline __attribute__((always_inline)) void
tile(const int MRS, const int NV, float *c, int64_t ldc, const float *CNN_RESTRICT pa,
     const float *CNN_RESTRICT pb, int64_t kc, int mr, int nr, float alpha, float beta)
{
    /* pa (kc, MRS), pb (kc, 4 NV) -> C (mr, nr), rows ldc apart */
    float32x4_t acc[MR][3];
    for (int i = 0; i < MRS; ++i)
        for (int v = 0; v < NV; ++v)
            acc[i][v] = vdupq_n_f32(0.0f);
    for (int64_t k = 0; k < kc; ++k) {
        float32x4_t b[3];
        for (int v = 0; v < NV; ++v)
            b[v] = vld1q_f32(pb + 4 * v);
        for (int i = 0; i < MRS; ++i) {
            const float a = pa[i];
            for (int v = 0; v < NV; ++v)
                acc[i][v] = vfmaq_n_f32(acc[i][v], b[v], a);
        }
        pa += MRS;
        pb += 4 * NV;
    }
    for (int i = 0; i < MRS; ++i) {
        if (i >= mr)
            break;
        float *ci = c + i * ldc;
        for (int v = 0; v < NV; ++v) {
            float32x4_t r = vmulq_n_f32(acc[i][v], alpha);
            if (4 * v + 4 <= nr) {
                if (beta != 0.0f)
                    r = vfmaq_n_f32(r, vld1q_f32(ci + 4 * v), beta);
                vst1q_f32(ci + 4 * v, r);
            } else {
                /* Partial vector: the same arithmetic through a bounce buffer. */
                float tmp[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
                if (beta != 0.0f) {
                    for (int j = 4 * v; j < nr; ++j)
                        tmp[j - 4 * v] = ci[j];
                    r = vfmaq_n_f32(r, vld1q_f32(tmp), beta);
                }
                vst1q_f32(tmp, r);
                for (int j = 4 * v; j < nr; ++j)
                    ci[j] = tmp[j - 4 * v];
            }
        }
    }
}

#define TILE_CASE(R, V) \
    case R: tile(R, V, c, ldc, pa, pb, kc, mr, nr, alpha, beta); return;
#define TILE_SWITCH(V)                                                             \
    switch (mr_stride) {                                                           \
        TILE_CASE(1, V) TILE_CASE(2, V) TILE_CASE(3, V) TILE_CASE(4, V)            \
        TILE_CASE(5, V) TILE_CASE(6, V) TILE_CASE(7, V) TILE_CASE(8, V)            \
        default: return;                                                           \
    }

/* C tile (mr, nr) = alpha * pa . pb + beta * C ; pa (kc, mr_stride), pb (kc, nr_panel). */
static void kernel_neon(float *c, int64_t ldc, const float *pa, const float *pb,
                        int64_t kc, int mr_stride, int mr, int nr_panel, int nr,
                        float alpha, float beta)
{
    /* pa (kc, mr_stride), pb (kc, nr_panel) -> C (mr, nr) */
    if (nr_panel == 12) {
        TILE_SWITCH(3)
    } else if (nr_panel == 8) {
        TILE_SWITCH(2)
    } else {
        TILE_SWITCH(1)
    }
}

/* One panel: dst (kc, width) = X(k0 + k, x0 + x), zero past nx ; X as in
   cnn_gemm_pack_fn. */
static void pack_panel(float *dst, const float *src, int64_t ld, int xmajor,
                       int64_t k0, int64_t kc, int64_t x0, int64_t nx, int width)
{
    /* X (kc, nx) -> dst (kc, width) */
    if (!xmajor && nx == width && (width & 3) == 0) {
        const float *s = src + k0 * ld + x0;
        for (int64_t k = 0; k < kc; ++k, s += ld, dst += width)
            for (int x = 0; x < width; x += 4)
                vst1q_f32(dst + x, vld1q_f32(s + x));
        return;
    }
    if (xmajor && nx == 4 * (nx / 4)) {
        /* 4 x 4 transposes of full groups of four x's, scalar tail in k. */
        for (int64_t x = 0; x < width; x += 4) {
            if (x >= nx) {
                for (int64_t k = 0; k < kc; ++k)
                    for (int64_t xx = x; xx < x + 4 && xx < width; ++xx)
                        dst[k * width + xx] = 0.0f;
                continue;
            }
            const float *s = src + (x0 + x) * ld + k0;
            int64_t k = 0;
            if (x + 4 <= width) {
                for (; k + 4 <= kc; k += 4) {
                    const float32x4_t r0 = vld1q_f32(s + k), r1 = vld1q_f32(s + ld + k);
                    const float32x4_t r2 = vld1q_f32(s + 2 * ld + k);
                    const float32x4_t r3 = vld1q_f32(s + 3 * ld + k);
                    const float32x4_t t0 = vtrn1q_f32(r0, r1), t1 = vtrn2q_f32(r0, r1);
                    const float32x4_t t2 = vtrn1q_f32(r2, r3), t3 = vtrn2q_f32(r2, r3);
                    float *d = dst + k * width + x;
                    vst1q_f32(d, vreinterpretq_f32_f64(vtrn1q_f64(
                        vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))));
                    vst1q_f32(d + width, vreinterpretq_f32_f64(vtrn1q_f64(
                        vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3))));
                    vst1q_f32(d + 2 * width, vreinterpretq_f32_f64(vtrn2q_f64(
                        vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))));
                    vst1q_f32(d + 3 * width, vreinterpretq_f32_f64(vtrn2q_f64(
                        vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3))));
                }
            }
            for (; k < kc; ++k)
                for (int64_t xx = x; xx < x + 4 && xx < width; ++xx)
                    dst[k * width + xx] = s[(xx - x) * ld + k];
        }
        return;
    }
    cnn_gemm_pack_generic(dst, src, ld, xmajor, k0, kc, x0, nx, width, width);
}

/* Panels of X(k0 : k0 + kc, x0 : x0 + nx) ; see cnn_gemm_pack_fn. */
static void pack_neon(float *dst, const float *src, int64_t ld, int xmajor,
                      int64_t k0, int64_t kc, int64_t x0, int64_t nx, int panel, int step)
{
    /* X (kc, nx) -> ceil(nx / panel) panels (kc, panel), the last narrower */
    const int64_t pstride = (int64_t)panel * kc;
    for (int64_t p = 0; p * panel < nx; ++p) {
        const int64_t rest = nx - p * panel;
        const int w = rest >= panel ? panel : cnn_gemm_last_width(rest, panel, step);
        pack_panel(dst + p * pstride, src, ld, xmajor, k0, kc, x0 + p * panel,
                   rest < panel ? rest : panel, w);
    }
}

static const cnn_gemm_family family_neon = {
    CNN_KERNEL_NEON, MR, NR, 4,
    256, 128, 4096,
    kernel_neon, pack_neon, 0, 0, 0, 0, 0, 0, 0
};

const cnn_gemm_family *cnn_gemm_family_neon(void) { return &family_neon; }

#else

const cnn_gemm_family *cnn_gemm_family_neon(void) { return 0; }

#endif
