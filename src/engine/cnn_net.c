/* cnn_net.c -- a network as a table of layers: batched inference and minibatch training
   over caller-provided workspaces (no allocation here).

   Each layer kind has one row in LAYER_OPS: how it turns an input shape into an output
   shape and a parameter count, the workspace its kernels need, and its forward and
   backward passes (calls into src/layers/).  The engine only walks that table. */
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"

/* ---- geometry ------------------------------------------------------------------ */

/* One layer's shapes for one sample (flat data is 1 x 1 x features) and where its
   parameters start in the flat vector. */
typedef struct layer_geom {
    int64_t in_h, in_w, in_c, out_h, out_w, out_c;
    int64_t n_in, n_out;       /* in_h in_w in_c, out_h out_w out_c */
    int64_t n_params, offset;  /* W then b, at params + offset */
} layer_geom;

/* Everything one pass of one layer needs besides its input and output. */
typedef struct layer_call {
    const cnn_layer *layer;
    const layer_geom *g;
    int64_t rows;                   /* samples in this batch */
    const float *params;            /* this layer's W then b (NULL: none) */
    float *grads;                   /* this layer's dW then db (backward) */
    cnn_activation input_act;       /* backward: the activation that produced X */
    float input_alpha;
    uint64_t seed, offset;          /* dropout mask */
    float *work;
    int n_threads;
} layer_call;

typedef struct layer_ops {
    /* g->out_* and g->n_params from g->in_* ; CNN_ERR_ARG if the layer cannot take it */
    int (*shape)(layer_geom *g, const cnn_layer *l);
    /* floats of kernel workspace for `rows` samples (0 if none) */
    int64_t (*workspace)(const layer_geom *g, const cnn_layer *l, int64_t rows, int n_threads);
    /* Y (rows, n_out) from X (rows, n_in) ; NULL: Y is X (the layer moves no data) */
    int (*forward)(float *Y, const float *X, const layer_call *c);
    /* grads and dX (rows, n_in; NULL for the first layer) from dY (rows, n_out), its input
       X and output Y; NULL: dX is dY.  dY is the gradient of the pre-activation output. */
    int (*backward)(float *dX, const float *dY, const float *X, const float *Y,
                    const layer_call *c);
    /* 1 if backward already multiplies dX by input_act' (else the engine does it) */
    int fuses_input_grad;
    /* 1 if the layer has an activation (dense, conv2d) */
    int has_activation;
    /* 1 if the layer is the identity at inference (dropout) */
    int inference_identity;
} layer_ops;

static int conv_shape(cnn_conv2d_shape *s, const layer_geom *g, const cnn_layer *l,
                      int64_t rows)
{
    /* the kernels' shape of a conv2d layer for `rows` samples */
    return cnn_conv2d_shape_init(s, rows, g->in_h, g->in_w, g->in_c, l->units, l->kernel_h,
                                 l->kernel_w, l->stride, l->same_padding);
}

static int pool_shape(cnn_pool2d_shape *s, const layer_geom *g, const cnn_layer *l,
                      int64_t rows)
{
    /* the kernels' shape of a pooling layer for `rows` samples */
    return cnn_pool2d_shape_init(s, rows, g->in_h, g->in_w, g->in_c, l->kernel_h, l->stride);
}

/* ---- dense --------------------------------------------------------------------- */
static int dense_shape(layer_geom *g, const cnn_layer *l)
{
    /* (h, w, c) -> (1, 1, units): a dense layer reads the whole sample */
    if (l->units < 1 || l->units > CNN_MAX_DIMENSION)
        return CNN_ERR_ARG;
    g->out_h = g->out_w = 1;
    g->out_c = l->units;
    g->n_params = g->n_in * l->units + l->units;
    return CNN_OK;
}

static int64_t dense_workspace(const layer_geom *g, const cnn_layer *l, int64_t rows,
                               int n_threads)
{
    (void)l;
    return cnn_dense_workspace_floats(rows, g->n_in, g->n_out, n_threads);
}

static int dense_forward(float *Y, const float *X, const layer_call *c)
{
    /* Y = act(X W + b) */
    const float *W = c->params, *b = W + c->g->n_in * c->g->n_out;
    return cnn_dense_forward(Y, X, W, b, c->rows, c->g->n_in, c->g->n_out,
                             (cnn_activation)c->layer->activation, c->layer->alpha, c->work,
                             c->n_threads);
}

static int dense_backward(float *dX, const float *dY, const float *X, const float *Y,
                          const layer_call *c)
{
    /* dW, db, dX = (dY W^T) * input_act'(X) */
    (void)Y;
    float *dW = c->grads, *db = dW + c->g->n_in * c->g->n_out;
    return cnn_dense_backward_act(dW, db, dX, X, dY, c->params, c->rows, c->g->n_in,
                                  c->g->n_out, c->input_act, c->input_alpha, c->work,
                                  c->n_threads);
}

