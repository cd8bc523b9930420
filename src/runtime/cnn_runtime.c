/* cnn_runtime.c -- CPU feature detection, kernel selection, status strings, aligned
   memory (the thread pool is in cnn_threads.c). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#endif
#include <stdlib.h>
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"
#include "gemm/cnn_gemm_kernels.h"
#if defined(_WIN32)
#include <malloc.h>
#endif

const char *cnn_status_string(int status)
{
    /* status code -> static text */
    switch (status) {
    case CNN_OK: return "success";
    case CNN_ERR_ALLOC: return "out of memory";
    case CNN_ERR_ARG: return "invalid argument";
    case CNN_ERR_IO: return "file could not be read";
    case CNN_ERR_FORMAT: return "not a valid cnn_core model file (truncated, corrupted or foreign)";
    case CNN_ERR_NONFINITE: return "input contains NaN or infinite values";
    default: return "unknown status";
    }
}

/* ---- CPU features and kernel selection ------------------------------------- */

/* Detection state: 0 before the first use, 1 once `supported`, `best` and `selected`
   are set.  Initialisation is idempotent, so a race between two first uses only
   repeats the same work. */
static volatile int runtime_ready = 0;
static int supported[4];
static cnn_kernel best = CNN_KERNEL_GENERIC;
static volatile cnn_kernel selected = CNN_KERNEL_GENERIC;

/* 1 if this CPU can run kernel family k (ignoring whether it is compiled in). */
static int cpu_can_run(cnn_kernel k)
{
    /* kernel id -> flag */
    switch (k) {
    case CNN_KERNEL_GENERIC:
        return 1;
#if defined(CNN_GEMM_X86)
    case CNN_KERNEL_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CNN_KERNEL_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
#endif
#if defined(CNN_GEMM_NEON)
    case CNN_KERNEL_NEON:
        return 1;
#endif
    default:
        return 0;
    }
}

/* Kernel id for a CNN_CORE_KERNEL value, or -1 if the name is unknown. */
static int kernel_from_name(const char *name)
{
    /* name -> id */
    static const char *names[4] = { "generic", "avx2", "avx512", "neon" };
    for (int k = 0; k < 4; ++k)
        if (strcmp(name, names[k]) == 0)
            return k;
    return -1;
}

/* Detect the CPU once and apply the CNN_CORE_KERNEL override. */
static void runtime_init(void)
{
    /* () -> fills supported, best, selected */
    if (runtime_ready)
        return;
    static const cnn_kernel order[4] = { CNN_KERNEL_GENERIC, CNN_KERNEL_NEON,
                                         CNN_KERNEL_AVX2, CNN_KERNEL_AVX512 };
    cnn_kernel b = CNN_KERNEL_GENERIC;
    for (int t = 0; t < 4; ++t) {
        const cnn_kernel k = order[t];
        supported[k] = cnn_gemm_family_for(k) != NULL && cpu_can_run(k);
        if (supported[k])
            b = k;
    }
    best = b;
    cnn_kernel s = b;
    const char *env = getenv("CNN_CORE_KERNEL");
    if (env) {
        const int k = kernel_from_name(env);
        if (k >= 0 && supported[k])
            s = (cnn_kernel)k;
    }
    selected = s;
    runtime_ready = 1;
}

cnn_kernel cnn_best_kernel(void)
{
    /* () -> best kernel this CPU and build can run */
    runtime_init();
    return best;
}

cnn_kernel cnn_get_kernel(void)
{
    /* () -> kernel used by GEMM */
    runtime_init();
    return selected;
}

int cnn_set_kernel(cnn_kernel kernel)
{
    /* kernel id -> status; the selection changes only on success */
    runtime_init();
    if ((int)kernel < 0 || (int)kernel > 3 || !supported[kernel])
        return CNN_ERR_ARG;
    selected = kernel;
    return CNN_OK;
}

const char *cnn_kernel_name(cnn_kernel kernel)
{
    /* kernel id -> static name */
    switch (kernel) {
    case CNN_KERNEL_GENERIC: return "generic";
    case CNN_KERNEL_AVX2: return "avx2";
    case CNN_KERNEL_AVX512: return "avx512";
    case CNN_KERNEL_NEON: return "neon";
    }
    return "unknown";
}

/* ---- aligned memory ------------------------------------------------------------ */

float *cnn_aligned_alloc_floats(int64_t n)
{
    /* n -> 64-byte aligned (n,) floats or NULL */
    if (n <= 0 || (uint64_t)n > SIZE_MAX / sizeof(float) - CNN_ALIGN)
        return NULL;
    size_t bytes = ((size_t)n * sizeof(float) + CNN_ALIGN - 1) / CNN_ALIGN * CNN_ALIGN;
#if defined(_WIN32)
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
    /* free a cnn_aligned_alloc_floats block (NULL is fine) */
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}
