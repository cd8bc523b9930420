/*
 * predict.c -- a plain C program that embeds cnn_core: load a model saved by
 * Network.save and classify a matrix of float32 inputs.
 *
 * Build against the installed Python package (no Python needed at run time):
 *
 *     INC=$(python -c "import cnn_core; print(cnn_core.get_include())")
 *     LIB=$(python -c "import cnn_core; print(cnn_core.get_library_dir())")
 *     cc -std=c99 -O2 predict.c -I"$INC" -L"$LIB" -lcnn_core -lm -pthread -o predict
 *
 * Usage:
 *     predict info MODEL
 *         print "layers L", "sizes n_0 ... n_L", "activation A", "slope S", "loss K",
 *         then for the input and each layer i = 1 .. L "shape i RANK D0 D1 D2", and for
 *         each layer "layer i KIND ACTIVATION SLOPE RATE UNITS KH KW STRIDE SAME"
 *     predict info-memory MODEL
 *         the same, reading the file into memory first and loading it from there with
 *         cnn_model_load_memory (as a program with a model compiled into it would)
 *     predict run MODEL INPUTS N PROBS LABELS
 *         INPUTS holds N rows of n_0 float32 values (raw, native byte order, which is
 *         little-endian on every platform cnn_core supports); writes the (N, n_L)
 *         float32 probabilities to PROBS and the N int32 predicted labels to LABELS.
 *
 * Exit status: 0 on success; the cnn_core status of the failing call (for example
 * 3 = CNN_ERR_IO, 4 = CNN_ERR_FORMAT) with its text on stderr; 64 for bad usage or an
 * input file of the wrong size.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cnn_model.h>

#define EXIT_USAGE 64

static int fail(const char *what, int status)
{
    /* report a cnn_core status on stderr and return it as the exit status */
    fprintf(stderr, "%s: %s (status %d)\n", what, cnn_status_string(status), status);
    return status;
}

static int usage(const char *message)
{
    /* report bad usage */
    fprintf(stderr, "predict: %s\nusage: predict info|info-memory MODEL | "
                    "predict run MODEL INPUTS N PROBS LABELS\n", message);
    return EXIT_USAGE;
}

static int read_floats(float *dst, size_t count, const char *path)
{
    /* dst (count,) = the float32 contents of path, which must hold exactly count values */
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    size_t got = fread(dst, sizeof(float), count, f);
    int extra = fgetc(f);
    fclose(f);
    return got == count && extra == EOF;
}

static int write_bytes(const char *path, const void *src, size_t size, size_t count)
{
    /* write count items of size bytes from src to path; 1 on success */
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    size_t put = fwrite(src, size, count, f);
    return (fclose(f) == 0) & (put == count);
}

static int load_via_memory(cnn_model **m, const char *path)
{
    /* *m = the model in file path, read whole and loaded with cnn_model_load_memory */
    FILE *f = fopen(path, "rb");
    if (!f)
        return CNN_ERR_IO;
    unsigned char *data = NULL;
    size_t size = 0, capacity = 0;
    int status = CNN_OK;
    for (;;) {
        if (size == capacity) {
            unsigned char *grown = (unsigned char *)realloc(data, capacity ? 2 * capacity : 4096);
            if (!grown) {
                status = CNN_ERR_ALLOC;
                break;
            }
            data = grown;
            capacity = capacity ? 2 * capacity : 4096;
        }
        size_t got = fread(data + size, 1, capacity - size, f);
        size += got;
        if (got == 0) {
            status = ferror(f) ? CNN_ERR_IO : CNN_OK;
            break;
        }
    }
    fclose(f);
    if (status == CNN_OK)
        status = cnn_model_load_memory(m, data, size);
    free(data);
    return status;
}

static int info(const cnn_model *m)
{
    /* print the shape of the model */
    int32_t L = cnn_model_n_layers(m);
    printf("layers %d\nsizes", (int)L);
    for (int32_t i = 0; i <= L; ++i)
        printf(" %lld", (long long)cnn_model_layer_size(m, i));
    printf("\nactivation %d\nslope %.9g\n", (int)cnn_model_activation(m),
           (double)cnn_model_leaky_slope(m));
    const cnn_net *net = cnn_model_net(m);
    printf("loss %d\n", (int)net->loss);
    for (int32_t i = 0; i <= L; ++i) {
        int64_t shape[3];
        int32_t rank = cnn_model_layer_shape(m, i, shape);
        printf("shape %d %d %lld %lld %lld\n", (int)i, (int)rank, (long long)shape[0],
               (long long)shape[1], (long long)shape[2]);
    }
    for (int32_t i = 1; i <= L; ++i) {
        const cnn_layer *l = &net->layers[i - 1];
        printf("layer %d %d %d %.9g %.9g %lld %lld %lld %lld %d\n", (int)i, (int)l->kind,
               (int)l->activation, (double)l->alpha, (double)l->rate, (long long)l->units,
               (long long)l->kernel_h, (long long)l->kernel_w, (long long)l->stride,
               (int)l->same_padding);
    }
    return 0;
}

static int run(const cnn_model *m, char **argv)
{
    /* argv: INPUTS N PROBS LABELS ; classify the N rows of INPUTS */
    char *end = NULL;
    long long n = strtoll(argv[1], &end, 10);
    if (*argv[1] == '\0' || *end != '\0' || n < 1 || n > 100000000)
        return usage("N must be a positive integer");
    const size_t rows = (size_t)n, n_in = (size_t)cnn_model_n_inputs(m);
    const size_t n_classes = (size_t)cnn_model_n_classes(m);
    float *X = (float *)malloc(rows * n_in * sizeof(float));
    float *probs = (float *)malloc(rows * n_classes * sizeof(float));
    int32_t *labels = (int32_t *)malloc(rows * sizeof(int32_t));
    int code = 0;
    if (!X || !probs || !labels) {
        code = fail("predict", CNN_ERR_ALLOC);
    } else if (!read_floats(X, rows * n_in, argv[0])) {
        code = usage("INPUTS must hold exactly N x n_inputs float32 values");
    } else {
        int status;
        if ((status = cnn_model_predict_proba(m, probs, X, (int64_t)n)) != CNN_OK)
            code = fail("cnn_model_predict_proba", status);
        else if ((status = cnn_model_predict(m, labels, X, (int64_t)n)) != CNN_OK)
            code = fail("cnn_model_predict", status);
        else if (!write_bytes(argv[2], probs, sizeof(float), rows * n_classes)
                 || !write_bytes(argv[3], labels, sizeof(int32_t), rows))
            code = fail("writing the outputs", CNN_ERR_IO);
    }
    free(X);
    free(probs);
    free(labels);
    return code;
}

int main(int argc, char **argv)
{
    /* predict info MODEL | predict info-memory MODEL | predict run MODEL INPUTS N PROBS LABELS */
    int is_memory = argc == 3 && strcmp(argv[1], "info-memory") == 0;
    int is_info = is_memory || (argc == 3 && strcmp(argv[1], "info") == 0);
    int is_run = argc == 7 && strcmp(argv[1], "run") == 0;
    if (!is_info && !is_run)
        return usage("wrong arguments");
    cnn_model *m = NULL;
    int status = is_memory ? load_via_memory(&m, argv[2]) : cnn_model_load(&m, argv[2]);
    if (status != CNN_OK)
        return fail(argv[2], status);
    int code = is_info ? info(m) : run(m, argv + 3);
    cnn_model_free(m);
    return code;
}
