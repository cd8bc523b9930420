/* cnn_mlp.c -- a whole multilayer perceptron: batched inference and minibatch training
   over caller-provided workspaces (no allocation here). */
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"

int64_t cnn_mlp_param_count(const cnn_mlp *net)
{
    /* sum over layers of n_in * n_out + n_out */
    int64_t n = 0;
    for (int32_t l = 0; l < net->n_layers; ++l)
        n += net->sizes[l] * net->sizes[l + 1] + net->sizes[l + 1];
    return n;
}

static int64_t widest_layer(const cnn_mlp *net)
{
    /* max of sizes[1..n_layers] */
    int64_t m = 1;
    for (int32_t l = 1; l <= net->n_layers; ++l)
        m = net->sizes[l] > m ? net->sizes[l] : m;
    return m;
}

static int64_t gemm_workspace(const cnn_mlp *net, int64_t batch, int n_threads)
{
    /* the largest dense-layer workspace over all layers */
    int64_t m = 0;
    for (int32_t l = 0; l < net->n_layers; ++l) {
        int64_t w = cnn_dense_workspace_floats(batch, net->sizes[l], net->sizes[l + 1], n_threads);
        m = w > m ? w : m;
    }
    return cnn_round_up_floats(m);
}

/* Workspace layout, every block 64-byte aligned:
   predict: per thread slot: input (B, sizes[0]) | two ping-pong buffers (B, widest) |
            gemm workspace; n_threads slots with one-thread GEMMs (chunks in parallel),
            or one slot with an n_threads GEMM workspace (one chunk), whichever is larger
   train:   input (B, sizes[0]) | outputs of each layer (B, sizes[l + 1]) |
            two delta buffers (B, widest) | labels (B) | weights (B) | gemm workspace */
static int64_t predict_slot_floats(const cnn_mlp *net, int64_t B, int gemm_threads)
{
    /* floats of one thread's predict workspace */
    return cnn_round_up_floats(B * net->sizes[0]) + 2 * cnn_round_up_floats(B * widest_layer(net))
           + gemm_workspace(net, B, gemm_threads);
}

int64_t cnn_mlp_predict_workspace_floats(const cnn_mlp *net, int64_t batch_size, int n_threads)
{
    const int64_t one_chunk = predict_slot_floats(net, batch_size, n_threads);
    const int64_t parallel_chunks = n_threads * predict_slot_floats(net, batch_size, 1);
    return one_chunk > parallel_chunks ? one_chunk : parallel_chunks;
}

int64_t cnn_mlp_train_workspace_floats(const cnn_mlp *net, int64_t batch_size, int n_threads)
{
    int64_t B = batch_size, n = cnn_round_up_floats(B * net->sizes[0]);
    for (int32_t l = 1; l <= net->n_layers; ++l)
        n += cnn_round_up_floats(B * net->sizes[l]);
    return n + 2 * cnn_round_up_floats(B * widest_layer(net)) + 2 * cnn_round_up_floats(B)
           + gemm_workspace(net, B, n_threads);
}

static float *layer_W(const cnn_mlp *net, float *params, int32_t layer)
{
    /* W_layer inside a flat parameter (or gradient) vector */
    for (int32_t l = 0; l < layer; ++l)
        params += net->sizes[l] * net->sizes[l + 1] + net->sizes[l + 1];
    return params;
}

