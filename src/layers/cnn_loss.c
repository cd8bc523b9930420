/* cnn_loss.c -- the squared-error loss for regression, fused like the softmax
   cross-entropy: loss and gradient in one pass over the outputs. */
#include "cnn_core.h"

int cnn_squared_error(float *dZ, double *loss, const float *Z, const float *T,
                      const float *w, int64_t M, int64_t N)
{
    /* loss = sum_i w_i (1/2) sum_j (Z_ij - T_ij)^2 / sum_i w_i ; dZ = w_i (Z - T) / sum w
       Z, T, dZ (M, N); w (M,) */
    if (M < 0 || N < 0)
        return CNN_ERR_ARG;
    double w_sum = 0.0;
    for (int64_t i = 0; i < M; ++i)
        w_sum += w ? (double)w[i] : 1.0;
    const double inv_w = w_sum > 0.0 ? 1.0 / w_sum : 0.0;
    double total = 0.0;
    for (int64_t i = 0; i < M; ++i) {
        const double wi = w ? (double)w[i] : 1.0;
        const float scale = (float)(wi * inv_w);
        double row = 0.0;
        for (int64_t j = 0; j < N; ++j) {
            const float r = Z[i * N + j] - T[i * N + j];
            row += (double)r * r;
            if (dZ)
                dZ[i * N + j] = scale * r;
        }
        total += wi * 0.5 * row;
    }
    if (loss)
        *loss = total * inv_w;
    return CNN_OK;
}
