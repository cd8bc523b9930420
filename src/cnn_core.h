/*
 * cnn_core.h -- the C99 kernels of cnn_core and a small model API.
 *
 * Conventions (every function below follows them):
 *   - float32, row-major; a matrix argument has an explicit leading dimension
 *     (elements between the starts of consecutive rows), ld >= its row length.
 *   - Arguments: outputs first, then inputs, then dimensions, then scalars/flags.
 *   - The caller owns all memory.  Only cnn_sgemm and the model API of cnn_model.h
 *     (cnn_model_load*, cnn_model_predict*) allocate, and a failed allocation is a
 *     status, never an abort.
 *   - Fallible functions return an int status: CNN_OK (0) or a CNN_ERR_* code.
 *   - Weights are stored (n_in, n_out) so that Y = X W + b.
 *   - Accumulate vs overwrite: cnn_sgemm* follows BLAS (C = alpha op(A) op(B) + beta C;
 *     beta == 0 overwrites and never reads C, so C may hold NaN garbage).  Everything
 *     else OVERWRITES its outputs, except the optimizer updates, which update params
 *     and optimizer state in place.
 *   - Kernels never split a reduction across threads: results are bit-identical for
 *     any thread count.
 */
#ifndef CNN_CORE_H
#define CNN_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CNN_CORE_ABI_VERSION 1

/* ---- status codes ------------------------------------------------------- */
#define CNN_OK 0
#define CNN_ERR_ALLOC 1    /* an allocation failed */
#define CNN_ERR_ARG 2      /* an argument broke a documented precondition */
#define CNN_ERR_IO 3       /* a file could not be opened or read */
#define CNN_ERR_FORMAT 4   /* a model file is truncated, corrupted or foreign */
#define CNN_ERR_NONFINITE 5 /* an input holds NaN or infinity where it must not */

/* Human-readable text for a status code (static storage, never NULL). */
const char *cnn_status_string(int status);

/* ---- enumerations ------------------------------------------------------- */
typedef enum { CNN_NO_TRANS = 0, CNN_TRANS = 1 } cnn_trans;

typedef enum {
    CNN_ACT_IDENTITY = 0,
    CNN_ACT_RELU = 1,
    CNN_ACT_LEAKY_RELU = 2, /* x > 0 ? x : alpha * x   (alpha in [0, 1)) */
    CNN_ACT_SIGMOID = 3,
    CNN_ACT_TANH = 4,
    CNN_ACT_SOFTMAX = 5     /* row-wise; only where a function says so */
} cnn_activation;

/* "identity", "relu", "leaky_relu", "sigmoid", "tanh", "softmax"; NULL for any other
   code (so callers can list the activations by counting codes up from 0). */
const char *cnn_activation_name(cnn_activation act);

typedef enum { CNN_DTYPE_FLOAT32 = 0, CNN_DTYPE_UINT8 = 1 } cnn_dtype;

typedef enum { CNN_OPT_SGD = 0, CNN_OPT_ADAM = 1, CNN_OPT_ADAMW = 2 } cnn_optimizer_kind;

typedef enum { CNN_KERNEL_GENERIC = 0, CNN_KERNEL_AVX2 = 1, CNN_KERNEL_AVX512 = 2,
               CNN_KERNEL_NEON = 3 } cnn_kernel;

/* ---- runtime: SIMD kernel selection and threads ------------------------- */
/* The best kernel this CPU supports (detected once, cached). */
cnn_kernel cnn_best_kernel(void);
/* Select the kernel family used by every GEMM from now on.
   CNN_ERR_ARG if this CPU or build cannot run it; the selection is then unchanged. */
int cnn_set_kernel(cnn_kernel kernel);
cnn_kernel cnn_get_kernel(void);
/* "generic", "avx2", "avx512" or "neon". */
const char *cnn_kernel_name(cnn_kernel kernel);
/* Threads the kernels use by default, on cnn_core's own pool of POSIX or Win32 threads
   (link with -pthread): OMP_NUM_THREADS if set, else the CPUs this process may run on
   (affinity mask, cgroup CPU quota); at most the limit set below. */
int cnn_max_threads(void);
/* Limit cnn_max_threads() to n_threads (0 removes the limit; threadpoolctl uses this).
   CNN_ERR_ARG unless 0 <= n_threads <= 1024. */