/* ---- conv2d -------------------------------------------------------------------- */
static int conv2d_shape(layer_geom *g, const cnn_layer *l)
{
    /* output (out_h, out_w, filters) by the padding rule of the kernels */
    cnn_conv2d_shape s;
    if (l->units > CNN_MAX_DIMENSION || conv_shape(&s, g, l, 1) != CNN_OK)
        return CNN_ERR_ARG;
    g->out_h = s.out_h;
    g->out_w = s.out_w;
    g->out_c = s.out_c;
    g->n_params = l->kernel_h * l->kernel_w * g->in_c * l->units + l->units;
    return CNN_OK;
}

static int64_t conv2d_workspace(const layer_geom *g, const cnn_layer *l, int64_t rows,
                                int n_threads)
{
    cnn_conv2d_shape s;
    conv_shape(&s, g, l, rows);
    return cnn_conv2d_workspace_floats(&s, n_threads);
}

static int conv2d_forward(float *Y, const float *X, const layer_call *c)
{
    /* Y = act(conv(X, W) + b) */
    cnn_conv2d_shape s;
    int status = conv_shape(&s, c->g, c->layer, c->rows);
    const float *W = c->params, *b = W + c->g->n_params - c->layer->units;
    if (status == CNN_OK)
        status = cnn_conv2d_forward(Y, X, W, b, &s, (cnn_activation)c->layer->activation,
                                    c->layer->alpha, c->work, c->n_threads);
    return status;
}

static int conv2d_backward(float *dX, const float *dY, const float *X, const float *Y,
                           const layer_call *c)
{
    /* dW, db, dX = conv_transpose(dY, W) */
    (void)Y;
    cnn_conv2d_shape s;
    int status = conv_shape(&s, c->g, c->layer, c->rows);
    float *dW = c->grads, *db = dW + c->g->n_params - c->layer->units;
    if (status == CNN_OK)
        status = cnn_conv2d_backward(dX, dW, db, dY, X, c->params, &s, c->work, c->n_threads);
    return status;
}

/* ---- pooling ------------------------------------------------------------------- */
static int pool2d_shape(layer_geom *g, const cnn_layer *l)
{
    /* output (out_h, out_w, channels), valid windows */
    cnn_pool2d_shape s;
    if (pool_shape(&s, g, l, 1) != CNN_OK || l->kernel_w != l->kernel_h)
        return CNN_ERR_ARG;
    g->out_h = s.out_h;
    g->out_w = s.out_w;
    g->out_c = g->in_c;
    g->n_params = 0;
    return CNN_OK;
}

static int maxpool2d_forward(float *Y, const float *X, const layer_call *c)
{
    /* Y = the maximum of each window */
    cnn_pool2d_shape s;
    int status = pool_shape(&s, c->g, c->layer, c->rows);
    return status == CNN_OK ? cnn_maxpool2d_forward(Y, X, &s, c->n_threads) : status;
}

static int maxpool2d_backward(float *dX, const float *dY, const float *X, const float *Y,
                              const layer_call *c)
{
    /* dX = dY routed to the first maximum of each window, times input_act'(X) */
    (void)Y;
    cnn_pool2d_shape s;
    int status = pool_shape(&s, c->g, c->layer, c->rows);
    return status == CNN_OK ? cnn_pool2d_backward_act(dX, dY, X, X, &s, 0, c->input_act,
                                                      c->input_alpha, c->n_threads)
                            : status;
}

static int avgpool2d_forward(float *Y, const float *X, const layer_call *c)
{
    /* Y = the mean of each window */
    cnn_pool2d_shape s;
    int status = pool_shape(&s, c->g, c->layer, c->rows);
    return status == CNN_OK ? cnn_avgpool2d_forward(Y, X, &s, c->n_threads) : status;
}

static int avgpool2d_backward(float *dX, const float *dY, const float *X, const float *Y,
                              const layer_call *c)
{
    /* dX = dY / size^2 spread over each window, times input_act'(X) */
    (void)Y;
    cnn_pool2d_shape s;
    int status = pool_shape(&s, c->g, c->layer, c->rows);
    return status == CNN_OK ? cnn_pool2d_backward_act(dX, dY, NULL, X, &s, 1, c->input_act,
                                                      c->input_alpha, c->n_threads)
                            : status;
}

/* ---- flatten and dropout ------------------------------------------------------- */
static int flatten_shape(layer_geom *g, const cnn_layer *l)
{
    /* (h, w, c) -> (1, 1, h w c): NHWC rows are already flat */
    (void)l;
    g->out_h = g->out_w = 1;
    g->out_c = g->n_in;
    g->n_params = 0;
    return CNN_OK;
}

static int dropout_shape(layer_geom *g, const cnn_layer *l)
{
    /* the shape is unchanged */
    if (!(l->rate >= 0.0f && l->rate < 1.0f))
        return CNN_ERR_ARG;
    g->out_h = g->in_h;
    g->out_w = g->in_w;
    g->out_c = g->in_c;
    g->n_params = 0;
    return CNN_OK;
}

static int64_t no_workspace(const layer_geom *g, const cnn_layer *l, int64_t rows,
                            int n_threads)
{
    (void)g; (void)l; (void)rows; (void)n_threads;
    return 0;
}

static int dropout_forward(float *Y, const float *X, const layer_call *c)
{
    /* Y = X * keep / (1 - rate), the mask from (seed, offset) */
    return cnn_dropout_forward(Y, X, c->rows * c->g->n_in, c->layer->rate, c->seed, c->offset,
                               c->n_threads);
}

