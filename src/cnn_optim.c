/* cnn_optim.c -- parameter updates: SGD (momentum, Nesterov, L2) and Adam / AdamW.
   Every update is elementwise, so splitting it across threads changes no result. */
#include <math.h>
#include "cnn_core.h"

/* OpenMP 3.0 or newer (64-bit loop counters); older runtimes (MSVC) run serially. */
#if defined(_OPENMP) && _OPENMP >= 200805
#define CNN_PARALLEL_FOR _Pragma("omp parallel for num_threads(n_threads) schedule(static) if (n >= 32768 && n_threads > 1)")
#else
#define CNN_PARALLEL_FOR
#endif

static void sgd(float *p, float *v, const float *g, int64_t n, float lr, float mu,
                int nesterov, float wd, int n_threads)
{
    /* v = mu v + g + wd p ; p -= lr (nesterov ? g + wd p + mu v : v) ; all (n,) */
    (void)n_threads;
    if (mu == 0.0f) {
        CNN_PARALLEL_FOR
        for (int64_t i = 0; i < n; ++i)
            p[i] -= lr * (g[i] + wd * p[i]);
    } else if (nesterov) {
        CNN_PARALLEL_FOR
        for (int64_t i = 0; i < n; ++i) {
            float gi = g[i] + wd * p[i];
            float vi = mu * v[i] + gi;
            v[i] = vi;
            p[i] -= lr * (gi + mu * vi);
        }
    } else {
        CNN_PARALLEL_FOR
        for (int64_t i = 0; i < n; ++i) {
            float vi = mu * v[i] + g[i] + wd * p[i];
            v[i] = vi;
            p[i] -= lr * vi;
        }
    }
}

static void adam(float *p, float *m, float *v, const float *g, int64_t n, float lr, float b1,
                 float b2, float eps, float wd, int decoupled, float c1, float c2, int n_threads)
{
    /* m, v = moments of g (+ wd p unless decoupled) ; p -= lr m^ / (sqrt v^ + eps) (+ lr wd p) */
    (void)n_threads;
    CNN_PARALLEL_FOR
    for (int64_t i = 0; i < n; ++i) {
        float gi = decoupled ? g[i] : g[i] + wd * p[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float step = lr * (mi * c1) / (sqrtf(vi * c2) + eps);
        p[i] -= decoupled ? step + lr * wd * p[i] : step;
    }
}

int cnn_optimizer_update(float *p, float *state1, float *state2, cnn_optimizer *opt,
                         const float *g, int64_t n, int n_threads)
{
    /* p, state1, state2, g (n,) ; updates p and the states in place */
    const float lr = opt->learning_rate, wd = opt->weight_decay;
    if (!(lr >= 0.0f) || !(wd >= 0.0f) || n_threads < 1)
        return CNN_ERR_ARG;
    if (opt->kind == CNN_OPT_SGD) {
        const float mu = opt->momentum;
        if (!(mu >= 0.0f && mu < 1.0f) || (opt->nesterov && !(mu > 0.0f)))
            return CNN_ERR_ARG;
        sgd(p, state1, g, n, lr, mu, opt->nesterov, wd, n_threads);
        return CNN_OK;
    }
    if (opt->kind != CNN_OPT_ADAM && opt->kind != CNN_OPT_ADAMW)
        return CNN_ERR_ARG;
    const float b1 = opt->beta1, b2 = opt->beta2, eps = opt->eps;
    if (!(b1 >= 0.0f && b1 < 1.0f) || !(b2 >= 0.0f && b2 < 1.0f) || !(eps > 0.0f))
        return CNN_ERR_ARG;
    const int64_t t = ++opt->step;
    const float c1 = (float)(1.0 / (1.0 - pow(b1, (double)t)));
    const float c2 = (float)(1.0 / (1.0 - pow(b2, (double)t)));
    adam(p, state1, state2, g, n, lr, b1, b2, eps, wd, opt->kind == CNN_OPT_ADAMW, c1, c2,
         n_threads);
    return CNN_OK;
}