static uint32_t nonfinite_bits(const float *x, int64_t n)
{
    /* nonzero if some element of x (n,) is NaN or infinite (all exponent bits set) */
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

typedef struct finite_job {
    const float *x;
    int64_t n;
    uint32_t bad[CNN_MAX_THREADS]; /* per thread */
} finite_job;

static void finite_task(void *arg, int64_t task, int thread)
{
    /* elements [4096 task, 4096 task + 4096) of x */
    finite_job *j = (finite_job *)arg;
    const int64_t i = task * 4096;
    j->bad[thread] |= nonfinite_bits(j->x + i, j->n - i < 4096 ? j->n - i : 4096);
}

static int all_finite(const float *x, int64_t n, int n_threads)
{
    /* 1 if no element of x (n,) is NaN or infinite, else 0 */
    if (n < 65536 || n_threads < 2)
        return nonfinite_bits(x, n) == 0;
    finite_job j = { x, n, {0} };
    uint32_t bad = 0;
    cnn_parallel_for(n_threads, (n + 4095) / 4096, finite_task, &j);
    for (int t = 0; t < CNN_MAX_THREADS; ++t)
        bad |= j.bad[t];
    return bad == 0;
}

static int forward_batch(float *out, int64_t ld_out, float **outputs, const cnn_mlp *net,
                         const float *x, int64_t B, float *work, int n_threads)
{
    /* outputs[l] (B, sizes[l + 1]) = layer l of the net, last into out (ld_out) ; x (B, sizes[0]) */
    const int32_t L = net->n_layers;
    const float *in = x;
    for (int32_t l = 0; l < L; ++l) {
        int64_t n_in = net->sizes[l], n_out = net->sizes[l + 1];
        const float *W = layer_W(net, net->params, l), *b = W + n_in * n_out;
        cnn_epilogue ep = {0};
        ep.bias = b;
        ep.act = l + 1 < L ? net->activation : CNN_ACT_IDENTITY;
        ep.grad_act = CNN_ACT_IDENTITY;
        ep.alpha = net->alpha;
        float *y = l + 1 < L || !out ? outputs[l] : out;
        int64_t ldy = l + 1 < L || !out ? n_out : ld_out;
        int status = cnn_sgemm_ex(y, in, W, B, n_out, n_in, ldy, n_in, n_out, CNN_NO_TRANS,
                                  CNN_NO_TRANS, 1.0f, 0.0f, &ep, work, n_threads);
        if (status != CNN_OK)
            return status;
        in = y;
    }
    return CNN_OK;
}

/* Rows [r0, r0 + rows) of the prediction, with the workspace slot `slot`. */
static int predict_chunk(float *probs, const cnn_mlp *net, const void *X, cnn_dtype dtype,
                         int64_t n, int64_t B, int64_t r0, int64_t rows, int logits,
                         float *slot, int n_threads)
{
    /* probs[r0:r0+rows] = softmax(net(X[r0:r0+rows])) */
    const int64_t n_in = net->sizes[0], C = net->sizes[net->n_layers];
    float *x = slot;
    float *ping = x + cnn_round_up_floats(B * n_in);
    float *pong = ping + cnn_round_up_floats(B * widest_layer(net));
    float *gemm_work = pong + cnn_round_up_floats(B * widest_layer(net));
    float *outputs[CNN_MAX_LAYERS];
    for (int32_t l = 0; l < net->n_layers; ++l)
        outputs[l] = l % 2 ? pong : ping;
    const float *xb;
    if (dtype == CNN_DTYPE_FLOAT32) {
        xb = (const float *)X + r0 * n_in;
        if (!all_finite(xb, rows * n_in, n_threads))
            return CNN_ERR_NONFINITE;
    } else {
        int64_t index[256];
        for (int64_t r = 0; r < rows; r += 256) {
            int64_t k = rows - r < 256 ? rows - r : 256;
            for (int64_t i = 0; i < k; ++i)
                index[i] = r0 + r + i;
            int status = cnn_gather_rows(x + r * n_in, X, dtype, index, k, n, n_in);
            if (status != CNN_OK)
                return status;
        }
        xb = x;
    }
    float *out = probs + r0 * C;
    int status = forward_batch(out, C, outputs, net, xb, rows, gemm_work, n_threads);
    if (status != CNN_OK)
        return status;
    if (!logits)
        cnn_activation_forward(out, out, rows * C, C, CNN_ACT_SOFTMAX, 0.0f);
    return CNN_OK;
}

/* Chunks [c0, c1) of B rows, in order; the status of the first that fails. */
static int predict_chunks(float *probs, const cnn_mlp *net, const void *X, cnn_dtype dtype,
                          int64_t n, int64_t B, int64_t c0, int64_t c1, int logits,
                          float *slot, int n_threads)
{
    /* probs[c0 B : c1 B] */
    for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t r0 = ch * B, rows = n - r0 < B ? n - r0 : B;
        int status = predict_chunk(probs, net, X, dtype, n, B, r0, rows, logits, slot,
                                   n_threads);
        if (status != CNN_OK)
            return status;
    }
    return CNN_OK;
}

