/* cnn_internal.h -- helpers shared by the kernel sources; not part of the public API. */
#ifndef CNN_INTERNAL_H
#define CNN_INTERNAL_H

#include <stdint.h>
#include "cnn_core.h"

#define CNN_ALIGN 64

/* 64-byte aligned allocation of n floats (NULL on failure or n <= 0); free with
   cnn_aligned_free (NULL is fine). */
float *cnn_aligned_alloc_floats(int64_t n);
void cnn_aligned_free(float *p);

/* Apply `ep` to row i of C, columns j0 .. j0 + n - 1 (c points at column j0). */
void cnn_epilogue_row(float *c, const cnn_epilogue *ep, int64_t i, int64_t j0, int64_t n);

/* Round n up to a multiple of CNN_ALIGN / sizeof(float) floats. */
static inline int64_t cnn_round_up_floats(int64_t n) { return (n + 15) & ~(int64_t)15; }

#endif
