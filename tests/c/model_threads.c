/*
 * model_threads.c -- one loaded model used by several threads at once through the C API.
 *
 * cnn_model.h promises that a loaded model is immutable and that every function taking a
 * `const cnn_model *` may be called from several threads at once.  This program loads each
 * MODEL once, computes reference outputs on one thread, then has THREADS pthreads call
 * cnn_model_predict_proba, cnn_model_predict and the accessors on the same model together,
 * many times each, and checks every result is bit-identical to the reference.  Built and
 * run by .ci/sanitize under AddressSanitizer and UndefinedBehaviorSanitizer.
 *
 *     model_threads MODEL...
 *
 * Exit status 0 if every thread got the reference results, 1 otherwise.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cnn_model.h"

#define THREADS 8
#define ROUNDS 20
#define ROWS 37     /* not a multiple of any block size */

typedef struct job {
    const cnn_model *model;
    const float *X;
    const float *probs;     /* reference */
    const int32_t *labels;  /* reference */
    int64_t n_in, n_out;
    int failures;
} job;

static void *worker(void *arg)
{
    job *j = arg;
    float *probs = malloc((size_t)(ROWS * j->n_out) * sizeof *probs);
    int32_t labels[ROWS];
    if (!probs) {
        j->failures++;
        return NULL;
    }
    for (int round = 0; round < ROUNDS; ++round) {
        if (cnn_model_predict_proba(j->model, probs, j->X, ROWS) != CNN_OK
            || memcmp(probs, j->probs, (size_t)(ROWS * j->n_out) * sizeof *probs) != 0)
            j->failures++;
        if (cnn_model_predict(j->model, labels, j->X, ROWS) != CNN_OK
            || memcmp(labels, j->labels, sizeof labels) != 0)
            j->failures++;
        if (cnn_model_n_inputs(j->model) != j->n_in || cnn_model_n_classes(j->model) != j->n_out)
            j->failures++;
    }
    free(probs);
    return NULL;
}

static int check_model(const char *path)
{
    cnn_model *m = NULL;
    int status = cnn_model_load(&m, path);
    if (status != CNN_OK) {
        fprintf(stderr, "%s: %s\n", path, cnn_status_string(status));
        return 1;
    }
    const int64_t n_in = cnn_model_n_inputs(m), n_out = cnn_model_n_classes(m);
    float *X = malloc((size_t)(ROWS * n_in) * sizeof *X);
    float *probs = malloc((size_t)(ROWS * n_out) * sizeof *probs);
    int32_t labels[ROWS];
    int failures = !X || !probs;
    if (!failures) {
        for (int64_t i = 0; i < ROWS * n_in; ++i)
            X[i] = (float)((i * 37) % 256) / 255.0f;
        failures = cnn_model_predict_proba(m, probs, X, ROWS) != CNN_OK
                   || cnn_model_predict(m, labels, X, ROWS) != CNN_OK;
    }
    if (!failures) {
        pthread_t threads[THREADS];
        job jobs[THREADS];
        int started = 0;
        for (int t = 0; t < THREADS; ++t) {
            jobs[t] = (job){m, X, probs, labels, n_in, n_out, 0};
            if (pthread_create(&threads[t], NULL, worker, &jobs[t]) != 0)
                break;
            started++;
        }
        failures += started != THREADS;
        for (int t = 0; t < started; ++t) {
            pthread_join(threads[t], NULL);
            failures += jobs[t].failures;
        }
    }
    printf("%s: %lld inputs, %lld classes, %d threads x %d rounds: %s\n", path,
           (long long)n_in, (long long)n_out, THREADS, ROUNDS,
           failures ? "DIFFERENT RESULTS" : "identical results");
    free(X);
    free(probs);
    cnn_model_free(m);
    return failures != 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: model_threads MODEL...\n");
        return 2;
    }
    int failed = 0;
    for (int i = 1; i < argc; ++i)
        failed |= check_model(argv[i]);
    return failed;
}