int cnn_set_max_threads(int n_threads);
/* The thread count of each training step, chosen by measurement.  A second thread does
   not always pay: on a busy machine it waits for a core, and the GEMMs of a small network
   gain less from splitting than the split costs.  So steps are timed, and each runs with
   1 thread or with n_threads, whichever has been faster lately: the other count is tried
   for 3 steps CNN_STEP_PERIOD steps later, then twice as far apart after every trial
   that keeps the choice (at most 1024 steps or four seconds apart), and the choice
   switches only on a clear gap.  Results never depend on the choice.  Zero-initialise
   one per training run. */
#define CNN_STEP_PERIOD 8
typedef struct cnn_step_threads {
    double mean_ns[2];   /* time of a full step with [0] n_threads, [1] 1 thread; 0 unknown */
    double trial_ns;     /* summed time of the current trial's timed steps */
    int64_t trial_n;     /* and their number */
    int64_t steps;       /* steps finished */
    int64_t next_trial;  /* the step where the next trial begins */
    int64_t period;      /* steps from the last trial to the next (0: none yet) */
    int64_t start_ns;    /* when the step in progress began (0: not timed) */
    int32_t preferred;   /* the faster count lately: 0 n_threads, 1 one thread */
    int32_t current;     /* the count of the step in progress */
    int32_t previous;    /* the count of the step before */
} cnn_step_threads;
/* Threads for the next step (1 or n_threads); starts its clock.  s may be NULL (then
   n_threads). */
int cnn_step_threads_begin(cnn_step_threads *s, int n_threads);
/* The step begun last has finished; full != 0 when it had the usual size (only those
   are compared). */
void cnn_step_threads_end(cnn_step_threads *s, int full);
/* The same choice from a given step time instead of the clock (for tests). */
void cnn_step_threads_record(cnn_step_threads *s, double step_ns, int full);

/* ---- GEMM --------------------------------------------------------------- */
/* C = alpha op(A) op(B) + beta C ; op(A) is (M, K), op(B) is (K, N), C is (M, N).
   A is stored (M, K) with lda >= K when trans_a == CNN_NO_TRANS, else (K, M), lda >= M;
   likewise B is (K, N), ldb >= N, or (N, K), ldb >= K; ldc >= N.
   Any of M, N, K may be 0.  Allocates its packing buffers (CNN_ERR_ALLOC on failure).
   Terms whose op(A) entry is zero may be skipped, as in reference BLAS (always for
   M <= 2, and where op(A) is mostly zeros): the values do not change, but a zero in
   op(A) times an infinite or NaN op(B) entry need not make the result NaN. */
int cnn_sgemm(float *C, const float *A, const float *B,
              int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
              cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta);

/* The plain triple loop, kept as the test oracle and portable fallback. Same contract. */
void cnn_sgemm_ref(float *C, const float *A, const float *B,
                   int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                   cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta);

/* What the fast GEMM applies to each element of C as it writes it, in this order:
   c += bias[j]; c = act(c); c *= act'(grad_of[i, j]) -- the last one multiplies by
   the derivative of activation `grad_act` expressed from an activation OUTPUT y
   (relu: y > 0; sigmoid: y (1 - y); tanh: 1 - y^2; leaky: y > 0 ? 1 : alpha).
   Unused fields are NULL / CNN_ACT_IDENTITY.  act must not be CNN_ACT_SOFTMAX. */
typedef struct cnn_epilogue {
    const float *bias;          /* (N,) or NULL */
    cnn_activation act;
    cnn_activation grad_act;
    const float *grad_of;       /* (M, N) with leading dimension ld_grad_of, or NULL */
    int64_t ld_grad_of;
    float alpha;                /* leaky_relu slope for act and grad_act */
} cnn_epilogue;

/* Floats of workspace cnn_sgemm_ex needs for these sizes and thread count. */
int64_t cnn_sgemm_workspace_floats(int64_t M, int64_t N, int64_t K, int n_threads);

/* cnn_sgemm with an epilogue (may be NULL), a caller-provided workspace of at least
   cnn_sgemm_workspace_floats(M, N, K, n_threads) floats, 64-byte aligned, and
   n_threads >= 1 threads.  Never allocates.  Same result for any n_threads. */
int cnn_sgemm_ex(float *C, const float *A, const float *B,
                 int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                 cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta,
                 const cnn_epilogue *epilogue, float *work, int n_threads);

