/* cnn_internal.h -- helpers shared by the kernel sources; not part of the public API. */
#ifndef CNN_INTERNAL_H
#define CNN_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "cnn_core.h"

#define CNN_ALIGN 64

/* 64-byte aligned allocation of n floats (NULL on failure or n <= 0); free with
   cnn_aligned_free (NULL is fine). */
float *cnn_aligned_alloc_floats(int64_t n);
void cnn_aligned_free(float *p);

/* Most threads a parallel loop runs on (thread indices are below this). */
#define CNN_MAX_THREADS 256

/* One task of a parallel loop: `thread` (0 for the caller, < the loop's n_threads) only
   picks the task's scratch space; what a task computes must not depend on it. */
typedef void (*cnn_task_fn)(void *ctx, int64_t task, int thread);

/* Run fn(ctx, task, thread) for every task in [0, n_tasks) on the calling thread and up
   to n_threads - 1 pool workers, which claim tasks one at a time; returns when all have
   finished.  Runs serially while the pool is busy (nested or concurrent calls). */
void cnn_parallel_for(int n_threads, int64_t n_tasks, cnn_task_fn fn, void *ctx);

/* cnn_gather_rows with the rows shared out over n_threads threads once there are
   enough of them (same result), which also checks the copied values: CNN_ERR_NONFINITE
   if a float32 one is NaN or infinite (out is filled all the same). */
int cnn_gather_rows_threaded(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                             int64_t n_index, int64_t n_rows, int64_t n_cols, int n_threads);

/* Max (avg = 0) or average (avg = 1) pooling backward, each image's dX then multiplied
   by act'(act_y) while it is in cache: act_y (batch, in_h, in_w, channels) is the
   activation output that was pooled (unused for CNN_ACT_IDENTITY).  X as for
   cnn_maxpool2d_backward (unused for average pooling). */
int cnn_pool2d_backward_act(float *dX, const float *dY, const float *X, const float *act_y,
                            const cnn_pool2d_shape *s, int avg, cnn_activation act,
                            float alpha, int n_threads);

/* Elementwise loops with an AVX2 build beside the baseline one (the optimizer, the
   gather): the body is a CNN_ALWAYS_INLINE function compiled twice, and
   cnn_use_avx2_build() says which to run.  Only the vector width differs (ISO C builds
   fuse no multiply-add), so both give the same bits.  CNN_PORTABLE_ONLY leaves out
   every x86-64 SIMD path (what other architectures compile; the tests check it). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(CNN_PORTABLE_ONLY)
#define CNN_AVX2_BUILD 1
#endif
#if defined(__GNUC__)
#define CNN_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define CNN_ALWAYS_INLINE static __inline
#endif

/* 1 when the selected GEMM family is AVX2 or AVX-512 (so the CPU runs AVX2 code). */
static inline int cnn_use_avx2_build(void)
{
    return cnn_get_kernel() == CNN_KERNEL_AVX2 || cnn_get_kernel() == CNN_KERNEL_AVX512;
}

