/* cnn_optim.c -- parameter updates: SGD (momentum, Nesterov, L2) and Adam / AdamW. */
#include <math.h>
#include "cnn_core.h"

int cnn_optimizer_update(float *p, float *state1, float *state2, cnn_optimizer *opt,
                         const float *g, int64_t n)
{
    /* p, state1, state2, g (n,) ; updates p and the states in place */
    const float lr = opt->learning_rate, wd = opt->weight_decay;
    if (!(lr >= 0.0f) || !(wd >= 0.0f))
        return CNN_ERR_ARG;
    if (opt->kind == CNN_OPT_SGD) {
        const float mu = opt->momentum;
        if (!(mu >= 0.0f && mu < 1.0f) || (opt->nesterov && !(mu > 0.0f)))
            return CNN_ERR_ARG;
        if (mu == 0.0f) {
            for (int64_t i = 0; i < n; ++i)
                p[i] -= lr * (g[i] + wd * p[i]);
        } else if (opt->nesterov) {
            for (int64_t i = 0; i < n; ++i) {
                float gi = g[i] + wd * p[i];
                float v = mu * state1[i] + gi;
                state1[i] = v;
                p[i] -= lr * (gi + mu * v);
            }
        } else {
            for (int64_t i = 0; i < n; ++i) {
                float v = mu * state1[i] + g[i] + wd * p[i];
                state1[i] = v;
                p[i] -= lr * v;
            }
        }
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
    const int decoupled = opt->kind == CNN_OPT_ADAMW;
    for (int64_t i = 0; i < n; ++i) {
        float gi = decoupled ? g[i] : g[i] + wd * p[i];
        float m = b1 * state1[i] + (1.0f - b1) * gi;
        float v = b2 * state2[i] + (1.0f - b2) * gi * gi;
        state1[i] = m;
        state2[i] = v;
        float step = lr * (m * c1) / (sqrtf(v * c2) + eps);
        p[i] -= decoupled ? step + lr * wd * p[i] : step;
    }
    return CNN_OK;
}