/* A threaded predict: chunk `task` in thread `thread`'s slot; per thread, the first
   chunk that failed and its status. */
typedef struct predict_job {
    float *probs;
    const cnn_mlp *net;
    const void *X;
    cnn_dtype dtype;
    int64_t n, B, slot;
    int logits;
    float *work;
    int64_t failed[CNN_MAX_THREADS];
    int status[CNN_MAX_THREADS];
} predict_job;

static void predict_task(void *arg, int64_t task, int thread)
{
    /* chunk `task` */
    predict_job *j = (predict_job *)arg;
    const int st = predict_chunks(j->probs, j->net, j->X, j->dtype, j->n, j->B, task, task + 1,
                                  j->logits, j->work + thread * j->slot, 1);
    if (st != CNN_OK && j->status[thread] == CNN_OK) {
        j->failed[thread] = task;  /* a thread claims chunks in increasing order */
        j->status[thread] = st;
    }
}

int cnn_mlp_predict(float *probs, const cnn_mlp *net, const void *X, cnn_dtype dtype,
                    int64_t n, int64_t batch_size, int logits, float *work, int n_threads)
{
    /* probs (n, n_classes) = softmax(net(X)) ; X (n, sizes[0]) */
    if (net->n_layers < 1 || net->n_layers > CNN_MAX_LAYERS || batch_size < 1 || n < 0 ||
        n_threads < 1)
        return CNN_ERR_ARG;
    const int64_t B = batch_size, chunks = (n + B - 1) / B;
    if (chunks < 2 || n_threads < 2)
        return predict_chunks(probs, net, X, dtype, n, B, 0, chunks, logits, work, n_threads);
    /* Several chunks: threads claim chunks and run each with one-thread GEMMs in their
       own workspace slot (no barriers at all).  Results do not depend on the split. */
    predict_job j;
    j.probs = probs; j.net = net; j.X = X; j.dtype = dtype; j.n = n; j.B = B;
    j.logits = logits; j.work = work; j.slot = predict_slot_floats(net, B, 1);
    for (int t = 0; t < CNN_MAX_THREADS; ++t) {
        j.failed[t] = chunks;
        j.status[t] = CNN_OK;
    }
    cnn_parallel_for(n_threads, chunks, predict_task, &j);
    int status = CNN_OK;
    for (int t = 0, first = 0; t < CNN_MAX_THREADS; ++t)
        if (j.status[t] != CNN_OK && (status == CNN_OK || j.failed[t] < j.failed[first])) {
            first = t;
            status = j.status[t];
        }
    return status;
}

/* Ask the cache for the rows X[idx[0..rows)] (n_in entries of `bytes` each), which the
   next minibatch will gather: their random reads from memory then overlap this
   minibatch's arithmetic instead of stalling the gather. */
static void prefetch_rows(const void *X, int64_t bytes, const int64_t *idx, int64_t rows,
                          int64_t n_in)
{
    /* X rows -> cache (no effect on results) */
#if defined(__GNUC__) || defined(__clang__)
    const int64_t row_bytes = n_in * bytes;
    for (int64_t r = 0; r < rows; ++r) {
        const char *p = (const char *)X + idx[r] * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64)
            __builtin_prefetch(p + b, 0, 2);
    }
#else
    (void)X; (void)bytes; (void)idx; (void)rows; (void)n_in;
#endif
}