/* ---- elementwise and row-wise kernels ----------------------------------- */
/* Y[i, j] = X[i, j] + b[j] ; X, Y are (M, N) contiguous, b is (N,). Y may alias X. */
void cnn_bias_forward(float *Y, const float *X, const float *b, int64_t M, int64_t N);

/* db[j] = sum_i dY[i, j] ; dY is (M, N) contiguous, db is (N,). */
void cnn_bias_backward(float *db, const float *dY, int64_t M, int64_t N);

/* Y = act(X) over n elements, or row-wise softmax of the (n / n_cols, n_cols) matrix.
   Y may alias X.  alpha is the leaky_relu slope.  CNN_ERR_ARG for an unknown act or
   softmax with n_cols < 1 or n not a multiple of n_cols. */
int cnn_activation_forward(float *Y, const float *X, int64_t n, int64_t n_cols,
                           cnn_activation act, float alpha);

/* dX = dY * act'(.) from the activation OUTPUT Y, over n elements; for softmax the
   row-wise Jacobian product dX = Y * (dY - sum_j dY Y).  dX may alias dY. */
int cnn_activation_backward(float *dX, const float *dY, const float *Y, int64_t n,
                            int64_t n_cols, cnn_activation act, float alpha);

/* Fused softmax + cross-entropy over logits Z (M, N) and labels y (M,), 0 <= y < N.
   probs (M, N) receives softmax(Z) (may be NULL); dZ (M, N) the gradient of the
   weighted mean loss (may be NULL, may alias Z); loss the weighted mean of
   -log p[i, y_i] with weights w (M,) or 1 if w is NULL (normalised by sum w).
   n_correct (may be NULL) the number of rows whose argmax equals y.
   Stable for any finite logits.  CNN_ERR_ARG for a label outside [0, N). */
int cnn_softmax_cross_entropy(float *probs, float *dZ, double *loss, int64_t *n_correct,
                              const float *Z, const int32_t *y, const float *w,
                              int64_t M, int64_t N);

/* Squared error of outputs Z (M, N) against targets T (M, N): loss the weighted mean over
   rows of half the squared distance, sum_i w_i (1/2) sum_j (Z_ij - T_ij)^2 / sum_i w_i
   (w (M,), or 1 if NULL); dZ (M, N) its gradient w_i (Z_i - T_i) / sum w (may be NULL,
   may alias Z).  Zero total weight gives loss 0 and dZ 0.  CNN_ERR_ARG for M or N < 0. */
int cnn_squared_error(float *dZ, double *loss, const float *Z, const float *T,
                      const float *w, int64_t M, int64_t N);

/* ---- dense layer -------------------------------------------------------- */
/* Y = act(X W + b) ; X is (B, n_in), W is (n_in, n_out), b is (n_out,), Y is (B, n_out).
   act may be softmax (row-wise).  work/n_threads as for cnn_sgemm_ex. */
int cnn_dense_forward(float *Y, const float *X, const float *W, const float *b,
                      int64_t B, int64_t n_in, int64_t n_out, cnn_activation act,
                      float alpha, float *work, int n_threads);

/* dW = X^T dY, db = sum over rows of dY, dX = dY W^T (skipped when dX is NULL);
   X is (B, n_in), dY is (B, n_out), W is (n_in, n_out).  Overwrites dW, db, dX. */
int cnn_dense_backward(float *dW, float *db, float *dX, const float *X, const float *dY,
                       const float *W, int64_t B, int64_t n_in, int64_t n_out,
                       float *work, int n_threads);

/* cnn_dense_backward, and dX multiplied by the derivative of input_act, the elementwise
   activation that produced X (computed from X, as cnn_activation_backward does), fused
   into the GEMM that writes dX.  CNN_ERR_ARG if input_act is not elementwise. */
int cnn_dense_backward_act(float *dW, float *db, float *dX, const float *X, const float *dY,
                           const float *W, int64_t B, int64_t n_in, int64_t n_out,
                           cnn_activation input_act, float alpha, float *work, int n_threads);

/* Floats of workspace cnn_dense_forward / cnn_dense_backward need. */
int64_t cnn_dense_workspace_floats(int64_t B, int64_t n_in, int64_t n_out, int n_threads);

/* ---- convolution, pooling, dropout -------------------------------------- */
/* Activations are NHWC, row-major: (batch, height, width, channels).  Conv2D weights are
   (kernel_h, kernel_w, in_c, out_c), bias (out_c,); the convolution is a
   cross-correlation.  Padded positions are zeros. */
