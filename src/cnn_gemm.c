/* cnn_gemm.c -- single-precision GEMM: the plain reference and the fast entry points. */
#include <stdlib.h>
#include <math.h>
#include "cnn_core.h"
#include "cnn_internal.h"

void cnn_sgemm_ref(float *C, const float *A, const float *B,
                   int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                   cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)
{
    /* C = alpha op(A) op(B) + beta C ; op(A) (M, K), op(B) (K, N), C (M, N) */
    for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
            double acc = 0.0;
            for (int64_t p = 0; p < K; ++p) {
                float a = trans_a ? A[p * lda + i] : A[i * lda + p];
                float b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
                acc += (double)a * (double)b;
            }
            float c = alpha * (float)acc;
            C[i * ldc + j] = beta == 0.0f ? c : c + beta * C[i * ldc + j];
        }
    }
}

int64_t cnn_sgemm_workspace_floats(int64_t M, int64_t N, int64_t K, int n_threads)
{
    (void)M; (void)N; (void)K; (void)n_threads;
    return 0;
}

int cnn_sgemm_ex(float *C, const float *A, const float *B,
                 int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
                 cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta,
                 const cnn_epilogue *epilogue, float *work, int n_threads)
{
    /* C = epilogue(alpha op(A) op(B) + beta C) */
    (void)work; (void)n_threads;
    cnn_sgemm_ref(C, A, B, M, N, K, ldc, lda, ldb, trans_a, trans_b, alpha, beta);
    if (epilogue)
        for (int64_t i = 0; i < M; ++i)
            cnn_epilogue_row(C + i * ldc, epilogue, i, 0, N);
    return CNN_OK;
}

int cnn_sgemm(float *C, const float *A, const float *B,
              int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
              cnn_trans trans_a, cnn_trans trans_b, float alpha, float beta)
{
    int n_threads = cnn_max_threads();
    int64_t n_work = cnn_sgemm_workspace_floats(M, N, K, n_threads);
    float *work = NULL;
    if (n_work > 0) {
        work = cnn_aligned_alloc_floats(n_work);
        if (!work)
            return CNN_ERR_ALLOC;
    }
    int status = cnn_sgemm_ex(C, A, B, M, N, K, ldc, lda, ldb, trans_a, trans_b,
                              alpha, beta, NULL, work, n_threads);
    cnn_aligned_free(work);
    return status;
}
