# Private mirror of src/cnn_core.h, line for line.  Not part of the public API:
# other projects cimport cnn_core.kernels instead.
from libc.stdint cimport int32_t, int64_t, uint64_t

cdef extern from "cnn_core.h" nogil:
    int CNN_CORE_ABI_VERSION

    int CNN_OK
    int CNN_ERR_ALLOC
    int CNN_ERR_ARG
    int CNN_ERR_IO
    int CNN_ERR_FORMAT
    int CNN_ERR_NONFINITE

    const char *cnn_status_string(int status)

    ctypedef enum cnn_trans:
        CNN_NO_TRANS
        CNN_TRANS

    ctypedef enum cnn_activation:
        CNN_ACT_IDENTITY
        CNN_ACT_RELU
        CNN_ACT_LEAKY_RELU
        CNN_ACT_SIGMOID
        CNN_ACT_TANH
        CNN_ACT_SOFTMAX

    const char *cnn_activation_name(cnn_activation act)

    ctypedef enum cnn_dtype:
        CNN_DTYPE_FLOAT32
        CNN_DTYPE_UINT8

    ctypedef enum cnn_optimizer_kind:
        CNN_OPT_SGD
        CNN_OPT_ADAM
        CNN_OPT_ADAMW

    ctypedef enum cnn_kernel:
        CNN_KERNEL_GENERIC
        CNN_KERNEL_AVX2
        CNN_KERNEL_AVX512
        CNN_KERNEL_NEON

    cnn_kernel cnn_best_kernel()
    int cnn_set_kernel(cnn_kernel kernel)
    cnn_kernel cnn_get_kernel()
    const char *cnn_kernel_name(cnn_kernel kernel)
    int cnn_max_threads()
    int cnn_set_max_threads(int n_threads)
    enum: CNN_STEP_PERIOD
    ctypedef struct cnn_step_threads:
        double mean_ns[2]
        double trial_ns
        int64_t trial_n
        int64_t steps
        int64_t next_trial
        int64_t period
        int64_t start_ns
        int32_t preferred
        int32_t current
        int32_t previous
    int cnn_step_threads_begin(cnn_step_threads *s, int n_threads)
    void cnn_step_threads_end(cnn_step_threads *s, int full)
    void cnn_step_threads_record(cnn_step_threads *s, double step_ns, int full)

    int cnn_sgemm(float *C, const float *A, const float *B,
                  int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                  cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)
    void cnn_sgemm_ref(float *C, const float *A, const float *B,
                       int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                       cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)

    ctypedef struct cnn_epilogue:
        const float *bias
        cnn_activation act
        cnn_activation grad_act
        const float *grad_of
        int64_t ld_grad_of
        float alpha

    int64_t cnn_sgemm_workspace_floats(int64_t M, int64_t N, int64_t K, int n_threads)
    int cnn_sgemm_ex(float *C, const float *A, const float *B,
                     int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                     cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta,
                     const cnn_epilogue *epilogue, float *work, int n_threads)

    void cnn_bias_forward(float *Y, const float *X, const float *b, int64_t M, int64_t N)
    void cnn_bias_backward(float *db, const float *dY, int64_t M, int64_t N)
    int cnn_activation_forward(float *Y, const float *X, int64_t n, int64_t n_cols,
                               cnn_activation act, float alpha)
    int cnn_activation_backward(float *dX, const float *dY, const float *Y, int64_t n,
                                int64_t n_cols, cnn_activation act, float alpha)
    int cnn_softmax_cross_entropy(float *probs, float *dZ, double *loss, int64_t *n_correct,
                                  const float *Z, const int32_t *y, const float *w,
                                  int64_t M, int64_t N)
    int cnn_squared_error(float *dZ, double *loss, const float *Z, const float *T,
                          const float *w, int64_t M, int64_t N)

    int cnn_dense_forward(float *Y, const float *X, const float *W, const float *b,
                          int64_t B, int64_t n_in, int64_t n_out, cnn_activation act,
                          float alpha, float *work, int n_threads)
    int cnn_dense_backward(float *dW, float *db, float *dX, const float *X, const float *dY,
                           const float *W, int64_t B, int64_t n_in, int64_t n_out,
                           float *work, int n_threads)
    int cnn_dense_backward_act(float *dW, float *db, float *dX, const float *X, const float *dY,
                               const float *W, int64_t B, int64_t n_in, int64_t n_out,
                               cnn_activation input_act, float alpha, float *work, int n_threads)
    int64_t cnn_dense_workspace_floats(int64_t B, int64_t n_in, int64_t n_out, int n_threads)

    ctypedef struct cnn_conv2d_shape:
        int64_t batch, in_h, in_w, in_c
        int64_t out_h, out_w, out_c
        int64_t kernel_h, kernel_w, stride
        int64_t pad_top, pad_left

    int cnn_conv2d_shape_init(cnn_conv2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                              int64_t in_c, int64_t out_c, int64_t kernel_h, int64_t kernel_w,
                              int64_t stride, int same_padding)
    int cnn_conv2d_shape_check(const cnn_conv2d_shape *s)
    int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s, int n_threads)
    int cnn_conv2d_forward(float *Y, const float *X, const float *W, const float *b,
                           const cnn_conv2d_shape *s, cnn_activation act, float alpha,
                           float *work, int n_threads)
    int cnn_conv2d_forward_ref(float *Y, const float *X, const float *W, const float *b,
                               const cnn_conv2d_shape *s, cnn_activation act, float alpha)
    int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                            const float *W, const cnn_conv2d_shape *s, float *work, int n_threads)
    int cnn_conv2d_backward_ref(float *dX, float *dW, float *db, const float *dY, const float *X,
                                const float *W, const cnn_conv2d_shape *s)

    ctypedef struct cnn_pool2d_shape:
        int64_t batch, in_h, in_w, channels
        int64_t out_h, out_w, size, stride

    int cnn_pool2d_shape_init(cnn_pool2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                              int64_t channels, int64_t size, int64_t stride)
    int cnn_pool2d_shape_check(const cnn_pool2d_shape *s)
    int cnn_maxpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads)
    int cnn_maxpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s)
    int cnn_maxpool2d_backward(float *dX, const float *dY, const float *X,
                               const cnn_pool2d_shape *s, int n_threads)
    int cnn_maxpool2d_backward_ref(float *dX, const float *dY, const float *X,
                                   const cnn_pool2d_shape *s)
    int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads)
    int cnn_avgpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s)
    int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s,
                               int n_threads)
    int cnn_avgpool2d_backward_ref(float *dX, const float *dY, const cnn_pool2d_shape *s)

    int cnn_dropout_forward(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                            uint64_t offset, int n_threads)
    int cnn_dropout_forward_ref(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                                uint64_t offset)
    int cnn_dropout_backward(float *dX, const float *dY, int64_t n, float rate, uint64_t seed,
                             uint64_t offset, int n_threads)
    int cnn_dropout_backward_ref(float *dX, const float *dY, int64_t n, float rate,
                                 uint64_t seed, uint64_t offset)

    ctypedef struct cnn_optimizer:
        cnn_optimizer_kind kind
        float learning_rate
        float momentum
        int32_t nesterov
        float weight_decay
        float beta1, beta2, eps
        int64_t step

    int cnn_optimizer_update(float *p, float *state1, float *state2, cnn_optimizer *opt,
                             const float *g, int64_t n, int n_threads)

    int cnn_gather_rows(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                        int64_t n_index, int64_t n_rows, int64_t n_cols)

    int CNN_MAX_LAYERS

    int CNN_MAX_DIMENSION

    ctypedef enum cnn_layer_kind:
        CNN_LAYER_DENSE, CNN_LAYER_CONV2D, CNN_LAYER_MAXPOOL2D, CNN_LAYER_AVGPOOL2D,
        CNN_LAYER_FLATTEN, CNN_LAYER_DROPOUT

    ctypedef enum cnn_loss_kind:
        CNN_LOSS_SOFTMAX_CROSS_ENTROPY, CNN_LOSS_SQUARED_ERROR

    ctypedef struct cnn_layer:
        int32_t kind
        int32_t activation
        float alpha
        float rate
        int64_t units
        int64_t kernel_h, kernel_w
        int64_t stride
        int32_t same_padding

    ctypedef struct cnn_net:
        int32_t n_layers
        cnn_layer layers[32]
        int64_t in_h, in_w, in_c
        int32_t loss
        uint64_t seed
        float *params

    int cnn_net_check(const cnn_net *net)
    int64_t cnn_net_param_count(const cnn_net *net)
    int64_t cnn_net_n_outputs(const cnn_net *net)
    int64_t cnn_net_predict_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads)
    int64_t cnn_net_train_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads)
    int cnn_net_predict(float *out, const cnn_net *net, const void *X, cnn_dtype dtype, int64_t n,
                        int64_t batch_size, int logits, float *work, int n_threads)
    int cnn_net_train_batches(cnn_net *net, cnn_optimizer *opt, float *state1, float *state2,
                              float *grads, float *work, const void *X, cnn_dtype dtype,
                              const int32_t *labels, const float *targets,
                              const float *sample_weight, const int64_t *order, int64_t n_order,
                              int64_t batch_size, int64_t first_batch, int64_t n_batches,
                              int64_t *batch_count, double *loss_sum, int64_t *n_correct,
                              cnn_step_threads *threads, int n_threads)
