# cython: language_level=3, boundscheck=False, wraparound=False
"""A downstream extension that reuses cnn_core's C kernels through ``cimport``.

The functions come from the installed ``cnn_core.kernels`` extension at import time
(Cython's exported C API), so this module needs neither cnn_core's headers nor its
library to build: ``python setup.py build_ext --inplace`` is enough.
"""
import numpy as np

from libc.stdint cimport int64_t, uintptr_t
from cnn_core.kernels cimport (cnn_sgemm, cnn_dense_forward, cnn_dense_backward,
                               cnn_dense_workspace_floats, cnn_conv2d_shape,
                               cnn_conv2d_shape_init, cnn_conv2d_workspace_floats,
                               cnn_conv2d_forward, cnn_pool2d_shape, cnn_pool2d_shape_init,
                               cnn_maxpool2d_forward)


cdef float *aligned(float[::1] buffer) noexcept nogil:
    """The first 64-byte aligned address inside buffer (16 floats of slack needed)."""
    return <float *>((<uintptr_t>&buffer[0] + 63) & ~(<uintptr_t>63))


def _workspace(int64_t n_floats):
    """A float32 buffer holding a 64-byte aligned block of n_floats."""
    return np.empty(max(n_floats, 1) + 16, dtype=np.float32)


def _check(int status, str name):
    if status != 0:
        raise RuntimeError(f"{name} failed with cnn_core status {status}")


def matmul(const float[:, ::1] A, const float[:, ::1] B):
    """C = A @ B ; A float32 (M, K), B float32 (K, N), both C-contiguous and non-empty."""
    cdef int64_t M = A.shape[0], K = A.shape[1], N = B.shape[1]
    if B.shape[0] != K or M == 0 or K == 0 or N == 0:
        raise ValueError(f"cannot multiply shapes {(M, K)} and {(B.shape[0], N)}")
    C = np.empty((M, N), dtype=np.float32)
    cdef float[:, ::1] c = C
    cdef int status
    with nogil:
        status = cnn_sgemm(&c[0, 0], &A[0, 0], &B[0, 0], M, N, K, N, K, N,
                           False, False, 1.0, 0.0)
    _check(status, "cnn_sgemm")
    return C


def dense_forward(const float[:, ::1] X, const float[:, ::1] W, const float[::1] b,
                  int activation, float alpha=0.01):
    """Y = act(X @ W + b) ; X (B, n_in), W (n_in, n_out), b (n_out,), all float32.

    activation is cnn_core's code: 0 identity, 1 relu, 2 leaky_relu (slope alpha),
    3 sigmoid, 4 tanh, 5 softmax.
    """
    cdef int64_t B = X.shape[0], n_in = X.shape[1], n_out = W.shape[1]
    if W.shape[0] != n_in or b.shape[0] != n_out or B == 0 or n_in == 0 or n_out == 0:
        raise ValueError("need X (B, n_in), W (n_in, n_out), b (n_out,), none empty")
    Y = np.empty((B, n_out), dtype=np.float32)
    work = _workspace(cnn_dense_workspace_floats(B, n_in, n_out, 1))
    cdef float[:, ::1] y = Y
    cdef float[::1] w = work
    cdef int status
    with nogil:
        status = cnn_dense_forward(&y[0, 0], &X[0, 0], &W[0, 0], &b[0], B, n_in, n_out,
                                   activation, alpha, aligned(w), 1)
    _check(status, "cnn_dense_forward")
    return Y


def dense_backward(const float[:, ::1] X, const float[:, ::1] dY, const float[:, ::1] W):
    """(dW, db, dX) = (X.T @ dY, dY.sum(0), dY @ W.T) ; X (B, n_in), dY (B, n_out)."""
    cdef int64_t B = X.shape[0], n_in = X.shape[1], n_out = W.shape[1]
    if W.shape[0] != n_in or dY.shape[0] != B or dY.shape[1] != n_out or B == 0 \
            or n_in == 0 or n_out == 0:
        raise ValueError("need X (B, n_in), dY (B, n_out), W (n_in, n_out), none empty")
    dW = np.empty((n_in, n_out), dtype=np.float32)
    db = np.empty(n_out, dtype=np.float32)
    dX = np.empty((B, n_in), dtype=np.float32)
    work = _workspace(cnn_dense_workspace_floats(B, n_in, n_out, 1))
    cdef float[:, ::1] dw = dW, dx = dX
    cdef float[::1] dbv = db, w = work
    cdef int status
    with nogil:
        status = cnn_dense_backward(&dw[0, 0], &dbv[0], &dx[0, 0], &X[0, 0], &dY[0, 0],
                                    &W[0, 0], B, n_in, n_out, aligned(w), 1)
    _check(status, "cnn_dense_backward")
    return dW, db, dX


def conv2d_forward(const float[:, :, :, ::1] X, const float[:, :, :, ::1] W,
                   const float[::1] b, int stride, bint same, int activation):
    """Y = act(conv(X, W) + b) ; X (batch, h, w, in_c), W (kh, kw, in_c, out_c), b
    (out_c,), all float32, channels last; padding "same" or "valid"."""
    cdef cnn_conv2d_shape s
    _check(cnn_conv2d_shape_init(&s, X.shape[0], X.shape[1], X.shape[2], X.shape[3],
                                 W.shape[3], W.shape[0], W.shape[1], stride, same),
           "cnn_conv2d_shape_init")
    if W.shape[2] != X.shape[3] or b.shape[0] != W.shape[3] or X.shape[0] == 0:
        raise ValueError("need X (batch > 0, h, w, in_c), W (kh, kw, in_c, out_c), b (out_c,)")
    Y = np.empty((s.batch, s.out_h, s.out_w, s.out_c), dtype=np.float32)
    work = _workspace(cnn_conv2d_workspace_floats(&s, 1))
    cdef float[:, :, :, ::1] y = Y
    cdef float[::1] w = work
    cdef int status
    with nogil:
        status = cnn_conv2d_forward(&y[0, 0, 0, 0], &X[0, 0, 0, 0], &W[0, 0, 0, 0], &b[0],
                                    &s, activation, 0.01, aligned(w), 1)
    _check(status, "cnn_conv2d_forward")
    return Y


def maxpool2d_forward(const float[:, :, :, ::1] X, int size, int stride):
    """The maximum of each size x size window (valid) of X (batch, h, w, channels)."""
    cdef cnn_pool2d_shape s
    _check(cnn_pool2d_shape_init(&s, X.shape[0], X.shape[1], X.shape[2], X.shape[3], size,
                                 stride), "cnn_pool2d_shape_init")
    if X.shape[0] == 0:
        raise ValueError("need at least one image")
    Y = np.empty((s.batch, s.out_h, s.out_w, s.channels), dtype=np.float32)
    cdef float[:, :, :, ::1] y = Y
    cdef int status
    with nogil:
        status = cnn_maxpool2d_forward(&y[0, 0, 0, 0], &X[0, 0, 0, 0], &s, 1)
    _check(status, "cnn_maxpool2d_forward")
    return Y