static int dropout_backward(float *dX, const float *dY, const float *X, const float *Y,
                            const layer_call *c)
{
    /* dX = dY * keep / (1 - rate), the same mask */
    (void)X; (void)Y;
    return cnn_dropout_backward(dX, dY, c->rows * c->g->n_in, c->layer->rate, c->seed,
                                c->offset, c->n_threads);
}

static const layer_ops LAYER_OPS[] = {
    [CNN_LAYER_DENSE] = { dense_shape, dense_workspace, dense_forward, dense_backward,
                          1, 1, 0 },
    [CNN_LAYER_CONV2D] = { conv2d_shape, conv2d_workspace, conv2d_forward, conv2d_backward,
                           0, 1, 0 },
    [CNN_LAYER_MAXPOOL2D] = { pool2d_shape, no_workspace, maxpool2d_forward,
                              maxpool2d_backward, 1, 0, 0 },
    [CNN_LAYER_AVGPOOL2D] = { pool2d_shape, no_workspace, avgpool2d_forward,
                              avgpool2d_backward, 1, 0, 0 },
    [CNN_LAYER_FLATTEN] = { flatten_shape, no_workspace, NULL, NULL, 0, 0, 0 },
    [CNN_LAYER_DROPOUT] = { dropout_shape, no_workspace, dropout_forward, dropout_backward,
                            0, 0, 1 },
};
#define N_LAYER_KINDS ((int32_t)(sizeof LAYER_OPS / sizeof LAYER_OPS[0]))

/* ---- the plan: every layer's geometry, checked once per call ------------------- */
typedef struct net_plan {
    layer_geom g[CNN_MAX_LAYERS];
    int64_t n_params;
    int64_t widest;            /* the largest n_out of any layer */
} net_plan;

static void input_grad(float *dX, const float *X, int64_t n, cnn_activation act, float alpha)
{
    /* dX *= act'(.) from the activation outputs X (n,) ; nothing for the identity */
    if (act != CNN_ACT_IDENTITY)
        cnn_activation_grad(dX, dX, X, n, act, alpha);
}

static cnn_activation layer_activation(const cnn_layer *l)
{
    /* the activation a layer applies (identity for kinds without one) */
    return LAYER_OPS[l->kind].has_activation ? (cnn_activation)l->activation
                                             : CNN_ACT_IDENTITY;
}

static int make_plan(net_plan *p, const cnn_net *net)
{
    /* *p from net ; CNN_ERR_ARG for anything cnn_net_check refuses */
    if (!net || net->n_layers < 1 || net->n_layers > CNN_MAX_LAYERS ||
        (net->loss != CNN_LOSS_SOFTMAX_CROSS_ENTROPY && net->loss != CNN_LOSS_SQUARED_ERROR))
        return CNN_ERR_ARG;
    int64_t h = net->in_h, w = net->in_w, c = net->in_c;
    if (h < 1 || w < 1 || c < 1 || h > CNN_MAX_DIMENSION || w > CNN_MAX_DIMENSION ||
        c > CNN_MAX_DIMENSION || h * w * c > CNN_MAX_DIMENSION)
        return CNN_ERR_ARG;
    p->n_params = 0;
    p->widest = 1;
    for (int32_t i = 0; i < net->n_layers; ++i) {
        const cnn_layer *l = &net->layers[i];
        layer_geom *g = &p->g[i];
        if (l->kind < 0 || l->kind >= N_LAYER_KINDS)
            return CNN_ERR_ARG;
        const layer_ops *ops = &LAYER_OPS[l->kind];
        if (ops->has_activation &&
            (!cnn_is_elementwise_activation((cnn_activation)l->activation) ||
             !(l->alpha >= 0.0f && l->alpha < 1.0f)))
            return CNN_ERR_ARG;
        g->in_h = h; g->in_w = w; g->in_c = c;
        g->n_in = h * w * c;
        if (ops->shape(g, l) != CNN_OK)
            return CNN_ERR_ARG;
        h = g->out_h; w = g->out_w; c = g->out_c;
        if (h > CNN_MAX_DIMENSION || w > CNN_MAX_DIMENSION || c > CNN_MAX_DIMENSION ||
            h * w * c > CNN_MAX_DIMENSION || g->n_params > ((int64_t)1 << 40) - p->n_params)
            return CNN_ERR_ARG;
        g->n_out = h * w * c;
        g->offset = p->n_params;
        p->n_params += g->n_params;
        p->widest = g->n_out > p->widest ? g->n_out : p->widest;
    }
    return net->layers[net->n_layers - 1].kind == CNN_LAYER_DENSE ? CNN_OK : CNN_ERR_ARG;
}

int cnn_net_check(const cnn_net *net)
{
    net_plan p;
    return make_plan(&p, net);
}

int64_t cnn_net_param_count(const cnn_net *net)
{
    net_plan p;
    return make_plan(&p, net) == CNN_OK ? p.n_params : -1;
}

