/* cnn_gather.c -- minibatch gather: rows picked by index, converted to float32.
   The conversion is exact arithmetic on each element, so the x86-64 AVX2 build of the
   loop (used when the selected kernel family is AVX2 or AVX-512) gives the same bits.
   Float rows are checked for NaN and infinity as they are copied, so training needs no
   separate pass over X. */
#include "cnn_core.h"
#include "cnn_internal.h"

/* Rows ahead of the copy whose cache lines the gather asks for: rows picked at random
   are fetched from memory, and one row at a time the copy would wait for each of them
   in turn; asking a few rows ahead keeps several rows' fetches in flight. */
#define CNN_GATHER_AHEAD 4

CNN_ALWAYS_INLINE void prefetch_row(const void *X, int64_t row_bytes, int64_t row)
{
    /* X row -> cache (no effect on results) */
#if defined(__GNUC__) || defined(__clang__)
    const char *p = (const char *)X + row * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64)
        __builtin_prefetch(p + b, 0, 3);
#else
    (void)X; (void)row_bytes; (void)row;
#endif
}

CNN_ALWAYS_INLINE int gather_body(float *out, const void *X, cnn_dtype dtype,
                                  const int64_t *index, int64_t n_index, int64_t n_cols)
{
    /* out[r, :] = X[index[r], :] (uint8 scaled by 1/255) -> 1 if a copied float is NaN
       or infinite (x - x is then NaN, else 0), else 0 */
    int nonfinite = 0;
    const int64_t row_bytes = n_cols * (dtype == CNN_DTYPE_UINT8 ? 1 : 4);
    for (int64_t r = 0; r < n_index && r < CNN_GATHER_AHEAD; ++r)
        prefetch_row(X, row_bytes, index[r]);
    for (int64_t r = 0; r < n_index; ++r) {
        float *o = out + r * n_cols;
        if (r + CNN_GATHER_AHEAD < n_index)
            prefetch_row(X, row_bytes, index[r + CNN_GATHER_AHEAD]);
        if (dtype == CNN_DTYPE_UINT8) {
            const uint8_t *x = (const uint8_t *)X + index[r] * n_cols;
            for (int64_t j = 0; j < n_cols; ++j)
                o[j] = (float)x[j] * (1.0f / 255.0f);
        } else {
            const float *x = (const float *)X + index[r] * n_cols;
            int bad = 0;
            for (int64_t j = 0; j < n_cols; ++j) {
                o[j] = x[j];
                bad |= x[j] - x[j] != 0.0f;
            }
            nonfinite |= bad;
        }
    }
    return nonfinite;
}

static int gather_generic(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                          int64_t n_index, int64_t n_cols)
{
    return gather_body(out, X, dtype, index, n_index, n_cols);
}

#ifdef CNN_AVX2_BUILD
__attribute__((target("avx2")))
static int gather_avx2(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                       int64_t n_index, int64_t n_cols)
{
    return gather_body(out, X, dtype, index, n_index, n_cols);
}
#endif

/* The gather of checked indices -> 1 if a copied float is NaN or infinite. */
static int gather(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                  int64_t n_index, int64_t n_cols)
{
#ifdef CNN_AVX2_BUILD
    if (cnn_use_avx2_build())
        return gather_avx2(out, X, dtype, index, n_index, n_cols);
#endif
    return gather_generic(out, X, dtype, index, n_index, n_cols);
}

/* CNN_OK if every index is in [0, n_rows) and dtype is known, else CNN_ERR_ARG. */
static int check_gather(cnn_dtype dtype, const int64_t *index, int64_t n_index, int64_t n_rows)
{
    if (dtype != CNN_DTYPE_FLOAT32 && dtype != CNN_DTYPE_UINT8)
        return CNN_ERR_ARG;
    for (int64_t r = 0; r < n_index; ++r)
        if (index[r] < 0 || index[r] >= n_rows)
            return CNN_ERR_ARG;
    return CNN_OK;
}

int cnn_gather_rows(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                    int64_t n_index, int64_t n_rows, int64_t n_cols)
{
    /* out[r, :] = X[index[r], :] (uint8 scaled by 1/255) ; X (n_rows, n_cols), out (n_index, n_cols) */
    const int status = check_gather(dtype, index, n_index, n_rows);
    if (status == CNN_OK)
        (void)gather(out, X, dtype, index, n_index, n_cols);
    return status;
}

/* Rows per task of a threaded gather. */
#define CNN_GATHER_ROWS 16

typedef struct gather_job {
    float *out;
    const void *X;
    cnn_dtype dtype;
    const int64_t *index;
    int64_t n_index, n_cols;
    int nonfinite[CNN_MAX_THREADS];    /* per thread: a copied float was NaN or infinite */
} gather_job;

static void gather_task(void *arg, int64_t task, int thread)
{
    /* rows [16 task, 16 task + 16) */
    gather_job *j = (gather_job *)arg;
    const int64_t r0 = task * CNN_GATHER_ROWS;
    const int64_t k = j->n_index - r0 < CNN_GATHER_ROWS ? j->n_index - r0 : CNN_GATHER_ROWS;
    j->nonfinite[thread] |= gather(j->out + r0 * j->n_cols, j->X, j->dtype, j->index + r0, k,
                                   j->n_cols);
}

int cnn_gather_rows_threaded(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                             int64_t n_index, int64_t n_rows, int64_t n_cols, int n_threads)
{
    /* cnn_gather_rows, rows shared out in tasks once there are enough; CNN_ERR_NONFINITE
       if a copied float is NaN or infinite */
    int status = check_gather(dtype, index, n_index, n_rows);
    if (status != CNN_OK)
        return status;
    if (n_threads < 2 || n_index * n_cols < 16384)
        return gather(out, X, dtype, index, n_index, n_cols) ? CNN_ERR_NONFINITE : CNN_OK;
    gather_job j = { out, X, dtype, index, n_index, n_cols, { 0 } };
    if (n_threads > CNN_MAX_THREADS)
        n_threads = CNN_MAX_THREADS;
    cnn_parallel_for(n_threads, (n_index + CNN_GATHER_ROWS - 1) / CNN_GATHER_ROWS, gather_task,
                     &j);
    for (int t = 0; t < n_threads; ++t)
        if (j.nonfinite[t])
            return CNN_ERR_NONFINITE;
    return CNN_OK;
}
