/* cnn_dropout.c -- inverted dropout with a counter-based mask.

   Element i is kept when the top 32 bits of splitmix64's output for the counter
   seed + (offset + i + 1) * golden are at least rate * 2^32: a pure function of
   (seed, offset + i), so the mask needs no memory, the backward pass recomputes it, and
   any split of the elements over threads gives the same result.  The fast path is the
   reference loop over one range per thread. */
#include "cnn_core.h"
#include "cnn_internal.h"

/* Elements below which dropout stays on one thread. */
#define DROPOUT_PARALLEL_MIN 32768

/* splitmix64's output function (Steele, Lea and Flood 2014) for counter k of seed. */
static inline uint64_t mix64(uint64_t seed, uint64_t k)
{
    /* (seed, k) -> 64 well-mixed bits */
    uint64_t z = seed + (k + 1) * UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

typedef struct dropout_mask {
    uint64_t seed, offset, threshold;  /* keep when the top 32 bits >= threshold */
    float scale;                       /* 1 / (1 - rate) */
} dropout_mask;

static int make_mask(dropout_mask *m, float rate, uint64_t seed, uint64_t offset)
{
    /* rate -> *m ; CNN_ERR_ARG unless 0 <= rate < 1 */
    if (!(rate >= 0.0f && rate < 1.0f))
        return CNN_ERR_ARG;
    m->seed = seed;
    m->offset = offset;
    m->threshold = (uint64_t)((double)rate * 4294967296.0);
    m->scale = 1.0f / (1.0f - rate);
    return CNN_OK;
}

static void apply_range(float *Y, const float *X, const dropout_mask *m, int64_t i0, int64_t i1)
{
    /* Y[i] = X[i] * keep(i) * scale for i in [i0, i1) */
    for (int64_t i = i0; i < i1; ++i) {
        const int keep = (mix64(m->seed, m->offset + (uint64_t)i) >> 32) >= m->threshold;
        Y[i] = keep ? X[i] * m->scale : 0.0f;
    }
}

int cnn_dropout_forward_ref(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                            uint64_t offset)
{
    /* Y (n,) = X (n,) * keep / (1 - rate) */
    dropout_mask m;
    if (n < 0 || make_mask(&m, rate, seed, offset) != CNN_OK || (n > 0 && (!Y || !X)))
        return CNN_ERR_ARG;
    apply_range(Y, X, &m, 0, n);
    return CNN_OK;
}

/* One of `parts` equal ranges of a threaded dropout pass. */
typedef struct dropout_job {
    float *Y;
    const float *X;
    const dropout_mask *m;
    int64_t n, parts;
} dropout_job;

static void dropout_task(void *arg, int64_t part, int thread)
{
    /* range `part` of Y */
    const dropout_job *j = (const dropout_job *)arg;
    (void)thread;
    apply_range(j->Y, j->X, j->m, j->n * part / j->parts, j->n * (part + 1) / j->parts);
}

int cnn_dropout_forward(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                        uint64_t offset, int n_threads)
{
    /* Y (n,) = X (n,) * keep / (1 - rate), one contiguous range per thread */
    dropout_mask m;
    if (n < 0 || n_threads < 1 || make_mask(&m, rate, seed, offset) != CNN_OK ||
        (n > 0 && (!Y || !X)))
        return CNN_ERR_ARG;
    if (n_threads > 1 && n >= DROPOUT_PARALLEL_MIN) {
        dropout_job j = { Y, X, &m, n, n_threads };
        cnn_parallel_for(n_threads, n_threads, dropout_task, &j);
        return CNN_OK;
    }
    apply_range(Y, X, &m, 0, n);
    return CNN_OK;
}

int cnn_dropout_backward_ref(float *dX, const float *dY, int64_t n, float rate,
                             uint64_t seed, uint64_t offset)
{
    /* dX (n,) = dY (n,) * keep / (1 - rate): the forward map, as it is linear */
    return cnn_dropout_forward_ref(dX, dY, n, rate, seed, offset);
}

int cnn_dropout_backward(float *dX, const float *dY, int64_t n, float rate, uint64_t seed,
                         uint64_t offset, int n_threads)
{
    /* dX (n,) = dY (n,) * keep / (1 - rate) */
    return cnn_dropout_forward(dX, dY, n, rate, seed, offset, n_threads);
}