int64_t cnn_net_n_outputs(const cnn_net *net)
{
    net_plan p;
    return make_plan(&p, net) == CNN_OK ? p.g[net->n_layers - 1].n_out : -1;
}

static int64_t layers_workspace(const cnn_net *net, const net_plan *p, int32_t first,
                                int32_t end, int64_t rows, int n_threads)
{
    /* the largest kernel workspace over layers [first, end) */
    int64_t m = 0;
    for (int32_t i = first; i < end; ++i) {
        const cnn_layer *l = &net->layers[i];
        int64_t w = LAYER_OPS[l->kind].workspace(&p->g[i], l, rows, n_threads);
        m = w > m ? w : m;
    }
    return cnn_round_up_floats(m);
}

/* ---- finiteness of float input ------------------------------------------------- */
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

/* ---- inference ----------------------------------------------------------------- */
/* Predict workspace, every block 64-byte aligned: per slot: input (B, n_in) | two
   ping-pong buffers (B, widest) | layer workspace; n_threads slots with one-thread
   kernels (chunks in parallel), or one slot with n_threads kernels (one chunk),
   whichever is larger. */
static int64_t predict_slot_floats(const cnn_net *net, const net_plan *p, int64_t B,
                                   int n_threads)
{
    /* floats of one slot */
    return cnn_round_up_floats(B * p->g[0].n_in) + 2 * cnn_round_up_floats(B * p->widest)
           + layers_workspace(net, p, 0, net->n_layers, B, n_threads);
}

int64_t cnn_net_predict_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads)
{
    net_plan p;
    if (make_plan(&p, net) != CNN_OK || batch_size < 1 || n_threads < 1)
        return -1;
    const int64_t one_chunk = predict_slot_floats(net, &p, batch_size, n_threads);
    const int64_t parallel_chunks = n_threads * predict_slot_floats(net, &p, batch_size, 1);
    return one_chunk > parallel_chunks ? one_chunk : parallel_chunks;
}

/* Images per slice of the image layers.  Inference pools a convolution's output slice
   by slice, and training takes each slice through all the image layers, so the slice's
   activations are read again from cache (a batch of 64 of LeNet-5's first convolution
   outputs is 1.2 MB, a slice of 8 is 150 kB).  Every image is computed alone, so
   slicing changes no output bits. */
#define IMAGE_SLICE 8

/* 1 if layer i is a convolution whose output layer i + 1 pools. */
static int pooled_conv(const cnn_net *net, int32_t i)
{
    /* -> flag */
    return net->layers[i].kind == CNN_LAYER_CONV2D && i + 1 < net->n_layers &&
           (net->layers[i + 1].kind == CNN_LAYER_MAXPOOL2D ||
            net->layers[i + 1].kind == CNN_LAYER_AVGPOOL2D);
}

/* Layer i (a convolution) from X into Yc and layer i + 1 (its pooling) from Yc into Yp,
   IMAGE_SLICE images at a time. */
static int conv_pool_forward(float *Yc, float *Yp, const float *X, const cnn_net *net,
                             const net_plan *p, int32_t i, const layer_call *base)
{
    /* -> status */
    layer_call cc = *base, pc = *base;
    cc.layer = &net->layers[i];
    cc.g = &p->g[i];
    cc.params = net->params + p->g[i].offset;
    pc.layer = &net->layers[i + 1];
    pc.g = &p->g[i + 1];
    pc.params = NULL;
    for (int64_t r0 = 0; r0 < base->rows; r0 += IMAGE_SLICE) {
        cc.rows = pc.rows = base->rows - r0 < IMAGE_SLICE ? base->rows - r0 : IMAGE_SLICE;
        float *yc = Yc + r0 * cc.g->n_out;
        int status = LAYER_OPS[cc.layer->kind].forward(yc, X + r0 * cc.g->n_in, &cc);
        if (status == CNN_OK)
            status = LAYER_OPS[pc.layer->kind].forward(Yp + r0 * pc.g->n_out, yc, &pc);
        if (status != CNN_OK)
            return status;
    }
    return CNN_OK;
}

static int forward_inference(float *out, const cnn_net *net, const net_plan *p,
                             const float *x, int64_t rows, float *ping, float *pong,
                             float *work, int n_threads)
{
    /* out (rows, n_outputs) = the last layer's output for x (rows, n_in) */
    const float *in = x;
    for (int32_t i = 0; i < net->n_layers; ++i) {
        const cnn_layer *l = &net->layers[i];
        const layer_ops *ops = &LAYER_OPS[l->kind];
        if (!ops->forward || ops->inference_identity)
            continue;
        layer_call c = { l, &p->g[i], rows, net->params + p->g[i].offset, NULL,
                         CNN_ACT_IDENTITY, 0.0f, 0, 0, work, n_threads };
        float *y = i + 1 == net->n_layers ? out : in == ping ? pong : ping;
        float *pooled = y == ping ? pong : ping;
        if (pooled_conv(net, i) && i + 2 < net->n_layers && pooled != in) {
            int status = conv_pool_forward(y, pooled, in, net, p, i, &c);
            if (status != CNN_OK)
                return status;
            in = pooled;
            ++i;
            continue;
        }
        int status = ops->forward(y, in, &c);
        if (status != CNN_OK)
            return status;
        in = y;
    }
    return CNN_OK;
}

