/* cnn_activations.c -- bias add, activations forward/backward, fused softmax + cross-entropy. */
#include <math.h>
#include <float.h>
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"

void cnn_bias_forward(float *Y, const float *X, const float *b, int64_t M, int64_t N)
{
    /* Y = X + b ; X, Y (M, N), b (N,) */
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j)
            Y[i * N + j] = X[i * N + j] + b[j];
}

void cnn_bias_backward(float *db, const float *dY, int64_t M, int64_t N)
{
    /* db = sum over rows of dY ; dY (M, N), db (N,) */
    for (int64_t j = 0; j < N; ++j)
        db[j] = 0.0f;
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j)
            db[j] += dY[i * N + j];
}

static void softmax_row(float *y, const float *x, int64_t n)
{
    /* y = exp(x - max x) / sum exp(x - max x) ; x, y (n,) */
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j)
        m = x[j] > m ? x[j] : m;
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) {
        y[j] = cnn_exp(x[j] - m);
        s += y[j];
    }
    float inv = (float)(1.0 / s);
    for (int64_t j = 0; j < n; ++j)
        y[j] *= inv;
}

const char *cnn_activation_name(cnn_activation act)
{
    /* "relu", ... for a known code, else NULL */
    switch (act) {
#define CNN_ACT_NAME(code, name, f, d) case code: return name;
    CNN_ELEMENTWISE_ACTIVATIONS(CNN_ACT_NAME)
#undef CNN_ACT_NAME
    case CNN_ACT_SOFTMAX:
        return "softmax";
    }
    return NULL;
}

int cnn_activation_forward(float *Y, const float *X, int64_t n, int64_t n_cols,
                           cnn_activation act, float alpha)
{
    /* Y = act(X) ; X, Y (n,) elementwise or (n / n_cols, n_cols) row-wise for softmax */
    if (act == CNN_ACT_SOFTMAX) {
        if (n_cols < 1 || n % n_cols != 0)
            return CNN_ERR_ARG;
        for (int64_t r = 0; r < n / n_cols; ++r)
            softmax_row(Y + r * n_cols, X + r * n_cols, n_cols);
        return CNN_OK;
    }
    if (!cnn_is_elementwise_activation(act))
        return CNN_ERR_ARG;
    if (Y != X)
        memmove(Y, X, (size_t)n * sizeof *Y);
    cnn_activate_in_place(Y, n, act, alpha);
    return CNN_OK;
}

int cnn_activation_backward(float *dX, const float *dY, const float *Y, int64_t n,
                            int64_t n_cols, cnn_activation act, float alpha)
{
    /* dX = dY * act'(from output Y) ; all (n,), or (n / n_cols, n_cols) for softmax */
    if (act == CNN_ACT_SOFTMAX) {
        if (n_cols < 1 || n % n_cols != 0)
            return CNN_ERR_ARG;
        for (int64_t r = 0; r < n / n_cols; ++r) {
            const float *y = Y + r * n_cols, *dy = dY + r * n_cols;
            float *dx = dX + r * n_cols;
            double dot = 0.0;
            for (int64_t j = 0; j < n_cols; ++j)
                dot += (double)dy[j] * y[j];
            for (int64_t j = 0; j < n_cols; ++j)
                dx[j] = y[j] * (dy[j] - (float)dot);
        }
        return CNN_OK;
    }
    if (!cnn_is_elementwise_activation(act))
        return CNN_ERR_ARG;
    cnn_activation_grad(dX, dY, Y, n, act, alpha);
    return CNN_OK;
}

int cnn_softmax_cross_entropy(float *probs, float *dZ, double *loss, int64_t *n_correct,
                              const float *Z, const int32_t *y, const float *w,
                              int64_t M, int64_t N)
{
    /* loss = sum_i w_i (logsumexp(Z_i) - Z_i,y_i) / sum_i w_i ; dZ = w_i (p_i - onehot) / sum w
       Z, probs, dZ (M, N); y, w (M,) */
    double w_sum = 0.0;
    for (int64_t i = 0; i < M; ++i) {
        if (y[i] < 0 || y[i] >= N)
            return CNN_ERR_ARG;
        w_sum += w ? (double)w[i] : 1.0;
    }
    double inv_w = w_sum > 0.0 ? 1.0 / w_sum : 0.0;
    double total = 0.0;
    int64_t correct = 0;
    for (int64_t i = 0; i < M; ++i) {
        const float *z = Z + i * N;
        int64_t arg = 0;
        for (int64_t j = 1; j < N; ++j)
            if (z[j] > z[arg]) arg = j;
        float m = z[arg];
        const double z_label = z[y[i]];  /* read before dZ (which may alias Z) is written */
        /* exp(z - max) once per entry, kept in dZ or probs (where the result goes) */
        float *e = dZ ? dZ + i * N : probs ? probs + i * N : NULL;
        double s = 0.0;
        for (int64_t j = 0; j < N; ++j) {
            const float ej = cnn_exp(z[j] - m);
            s += ej;
            if (e)
                e[j] = ej;
        }
        double log_s = log(s);
        float inv_s = (float)(1.0 / s);
        double wi = w ? (double)w[i] : 1.0;
        total += wi * (log_s - (z_label - m));
        correct += arg == y[i];
        float scale = (float)(wi * inv_w);
        int64_t label = y[i];
        for (int64_t j = 0; e && j < N; ++j) {
            float p = e[j] * inv_s;
            if (probs) probs[i * N + j] = p;
            if (dZ) dZ[i * N + j] = scale * (p - (j == label ? 1.0f : 0.0f));
        }
    }
    if (loss) *loss = total * inv_w;
    if (n_correct) *n_correct = correct;
    return CNN_OK;
}