int cnn_mlp_train_batches(cnn_mlp *net, cnn_optimizer *opt, float *state1, float *state2,
                          float *grads, float *work, const void *X, cnn_dtype dtype,
                          const int32_t *y, const float *sample_weight, const int64_t *order,
                          int64_t n_order, int64_t batch_size, int64_t first_batch,
                          int64_t n_batches, double *loss_sum, int64_t *n_correct,
                          int n_threads)
{
    /* for each minibatch: gather, forward, softmax cross-entropy, backward, update */
    const int32_t L = net->n_layers;
    if (L < 1 || L > CNN_MAX_LAYERS || batch_size < 1 || first_batch < 0 || n_batches < 0)
        return CNN_ERR_ARG;
    const int64_t B = batch_size, n_in = net->sizes[0], C = net->sizes[L];
    const int64_t n_params = cnn_mlp_param_count(net);
    float *x = work, *outputs[CNN_MAX_LAYERS];
    float *p = x + cnn_round_up_floats(B * n_in);
    for (int32_t l = 0; l < L; ++l) {
        outputs[l] = p;
        p += cnn_round_up_floats(B * net->sizes[l + 1]);
    }
    float *delta = p, *delta_next = delta + cnn_round_up_floats(B * widest_layer(net));
    int32_t *yb = (int32_t *)(delta_next + cnn_round_up_floats(B * widest_layer(net)));
    float *wb = (float *)yb + cnn_round_up_floats(B);
    float *gemm_work = wb + cnn_round_up_floats(B);

    for (int64_t batch = first_batch; batch < first_batch + n_batches; ++batch) {
        const int64_t r0 = batch * B;
        if (r0 >= n_order)
            return CNN_ERR_ARG;
        const int64_t rows = n_order - r0 < B ? n_order - r0 : B;
        const int64_t *idx = order + r0;
        int status = cnn_gather_rows_threaded(x, X, dtype, idx, rows, INT64_MAX, n_in, n_threads);
        if (status != CNN_OK)
            return status;
        if (batch + 1 < first_batch + n_batches && r0 + B < n_order)
            prefetch_rows(X, dtype == CNN_DTYPE_UINT8 ? 1 : 4, idx + B,
                          n_order - r0 - B < B ? n_order - r0 - B : B, n_in);
        for (int64_t r = 0; r < rows; ++r) {
            yb[r] = y[idx[r]];
            if (sample_weight)
                wb[r] = sample_weight[idx[r]];
        }
        status = forward_batch(NULL, 0, outputs, net, x, rows, gemm_work, n_threads);
        if (status != CNN_OK)
            return status;
        double loss;
        int64_t correct;
        status = cnn_softmax_cross_entropy(NULL, delta, &loss, &correct, outputs[L - 1], yb,
                                           sample_weight ? wb : NULL, rows, C);
        if (status != CNN_OK)
            return status;
        double w_sum = rows;
        if (sample_weight) {
            w_sum = 0.0;
            for (int64_t r = 0; r < rows; ++r)
                w_sum += wb[r];
        }
        *loss_sum += loss * w_sum;
        *n_correct += correct;
        for (int32_t l = L - 1; l >= 0; --l) {
            const int64_t k = net->sizes[l], m = net->sizes[l + 1];
            const float *in = l ? outputs[l - 1] : x;
            float *dW = layer_W(net, grads, l), *db = dW + k * m;
            const float *W = layer_W(net, net->params, l);
            status = cnn_sgemm_ex(dW, in, delta, k, m, rows, m, k, m, CNN_TRANS, CNN_NO_TRANS,
                                  1.0f, 0.0f, NULL, gemm_work, n_threads);
            if (status != CNN_OK)
                return status;
            cnn_bias_backward(db, delta, rows, m);
            if (l == 0)
                break;
            cnn_epilogue ep = {0};
            ep.act = CNN_ACT_IDENTITY;
            ep.grad_act = net->activation;
            ep.grad_of = outputs[l - 1];
            ep.ld_grad_of = k;
            ep.alpha = net->alpha;
            status = cnn_sgemm_ex(delta_next, delta, W, rows, k, m, k, m, m, CNN_NO_TRANS,
                                  CNN_TRANS, 1.0f, 0.0f, &ep, gemm_work, n_threads);
            if (status != CNN_OK)
                return status;
            float *t = delta;
            delta = delta_next;
            delta_next = t;
        }
        status = cnn_optimizer_update(net->params, state1, state2, opt, grads, n_params, n_threads);
        if (status != CNN_OK)
            return status;
    }
    return CNN_OK;
}