/* Round n up to a multiple of CNN_ALIGN / sizeof(float) floats. */
static inline int64_t cnn_round_up_floats(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* exp(t) within about 1 ulp for t in [-87.3, 88] (t is clamped to it; NaN becomes -87.3,
   so callers check NaN themselves).  Plain branch-free arithmetic: loops over it vectorise,
   and it gives the same bits wherever it runs (ISO C builds do not fuse a * b + c). */
static inline float cnn_exp_clamped(float t)
{
    t = t < 88.0f ? t : 88.0f;
    t = t > -87.3f ? t : -87.3f;
    /* t = n ln 2 + r, |r| <= ln 2 / 2; n rounded to nearest by the 1.5 * 2^23 shift */
    const float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (t - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;   /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* exp(t) for any t: cnn_exp_clamped, with 0 below -87.3 (where exp is subnormal),
   infinity above 88.7 and NaN kept. */
static inline float cnn_exp(float t)
{
    float y = cnn_exp_clamped(t);
    y = t < -87.3f ? 0.0f : y;
    y = t > 88.72f ? INFINITY : y;
    return t == t ? y : t;
}

/* The logistic function 1 / (1 + exp(-x)), from exp(-|x|) so it never overflows; 0
   below x = -87.3, where it would be subnormal. */
static inline float cnn_sigmoid(float x)
{
    const float e = cnn_exp_clamped(x < 0.0f ? x : -x);
    const float y = x >= 0.0f ? 1.0f / (1.0f + e) : x < -87.3f ? 0.0f : e / (1.0f + e);
    return x == x ? y : x;
}

/* tanh(x): an odd Taylor polynomial below |x| = 0.5 (no cancellation), else
   1 - 2 / (exp(2|x|) + 1) with the sign of x (exactly +-1 from |x| = 9.01 on). */
static inline float cnn_tanh(float x)
{
    const float a = x < 0.0f ? -x : x;
    const float e = cnn_exp_clamped(2.0f * (a < 10.0f ? a : 10.0f));
    const float big = 1.0f - 2.0f / (e + 1.0f);
    const float x2 = x * x;
    float p = -1.4558343871e-03f;
    p = p * x2 + 3.5921280366e-03f;
    p = p * x2 + -8.8632355299e-03f;
    p = p * x2 + 2.1869488536e-02f;
    p = p * x2 + -5.3968253968e-02f;
    p = p * x2 + 1.3333333333e-01f;
    p = p * x2 + -3.3333333333e-01f;
    const float y = a < 0.5f ? x * (1.0f + x2 * p) : x < 0.0f ? -big : big;
    return x == x ? y : x;
}

/* ---- the activations, defined once ------------------------------------------------
   X(code, name, y = f(x), g * f'(x) written from the output y = f(x)), with `a` the
   leaky_relu slope.  cnn_activation_forward / cnn_activation_backward, the GEMM epilogue
   and cnn_activation_name all expand this table, so the fused and the separate paths
   give the same bits by construction.  Softmax (row-wise, CNN_ACT_SOFTMAX) is not
   elementwise and lives beside it in cnn_activations.c. */
#define CNN_ELEMENTWISE_ACTIVATIONS(X) \
    X(CNN_ACT_IDENTITY,   "identity",   x,                    g) \
    X(CNN_ACT_RELU,       "relu",       x > 0.0f ? x : 0.0f,  y > 0.0f ? g : 0.0f) \
    X(CNN_ACT_LEAKY_RELU, "leaky_relu", x > 0.0f ? x : a * x, y > 0.0f ? g : a * g) \
    X(CNN_ACT_SIGMOID,    "sigmoid",    cnn_sigmoid(x),       g * y * (1.0f - y)) \
    X(CNN_ACT_TANH,       "tanh",       cnn_tanh(x),          g * (1.0f - y * y))

/* 1 if act is one of the elementwise activations above (not softmax, not garbage). */
static inline int cnn_is_elementwise_activation(cnn_activation act)
{
    switch (act) {
#define CNN_ACT_KNOWN(code, name, f, d) case code: return 1;
    CNN_ELEMENTWISE_ACTIVATIONS(CNN_ACT_KNOWN)
#undef CNN_ACT_KNOWN
    default:
        return 0;
    }
}

/* z[0:n] = f(z) for elementwise act (slope a), in place; a loop per activation so each
   vectorises.  Unknown codes leave z unchanged. */
static inline void cnn_activate_in_place(float *z, int64_t n, cnn_activation act, float a)
{
    (void)a;
    switch (act) {
#define CNN_ACT_FORWARD_LOOP(code, name, f, d) \
    case code: for (int64_t i = 0; i < n; ++i) { const float x = z[i]; z[i] = (f); } break;
    CNN_ELEMENTWISE_ACTIVATIONS(CNN_ACT_FORWARD_LOOP)
#undef CNN_ACT_FORWARD_LOOP
    default:
        break;
    }
}

/* dz[0:n] = dy * f'(.) from outputs y[0:n] for elementwise act (slope a); dz may alias
   dy.  Unknown codes leave dz unchanged. */
static inline void cnn_activation_grad(float *dz, const float *dy, const float *yv, int64_t n,
                                       cnn_activation act, float a)
{
    (void)a;
    switch (act) {
#define CNN_ACT_BACKWARD_LOOP(code, name, f, d) \
    case code: \
        for (int64_t i = 0; i < n; ++i) { const float g = dy[i], y = yv[i]; (void)y; dz[i] = (d); } \
        break;
    CNN_ELEMENTWISE_ACTIVATIONS(CNN_ACT_BACKWARD_LOOP)
#undef CNN_ACT_BACKWARD_LOOP
    default:
        break;
    }
}

#endif
