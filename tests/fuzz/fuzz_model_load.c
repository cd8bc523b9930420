/*
 * fuzz_model_load.c -- libFuzzer harness for the C model loader: cnn_model_load_memory
 * on arbitrary bytes, then inference on whatever it loaded.
 *
 * Every input must either load or fail with CNN_ERR_FORMAT (CNN_ERR_ALLOC only if memory
 * runs out) leaving *out NULL; a loaded model must answer its accessors consistently and
 * predict labels in range and probabilities for a few rows.  Built and run by
 * tests/fuzz/README.md's command (clang -fsanitize=fuzzer,address,undefined).
 *
 * Structure-aware mode: with CNN_CORE_FUZZ_FIX_CRC=1 the last 4 bytes of every input are
 * replaced by the CRC-32 of the bytes before them, so mutations get past the checksum
 * and reach the checks behind it (exact length, layer sizes, finite parameters).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cnn_model.h"

#define ROWS 3

static int fix_crc;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *mode = getenv("CNN_CORE_FUZZ_FIX_CRC");
    fix_crc = mode && strcmp(mode, "1") == 0;
    return 0;
}

static uint32_t crc32_of(const uint8_t *p, size_t n)
{
    /* CRC-32 as zlib computes it (reflected polynomial 0xEDB88320), bit by bit */
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; ++i) {
        c ^= p[i];
        for (int k = 0; k < 8; ++k)
            c = c & 1u ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return c ^ 0xFFFFFFFFu;
}

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_model_load: %s\n", what);
        abort();
    }
}

static void run_model(const cnn_model *m)
{
    /* the accessors agree with each other; predict works on a few rows */
    const int32_t L = cnn_model_n_layers(m);
    const int64_t n_in = cnn_model_n_inputs(m), n_out = cnn_model_n_classes(m);
    check(L >= 1 && n_in >= 1 && n_out >= 1, "accessors out of range");
    check(cnn_model_layer_size(m, -1) == -1 && cnn_model_layer_size(m, L + 1) == -1,
          "layer_size outside 0..L must be -1");
    check(cnn_model_net(m) != NULL, "no network");
    float *X = malloc((size_t)(ROWS * n_in) * sizeof *X);
    float *probs = malloc((size_t)(ROWS * n_out) * sizeof *probs);
    int32_t labels[ROWS];
    check(X && probs, "out of memory in the harness");
    for (int64_t i = 0; i < ROWS * n_in; ++i)
        X[i] = (float)(i % 7) / 7.0f;
    check(cnn_model_predict_proba(m, probs, X, ROWS) == CNN_OK, "predict_proba failed");
    check(cnn_model_predict(m, labels, X, ROWS) == CNN_OK, "predict failed");
    for (int r = 0; r < ROWS; ++r)
        check(labels[r] >= 0 && labels[r] < n_out, "label out of range");
    check(cnn_model_predict(m, labels, X, 0) == CNN_OK, "predict of 0 rows failed");
    check(cnn_model_predict(m, labels, X, -1) == CNN_ERR_ARG, "n < 0 accepted");
    free(X);
    free(probs);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = NULL;
    if (fix_crc && size >= 4) {
        copy = malloc(size);
        check(copy != NULL, "out of memory in the harness");
        memcpy(copy, data, size);
        const uint32_t crc = crc32_of(copy, size - 4);
        for (int k = 0; k < 4; ++k)
            copy[size - 4 + k] = (uint8_t)(crc >> (8 * k));
        data = copy;
    }
    cnn_model *m = (cnn_model *)&m;     /* must be overwritten, with NULL on failure */
    const int status = cnn_model_load_memory(&m, data, size);
    if (status == CNN_OK) {
        check(m != NULL, "CNN_OK without a model");
        run_model(m);
    } else {
        check(m == NULL, "a failed load left *out set");
        check(status == CNN_ERR_FORMAT || status == CNN_ERR_ALLOC, "unexpected status");
    }
    cnn_model_free(m);
    free(copy);
    return 0;
}
