/* cnn_model.c -- reading cnn_core model files, versions 1 and 2 (see
   cnn_core/model_file.py), and running inference on the loaded network.  Every byte of a file is checked before a model is
   returned; memory grows only as bytes actually arrive, so a hostile header claiming
   huge layers costs nothing before the file runs out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cnn_model.h"
#include "cnn_internal.h"

struct cnn_model {
    cnn_net net;        /* params is owned by the model */
    cnn_activation hidden_activation;   /* of a version-1 file; layer 0's otherwise */
    int32_t ranks[CNN_MAX_LAYERS + 1];  /* of the input and of each layer's output: */
    int64_t shapes[CNN_MAX_LAYERS + 1][3];  /* 1 (1, 1, n) or 3 (h, w, c) */
};

/* Rows per forward pass: the batch Network.predict uses, so results match it. */
#define PREDICT_BATCH 256

/* ---- format constants (cnn_core/model_file.py) ------------------------------- */
static const unsigned char MAGIC[8] = { 0x89, 'C', 'N', 'N', 'M', 'L', 'P', '\n' };
#define START_BYTES 16          /* magic, version, n_layers: every version */
#define V1_HEADER_BYTES 8       /* then: hidden activation, slope */
#define V2_HEADER_BYTES 32      /* then: loss, input rank, input h, w, c */
#define RECORD_BYTES 64         /* one layer of a version-2 file */
#define MAX_SIZE ((uint64_t)CNN_MAX_DIMENSION)
#define N_HIDDEN_ACTIVATIONS 5u /* identity, relu, leaky_relu, sigmoid, tanh */
#define N_LAYER_KINDS 6u

/* The fields of a version-2 layer record each kind uses; the others must be 0. */
enum { USES_ACTIVATION = 1, USES_SLOPE = 2, USES_RATE = 4, USES_UNITS = 8,
       USES_KERNEL = 16, USES_STRIDE = 32, USES_PADDING = 64 };
static const unsigned FIELDS_USED[N_LAYER_KINDS] = {
    [CNN_LAYER_DENSE] = USES_ACTIVATION | USES_SLOPE | USES_UNITS,
    [CNN_LAYER_CONV2D] = USES_ACTIVATION | USES_SLOPE | USES_UNITS | USES_KERNEL
                         | USES_STRIDE | USES_PADDING,
    [CNN_LAYER_MAXPOOL2D] = USES_KERNEL | USES_STRIDE,
    [CNN_LAYER_AVGPOOL2D] = USES_KERNEL | USES_STRIDE,
    [CNN_LAYER_FLATTEN] = 0,
    [CNN_LAYER_DROPOUT] = USES_RATE,
};

/* ---- a byte source: a FILE or a memory block --------------------------------- */
typedef struct source {
    FILE *file;                 /* NULL for memory */
    const unsigned char *data;  /* memory source */
    size_t size, pos;
    int failed;                 /* a read error (not end of file) happened */
    uint32_t crc;               /* running CRC-32 state of the bytes read so far */
    uint32_t table[256];
} source;

static void crc_init(source *s)
{
    /* table = CRC-32 of every byte value (reflected polynomial 0xEDB88320, as zlib) */
    for (uint32_t b = 0; b < 256; ++b) {
        uint32_t c = b;
        for (int k = 0; k < 8; ++k)
            c = c & 1u ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        s->table[b] = c;
    }
    s->crc = 0xFFFFFFFFu;
}

