/* cnn_gather.c -- minibatch gather: rows picked by index, converted to float32. */
#include "cnn_core.h"

int cnn_gather_rows(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                    int64_t n_index, int64_t n_rows, int64_t n_cols)
{
    /* out[r, :] = X[index[r], :] (uint8 scaled by 1/255) ; X (n_rows, n_cols), out (n_index, n_cols) */
    if (dtype != CNN_DTYPE_FLOAT32 && dtype != CNN_DTYPE_UINT8)
        return CNN_ERR_ARG;
    for (int64_t r = 0; r < n_index; ++r)
        if (index[r] < 0 || index[r] >= n_rows)
            return CNN_ERR_ARG;
    for (int64_t r = 0; r < n_index; ++r) {
        float *o = out + r * n_cols;
        if (dtype == CNN_DTYPE_UINT8) {
            const uint8_t *x = (const uint8_t *)X + index[r] * n_cols;
            for (int64_t j = 0; j < n_cols; ++j)
                o[j] = (float)x[j] * (1.0f / 255.0f);
        } else {
            const float *x = (const float *)X + index[r] * n_cols;
            for (int64_t j = 0; j < n_cols; ++j)
                o[j] = x[j];
        }
    }
    return CNN_OK;
}
