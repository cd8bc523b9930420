/*
 * run_export.c -- drive a network exported by cnn_core.export.export_c over many rows.
 *
 * Compile together with the generated <name>.c, naming the model through macros:
 *
 *     cc -std=c99 -O2 -DMODEL_HEADER='"digits.h"' -DPREDICT=digits_predict \
 *        -DPREDICT_PROBA=digits_predict_proba -DN_INPUTS=DIGITS_N_INPUTS \
 *        -DN_CLASSES=DIGITS_N_CLASSES run_export.c digits.c -lm -o run_export
 *
 * Usage: run_export INPUTS N PROBS LABELS
 *     INPUTS holds N rows of N_INPUTS float32 values (native byte order); writes the
 *     (N, N_CLASSES) float32 probabilities to PROBS and the N int32 labels to LABELS.
 * Exit status 0 on success, 1 if predict and predict_proba disagree on a row, 2 on a
 * usage or file error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include MODEL_HEADER

int main(int argc, char **argv)
{
    /* run_export INPUTS N PROBS LABELS */
    if (argc != 5) {
        fprintf(stderr, "usage: run_export INPUTS N PROBS LABELS\n");
        return 2;
    }
    long n = strtol(argv[2], NULL, 10);
    if (n < 1) {
        fprintf(stderr, "N must be positive\n");
        return 2;
    }
    float *X = (float *)malloc((size_t)n * N_INPUTS * sizeof(float));
    float *probs = (float *)malloc((size_t)n * N_CLASSES * sizeof(float));
    int32_t *labels = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    FILE *f = fopen(argv[1], "rb");
    if (!X || !probs || !labels || !f
        || fread(X, sizeof(float) * N_INPUTS, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "cannot read %ld rows from %s\n", n, argv[1]);
        return 2;
    }
    fclose(f);
    int code = 0;
    for (long r = 0; r < n; ++r) {
        labels[r] = PREDICT(X + r * N_INPUTS);
        if (PREDICT_PROBA(X + r * N_INPUTS, probs + r * N_CLASSES) != labels[r]) {
            fprintf(stderr, "row %ld: predict and predict_proba disagree\n", r);
            code = 1;
        }
    }
    FILE *p = fopen(argv[3], "wb"), *l = fopen(argv[4], "wb");
    if (!p || !l || fwrite(probs, sizeof(float) * N_CLASSES, (size_t)n, p) != (size_t)n
        || fwrite(labels, sizeof(int32_t), (size_t)n, l) != (size_t)n
        || fclose(p) != 0 || fclose(l) != 0) {
        fprintf(stderr, "cannot write the outputs\n");
        return 2;
    }
    free(X);
    free(probs);
    free(labels);
    return code;
}