/* Rows [r0, r0 + rows) of the prediction, with the workspace slot `slot`. */
static int predict_chunk(float *out, const cnn_net *net, const net_plan *p, const void *X,
                         cnn_dtype dtype, int64_t n, int64_t B, int64_t r0, int64_t rows,
                         int logits, float *slot, int n_threads)
{
    /* out[r0:r0+rows] = softmax(net(X[r0:r0+rows])), or the raw outputs */
    const int64_t n_in = p->g[0].n_in, C = p->g[net->n_layers - 1].n_out;
    float *x = slot;
    float *ping = x + cnn_round_up_floats(B * n_in);
    float *pong = ping + cnn_round_up_floats(B * p->widest);
    float *work = pong + cnn_round_up_floats(B * p->widest);
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
    float *o = out + r0 * C;
    int status = forward_inference(o, net, p, xb, rows, ping, pong, work, n_threads);
    if (status == CNN_OK && !logits && net->loss == CNN_LOSS_SOFTMAX_CROSS_ENTROPY)
        status = cnn_activation_forward(o, o, rows * C, C, CNN_ACT_SOFTMAX, 0.0f);
    return status;
}

/* A threaded predict: chunk `task` in thread `thread`'s slot; per thread, the first
   chunk that failed and its status. */
typedef struct predict_job {
    float *out;
    const cnn_net *net;
    const net_plan *plan;
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
    const int64_t r0 = task * j->B, rows = j->n - r0 < j->B ? j->n - r0 : j->B;
    const int st = predict_chunk(j->out, j->net, j->plan, j->X, j->dtype, j->n, j->B, r0, rows,
                                 j->logits, j->work + thread * j->slot, 1);
    if (st != CNN_OK && j->status[thread] == CNN_OK) {
        j->failed[thread] = task;  /* a thread claims chunks in increasing order */
        j->status[thread] = st;
    }
}

int cnn_net_predict(float *out, const cnn_net *net, const void *X, cnn_dtype dtype, int64_t n,
                    int64_t batch_size, int logits, float *work, int n_threads)
{
    /* out (n, n_outputs) = softmax(net(X)) or the raw outputs ; X (n, in_h in_w in_c) */
    net_plan p;
    if (make_plan(&p, net) != CNN_OK || batch_size < 1 || n < 0 || n_threads < 1)
        return CNN_ERR_ARG;
    const int64_t B = batch_size, chunks = (n + B - 1) / B;
    if (chunks < 2 || n_threads < 2) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
            const int64_t r0 = ch * B, rows = n - r0 < B ? n - r0 : B;
            int status = predict_chunk(out, net, &p, X, dtype, n, B, r0, rows, logits, work,
                                       n_threads);
            if (status != CNN_OK)
                return status;
        }
        return CNN_OK;
    }
    /* Several chunks: threads claim chunks and run each with one-thread kernels in their
       own workspace slot (no barriers at all).  Results do not depend on the split. */
    predict_job j;
    j.out = out; j.net = net; j.plan = &p; j.X = X; j.dtype = dtype; j.n = n; j.B = B;
    j.logits = logits; j.work = work; j.slot = predict_slot_floats(net, &p, B, 1);
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