typedef struct cnn_conv2d_shape {
    int64_t batch, in_h, in_w, in_c;       /* X  (batch, in_h, in_w, in_c)         */
    int64_t out_h, out_w, out_c;           /* Y  (batch, out_h, out_w, out_c)      */
    int64_t kernel_h, kernel_w, stride;    /* W  (kernel_h, kernel_w, in_c, out_c) */
    int64_t pad_top, pad_left;             /* zeros; bottom/right follow from out_h/out_w */
} cnn_conv2d_shape;

/* Fill *s for padding "valid" (same_padding == 0: out = (in - k) / stride + 1, needs
   in >= k) or "same" (TensorFlow's rule: out = ceil(in / stride), total padding
   max((out - 1) stride + k - in, 0), top/left = total / 2).  CNN_ERR_ARG if the result
   fails cnn_conv2d_shape_check. */
int cnn_conv2d_shape_init(cnn_conv2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                          int64_t in_c, int64_t out_c, int64_t kernel_h, int64_t kernel_w,
                          int64_t stride, int same_padding);

/* CNN_OK if batch >= 0, every other size and the stride >= 1, 0 <= pad < kernel, every
   window starts inside the input ((out - 1) stride - pad < in) and the arrays fit
   int64; else CNN_ERR_ARG. */
int cnn_conv2d_shape_check(const cnn_conv2d_shape *s);

/* Floats of workspace cnn_conv2d_forward / cnn_conv2d_backward need (-1 for a bad s). */
int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s, int n_threads);

/* Y = act(conv(X, W) + b) ; X (batch, in_h, in_w, in_c), W (kernel_h, kernel_w, in_c,
   out_c), b (out_c,), Y (batch, out_h, out_w, out_c).  act is not softmax.  work: at
   least cnn_conv2d_workspace_floats(s, n_threads) floats, 64-byte aligned. */
int cnn_conv2d_forward(float *Y, const float *X, const float *W, const float *b,
                       const cnn_conv2d_shape *s, cnn_activation act, float alpha,
                       float *work, int n_threads);
int cnn_conv2d_forward_ref(float *Y, const float *X, const float *W, const float *b,
                           const cnn_conv2d_shape *s, cnn_activation act, float alpha);

/* dX = conv_transpose(dY, W) (skipped when dX is NULL), dW = correlation of X with dY,
   db = sum of dY over batch and positions ; dY is the gradient of the PRE-activation
   output (batch, out_h, out_w, out_c), X and dX (batch, in_h, in_w, in_c), W and dW
   (kernel_h, kernel_w, in_c, out_c), db (out_c,).  Workspace as for the forward pass. */
int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                        const float *W, const cnn_conv2d_shape *s, float *work, int n_threads);
int cnn_conv2d_backward_ref(float *dX, float *dW, float *db, const float *dY, const float *X,
                            const float *W, const cnn_conv2d_shape *s);

/* Pooling over size x size windows moved by stride, valid padding:
   out = (in - size) / stride + 1.  Channels are independent. */
typedef struct cnn_pool2d_shape {
    int64_t batch, in_h, in_w, channels;   /* X (batch, in_h, in_w, channels)   */
    int64_t out_h, out_w, size, stride;    /* Y (batch, out_h, out_w, channels) */
} cnn_pool2d_shape;

/* Fill *s from the input shape, size and stride (CNN_ERR_ARG if it fails the check). */
int cnn_pool2d_shape_init(cnn_pool2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                          int64_t channels, int64_t size, int64_t stride);

/* CNN_OK if batch >= 0, the other sizes >= 1, in >= size and out matches the rule. */
int cnn_pool2d_shape_check(const cnn_pool2d_shape *s);

/* Y = the maximum of each window ; X (batch, in_h, in_w, channels), Y (batch, out_h,
   out_w, channels).  A NaN first in its window is kept. */
int cnn_maxpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads);
int cnn_maxpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s);

/* dX = each dY routed to the FIRST maximum of its window (row-major scan), summed where
   windows overlap, 0 elsewhere ; dY (batch, out_h, out_w, channels), X and dX (batch,
   in_h, in_w, channels). */
int cnn_maxpool2d_backward(float *dX, const float *dY, const float *X, const cnn_pool2d_shape *s,
                           int n_threads);