static void crc_update(source *s, const unsigned char *p, size_t n)
{
    /* crc state += bytes p (n,) */
    uint32_t c = s->crc;
    for (size_t i = 0; i < n; ++i)
        c = s->table[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    s->crc = c;
}

static size_t source_read(source *s, unsigned char *p, size_t n)
{
    /* p (n,) = the next bytes; returns how many arrived (< n at the end or on error) */
    size_t got;
    if (s->file) {
        got = fread(p, 1, n, s->file);
        if (got < n && ferror(s->file))
            s->failed = 1;
    } else {
        got = s->size - s->pos < n ? s->size - s->pos : n;
        if (got)
            memcpy(p, s->data + s->pos, got);
        s->pos += got;
    }
    return got;
}

static int read_exact(source *s, unsigned char *p, size_t n)
{
    /* p (n,) = the next n bytes, added to the CRC; CNN_ERR_IO / CNN_ERR_FORMAT if short */
    size_t got = source_read(s, p, n);
    crc_update(s, p, got);
    if (got == n)
        return CNN_OK;
    return s->failed ? CNN_ERR_IO : CNN_ERR_FORMAT;
}

static uint32_t le32(const unsigned char *p)
{
    /* little-endian uint32 at p (4,) */
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    /* little-endian uint64 at p (8,) */
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static float le_float(const unsigned char *p)
{
    /* little-endian IEEE-754 float32 at p (4,) */
    uint32_t u = le32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double le_double(const unsigned char *p)
{
    /* little-endian IEEE-754 float64 at p (8,) */
    uint64_t u = le64(p);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static int is_size(uint64_t v)
{
    /* 1 if v is a valid size: 1 .. 2^24 */
    return v >= 1 && v <= MAX_SIZE;
}

/* ---- loading --------------------------------------------------------------------- */

static int read_v1(cnn_model *m, uint32_t n_layers, source *s)
{
    /* m->net's layers (dense) and input from the rest of a version-1 header */
    unsigned char h[V1_HEADER_BYTES], b[8];
    int status = read_exact(s, h, sizeof h);
    if (status != CNN_OK)
        return status;
    const uint32_t code = le32(h);
    const float slope = le_float(h + 4);
    if (code >= N_HIDDEN_ACTIVATIONS || !(slope >= 0.0f && slope < 1.0f))
        return CNN_ERR_FORMAT;
    cnn_net *net = &m->net;
    net->loss = CNN_LOSS_SOFTMAX_CROSS_ENTROPY;
    m->ranks[0] = 1;
    m->hidden_activation = (cnn_activation)code;
    for (uint32_t l = 0; l <= n_layers; ++l) {
        status = read_exact(s, b, 8);
        if (status != CNN_OK)
            return status;
        const uint64_t size = le64(b);
        if (!is_size(size))
            return CNN_ERR_FORMAT;
        if (l == 0) {
            net->in_h = net->in_w = 1;
            net->in_c = (int64_t)size;
            continue;
        }
        cnn_layer *layer = &net->layers[l - 1];
        layer->kind = CNN_LAYER_DENSE;
        layer->units = (int64_t)size;
        layer->activation = l < n_layers ? (int32_t)code : CNN_ACT_IDENTITY;
        layer->alpha = slope;
    }
    return CNN_OK;
}

static int read_record(cnn_layer *layer, const unsigned char *r)
{
    /* *layer from a version-2 layer record r (RECORD_BYTES,) ; CNN_ERR_FORMAT if a
       field is out of range or one the kind does not use is not 0 */
    const uint32_t kind = le32(r), activation = le32(r + 4);
    const uint32_t padding = le32(r + 56), reserved = le32(r + 60);
    const double slope = le_double(r + 8), rate = le_double(r + 16);
    const uint64_t units = le64(r + 24), kernel_h = le64(r + 32), kernel_w = le64(r + 40);
    const uint64_t stride = le64(r + 48);
    if (kind >= N_LAYER_KINDS || reserved != 0)
        return CNN_ERR_FORMAT;
    const unsigned uses = FIELDS_USED[kind];
    /* unused fields: all bits zero (so -0.0 is refused too) */
    if ((!(uses & USES_ACTIVATION) && activation != 0) ||
        (!(uses & USES_SLOPE) && le64(r + 8) != 0) ||
        (!(uses & USES_RATE) && le64(r + 16) != 0) ||
        (!(uses & USES_UNITS) && units != 0) ||
        (!(uses & USES_KERNEL) && (kernel_h != 0 || kernel_w != 0)) ||
        (!(uses & USES_STRIDE) && stride != 0) ||
        (!(uses & USES_PADDING) && padding != 0))
        return CNN_ERR_FORMAT;
    /* used fields: in range */
    if (((uses & USES_ACTIVATION) && activation >= N_HIDDEN_ACTIVATIONS) ||
        ((uses & USES_SLOPE) && !(slope >= 0.0 && slope < 1.0)) ||
        ((uses & USES_RATE) && !(rate >= 0.0 && rate < 1.0)) ||
        ((uses & USES_UNITS) && !is_size(units)) ||
        ((uses & USES_KERNEL) && (!is_size(kernel_h) || !is_size(kernel_w))) ||
        ((uses & USES_STRIDE) && !is_size(stride)) ||
        ((uses & USES_PADDING) && padding > 1))
        return CNN_ERR_FORMAT;
    if ((kind == CNN_LAYER_MAXPOOL2D || kind == CNN_LAYER_AVGPOOL2D) && kernel_h != kernel_w)
        return CNN_ERR_FORMAT;      /* square windows */
    layer->kind = (int32_t)kind;
    layer->activation = (int32_t)activation;
    layer->alpha = (float)slope;
    layer->rate = (float)rate;
    layer->units = (int64_t)units;
    layer->kernel_h = (int64_t)kernel_h;
    layer->kernel_w = (int64_t)kernel_w;
    layer->stride = (int64_t)stride;
    layer->same_padding = (int32_t)padding;
    return CNN_OK;
}

static int read_v2(cnn_model *m, uint32_t n_layers, source *s)
{
    /* m->net's input, loss and layers from the rest of a version-2 header */
    unsigned char h[V2_HEADER_BYTES], r[RECORD_BYTES];
    int status = read_exact(s, h, sizeof h);
    if (status != CNN_OK)
        return status;
    const uint32_t loss = le32(h), rank = le32(h + 4);
    const uint64_t in_h = le64(h + 8), in_w = le64(h + 16), in_c = le64(h + 24);
    if ((loss != CNN_LOSS_SOFTMAX_CROSS_ENTROPY && loss != CNN_LOSS_SQUARED_ERROR) ||
        (rank != 1 && rank != 3) || (rank == 1 && (in_h != 1 || in_w != 1)) ||
        !is_size(in_h) || !is_size(in_w) || !is_size(in_c) ||
        in_h * in_w > MAX_SIZE || in_h * in_w * in_c > MAX_SIZE)
        return CNN_ERR_FORMAT;
    cnn_net *net = &m->net;
    net->loss = (int32_t)loss;
    net->in_h = (int64_t)in_h;
    net->in_w = (int64_t)in_w;
    net->in_c = (int64_t)in_c;
    m->ranks[0] = (int32_t)rank;
    for (uint32_t l = 0; l < n_layers; ++l) {
        status = read_exact(s, r, sizeof r);
        if (status == CNN_OK)
            status = read_record(&net->layers[l], r);
        if (status != CNN_OK)
            return status;
    }
    m->hidden_activation = FIELDS_USED[net->layers[0].kind] & USES_ACTIVATION
                               ? (cnn_activation)net->layers[0].activation
                               : CNN_ACT_IDENTITY;
    return CNN_OK;
}

static int layer_shapes(cnn_model *m)
{
    /* m->ranks and m->shapes of every layer's output from m->ranks[0] and the input
       shape; CNN_ERR_FORMAT if a dense layer follows an image (Flatten first) or a
       convolution or pooling layer a flat sample, as Python's cnn_core.layers rules */
    const cnn_net *net = &m->net;
    int64_t *in = m->shapes[0];
    in[0] = net->in_h, in[1] = net->in_w, in[2] = net->in_c;
    for (int32_t l = 0; l < net->n_layers; ++l) {
        const cnn_layer *layer = &net->layers[l];
        const int64_t *x = m->shapes[l];
        int64_t *y = m->shapes[l + 1];
        int32_t rank = m->ranks[l];
        cnn_conv2d_shape cs;
        cnn_pool2d_shape ps;
        switch (layer->kind) {
        case CNN_LAYER_DENSE:
            if (rank != 1)
                return CNN_ERR_FORMAT;
            y[0] = y[1] = 1, y[2] = layer->units;
            break;
        case CNN_LAYER_CONV2D:
            if (rank != 3 || cnn_conv2d_shape_init(&cs, 1, x[0], x[1], x[2], layer->units,
                                                   layer->kernel_h, layer->kernel_w,
                                                   layer->stride, layer->same_padding) != CNN_OK)
                return CNN_ERR_FORMAT;
            y[0] = cs.out_h, y[1] = cs.out_w, y[2] = cs.out_c;
            break;
        case CNN_LAYER_MAXPOOL2D:
        case CNN_LAYER_AVGPOOL2D:
            if (rank != 3 || cnn_pool2d_shape_init(&ps, 1, x[0], x[1], x[2], layer->kernel_h,
                                                   layer->stride) != CNN_OK)
                return CNN_ERR_FORMAT;
            y[0] = ps.out_h, y[1] = ps.out_w, y[2] = x[2];
            break;
        case CNN_LAYER_FLATTEN:
            y[0] = y[1] = 1, y[2] = x[0] * x[1] * x[2];
            break;
        default:    /* dropout */
            y[0] = x[0], y[1] = x[1], y[2] = x[2];
            break;
        }
        if (layer->kind == CNN_LAYER_DENSE || layer->kind == CNN_LAYER_FLATTEN)
            rank = 1;
        m->ranks[l + 1] = rank;
    }
    return CNN_OK;
}

static int read_header(cnn_model *m, uint64_t *n_params, source *s)
{
    /* m (everything but the parameters) and n_params from the header of a model file,
       checked as cnn_core/model_file.py does and by cnn_net_check */
    unsigned char h[START_BYTES];
    int status = read_exact(s, h, START_BYTES);
    if (status != CNN_OK)
        return status;
    const uint32_t version = le32(h + 8), n_layers = le32(h + 12);
    if (memcmp(h, MAGIC, sizeof MAGIC) != 0 || (version != 1 && version != 2) ||
        n_layers < 1 || n_layers > CNN_MAX_LAYERS)
        return CNN_ERR_FORMAT;
    memset(m, 0, sizeof *m);
    m->net.n_layers = (int32_t)n_layers;
    status = version == 1 ? read_v1(m, n_layers, s) : read_v2(m, n_layers, s);
    if (status != CNN_OK)
        return status;
    /* the engine's checks first: layer_shapes relies on shapes it accepts */
    const int64_t n = cnn_net_param_count(&m->net);
    if (n < 0 || layer_shapes(m) != CNN_OK)
        return CNN_ERR_FORMAT;
    *n_params = (uint64_t)n;
    return CNN_OK;
}

static int read_params(float **out, source *s, uint64_t n_params)
{
    /* *out = n_params little-endian floats from s, in a buffer grown as bytes arrive;
       CNN_ERR_FORMAT if one is NaN or infinite */
    unsigned char chunk[4096];
    const uint64_t per_chunk = sizeof chunk / 4;
    if (n_params > SIZE_MAX / sizeof(float))
        return CNN_ERR_ALLOC;
    float *params = NULL;
    uint64_t capacity = 0, done = 0;
    while (done < n_params) {
        if (done == capacity) {
            uint64_t grown = capacity ? 2 * capacity : 65536;
            grown = grown < n_params ? grown : n_params;
            float *p = (float *)realloc(params, (size_t)grown * sizeof(float));
            if (!p) {
                free(params);
                return CNN_ERR_ALLOC;
            }
            params = p;
            capacity = grown;
        }
        uint64_t k = n_params - done < per_chunk ? n_params - done : per_chunk;
        k = capacity - done < k ? capacity - done : k;
        int status = read_exact(s, chunk, (size_t)k * 4);
        if (status != CNN_OK) {
            free(params);
            return status;
        }
        uint32_t special = 0;   /* NaN or infinity: all exponent bits set */
        for (uint64_t i = 0; i < k; ++i) {
            special |= (le32(chunk + 4 * i) & 0x7F800000u) == 0x7F800000u;
            params[done + i] = le_float(chunk + 4 * i);
        }
        if (special) {
            free(params);
            return CNN_ERR_FORMAT;
        }
        done += k;
    }
    *out = params;
    return CNN_OK;
}

static int load_from(cnn_model **out, source *s)
{
    /* *out = the model read from s, checked to its last byte; NULL on failure */
    cnn_model header;
    uint64_t n_params = 0;
    float *params = NULL;
    unsigned char tail[4], extra;
    crc_init(s);
    int status = read_header(&header, &n_params, s);
    if (status == CNN_OK)
        status = read_params(&params, s, n_params);
    if (status != CNN_OK)
        return status;
    uint32_t crc = s->crc ^ 0xFFFFFFFFu;
    status = read_exact(s, tail, 4);
    if (status == CNN_OK && le32(tail) != crc)
        status = CNN_ERR_FORMAT;
    if (status == CNN_OK && source_read(s, &extra, 1) != 0)
        status = CNN_ERR_FORMAT;      /* longer than its header says */
    if (status == CNN_OK && s->failed)
        status = CNN_ERR_IO;
    cnn_model *m = status == CNN_OK ? (cnn_model *)malloc(sizeof *m) : NULL;
    if (status == CNN_OK && !m)
        status = CNN_ERR_ALLOC;
    if (status != CNN_OK) {
        free(params);
        return status;
    }
    *m = header;
    m->net.params = params;
    *out = m;
    return CNN_OK;
}

int cnn_model_load(cnn_model **out, const char *path)
{
    /* *out = the model in file `path` ; NULL on failure */
    if (!out)
        return CNN_ERR_ARG;
    *out = NULL;
    if (!path)
        return CNN_ERR_ARG;
    source *s = (source *)calloc(1, sizeof *s);
    if (!s)
        return CNN_ERR_ALLOC;
    s->file = fopen(path, "rb");
    int status = s->file ? load_from(out, s) : CNN_ERR_IO;
    if (s->file)
        fclose(s->file);
    free(s);
    return status;
}

int cnn_model_load_memory(cnn_model **out, const void *data, size_t size)
{
    /* *out = the model in data (size,) ; NULL on failure */
    if (!out)
        return CNN_ERR_ARG;
    *out = NULL;
    if (!data && size > 0)
        return CNN_ERR_ARG;
    source *s = (source *)calloc(1, sizeof *s);
    if (!s)
        return CNN_ERR_ALLOC;
    s->data = (const unsigned char *)data;
    s->size = size;
    int status = load_from(out, s);
    free(s);
    return status;
}

void cnn_model_free(cnn_model *m)
{
    /* release m and its parameters (NULL is fine) */
    if (!m)
        return;
    free(m->net.params);
    free(m);
}

/* ---- accessors ---------------------------------------------------------------- */

int32_t cnn_model_n_layers(const cnn_model *m)
{
    /* L */
    return m->net.n_layers;
}

int32_t cnn_model_layer_shape(const cnn_model *m, int32_t i, int64_t shape[3])
{
    /* shape of the input (i = 0) or of layer i's output, and its rank ; -1 out of range */
    if (i < 0 || i > m->net.n_layers)
        return -1;
    const int32_t rank = m->ranks[i];
    for (int k = 0; k < 3; ++k)
        shape[k] = rank == 3 ? m->shapes[i][k] : (k == 0 ? m->shapes[i][2] : 1);
    return rank;
}

int64_t cnn_model_layer_size(const cnn_model *m, int32_t i)
{
    /* values of the input (i = 0) or of layer i's output per sample ; -1 out of range */
    if (i < 0 || i > m->net.n_layers)
        return -1;
    return m->shapes[i][0] * m->shapes[i][1] * m->shapes[i][2];
}

int64_t cnn_model_n_inputs(const cnn_model *m)
{
    /* values per sample */
    return m->net.in_h * m->net.in_w * m->net.in_c;
}

int64_t cnn_model_n_classes(const cnn_model *m)
{
    /* outputs of the last layer */
    return cnn_net_n_outputs(&m->net);
}

cnn_activation cnn_model_activation(const cnn_model *m)
{
    /* hidden activation code (version 1), or layer 0's */
    return m->hidden_activation;
}

float cnn_model_leaky_slope(const cnn_model *m)
{
    /* leaky_relu slope of layer 0 */
    return m->net.layers[0].alpha;
}

const cnn_net *cnn_model_net(const cnn_model *m)
{
    /* the network, owned by m */
    return &m->net;
}

/* ---- inference -------------------------------------------------------------------- */

static int predict_rows(const cnn_model *m, float *out, int32_t *labels, const float *X,
                        int64_t n, int logits)
{
    /* out (n, C) = net(X) (softmax or logits), or labels (n,) = argmax of the logits of
       X (n, n_inputs) when labels != NULL (out is then ignored) */
    if (!m || !X || n < 0 || (!out && !labels))
        return CNN_ERR_ARG;
    if (n == 0)
        return CNN_OK;
    const cnn_net *net = &m->net;
    const int64_t C = cnn_net_n_outputs(net), n_in = cnn_model_n_inputs(m);
    const int64_t B = n < PREDICT_BATCH ? n : PREDICT_BATCH;
    const int n_threads = cnn_max_threads() > 0 ? cnn_max_threads() : 1;
    int64_t n_work = cnn_net_predict_workspace_floats(net, B, n_threads);
    int64_t n_logits = labels ? cnn_round_up_floats(B * C) : 0;
    float *work = cnn_aligned_alloc_floats(n_work + n_logits);
    if (!work)
        return CNN_ERR_ALLOC;
    float *chunk = work + n_work;
    int status = CNN_OK;
    for (int64_t r0 = 0; r0 < n && status == CNN_OK; r0 += B) {
        const int64_t rows = n - r0 < B ? n - r0 : B;
        float *dst = labels ? chunk : out + r0 * C;
        status = cnn_net_predict(dst, net, X + r0 * n_in, CNN_DTYPE_FLOAT32, rows, B,
                                 logits, work, n_threads);
        for (int64_t r = 0; labels && status == CNN_OK && r < rows; ++r) {
            const float *z = chunk + r * C;
            int64_t best = 0;
            for (int64_t j = 0; j < C; ++j) {
                if (z[j] != z[j]) {   /* NaN: numpy's argmax returns the first one */
                    best = j;
                    break;
                }
                if (z[j] > z[best])
                    best = j;
            }
            labels[r0 + r] = (int32_t)best;
        }
    }
    cnn_aligned_free(work);
    return status;
}

int cnn_model_predict_proba(const cnn_model *m, float *probs, const float *X, int64_t n)
{
    /* probs (n, n_classes) = softmax(net(X)) ; X (n, n_inputs) */
    if (!probs)
        return CNN_ERR_ARG;
    return predict_rows(m, probs, NULL, X, n, 0);
}

int cnn_model_predict(const cnn_model *m, int32_t *labels, const float *X, int64_t n)
{
    /* labels (n,) = argmax of net(X) per row ; X (n, n_inputs) */
    if (!labels)
        return CNN_ERR_ARG;
    return predict_rows(m, NULL, labels, X, n, 1);
}
