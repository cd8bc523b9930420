/*
 * cnn_model.h -- load a cnn_core model file and run inference on it from C.
 *
 * One include gives the whole C API (this header includes cnn_core.h):
 *
 *     #include <cnn_model.h>
 *
 *     cnn_model *m = NULL;
 *     int status = cnn_model_load(&m, "mnist.cnn");
 *     if (status != CNN_OK) { fprintf(stderr, "%s\n", cnn_status_string(status)); ... }
 *     int32_t labels[n];
 *     status = cnn_model_predict(m, labels, X, n);   // X is (n, cnn_model_n_inputs(m))
 *     cnn_model_free(m);
 *
 * A model is immutable once loaded: every function taking a `const cnn_model *` may be
 * called from several threads at once on the same model.  The predict functions
 * allocate their own workspace (CNN_ERR_ALLOC if that fails) and use cnn_max_threads()
 * threads (OMP_NUM_THREADS if set, else the usable CPUs); their results are identical to
 * Network.predict / Network.predict_proba in Python, bit for bit, for any thread count.
 *
 * The file format is described in cnn_core/model_file.py: version 2 holds any layer
 * stack (dense, conv2d, pooling, flatten, dropout), version 1 a multilayer perceptron.
 * The loader checks the magic, version, layer count, loss, input shape, every layer's
 * kind and hyper-parameters (codes, slopes, rates, sizes, unused fields zero), that the
 * layers fit together (cnn_net_check, and Dense only on flat data, convolutions and
 * pooling only on images), the exact file length, CRC-32 and that every parameter is
 * finite before it returns a model, and accepts exactly the files Network.load does (the
 * tests run one table of damaged files against both).
 */
#ifndef CNN_MODEL_H
#define CNN_MODEL_H

#include "cnn_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A network read from a model file (opaque; use the accessors below). */
typedef struct cnn_model cnn_model;

/* *out = the model in file `path`, or NULL on failure.  Statuses: CNN_ERR_ARG for a
   NULL argument, CNN_ERR_IO if the file cannot be opened or read, CNN_ERR_FORMAT if it is
   truncated, longer than its header says, corrupted or not a version-1 or version-2
   model file,
   CNN_ERR_ALLOC if memory runs out.  Never returns a partly loaded model. */
int cnn_model_load(cnn_model **out, const char *path);

/* *out = the model in the `size` bytes at `data` (the bytes of a model file), same
   checks and statuses as cnn_model_load (CNN_ERR_ARG if data is NULL and size > 0).
   The model keeps no reference to `data`. */
int cnn_model_load_memory(cnn_model **out, const void *data, size_t size);

/* Release a model (NULL is fine). */
void cnn_model_free(cnn_model *m);

/* Number of layers L after the input (1 .. CNN_MAX_LAYERS). */
int32_t cnn_model_n_layers(const cnn_model *m);

/* Values per sample of the input (i = 0) or of the output of layer i (1 <= i <= L):
   for a multilayer perceptron the layer sizes n_0 .. n_L.  -1 for any other i. */
int64_t cnn_model_layer_size(const cnn_model *m, int32_t i);

/* The shape of the input (i = 0) or of the output of layer i (1 <= i <= L): returns its
   rank, 1 for flat data (shape = {values, 1, 1}) or 3 for images (shape = {height,
   width, channels}, channels last); -1 for any other i (shape untouched).  The layers'
   kinds and hyper-parameters are cnn_model_net(m)->layers[i - 1]. */
int32_t cnn_model_layer_shape(const cnn_model *m, int32_t i, int64_t shape[3]);

/* Values per input sample (n_0; height x width x channels for images, NHWC rows), and
   outputs of the last layer (classes, or regression targets for the squared_error
   loss, cnn_model_net(m)->loss). */
int64_t cnn_model_n_inputs(const cnn_model *m);
int64_t cnn_model_n_classes(const cnn_model *m);

/* The hidden activation (CNN_ACT_IDENTITY .. CNN_ACT_TANH) of a version-1 file, or the
   activation of layer 1 of a version-2 file (identity if its kind has none); the
   leaky_relu slope of layer 1. */
cnn_activation cnn_model_activation(const cnn_model *m);
float cnn_model_leaky_slope(const cnn_model *m);

/* The network itself, for calling cnn_net_predict with a workspace of your own
   (uint8 inputs, logits, a chosen thread count).  Owned by the model: do not modify. */
const cnn_net *cnn_model_net(const cnn_model *m);

/* probs (n, n_classes) = softmax of the network on X (n, n_inputs), float32 row-major
   (for the squared_error loss: the network's outputs themselves).  n == 0 does nothing.  CNN_ERR_ARG for a NULL argument or n < 0. */
int cnn_model_predict_proba(const cnn_model *m, float *probs, const float *X, int64_t n);

/* labels (n,) = index of the largest output for each row of X (n, n_inputs): the first
   one on ties, the first NaN if any (numpy's argmax).  Same statuses as predict_proba. */
int cnn_model_predict(const cnn_model *m, int32_t *labels, const float *X, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* CNN_MODEL_H */