int cnn_maxpool2d_backward_ref(float *dX, const float *dY, const float *X,
                               const cnn_pool2d_shape *s);

/* Y = the mean of each window (sum in row-major order, divided by size * size). */
int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s, int n_threads);
int cnn_avgpool2d_forward_ref(float *Y, const float *X, const cnn_pool2d_shape *s);

/* dX = each dY / (size * size) added to every input of its window, 0 elsewhere. */
int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s, int n_threads);
int cnn_avgpool2d_backward_ref(float *dX, const float *dY, const cnn_pool2d_shape *s);

/* Inverted dropout over n elements: element i is kept with probability 1 - rate, decided
   by a hash of (seed, offset + i) alone (the same mask for any n_threads), and kept
   elements are scaled by 1 / (1 - rate): Y = X * keep / (1 - rate).  rate in [0, 1);
   Y may alias X.  The backward pass recomputes the mask: dX = dY * keep / (1 - rate). */
int cnn_dropout_forward(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                        uint64_t offset, int n_threads);
int cnn_dropout_forward_ref(float *Y, const float *X, int64_t n, float rate, uint64_t seed,
                            uint64_t offset);
int cnn_dropout_backward(float *dX, const float *dY, int64_t n, float rate, uint64_t seed,
                         uint64_t offset, int n_threads);
int cnn_dropout_backward_ref(float *dX, const float *dY, int64_t n, float rate,
                             uint64_t seed, uint64_t offset);

/* ---- optimizers (update in place) --------------------------------------- */
typedef struct cnn_optimizer {
    cnn_optimizer_kind kind;
    float learning_rate;
    float momentum;       /* SGD; 0 disables the velocity */
    int32_t nesterov;     /* SGD; needs momentum > 0 */
    float weight_decay;   /* SGD/Adam: L2 added to the gradient; AdamW: decoupled */
    float beta1, beta2, eps;  /* Adam, AdamW */
    int64_t step;         /* Adam bias correction: number of updates done so far */
} cnn_optimizer;

/* One update of n parameters p from gradients g.  state1 (n) is the SGD velocity or
   Adam's first moment; state2 (n) Adam's second moment (unused by SGD, may be NULL).
   Adam increments opt->step.  CNN_ERR_ARG for a bad kind or hyperparameter.
   Elementwise, so the result does not depend on n_threads (>= 1). */
int cnn_optimizer_update(float *p, float *state1, float *state2, cnn_optimizer *opt,
                         const float *g, int64_t n, int n_threads);

/* ---- batch gather ------------------------------------------------------- */
/* out[r, :] = X[index[r], :] as float32, scaled by 1/255 for CNN_DTYPE_UINT8.
   X is (n_rows, n_cols) contiguous; out is (n_index, n_cols).
   CNN_ERR_ARG if an index is outside [0, n_rows). */
int cnn_gather_rows(float *out, const void *X, cnn_dtype dtype, const int64_t *index,
                    int64_t n_index, int64_t n_rows, int64_t n_cols);

/* ---- networks: a table of layers ---------------------------------------- */
#define CNN_MAX_LAYERS 32
#define CNN_MAX_DIMENSION (1 << 24)   /* the most values of one sample in any layer */

typedef enum { CNN_LAYER_DENSE = 0, CNN_LAYER_CONV2D = 1, CNN_LAYER_MAXPOOL2D = 2,
               CNN_LAYER_AVGPOOL2D = 3, CNN_LAYER_FLATTEN = 4,
               CNN_LAYER_DROPOUT = 5 } cnn_layer_kind;

/* What the network minimises: softmax cross-entropy of the last layer's outputs against
   class labels, or the squared error (cnn_squared_error) against float targets. */
typedef enum { CNN_LOSS_SOFTMAX_CROSS_ENTROPY = 0, CNN_LOSS_SQUARED_ERROR = 1 } cnn_loss_kind;

/* One layer as the user chose it; the engine derives the shapes.  Fields a kind does not
   use are ignored. */
typedef struct cnn_layer {
    int32_t kind;                   /* cnn_layer_kind */
    int32_t activation;             /* cnn_activation, elementwise: dense, conv2d */
    float alpha;                    /* leaky_relu slope, [0, 1) */
    float rate;                     /* dropout rate, [0, 1) */
    int64_t units;                  /* dense: outputs; conv2d: filters */
    int64_t kernel_h, kernel_w;     /* conv2d kernel; pools: size, size */
    int64_t stride;                 /* conv2d, pools */
    int32_t same_padding;           /* conv2d: 1 "same" (TensorFlow's rule), 0 "valid" */
} cnn_layer;

