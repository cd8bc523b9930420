/* cnn_dense.c -- a dense layer's forward and backward passes over the GEMM. */
#include "cnn_core.h"
#include "cnn_internal.h"

int64_t cnn_dense_workspace_floats(int64_t B, int64_t n_in, int64_t n_out, int n_threads)
{
    /* the largest GEMM workspace among Y = X W, dW = X^T dY and dX = dY W^T */
    int64_t a = cnn_sgemm_workspace_floats(B, n_out, n_in, n_threads);
    int64_t b = cnn_sgemm_workspace_floats(n_in, n_out, B, n_threads);
    int64_t c = cnn_sgemm_workspace_floats(B, n_in, n_out, n_threads);
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

int cnn_dense_forward(float *Y, const float *X, const float *W, const float *b,
                      int64_t B, int64_t n_in, int64_t n_out, cnn_activation act,
                      float alpha, float *work, int n_threads)
{
    /* Y = act(X W + b) ; X (B, n_in), W (n_in, n_out), b (n_out,), Y (B, n_out) */
    cnn_epilogue ep = {0};
    ep.bias = b;
    ep.act = act == CNN_ACT_SOFTMAX ? CNN_ACT_IDENTITY : act;
    ep.grad_act = CNN_ACT_IDENTITY;
    ep.alpha = alpha;
    int status = cnn_sgemm_ex(Y, X, W, B, n_out, n_in, n_out, n_in, n_out,
                              CNN_NO_TRANS, CNN_NO_TRANS, 1.0f, 0.0f, &ep, work, n_threads);
    if (status == CNN_OK && act == CNN_ACT_SOFTMAX)
        status = cnn_activation_forward(Y, Y, B * n_out, n_out, CNN_ACT_SOFTMAX, alpha);
    return status;
}

int cnn_dense_backward_act(float *dW, float *db, float *dX, const float *X, const float *dY,
                           const float *W, int64_t B, int64_t n_in, int64_t n_out,
                           cnn_activation input_act, float alpha, float *work, int n_threads)
{
    /* dW = X^T dY (n_in, n_out); db = colsum dY (n_out,);
       dX = (dY W^T) * input_act'(X) (B, n_in), the derivative in the GEMM's epilogue */
    if (!cnn_is_elementwise_activation(input_act))
        return CNN_ERR_ARG;
    int status = cnn_sgemm_ex(dW, X, dY, n_in, n_out, B, n_out, n_in, n_out,
                              CNN_TRANS, CNN_NO_TRANS, 1.0f, 0.0f, NULL, work, n_threads);
    if (status != CNN_OK)
        return status;
    cnn_bias_backward(db, dY, B, n_out);
    if (!dX)
        return CNN_OK;
    cnn_epilogue ep = {0};
    ep.act = CNN_ACT_IDENTITY;
    ep.grad_act = input_act;
    ep.grad_of = X;
    ep.ld_grad_of = n_in;
    ep.alpha = alpha;
    return cnn_sgemm_ex(dX, dY, W, B, n_in, n_out, n_in, n_out, n_out, CNN_NO_TRANS, CNN_TRANS,
                        1.0f, 0.0f, input_act == CNN_ACT_IDENTITY ? NULL : &ep, work, n_threads);
}

int cnn_dense_backward(float *dW, float *db, float *dX, const float *X, const float *dY,
                       const float *W, int64_t B, int64_t n_in, int64_t n_out,
                       float *work, int n_threads)
{
    /* cnn_dense_backward_act with the identity */
    return cnn_dense_backward_act(dW, db, dX, X, dY, W, B, n_in, n_out, CNN_ACT_IDENTITY, 0.0f,
                                  work, n_threads);
}
