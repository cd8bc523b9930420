/* cnn_runtime.c -- CPU feature detection, kernel selection, threads, status strings,
   aligned memory. */
#include <stdlib.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

const char *cnn_status_string(int status)
{
    switch (status) {
    case CNN_OK: return "success";
    case CNN_ERR_ALLOC: return "out of memory";
    case CNN_ERR_ARG: return "invalid argument";
    case CNN_ERR_IO: return "file could not be read";
    case CNN_ERR_FORMAT: return "not a valid cnn_core model file (truncated, corrupted or foreign)";
    default: return "unknown status";
    }
}

static cnn_kernel selected = CNN_KERNEL_GENERIC;

cnn_kernel cnn_best_kernel(void) { return CNN_KERNEL_GENERIC; }
cnn_kernel cnn_get_kernel(void) { return selected; }

int cnn_set_kernel(cnn_kernel kernel)
{
    if (kernel != CNN_KERNEL_GENERIC)
        return CNN_ERR_ARG;
    selected = kernel;
    return CNN_OK;
}

const char *cnn_kernel_name(cnn_kernel kernel)
{
    switch (kernel) {
    case CNN_KERNEL_GENERIC: return "generic";
    case CNN_KERNEL_AVX2: return "avx2";
    case CNN_KERNEL_AVX512: return "avx512";
    case CNN_KERNEL_NEON: return "neon";
    }
    return "unknown";
}

int cnn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int cnn_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

float *cnn_aligned_alloc_floats(int64_t n)
{
    if (n <= 0 || (uint64_t)n > SIZE_MAX / sizeof(float) - CNN_ALIGN)
        return NULL;
    size_t bytes = ((size_t)n * sizeof(float) + CNN_ALIGN - 1) / CNN_ALIGN * CNN_ALIGN;
#if defined(_MSC_VER)
    return (float *)_aligned_malloc(bytes, CNN_ALIGN);
#else
    void *p = NULL;
    if (posix_memalign(&p, CNN_ALIGN, bytes) != 0)
        return NULL;
    return (float *)p;
#endif
}

void cnn_aligned_free(float *p)
{
#if defined(_MSC_VER)
    _aligned_free(p);
#else
    free(p);
#endif
}