/* A network: samples of in_h x in_w x in_c values (NHWC; flat data is 1 x 1 x features,
   stored as rows of in_h in_w in_c floats) through layers[0 .. n_layers), the last one
   dense.  Dense reads a whole sample (NHWC rows are already flat, so Flatten moves no
   data); conv2d and pooling follow the shape rules of their kernels above; dropout is
   the identity at inference.  params holds, per layer with parameters in order, W then
   b: dense W (n_in, n_out), conv2d W (kernel_h, kernel_w, in_c, out_c).  For a stack of
   dense layers that is the layout of a multilayer perceptron, layer after layer. */
typedef struct cnn_net {
    int32_t n_layers;               /* 1 .. CNN_MAX_LAYERS (the input is not a layer) */
    cnn_layer layers[CNN_MAX_LAYERS];
    int64_t in_h, in_w, in_c;
    int32_t loss;                   /* cnn_loss_kind */
    uint64_t seed;                  /* dropout masks */
    float *params;
} cnn_net;

/* CNN_OK if every layer is valid and accepts the shape before it (each sample at most
   CNN_MAX_DIMENSION values), the last layer is dense and the loss is known; else
   CNN_ERR_ARG.  Every function below checks this first (CNN_ERR_ARG, or -1 for the
   sizes). */
int cnn_net_check(const cnn_net *net);

/* Floats in params; the outputs of the last layer (classes, or regression targets). */
int64_t cnn_net_param_count(const cnn_net *net);
int64_t cnn_net_n_outputs(const cnn_net *net);

/* Floats of workspace for inference or for training, at batch_size and n_threads (pass
   the same values to cnn_net_predict / cnn_net_train_batches). */
int64_t cnn_net_predict_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads);
int64_t cnn_net_train_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads);

/* out (n, n_outputs) = the network on X (n, in_h in_w in_c) of dtype: softmax
   probabilities for cross-entropy, the raw outputs when logits != 0 or for squared
   error.  Rows are processed in chunks of batch_size with `work` as workspace.  With
   several chunks and threads, each thread runs its own chunks with one-thread kernels;
   one chunk uses all threads inside each kernel (same results either way).  Float input
   holding NaN or infinity gives CNN_ERR_NONFINITE (checked chunk by chunk, while it is
   hot in cache; other rows of out may then be written). */
int cnn_net_predict(float *out, const cnn_net *net, const void *X, cnn_dtype dtype, int64_t n,
                    int64_t batch_size, int logits, float *work, int n_threads);

/* Train on minibatches first_batch .. first_batch + n_batches - 1 of the sample order
   `order` (n_order indices into X), each of batch_size rows (the last may be short):
   per minibatch gather, forward, loss, backward and one optimizer update.  labels (n,)
   in [0, n_outputs) for cross-entropy (CNN_ERR_ARG otherwise), or targets (n,
   n_outputs) for squared error; sample_weight (n,) or NULL.  grads and the optimizer
   states hold cnn_net_param_count floats.  *batch_count counts the minibatches trained
   so far (it picks the dropout masks with net->seed, so they never depend on n_threads)
   and grows by one per minibatch.  Adds the summed (not mean) loss of the batches to
   *loss_sum and their correct predictions (cross-entropy) to *n_correct.  Each step
   uses 1 or n_threads threads as `threads` chooses (NULL: always n_threads).  Float X
   holding NaN or infinity in a minibatch's rows gives CNN_ERR_NONFINITE when that
   minibatch is gathered, before its step (the earlier minibatches have been applied). */
int cnn_net_train_batches(cnn_net *net, cnn_optimizer *opt, float *state1, float *state2,
                          float *grads, float *work, const void *X, cnn_dtype dtype,
                          const int32_t *labels, const float *targets,
                          const float *sample_weight, const int64_t *order, int64_t n_order,
                          int64_t batch_size, int64_t first_batch, int64_t n_batches,
                          int64_t *batch_count, double *loss_sum, int64_t *n_correct,
                          cnn_step_threads *threads, int n_threads);

#ifdef __cplusplus
}
#endif
#endif /* CNN_CORE_H */
