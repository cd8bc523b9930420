/* cnn_optim.c -- parameter updates: SGD (momentum, Nesterov, L2) and Adam / AdamW.
   Every update is elementwise: threads claim chunks of it, and the x86-64 AVX2 build
   of the loops only widens the vectors (ISO C mode contracts no multiply-add), so the
   result is the same for any thread count and kernel family. */
#include <math.h>
#include "cnn_core.h"
#include "cnn_internal.h"

typedef struct update {
    float *p, *s1, *s2;       /* parameters, first and second state */
    const float *g;           /* gradients */
    int kind;                 /* 0 sgd, 1 sgd + momentum, 2 nesterov, 3 adam, 4 adamw */
    float lr, mu, wd, b1, b2, eps, c1, c2;
} update;

CNN_ALWAYS_INLINE void update_body(const update *u, int64_t i0, int64_t i1)
{
    /* elements [i0, i1) of p, s1, s2, g (n,) */
    float *p = u->p, *v = u->s1, *m2 = u->s2;
    const float *g = u->g;
    const float lr = u->lr, mu = u->mu, wd = u->wd;
    switch (u->kind) {
    case 0:
        for (int64_t i = i0; i < i1; ++i)
            p[i] -= lr * (g[i] + wd * p[i]);
        break;
    case 1:
        for (int64_t i = i0; i < i1; ++i) {
            float vi = mu * v[i] + g[i] + wd * p[i];
            v[i] = vi;
            p[i] -= lr * vi;
        }
        break;
    case 2:
        for (int64_t i = i0; i < i1; ++i) {
            float gi = g[i] + wd * p[i];
            float vi = mu * v[i] + gi;
            v[i] = vi;
            p[i] -= lr * (gi + mu * vi);
        }
        break;
    default: {
        const float b1 = u->b1, b2 = u->b2, eps = u->eps, c1 = u->c1, c2 = u->c2;
        const int decoupled = u->kind == 4;
        for (int64_t i = i0; i < i1; ++i) {
            float gi = decoupled ? g[i] : g[i] + wd * p[i];
            float mi = b1 * v[i] + (1.0f - b1) * gi;
            float si = b2 * m2[i] + (1.0f - b2) * gi * gi;
            v[i] = mi;
            m2[i] = si;
            float step = lr * (mi * c1) / (sqrtf(si * c2) + eps);
            p[i] -= decoupled ? step + lr * wd * p[i] : step;
        }
    }
    }
}

static void update_generic(const update *u, int64_t i0, int64_t i1) { update_body(u, i0, i1); }

#ifdef CNN_AVX2_BUILD
__attribute__((target("avx2")))
static void update_avx2(const update *u, int64_t i0, int64_t i1) { update_body(u, i0, i1); }
#endif

/* Elements per task of a threaded update (a multiple of every vector width). */
#define CNN_UPDATE_CHUNK 16384

typedef struct update_job {
    const update *u;
    void (*range)(const update *, int64_t, int64_t);
    int64_t n;
} update_job;

static void update_task(void *arg, int64_t task, int thread)
{
    /* elements [task CHUNK, (task + 1) CHUNK) */
    const update_job *j = (const update_job *)arg;
    const int64_t i0 = task * CNN_UPDATE_CHUNK;
    (void)thread;
    j->range(j->u, i0, j->n - i0 < CNN_UPDATE_CHUNK ? j->n : i0 + CNN_UPDATE_CHUNK);
}

static void run(const update *u, int64_t n, int n_threads)
{
    /* the update over [0, n), in chunks claimed by the threads */
    update_job j = { u, update_generic, n };
#ifdef CNN_AVX2_BUILD
    if (cnn_use_avx2_build())
        j.range = update_avx2;
#endif
    cnn_parallel_for(n >= 2 * CNN_UPDATE_CHUNK ? n_threads : 1,
                     (n + CNN_UPDATE_CHUNK - 1) / CNN_UPDATE_CHUNK, update_task, &j);
}

int cnn_optimizer_update(float *p, float *state1, float *state2, cnn_optimizer *opt,
                         const float *g, int64_t n, int n_threads)
{
    /* p, state1, state2, g (n,) ; updates p and the states in place */
    update u = {0};
    u.p = p; u.s1 = state1; u.s2 = state2; u.g = g;
    u.lr = opt->learning_rate;
    u.wd = opt->weight_decay;
    if (!(u.lr >= 0.0f) || !(u.wd >= 0.0f) || n_threads < 1)
        return CNN_ERR_ARG;
    if (opt->kind == CNN_OPT_SGD) {
        u.mu = opt->momentum;
        if (!(u.mu >= 0.0f && u.mu < 1.0f) || (opt->nesterov && !(u.mu > 0.0f)))
            return CNN_ERR_ARG;
        u.kind = u.mu == 0.0f ? 0 : opt->nesterov ? 2 : 1;
        run(&u, n, n_threads);
        return CNN_OK;
    }
    if (opt->kind != CNN_OPT_ADAM && opt->kind != CNN_OPT_ADAMW)
        return CNN_ERR_ARG;
    u.b1 = opt->beta1;
    u.b2 = opt->beta2;
    u.eps = opt->eps;
    if (!(u.b1 >= 0.0f && u.b1 < 1.0f) || !(u.b2 >= 0.0f && u.b2 < 1.0f) || !(u.eps > 0.0f))
        return CNN_ERR_ARG;
    const int64_t t = ++opt->step;
    u.c1 = (float)(1.0 / (1.0 - pow(u.b1, (double)t)));
    u.c2 = (float)(1.0 / (1.0 - pow(u.b2, (double)t)));
    u.kind = opt->kind == CNN_OPT_ADAMW ? 4 : 3;
    run(&u, n, n_threads);
    return CNN_OK;
}