/* ---- training ------------------------------------------------------------------ */
static uint64_t layer_seed(uint64_t seed, int32_t layer)
{
    /* an independent dropout seed per layer (splitmix64's finaliser of seed and layer) */
    uint64_t z = seed ^ ((uint64_t)(layer + 1) * UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Training runs the image layers a slice (IMAGE_SLICE images) at a time, each slice
   through every image layer on one thread, forward and backward: its activations stay
   in that core's cache, and the image layers cost two parallel loops per step instead
   of one or more per layer.  The slices do not depend on the thread count, and each
   slice's weight gradients are kept apart and summed in slice order afterwards, so
   results are the same for any number of threads. */

/* The leading layers that work image by image: convolutions and pooling, and the
   dropout and flatten layers among them, up to the last convolution or pooling (0 if
   the network starts otherwise). */
static int32_t image_layers(const cnn_net *net)
{
    /* -> count */
    int32_t n = 0;
    for (int32_t i = 0; i < net->n_layers; ++i) {
        const int32_t kind = net->layers[i].kind;
        if (kind == CNN_LAYER_CONV2D || kind == CNN_LAYER_MAXPOOL2D ||
            kind == CNN_LAYER_AVGPOOL2D)
            n = i + 1;
        else if (kind != CNN_LAYER_DROPOUT && kind != CNN_LAYER_FLATTEN)
            break;
    }
    return n;
}

/* Image-layer workspace, every block 64-byte aligned: n_threads slots of (the kernels'
   workspace for one slice on one thread | two delta buffers of one slice) | each
   slice's weight gradients (the image layers' parameters come first in the network). */
typedef struct image_plan {
    int32_t n_layers;          /* image_layers(net) */
    int64_t kernels, buffer;   /* floats of a slot's two parts (each buffer) */
    int64_t slot, n_params;    /* floats of a slot; parameters of the image layers */
} image_plan;

static image_plan plan_images(const cnn_net *net, const net_plan *p)
{
    /* -> the image layers' plan (n_layers 0: none) */
    image_plan ip = { image_layers(net), 0, 0, 0, 0 };
    if (!ip.n_layers)
        return ip;
    int64_t widest = 1;
    for (int32_t i = 0; i < ip.n_layers; ++i)
        widest = p->g[i].n_in > widest ? p->g[i].n_in : widest;
    ip.kernels = layers_workspace(net, p, 0, ip.n_layers, IMAGE_SLICE, 1);
    ip.buffer = cnn_round_up_floats(IMAGE_SLICE * widest);
    ip.slot = ip.kernels + 2 * ip.buffer;
    ip.n_params = p->g[ip.n_layers - 1].offset + p->g[ip.n_layers - 1].n_params;
    return ip;
}

static int64_t image_workspace(const image_plan *ip, int64_t batch_size, int n_threads)
{
    /* floats */
    if (!ip->n_layers)
        return 0;
    const int64_t slices = (batch_size + IMAGE_SLICE - 1) / IMAGE_SLICE;
    return n_threads * ip->slot + cnn_round_up_floats(slices * ip->n_params);
}

/* One minibatch's pass over the image layers. */
typedef struct image_job {
    const cnn_net *net;
    const net_plan *p;
    const image_plan *ip;
    int64_t rows, batch_size;
    uint64_t step;               /* the minibatch's count (dropout masks) */
    const float *x;              /* the minibatch (rows, n_in) */
    float *const *outputs;       /* each layer's output (rows, n_out) */
    const float *delta;          /* backward: gradient of the last image layer's output */
    float *work;                 /* image_workspace */
    int slots;                   /* the thread slots it was sized for */
    int status[CNN_MAX_THREADS];
} image_job;

static layer_call image_call(const image_job *j, int32_t i, int64_t r0, int64_t rows,
                             int thread)
{
    /* layer i's call for the slice of `rows` images from r0, on `thread`'s slot */
    const layer_geom *g = &j->p->g[i];
    layer_call c = { &j->net->layers[i], g, rows, j->net->params + g->offset, NULL,
                     CNN_ACT_IDENTITY, 0.0f, layer_seed(j->net->seed, i),
                     j->step * (uint64_t)(j->batch_size * g->n_out) + (uint64_t)(r0 * g->n_out),
                     j->work + thread * j->ip->slot, 1 };
    return c;
}

static void image_forward_task(void *arg, int64_t slice, int thread)
{
    /* the image layers' outputs for images [8 slice, 8 slice + 8) */
    image_job *j = (image_job *)arg;
    const int64_t r0 = slice * IMAGE_SLICE;
    const int64_t rows = j->rows - r0 < IMAGE_SLICE ? j->rows - r0 : IMAGE_SLICE;
    for (int32_t i = 0; i < j->ip->n_layers; ++i) {
        const layer_ops *ops = &LAYER_OPS[j->net->layers[i].kind];
        if (!ops->forward)
            continue;
        const layer_call c = image_call(j, i, r0, rows, thread);
        const float *in = i ? j->outputs[i - 1] : j->x;
        const int status = ops->forward(j->outputs[i] + r0 * c.g->n_out, in + r0 * c.g->n_in,
                                        &c);
        if (status != CNN_OK) {
            j->status[thread] = status;
            return;
        }
    }
}

static void image_backward_task(void *arg, int64_t slice, int thread)
{
    /* the image layers' gradients for images [8 slice, 8 slice + 8), into the slice's
       own gradient block */
    image_job *j = (image_job *)arg;
    const image_plan *ip = j->ip;
    const int64_t r0 = slice * IMAGE_SLICE;
    const int64_t rows = j->rows - r0 < IMAGE_SLICE ? j->rows - r0 : IMAGE_SLICE;
    float *buf[2] = { j->work + thread * ip->slot + ip->kernels, NULL };
    buf[1] = buf[0] + ip->buffer;
    float *grads = j->work + (int64_t)j->slots * ip->slot + slice * ip->n_params;
    float *delta = (float *)j->delta + r0 * j->p->g[ip->n_layers - 1].n_out;
    int next = 0;
    for (int32_t i = ip->n_layers - 1; i >= 0; --i) {
        const cnn_layer *l = &j->net->layers[i];
        const layer_ops *ops = &LAYER_OPS[l->kind];
        layer_call c = image_call(j, i, r0, rows, thread);
        const float *in = (i ? j->outputs[i - 1] : j->x) + r0 * c.g->n_in;
        const cnn_layer *below = i ? &j->net->layers[i - 1] : NULL;
        c.grads = grads + c.g->offset;
        c.input_act = below ? layer_activation(below) : CNN_ACT_IDENTITY;
        c.input_alpha = below ? below->alpha : 0.0f;
        if (!ops->backward) {
            /* dX is dY (never the shared gradient: the last image layer has a backward) */
            input_grad(delta, in, rows * c.g->n_in, c.input_act, c.input_alpha);
            continue;
        }
        if (i == 0 && c.g->n_params == 0)
            break;
        float *dX = i ? buf[next] : NULL;
        const int status = ops->backward(dX, delta, in, j->outputs[i] + r0 * c.g->n_out, &c);
        if (status != CNN_OK) {
            j->status[thread] = status;
            return;
        }
        if (!dX)
            break;
        if (!ops->fuses_input_grad)
            input_grad(dX, in, rows * c.g->n_in, c.input_act, c.input_alpha);
        delta = dX;
        next ^= 1;
    }
}

/* Run the image layers' forward (backward: 1) pass over the minibatch on n_threads
   threads; the backward pass leaves the image layers' gradients in grads. */
static int image_pass(image_job *j, int backward, float *grads, int n_threads)
{
    /* -> status */
    const int64_t slices = (j->rows + IMAGE_SLICE - 1) / IMAGE_SLICE;
    for (int t = 0; t < n_threads; ++t)
        j->status[t] = CNN_OK;
    cnn_parallel_for(n_threads, slices, backward ? image_backward_task : image_forward_task,
                     j);
    for (int t = 0; t < n_threads; ++t)
        if (j->status[t] != CNN_OK)
            return j->status[t];
    if (backward) {
        /* the slices' gradients summed in slice order */
        const int64_t P = j->ip->n_params;
        const float *partial = j->work + (int64_t)j->slots * j->ip->slot;
        memcpy(grads, partial, (size_t)P * sizeof(float));
        for (int64_t s = 1; s < slices; ++s)
            for (int64_t k = 0; k < P; ++k)
                grads[k] += partial[s * P + k];
    }
    return CNN_OK;
}

/* Train workspace, every block 64-byte aligned: input (B, n_in) | the output of each
   layer that moves data (B, n_out) | two delta buffers (B, widest) | labels (B) |
   weights (B) | targets (B, n_outputs) | layer workspace: the other layers' kernels for
   n_threads or one thread (a step runs with either, see cnn_step_threads), or the
   image layers' slots and slice gradients, whichever is larger (they never overlap in
   time). */
int64_t cnn_net_train_workspace_floats(const cnn_net *net, int64_t batch_size, int n_threads)
{
    net_plan p;
    if (make_plan(&p, net) != CNN_OK || batch_size < 1 || n_threads < 1)
        return -1;
    const int64_t B = batch_size;
    const image_plan ip = plan_images(net, &p);
    int64_t many = layers_workspace(net, &p, ip.n_layers, net->n_layers, B, n_threads);
    const int64_t one = layers_workspace(net, &p, ip.n_layers, net->n_layers, B, 1);
    const int64_t images = image_workspace(&ip, B, n_threads);
    many = many > images ? many : images;
    int64_t n = cnn_round_up_floats(B * p.g[0].n_in);
    for (int32_t i = 0; i < net->n_layers; ++i)
        if (LAYER_OPS[net->layers[i].kind].forward)
            n += cnn_round_up_floats(B * p.g[i].n_out);
    return n + 2 * cnn_round_up_floats(B * p.widest) + 2 * cnn_round_up_floats(B)
           + cnn_round_up_floats(B * p.g[net->n_layers - 1].n_out)
           + (one > many ? one : many);
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

int cnn_net_train_batches(cnn_net *net, cnn_optimizer *opt, float *state1, float *state2,
                          float *grads, float *work, const void *X, cnn_dtype dtype,
                          const int32_t *labels, const float *targets,
                          const float *sample_weight, const int64_t *order, int64_t n_order,
                          int64_t batch_size, int64_t first_batch, int64_t n_batches,
                          int64_t *batch_count, double *loss_sum, int64_t *n_correct,
                          cnn_step_threads *threads, int n_threads)
{
    /* for each minibatch: gather, forward, loss, backward, update */
    net_plan p;
    if (make_plan(&p, net) != CNN_OK || batch_size < 1 || first_batch < 0 || n_batches < 0 ||
        n_threads < 1 || !batch_count ||
        (net->loss == CNN_LOSS_SOFTMAX_CROSS_ENTROPY ? !labels : !targets))
        return CNN_ERR_ARG;
    const int32_t L = net->n_layers;
    const int64_t B = batch_size, n_in = p.g[0].n_in, C = p.g[L - 1].n_out;
    float *x = work, *outputs[CNN_MAX_LAYERS];
    float *q = x + cnn_round_up_floats(B * n_in);
    for (int32_t i = 0; i < L; ++i) {
        const float *in = i ? outputs[i - 1] : x;
        outputs[i] = LAYER_OPS[net->layers[i].kind].forward ? q : (float *)in;
        q += LAYER_OPS[net->layers[i].kind].forward ? cnn_round_up_floats(B * p.g[i].n_out) : 0;
    }
    float *delta_a = q, *delta_b = delta_a + cnn_round_up_floats(B * p.widest);
    int32_t *yb = (int32_t *)(delta_b + cnn_round_up_floats(B * p.widest));
    float *wb = (float *)yb + cnn_round_up_floats(B);
    float *tb = wb + cnn_round_up_floats(B);
    float *layer_work = tb + cnn_round_up_floats(B * C);
    const image_plan ip = plan_images(net, &p);
    image_job images;
    images.net = net;
    images.p = &p;
    images.ip = &ip;
    images.batch_size = B;
    images.x = x;
    images.outputs = outputs;
    images.work = layer_work;
    images.slots = n_threads;

    for (int64_t batch = first_batch; batch < first_batch + n_batches;
         ++batch, ++*batch_count) {
        const int64_t r0 = batch * B;
        if (r0 >= n_order)
            return CNN_ERR_ARG;
        const int64_t rows = n_order - r0 < B ? n_order - r0 : B;
        const int64_t *idx = order + r0;
        const int T = cnn_step_threads_begin(threads, n_threads);
        int status = cnn_gather_rows_threaded(x, X, dtype, idx, rows, INT64_MAX, n_in, T);
        if (status != CNN_OK)
            return status;
        if (batch + 1 < first_batch + n_batches && r0 + B < n_order)
            prefetch_rows(X, dtype == CNN_DTYPE_UINT8 ? 1 : 4, idx + B,
                          n_order - r0 - B < B ? n_order - r0 - B : B, n_in);
        double w_sum = rows;
        if (sample_weight)
            w_sum = 0.0;
        for (int64_t r = 0; r < rows; ++r) {
            if (labels)
                yb[r] = labels[idx[r]];
            if (targets)
                memcpy(tb + r * C, targets + idx[r] * C, (size_t)C * sizeof(float));
            if (sample_weight) {
                wb[r] = sample_weight[idx[r]];
                w_sum += wb[r];
            }
        }
        /* forward, keeping every layer's output */
        images.rows = rows;
        images.step = (uint64_t)*batch_count;
        if (ip.n_layers && (status = image_pass(&images, 0, NULL, T)) != CNN_OK)
            return status;
        layer_call c = { NULL, NULL, rows, NULL, NULL, CNN_ACT_IDENTITY, 0.0f, 0, 0,
                         layer_work, T };
        for (int32_t i = ip.n_layers; i < L; ++i) {
            const cnn_layer *l = &net->layers[i];
            if (!LAYER_OPS[l->kind].forward)
                continue;
            c.layer = l;
            c.g = &p.g[i];
            c.params = net->params + p.g[i].offset;
            c.seed = layer_seed(net->seed, i);
            c.offset = (uint64_t)*batch_count * (uint64_t)(B * p.g[i].n_out);
            status = LAYER_OPS[l->kind].forward(outputs[i], i ? outputs[i - 1] : x, &c);
            if (status != CNN_OK)
                return status;
        }
        /* loss and its gradient with respect to the last layer's pre-activation output */
        double loss = 0.0;
        int64_t correct = 0;
        const float *Z = outputs[L - 1];
        const float *w = sample_weight ? wb : NULL;
        if (net->loss == CNN_LOSS_SOFTMAX_CROSS_ENTROPY)
            status = cnn_softmax_cross_entropy(NULL, delta_a, &loss, &correct, Z, yb, w, rows,
                                               C);
        else
            status = cnn_squared_error(delta_a, &loss, Z, tb, w, rows, C);
        if (status != CNN_OK)
            return status;
        *loss_sum += loss * w_sum;
        *n_correct += correct;
        const cnn_layer *last = &net->layers[L - 1];
        input_grad(delta_a, Z, rows * C, layer_activation(last), last->alpha);
        /* backward: delta is the gradient of layer i's pre-activation output */
        float *delta = delta_a, *spare = delta_b;
        for (int32_t i = L - 1; i >= ip.n_layers; --i) {
            const cnn_layer *l = &net->layers[i];
            const layer_ops *ops = &LAYER_OPS[l->kind];
            const float *in = i ? outputs[i - 1] : x;
            const cnn_layer *below = i ? &net->layers[i - 1] : NULL;
            c.layer = l;
            c.g = &p.g[i];
            c.params = net->params + p.g[i].offset;
            c.grads = grads + p.g[i].offset;
            c.input_act = below ? layer_activation(below) : CNN_ACT_IDENTITY;
            c.input_alpha = below ? below->alpha : 0.0f;
            c.seed = layer_seed(net->seed, i);
            c.offset = (uint64_t)*batch_count * (uint64_t)(B * p.g[i].n_out);
            if (!ops->backward) {
                /* dX is dY */
                input_grad(delta, in, rows * p.g[i].n_in, c.input_act, c.input_alpha);
                continue;
            }
            if (i == 0 && p.g[i].n_params == 0)
                break;   /* nothing below needs a gradient */
            float *dX = i ? spare : NULL;
            status = ops->backward(dX, delta, in, outputs[i], &c);
            if (status != CNN_OK)
                return status;
            if (!dX)
                break;
            if (!ops->fuses_input_grad)
                input_grad(dX, in, rows * p.g[i].n_in, c.input_act, c.input_alpha);
            spare = delta;
            delta = dX;
        }
        if (ip.n_params) {
            images.delta = delta;
            if ((status = image_pass(&images, 1, grads, T)) != CNN_OK)
                return status;
        }
        status = cnn_optimizer_update(net->params, state1, state2, opt, grads, p.n_params, T);
        if (status != CNN_OK)
            return status;
        cnn_step_threads_end(threads, rows == B);
    }
    return CNN_OK;
}
