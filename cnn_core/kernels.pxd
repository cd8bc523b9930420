# Public C-level API of cnn_core, for other Cython projects:
#
#     from cnn_core.kernels cimport cnn_sgemm, cnn_dense_forward, cnn_dense_backward
#
# The names match the C functions of cnn_core.h; each is a `noexcept nogil` free function over raw pointers and dimensions
# (row-major float32, explicit leading dimensions) returning a status: 0 on success,
# 1 out of memory, 2 invalid argument.  Activation codes: cnn_core.kernels.ACTIVATIONS
# maps each name to its code (0 identity, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh,
# 5 softmax, as in cnn_core.h).  Optimizer codes: 0 sgd, 1 adam, 2 adamw.
# Input dtype codes: 0 float32, 1 uint8 (scaled by 1/255).  Functions taking `work`
# need a 64-byte aligned workspace of the size the matching *_workspace_floats returns.
# Linking is automatic: the functions are imported from the installed cnn_core.kernels
# extension when the cimporting module is imported.
from libc.stdint cimport int32_t, int64_t

# C = alpha op(A) op(B) + beta C ; op(A) (M, K), op(B) (K, N), C (M, N).
cdef int cnn_sgemm(float *C, const float *A, const float *B,
               int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
               bint trans_a, bint trans_b, float alpha, float beta) noexcept nogil

# Y = act(X W + b) ; X (B, n_in), W (n_in, n_out), b (n_out,), Y (B, n_out).
cdef int cnn_dense_forward(float *Y, const float *X, const float *W, const float *b,
                       int64_t B, int64_t n_in, int64_t n_out, int activation, float alpha,
                       float *work, int n_threads) noexcept nogil

# dW = X^T dY, db = column sums of dY, dX = dY W^T (skipped when dX is NULL).
cdef int cnn_dense_backward(float *dW, float *db, float *dX, const float *X, const float *dY,
                        const float *W, int64_t B, int64_t n_in, int64_t n_out,
                        float *work, int n_threads) noexcept nogil

# Workspace (in floats) for dense_forward / dense_backward at these sizes.
cdef int64_t cnn_dense_workspace_floats(int64_t B, int64_t n_in, int64_t n_out,
                                    int n_threads) noexcept nogil

# Y = act(X) elementwise over n values, or row-wise softmax over (n / n_cols, n_cols).
cdef int cnn_activation_forward(float *Y, const float *X, int64_t n, int64_t n_cols,
                            int activation, float alpha) noexcept nogil

# dX = dY * act'(.) computed from the activation output Y.
cdef int cnn_activation_backward(float *dX, const float *dY, const float *Y, int64_t n,
                             int64_t n_cols, int activation, float alpha) noexcept nogil

# Softmax + cross-entropy of logits Z (M, N) against labels y (M,); see cnn_core.h.
cdef int cnn_softmax_cross_entropy(float *probs, float *dZ, double *loss, int64_t *n_correct,
                               const float *Z, const int32_t *y, const float *w,
                               int64_t M, int64_t N) noexcept nogil

# Half squared error of outputs Z (M, N) against targets T (M, N) and its gradient dZ.
cdef int cnn_squared_error(float *dZ, double *loss, const float *Z, const float *T,
                           const float *w, int64_t M, int64_t N) noexcept nogil

# One optimizer update of n parameters; *step counts Adam updates (incremented).
cdef int cnn_optimizer_update(float *params, float *state1, float *state2, const float *grads,
                          int64_t n, int optimizer, float learning_rate, float momentum,
                          bint nesterov, float weight_decay, float beta1, float beta2,
                          float eps, int64_t *step, int n_threads) noexcept nogil

# out[r] = X[index[r]] as float32 ; X (n_rows, n_cols) of dtype code, out (n_index, n_cols).
cdef int cnn_gather_rows(float *out, const void *X, int dtype, const int64_t *index,
                     int64_t n_index, int64_t n_rows, int64_t n_cols) noexcept nogil

# Convolution and pooling over NHWC float32 activations (batch, height, width, channels);
# Conv2D weights (kernel_h, kernel_w, in_c, out_c), bias (out_c,).  The shape structs have
# the layout of the C ones; fill them with the *_shape_init functions.
ctypedef struct cnn_conv2d_shape:
    int64_t batch, in_h, in_w, in_c
    int64_t out_h, out_w, out_c
    int64_t kernel_h, kernel_w, stride
    int64_t pad_top, pad_left

ctypedef struct cnn_pool2d_shape:
    int64_t batch, in_h, in_w, channels
    int64_t out_h, out_w, size, stride

# Fill *s for padding "valid" (same_padding 0) or "same" (1, TensorFlow's rule).
cdef int cnn_conv2d_shape_init(cnn_conv2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                               int64_t in_c, int64_t out_c, int64_t kernel_h, int64_t kernel_w,
                               int64_t stride, int same_padding) noexcept nogil

# Workspace (in floats) for conv2d_forward / conv2d_backward; -1 for a bad shape.
cdef int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s,
                                         int n_threads) noexcept nogil

# Y = act(conv(X, W) + b) ; X (batch, in_h, in_w, in_c), Y (batch, out_h, out_w, out_c).
cdef int cnn_conv2d_forward(float *Y, const float *X, const float *W, const float *b,
                            const cnn_conv2d_shape *s, int activation, float alpha,
                            float *work, int n_threads) noexcept nogil

# dX (skipped when NULL), dW, db from dY, the gradient of the pre-activation output.
cdef int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                             const float *W, const cnn_conv2d_shape *s, float *work,
                             int n_threads) noexcept nogil

# Fill *s for size x size windows moved by stride (valid padding).
cdef int cnn_pool2d_shape_init(cnn_pool2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                               int64_t channels, int64_t size, int64_t stride) noexcept nogil

# Y = window maxima / means ; X (batch, in_h, in_w, channels), Y (batch, out_h, out_w, channels).
cdef int cnn_maxpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s,
                               int n_threads) noexcept nogil
cdef int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s,
                               int n_threads) noexcept nogil

# dX = dY routed to each window's first maximum / spread over its window (overwrites dX).
cdef int cnn_maxpool2d_backward(float *dX, const float *dY, const float *X,
                                const cnn_pool2d_shape *s, int n_threads) noexcept nogil
cdef int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s,
                                int n_threads) noexcept nogil
