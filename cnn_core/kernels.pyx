"""Typed bindings of cnn_core's C kernels.

Each Python function here validates its arguments with the GIL held (a ``TypeError``
or ``ValueError`` naming the argument, the expected and the actual value), runs one C
kernel with the GIL released, and turns a non-zero status into an exception.  The C-level
functions declared in ``kernels.pxd`` are the public ``cimport`` API; the Python wrappers
below call them too.  ``_Net`` and ``_Trainer`` are the private engine of
:class:`cnn_core.Network`.

The names of the C enumerations live here once (``ACTIVATIONS`` and
``HIDDEN_ACTIVATIONS`` with their codes read from the C library, ``OPTIMIZERS``,
``KERNELS``, ``LOSSES``, ``LAYER_KINDS``); the rest of the package imports them.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from cnn_core cimport _cnn_core as c



def _activation_names():
    """{name: code} of every activation the C library defines (codes 0, 1, ... in order)."""
    names, code = {}, 0
    while c.cnn_activation_name(<c.cnn_activation>code) != NULL:
        names[c.cnn_activation_name(<c.cnn_activation>code).decode()] = code
        code += 1
    return names


ACTIVATIONS = _activation_names()
HIDDEN_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "softmax")
OPTIMIZERS = {"sgd": 0, "adam": 1, "adamw": 2}
KERNELS = {"generic": 0, "avx2": 1, "avx512": 2, "neon": 3}
LOSSES = {"cross_entropy": c.CNN_LOSS_SOFTMAX_CROSS_ENTROPY,
          "squared_error": c.CNN_LOSS_SQUARED_ERROR}
LAYER_KINDS = {"dense": c.CNN_LAYER_DENSE, "conv2d": c.CNN_LAYER_CONV2D,
               "maxpool2d": c.CNN_LAYER_MAXPOOL2D, "avgpool2d": c.CNN_LAYER_AVGPOOL2D,
               "flatten": c.CNN_LAYER_FLATTEN, "dropout": c.CNN_LAYER_DROPOUT}

cdef float _EMPTY[16]   # a valid address for arrays with no elements
cdef int64_t _PREDICT_BATCH = 256   # rows per inference chunk (kept hot in cache)

cnp.import_array()


# ---- the public C-level API (see kernels.pxd) -----------------------------------

cdef inline bint _known_activation(int code) noexcept nogil:
    return code >= 0 and c.cnn_activation_name(<c.cnn_activation>code) != NULL

cdef int cnn_sgemm(float *C, const float *A, const float *B,
               int64_t M, int64_t N, int64_t K, int64_t ldc, int64_t lda, int64_t ldb,
               bint trans_a, bint trans_b, float alpha, float beta) noexcept nogil:
    return c.cnn_sgemm(C, A, B, M, N, K, ldc, lda, ldb,
                       c.CNN_TRANS if trans_a else c.CNN_NO_TRANS,
                       c.CNN_TRANS if trans_b else c.CNN_NO_TRANS, alpha, beta)

cdef int cnn_dense_forward(float *Y, const float *X, const float *W, const float *b,
                       int64_t B, int64_t n_in, int64_t n_out, int activation, float alpha,
                       float *work, int n_threads) noexcept nogil:
    if not _known_activation(activation) or n_threads < 1:
        return c.CNN_ERR_ARG
    return c.cnn_dense_forward(Y, X, W, b, B, n_in, n_out, <c.cnn_activation>activation,
                               alpha, work, n_threads)

cdef int cnn_dense_backward(float *dW, float *db, float *dX, const float *X, const float *dY,
                        const float *W, int64_t B, int64_t n_in, int64_t n_out,
                        float *work, int n_threads) noexcept nogil:
    if n_threads < 1:
        return c.CNN_ERR_ARG
    return c.cnn_dense_backward(dW, db, dX, X, dY, W, B, n_in, n_out, work, n_threads)

cdef int64_t cnn_dense_workspace_floats(int64_t B, int64_t n_in, int64_t n_out,
                                    int n_threads) noexcept nogil:
    return c.cnn_dense_workspace_floats(B, n_in, n_out, n_threads)

cdef int cnn_activation_forward(float *Y, const float *X, int64_t n, int64_t n_cols,
                            int activation, float alpha) noexcept nogil:
    if not _known_activation(activation):
        return c.CNN_ERR_ARG
    return c.cnn_activation_forward(Y, X, n, n_cols, <c.cnn_activation>activation, alpha)

cdef int cnn_activation_backward(float *dX, const float *dY, const float *Y, int64_t n,
                             int64_t n_cols, int activation, float alpha) noexcept nogil:
    if not _known_activation(activation):
        return c.CNN_ERR_ARG
    return c.cnn_activation_backward(dX, dY, Y, n, n_cols, <c.cnn_activation>activation, alpha)

cdef int cnn_softmax_cross_entropy(float *probs, float *dZ, double *loss, int64_t *n_correct,
                               const float *Z, const int32_t *y, const float *w,
                               int64_t M, int64_t N) noexcept nogil:
    return c.cnn_softmax_cross_entropy(probs, dZ, loss, n_correct, Z, y, w, M, N)

cdef int cnn_squared_error(float *dZ, double *loss, const float *Z, const float *T,
                           const float *w, int64_t M, int64_t N) noexcept nogil:
    return c.cnn_squared_error(dZ, loss, Z, T, w, M, N)

cdef int cnn_optimizer_update(float *params, float *state1, float *state2, const float *grads,
                          int64_t n, int optimizer, float learning_rate, float momentum,
                          bint nesterov, float weight_decay, float beta1, float beta2,
                          float eps, int64_t *step, int n_threads) noexcept nogil:
    cdef c.cnn_optimizer opt
    if optimizer < 0 or optimizer > 2:
        return c.CNN_ERR_ARG
    opt.kind = <c.cnn_optimizer_kind>optimizer
    opt.learning_rate = learning_rate
    opt.momentum = momentum
    opt.nesterov = nesterov
    opt.weight_decay = weight_decay
    opt.beta1 = beta1
    opt.beta2 = beta2
    opt.eps = eps
    opt.step = step[0]
    cdef int status = c.cnn_optimizer_update(params, state1, state2, &opt, grads, n, n_threads)
    step[0] = opt.step
    return status

cdef int cnn_gather_rows(float *out, const void *X, int dtype, const int64_t *index,
                     int64_t n_index, int64_t n_rows, int64_t n_cols) noexcept nogil:
    if dtype != 0 and dtype != 1:
        return c.CNN_ERR_ARG
    return c.cnn_gather_rows(out, X, <c.cnn_dtype>dtype, index, n_index, n_rows, n_cols)


cdef int cnn_conv2d_shape_init(cnn_conv2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                               int64_t in_c, int64_t out_c, int64_t kernel_h, int64_t kernel_w,
                               int64_t stride, int same_padding) noexcept nogil:
    return c.cnn_conv2d_shape_init(<c.cnn_conv2d_shape *>s, batch, in_h, in_w, in_c, out_c,
                                   kernel_h, kernel_w, stride, same_padding)

cdef int64_t cnn_conv2d_workspace_floats(const cnn_conv2d_shape *s,
                                         int n_threads) noexcept nogil:
    return c.cnn_conv2d_workspace_floats(<const c.cnn_conv2d_shape *>s, n_threads)

cdef int cnn_conv2d_forward(float *Y, const float *X, const float *W, const float *b,
                            const cnn_conv2d_shape *s, int activation, float alpha,
                            float *work, int n_threads) noexcept nogil:
    if activation < 0 or activation > 4:
        return c.CNN_ERR_ARG
    return c.cnn_conv2d_forward(Y, X, W, b, <const c.cnn_conv2d_shape *>s,
                                <c.cnn_activation>activation, alpha, work, n_threads)

cdef int cnn_conv2d_backward(float *dX, float *dW, float *db, const float *dY, const float *X,
                             const float *W, const cnn_conv2d_shape *s, float *work,
                             int n_threads) noexcept nogil:
    return c.cnn_conv2d_backward(dX, dW, db, dY, X, W, <const c.cnn_conv2d_shape *>s, work,
                                 n_threads)

cdef int cnn_pool2d_shape_init(cnn_pool2d_shape *s, int64_t batch, int64_t in_h, int64_t in_w,
                               int64_t channels, int64_t size, int64_t stride) noexcept nogil:
    return c.cnn_pool2d_shape_init(<c.cnn_pool2d_shape *>s, batch, in_h, in_w, channels, size,
                                   stride)

cdef int cnn_maxpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s,
                               int n_threads) noexcept nogil:
    return c.cnn_maxpool2d_forward(Y, X, <const c.cnn_pool2d_shape *>s, n_threads)

cdef int cnn_avgpool2d_forward(float *Y, const float *X, const cnn_pool2d_shape *s,
                               int n_threads) noexcept nogil:
    return c.cnn_avgpool2d_forward(Y, X, <const c.cnn_pool2d_shape *>s, n_threads)

cdef int cnn_maxpool2d_backward(float *dX, const float *dY, const float *X,
                                const cnn_pool2d_shape *s, int n_threads) noexcept nogil:
    return c.cnn_maxpool2d_backward(dX, dY, X, <const c.cnn_pool2d_shape *>s, n_threads)

cdef int cnn_avgpool2d_backward(float *dX, const float *dY, const cnn_pool2d_shape *s,
                                int n_threads) noexcept nogil:
    return c.cnn_avgpool2d_backward(dX, dY, <const c.cnn_pool2d_shape *>s, n_threads)


# ---- status codes and argument checks -------------------------------------------

class NonFiniteInputError(ValueError):
    """Input rows hold NaN or infinity (found by a kernel as it reads them)."""


cdef int _raise_for(int status) except -1:
    """Turn a non-zero kernel status into the matching Python exception."""
    if status == c.CNN_OK:
        return 0
    message = c.cnn_status_string(status).decode()
    if status == c.CNN_ERR_ALLOC:
        raise MemoryError(message)
    if status == c.CNN_ERR_NONFINITE:
        raise NonFiniteInputError("X contains NaN or infinite values")
    raise ValueError(f"kernel rejected its arguments: {message}")


def _check_array(a, str name, dtype, int ndim, bint writable=False):
    """`a` if it is a numpy array of `dtype` and `ndim` dimensions, else raise.

    The kernels read and write through aligned, native-endian pointers: an input that is
    misaligned or byte-swapped is returned as an aligned native copy (same layout); an
    output (writable) must already be one, else ValueError.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    odd = not a.flags.aligned or not a.dtype.isnative
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable, got a read-only array")
    if writable and odd:
        raise ValueError(f"{name} is written in place, so it must be an aligned, "
                         f"native-endian array; pass numpy.empty_like({name}) or a copy")
    if odd:
        return np.array(a, dtype=dtype, order="K")
    return a


def _contiguous(a, str name, dtype, int ndim, bint writable=False):
    """`_check_array` plus C-contiguity."""
    a = _check_array(a, name, dtype, ndim, writable)
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass numpy.ascontiguousarray({name})")
    return a


cdef int64_t _leading_dimension(a, str name) except -1:
    """Elements between row starts of a 2-D float32 array whose rows are contiguous."""
    cdef int64_t rows = a.shape[0], cols = a.shape[1]
    if rows > 0 and cols > 1 and a.strides[1] != 4:
        raise ValueError(f"{name} must have contiguous rows (column stride 4 bytes), "
                         f"got strides {a.strides}")
    if rows <= 1 or cols == 0:
        return max(cols, 1)
    if a.strides[0] % 4 or a.strides[0] < 4 * cols:
        raise ValueError(f"{name} must have a row stride of at least {4 * cols} bytes, "
                         f"got strides {a.strides}")
    return a.strides[0] // 4


cdef const float *_cptr(const float[:, :] m) noexcept nogil:
    return &m[0, 0] if m.shape[0] > 0 and m.shape[1] > 0 else _EMPTY

cdef float *_ptr(float[:, :] m) noexcept nogil:
    return &m[0, 0] if m.shape[0] > 0 and m.shape[1] > 0 else _EMPTY

cdef const float *_cptr1(const float[::1] v) noexcept nogil:
    return &v[0] if v.shape[0] > 0 else _EMPTY

cdef float *_ptr1(float[::1] v) noexcept nogil:
    return &v[0] if v.shape[0] > 0 else _EMPTY


def _threads(n_threads):
    """Validate n_threads (None -> max_threads())."""
    if n_threads is None:
        return max(1, c.cnn_max_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise TypeError(f"n_threads must be a positive int or None, got {n_threads!r}")
    if n_threads < 1 or n_threads > 1024:
        raise ValueError(f"n_threads must be between 1 and 1024, got {n_threads}")
    return int(n_threads)


def _activation_code(activation):
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}") from None


# ---- runtime ---------------------------------------------------------------------

def available_kernels():
    """Names of the GEMM kernel families this CPU and build can run, best last."""
    cdef c.cnn_kernel saved = c.cnn_get_kernel()
    names = [name for name, code in KERNELS.items()
             if c.cnn_set_kernel(<c.cnn_kernel>code) == c.CNN_OK]
    c.cnn_set_kernel(saved)
    return names


def get_kernel():
    """Name of the GEMM kernel family in use ("generic", "avx2", "avx512" or "neon")."""
    return c.cnn_kernel_name(c.cnn_get_kernel()).decode()


def best_kernel():
    """Name of the fastest kernel family this CPU supports."""
    return c.cnn_kernel_name(c.cnn_best_kernel()).decode()


def set_kernel(name):
    """Select the GEMM kernel family by name; ValueError if unknown or unsupported here."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {name!r}")
    if c.cnn_set_kernel(<c.cnn_kernel>KERNELS[name]) != c.CNN_OK:
        raise ValueError(f"kernel {name!r} is not supported on this CPU or build; "
                         f"available: {available_kernels()}")


def max_threads():
    """Threads used when n_threads is None: OMP_NUM_THREADS if set, else the CPUs this
    process may use (affinity mask, cgroup CPU quota), capped by threadpoolctl's limit."""
    return max(1, c.cnn_max_threads())


# ---- Python wrappers ---------------------------------------------------------------

def _gemm(A, B, C, trans_a, trans_b, alpha, beta, n_threads, bint reference):
    A = _check_array(A, "A", np.float32, 2)
    B = _check_array(B, "B", np.float32, 2)
    cdef int64_t M, N, K, Kb, lda, ldb, ldc
    M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
    Kb, N = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if K != Kb:
        raise ValueError(f"inner dimensions differ: op(A) is {M}x{K} but op(B) is {Kb}x{N}")
    if C is None:
        if beta != 0.0:
            raise ValueError("beta != 0 needs an output array C")
        C = np.empty((M, N), dtype=np.float32)
    _check_array(C, "C", np.float32, 2, writable=True)
    if C.shape != (M, N):
        raise ValueError(f"C must have shape {(M, N)}, got {C.shape}")
    for name, operand in (("A", A), ("B", B)):
        # bounds first (cheap); the exact test only when they overlap
        if np.may_share_memory(C, operand) and np.shares_memory(C, operand):
            raise ValueError(f"C shares memory with {name}: the product is written while "
                             f"{name} is read, so C must be a separate array")
    lda = _leading_dimension(A, "A")
    ldb = _leading_dimension(B, "B")
    ldc = _leading_dimension(C, "C")
    cdef const float[:, :] a = A
    cdef const float[:, :] b = B
    cdef float[:, :] cm = C
    cdef float al = alpha, be = beta
    cdef bint ta = bool(trans_a), tb = bool(trans_b)
    cdef int status = 0
    cdef int threads = _threads(n_threads)
    cdef c.cnn_trans cta = c.CNN_TRANS if ta else c.CNN_NO_TRANS
    cdef c.cnn_trans ctb = c.CNN_TRANS if tb else c.CNN_NO_TRANS
    cdef int64_t n_work = c.cnn_sgemm_workspace_floats(M, N, K, threads)
    work = _GEMM_WORK.take(n_work)
    cdef float[::1] w = work
    cdef float *wp = _ptr1(w)
    with nogil:
        if reference:
            c.cnn_sgemm_ref(_ptr(cm), _cptr(a), _cptr(b), M, N, K, ldc, lda, ldb, cta, ctb, al, be)
        else:
            status = c.cnn_sgemm_ex(_ptr(cm), _cptr(a), _cptr(b), M, N, K, ldc, lda, ldb,
                                    cta, ctb, al, be, NULL, wp, threads)
    _GEMM_WORK.give_back(work)
    _raise_for(status)
    return C


def gemm(A, B, C=None, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, n_threads=None):
    """C = alpha op(A) op(B) + beta C with the fast kernel.

    A, B: float32 2-D arrays with contiguous rows (a larger row stride is fine, e.g. a
    column slice); op(X) is X.T when trans_x.  op(A) is (M, K), op(B) is (K, N).
    C: optional float32 (M, N) output written in place (required when beta != 0).
    Returns C.  The result is bit-identical for any n_threads.
    """
    return _gemm(A, B, C, trans_a, trans_b, alpha, beta, n_threads, False)


def gemm_reference(A, B, C=None, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0,
                   n_threads=None):
    """The plain triple-loop GEMM (float64 accumulation): the oracle for :func:`gemm`."""
    return _gemm(A, B, C, trans_a, trans_b, alpha, beta, n_threads, True)


def bias_forward(X, b):
    """Return X + b ; X float32 (M, N) C-contiguous, b float32 (N,)."""
    X = _contiguous(X, "X", np.float32, 2)
    b = _contiguous(b, "b", np.float32, 1)
    if b.shape[0] != X.shape[1]:
        raise ValueError(f"b must have shape ({X.shape[1]},), got {b.shape}")
    Y = np.empty_like(X)
    cdef const float[:, ::1] x = X
    cdef const float[::1] bv = b
    cdef float[:, ::1] y = Y
    with nogil:
        c.cnn_bias_forward(_ptr(y), _cptr(x), _cptr1(bv), x.shape[0], x.shape[1])
    return Y


def bias_backward(dY):
    """Return the column sums of dY ; dY float32 (M, N) C-contiguous -> (N,)."""
    dY = _contiguous(dY, "dY", np.float32, 2)
    db = np.empty(dY.shape[1], dtype=np.float32)
    cdef const float[:, ::1] d = dY
    cdef float[::1] out = db
    with nogil:
        c.cnn_bias_backward(_ptr1(out), _cptr(d), d.shape[0], d.shape[1])
    return db


def activation_forward(X, activation, *, alpha=0.01):
    """Return act(X) ; X float32 (M, N) C-contiguous; softmax is row-wise.

    activation: "identity", "relu", "leaky_relu" (slope `alpha`), "sigmoid", "tanh",
    "softmax".
    """
    cdef int code = _activation_code(activation)
    X = _contiguous(X, "X", np.float32, 2)
    Y = np.empty_like(X)
    cdef const float[:, ::1] x = X
    cdef float[:, ::1] y = Y
    cdef float a = alpha
    cdef int status
    with nogil:
        status = cnn_activation_forward(_ptr(y), _cptr(x), x.shape[0] * x.shape[1],
                                    x.shape[1], code, a)
    if x.shape[0] * x.shape[1]:
        _raise_for(status)
    return Y


def activation_backward(dY, Y, activation, *, alpha=0.01):
    """Return dX = dY * act'(.) from the activation output Y (both float32 (M, N))."""
    cdef int code = _activation_code(activation)
    dY = _contiguous(dY, "dY", np.float32, 2)
    Y = _contiguous(Y, "Y", np.float32, 2)
    if dY.shape != Y.shape:
        raise ValueError(f"dY and Y must have the same shape, got {dY.shape} and {Y.shape}")
    dX = np.empty_like(dY)
    cdef const float[:, ::1] d = dY
    cdef const float[:, ::1] y = Y
    cdef float[:, ::1] dx = dX
    cdef float a = alpha
    cdef int status
    with nogil:
        status = cnn_activation_backward(_ptr(dx), _cptr(d), _cptr(y), d.shape[0] * d.shape[1],
                                     d.shape[1], code, a)
    if d.shape[0] * d.shape[1]:
        _raise_for(status)
    return dX


def _labels(y, int64_t n, int64_t n_classes, str name="y"):
    """y as int32 (n,) with values in [0, n_classes); clear errors otherwise."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype.name}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must hold labels in [0, {n_classes - 1}], "
                         f"got values in [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(y, dtype=np.int32)


def _sample_weight(w, int64_t n):
    """sample_weight as float32 (n,), finite and non-negative, or None."""
    if w is None:
        return None
    w = np.asarray(w)
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight must have shape ({n},), got {w.shape}")
    if w.dtype.kind not in "iuf":
        raise TypeError(f"sample_weight must be numeric, got dtype {w.dtype.name}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)) or (n and w.min() < 0):
        raise ValueError("sample_weight must be finite and non-negative")
    return w


def softmax_cross_entropy(Z, y, sample_weight=None):
    """Fused softmax + cross-entropy.

    Z: float32 logits (M, N) C-contiguous; y: integer labels (M,) in [0, N);
    sample_weight: optional (M,) non-negative weights.
    Returns (loss, probs, dZ, n_correct): the weighted mean loss (float), softmax(Z)
    (M, N), the gradient of the loss with respect to Z (M, N), and the number of rows
    whose argmax equals the label.
    """
    Z = _contiguous(Z, "Z", np.float32, 2)
    cdef int64_t M = Z.shape[0], N = Z.shape[1]
    if N < 1:
        raise ValueError("Z must have at least one column")
    yl = _labels(y, M, N)
    w = _sample_weight(sample_weight, M)
    probs = np.empty_like(Z)
    dZ = np.empty_like(Z)
    cdef const float[:, ::1] z = Z
    cdef const int32_t[::1] yv = yl
    cdef const float[::1] wv = w if w is not None else np.zeros(0, np.float32)
    cdef float[:, ::1] p = probs
    cdef float[:, ::1] d = dZ
    cdef double loss = 0.0
    cdef int64_t correct = 0
    cdef int32_t dummy = 0
    cdef int status
    cdef const float *wp = _cptr1(wv) if w is not None else NULL
    with nogil:
        status = cnn_softmax_cross_entropy(_ptr(p), _ptr(d), &loss, &correct, _cptr(z),
                                       &yv[0] if M else &dummy, wp, M, N)
    _raise_for(status)
    return loss, probs, dZ, int(correct)


def squared_error(Z, T, sample_weight=None):
    """Fused squared-error loss of a regression.

    Z: float32 outputs (M, N) C-contiguous; T: targets of the same shape (converted to
    float32); sample_weight: optional (M,) non-negative weights.
    Returns (loss, dZ): the weighted mean over rows of half the squared distance
    ``sum_j (Z_ij - T_ij)**2 / 2``, and its gradient with respect to Z (M, N).
    """
    _contiguous(Z, "Z", np.float32, 2)
    cdef int64_t M = Z.shape[0], N = Z.shape[1]
    T = _targets(T, M, N)
    w = _sample_weight(sample_weight, M)
    dZ = np.empty_like(Z)
    cdef const float[:, ::1] z = Z
    cdef const float[:, ::1] t = T
    cdef const float[::1] wv = w if w is not None else np.zeros(0, np.float32)
    cdef float[:, ::1] d = dZ
    cdef double loss = 0.0
    cdef int status
    cdef const float *wp = _cptr1(wv) if w is not None else NULL
    with nogil:
        status = cnn_squared_error(_ptr(d), &loss, _cptr(z), _cptr(t), wp, M, N)
    _raise_for(status)
    return loss, dZ


def _targets(T, int64_t n, int64_t n_outputs, str name="T"):
    """Regression targets as C-contiguous float32 (n, n_outputs), all finite ((n,) is
    accepted for one output)."""
    T = np.asarray(T)
    if T.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {T.dtype.name}")
    if T.ndim == 1 and n_outputs == 1:
        T = T.reshape(-1, 1)
    if T.shape != (n, n_outputs):
        raise ValueError(f"{name} must have shape ({n}, {n_outputs}), got {T.shape}")
    T = np.ascontiguousarray(T, dtype=np.float32)
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{name} contains NaN or infinite values (or values too large "
                         f"for float32)")
    return T


def dense_forward(X, W, b, activation="identity", *, alpha=0.01, n_threads=None):
    """Return act(X W + b) ; X (B, n_in), W (n_in, n_out), b (n_out,), all float32."""
    cdef int code = _activation_code(activation)
    X = _contiguous(X, "X", np.float32, 2)
    W = _contiguous(W, "W", np.float32, 2)
    b = _contiguous(b, "b", np.float32, 1)
    cdef int64_t B = X.shape[0], n_in = X.shape[1], n_out = W.shape[1]
    if W.shape[0] != n_in:
        raise ValueError(f"W must have {n_in} rows to match X, got shape {W.shape}")
    if b.shape[0] != n_out:
        raise ValueError(f"b must have shape ({n_out},), got {b.shape}")
    cdef int threads = _threads(n_threads)
    Y = np.empty((B, n_out), dtype=np.float32)
    work = _workspace(cnn_dense_workspace_floats(B, n_in, n_out, threads))
    cdef const float[:, ::1] x = X
    cdef const float[:, ::1] wm = W
    cdef const float[::1] bv = b
    cdef float[:, ::1] y = Y
    cdef float[::1] wk = work
    cdef float a = alpha
    cdef int status
    with nogil:
        status = cnn_dense_forward(_ptr(y), _cptr(x), _cptr(wm), _cptr1(bv), B, n_in, n_out,
                               code, a, _ptr1(wk), threads)
    _raise_for(status)
    return Y


def dense_backward(X, dY, W, *, compute_dX=True, activation="identity", alpha=0.01,
                   n_threads=None):
    """Return (dW, db, dX) = (X^T dY, column sums of dY, (dY W^T) * act'(X) or None).

    X (B, n_in), dY (B, n_out), W (n_in, n_out): float32 C-contiguous.  `activation`
    (elementwise, slope alpha for leaky_relu) is the one that produced X, the layer's
    input, whose derivative (written from its output, X) the GEMM applies to dX.
    """
    cdef int code = _activation_code(activation)
    if activation == "softmax":
        raise ValueError("activation must be elementwise (softmax is not)")
    X = _contiguous(X, "X", np.float32, 2)
    dY = _contiguous(dY, "dY", np.float32, 2)
    W = _contiguous(W, "W", np.float32, 2)
    cdef int64_t B = X.shape[0], n_in = X.shape[1], n_out = dY.shape[1]
    if dY.shape[0] != B:
        raise ValueError(f"dY must have {B} rows to match X, got shape {dY.shape}")
    if W.shape != (n_in, n_out):
        raise ValueError(f"W must have shape {(n_in, n_out)}, got {W.shape}")
    cdef int threads = _threads(n_threads)
    dW = np.empty((n_in, n_out), dtype=np.float32)
    db = np.empty(n_out, dtype=np.float32)
    dX = np.empty((B, n_in), dtype=np.float32) if compute_dX else None
    work = _workspace(cnn_dense_workspace_floats(B, n_in, n_out, threads))
    cdef const float[:, ::1] x = X
    cdef const float[:, ::1] d = dY
    cdef const float[:, ::1] wm = W
    cdef float[:, ::1] dw = dW
    cdef float[::1] dbv = db
    cdef float[:, ::1] dx = dX if compute_dX else np.empty((1, 1), np.float32)
    cdef float[::1] wk = work
    cdef float *dxp = _ptr(dx) if compute_dX else NULL
    cdef float a = alpha
    cdef int status
    with nogil:
        status = c.cnn_dense_backward_act(_ptr(dw), _ptr1(dbv), dxp, _cptr(x), _cptr(d),
                                          _cptr(wm), B, n_in, n_out, <c.cnn_activation>code,
                                          a, _ptr1(wk), threads)
    _raise_for(status)
    return dW, db, dX


def optimizer_update(params, grads, state1, state2=None, *, optimizer="sgd",
                     learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=0.0,
                     beta1=0.9, beta2=0.999, eps=1e-8, step=0, n_threads=None):
    """Update float32 1-D `params` in place from `grads`; returns the new Adam step count.

    state1: SGD velocity or Adam first moment; state2: Adam second moment (Adam/AdamW
    only).  All arrays have the same shape and are updated in place.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if not 0 <= step < 2 ** 62:
        raise ValueError(f"step (updates done so far) must be in [0, 2**62), got {step}")
    cdef int kind = OPTIMIZERS[optimizer]
    _contiguous(params, "params", np.float32, 1, writable=True)
    grads = _contiguous(grads, "grads", np.float32, 1)
    _contiguous(state1, "state1", np.float32, 1, writable=True)
    if kind != 0:
        if state2 is None:
            raise ValueError(f"optimizer {optimizer!r} needs state2")
        _contiguous(state2, "state2", np.float32, 1, writable=True)
    for name, arr in (("grads", grads), ("state1", state1), ("state2", state2)):
        if arr is not None and arr.shape != params.shape:
            raise ValueError(f"{name} must have shape {params.shape}, got {arr.shape}")
    cdef float[::1] p = params
    cdef const float[::1] g = grads
    cdef float[::1] s1 = state1
    cdef float[::1] s2 = state2 if kind != 0 else state1
    cdef int64_t n = params.shape[0], t = step
    cdef float lr = learning_rate, mu = momentum, wd = weight_decay
    cdef float b1 = beta1, b2 = beta2, e = eps
    cdef bint nest = bool(nesterov)
    cdef int threads = _threads(n_threads)
    cdef int status
    with nogil:
        status = cnn_optimizer_update(_ptr1(p), _ptr1(s1), _ptr1(s2), _cptr1(g), n, kind, lr, mu,
                                  nest, wd, b1, b2, e, &t, threads)
    if status != c.CNN_OK:
        raise ValueError("invalid optimizer hyperparameters: learning_rate and weight_decay "
                         "must be >= 0, momentum and beta1/beta2 in [0, 1), eps > 0, and "
                         "nesterov needs momentum > 0")
    return int(t)


def gather_rows(X, index):
    """Return X[index] as float32 (uint8 scaled by 1/255) ; X uint8/float32 (n, d)."""
    if not isinstance(X, np.ndarray) or X.dtype not in (np.uint8, np.float32):
        raise TypeError("X must be a uint8 or float32 numpy array")
    X = _contiguous(X, "X", X.dtype, 2)
    idx = np.asarray(index)
    if idx.size and idx.dtype.kind not in "iu":
        raise TypeError(f"index must hold integers, got dtype {idx.dtype}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"index must be 1-D, got shape {idx.shape}")
    cdef int64_t n = X.shape[0], d = X.shape[1], k = idx.shape[0]
    if k and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"index values must be in [0, {n - 1}]")
    out = np.empty((k, d), dtype=np.float32)
    cdef const int64_t[::1] iv = idx
    cdef float[:, ::1] o = out
    cdef const void *xp = _data_pointer(X)
    cdef int dtype = 1 if X.dtype == np.uint8 else 0
    cdef int status = 0
    cdef int64_t dummy = 0
    with nogil:
        status = cnn_gather_rows(_ptr(o), xp, dtype, &iv[0] if k else &dummy, k, n, d)
    _raise_for(status)
    return out


# ---- convolution, pooling, dropout (NHWC) --------------------------------------------

PADDINGS = {"valid": 0, "same": 1}


def _int_arg(value, str name, low, high=1 << 40):
    """Validate an int argument in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or value > high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _image_batch(a, str name):
    """a as a float32 C-contiguous 4-D NHWC array (checked, not converted)."""
    _contiguous(a, name, np.float32, 4)
    if 0 in a.shape[1:]:
        raise ValueError(f"{name} must have nonzero height, width and channels, "
                         f"got shape {a.shape}")
    return a


cdef float *_data(a) except? NULL:
    """Data pointer of a C-contiguous float32 array (a valid address if it is empty)."""
    return <float *>cnp.PyArray_DATA(a) if a.size else _EMPTY


def conv2d_geometry(in_h, in_w, kernel_size, stride=1, padding="valid"):
    """Return (out_h, out_w, pad_top, pad_left) of a Conv2D over an in_h x in_w input.

    kernel_size: an int or (kernel_h, kernel_w); padding "valid" (out = (in - k) //
    stride + 1, needs in >= k) or "same" (TensorFlow's rule: out = ceil(in / stride),
    the total padding max((out - 1) * stride + k - in, 0) split with the smaller half at
    the top/left).  ValueError if the kernel does not fit.
    """
    cdef c.cnn_conv2d_shape s
    _conv_shape(&s, (0, in_h, in_w, 1), kernel_size, 1, stride, padding)
    return int(s.out_h), int(s.out_w), int(s.pad_top), int(s.pad_left)


cdef int _conv_shape(c.cnn_conv2d_shape *s, x_shape, kernel_size, out_c, stride,
                     padding) except -1:
    """Fill *s for an NHWC input of x_shape, or raise naming the offending argument."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    if isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2:
        kh, kw = kernel_size
    else:
        kh = kw = kernel_size
    kh = _int_arg(kh, "kernel_size", 1)
    kw = _int_arg(kw, "kernel_size", 1)
    cdef int64_t st = _int_arg(stride, "stride", 1)
    batch, in_h, in_w, in_c = x_shape
    in_h = _int_arg(in_h, "in_h", 1)
    in_w = _int_arg(in_w, "in_w", 1)
    if padding == "valid" and (kh > in_h or kw > in_w):
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {in_h}x{in_w} input with "
                         f"padding 'valid'")
    if c.cnn_conv2d_shape_init(s, batch, in_h, in_w, in_c, out_c, kh, kw, st,
                               PADDINGS[padding]) != c.CNN_OK:
        raise ValueError(f"invalid convolution: input {tuple(x_shape)}, kernel {kh}x{kw}, "
                         f"{out_c} filters, stride {st}, padding {padding!r}")
    return 0


cdef int _conv_operands(c.cnn_conv2d_shape *s, X, W, stride, padding) except -1:
    """Check X (batch, in_h, in_w, in_c) and W (kh, kw, in_c, out_c); fill *s."""
    _image_batch(X, "X")
    _contiguous(W, "W", np.float32, 4)
    if W.shape[2] != X.shape[3] or 0 in W.shape:
        raise ValueError(f"W must have shape (kernel_h, kernel_w, {X.shape[3]}, out_c) "
                         f"with nonzero sizes to match X, got {W.shape}")
    _conv_shape(s, X.shape, (W.shape[0], W.shape[1]), W.shape[3], stride, padding)
    return 0


def conv2d_forward(X, W, b, stride=1, padding="valid", activation="identity", *,
                   alpha=0.01, n_threads=None, reference=False):
    """Return act(conv(X, W) + b), a cross-correlation over NHWC images.

    X: float32 (batch, in_h, in_w, in_c); W: float32 (kernel_h, kernel_w, in_c, out_c);
    b: float32 (out_c,); all C-contiguous.  padding "valid" or "same" (see
    :func:`conv2d_geometry`); activation one of ACTIVATIONS except softmax.  Returns
    float32 (batch, out_h, out_w, out_c).  reference=True runs the plain loops (float64
    accumulation), the oracle of the fast path.  Bit-identical for any n_threads.
    """
    cdef c.cnn_conv2d_shape s
    _conv_operands(&s, X, W, stride, padding)
    cdef int code = _activation_code(activation)
    if code == ACTIVATIONS["softmax"]:
        raise ValueError("activation 'softmax' is not available for a convolution")
    _contiguous(b, "b", np.float32, 1)
    if b.shape[0] != s.out_c:
        raise ValueError(f"b must have shape ({s.out_c},), got {b.shape}")
    cdef int threads = _threads(n_threads)
    Y = np.empty((s.batch, s.out_h, s.out_w, s.out_c), dtype=np.float32)
    work = _workspace(max(c.cnn_conv2d_workspace_floats(&s, threads), 16))
    cdef float *yp = _data(Y)
    cdef const float *xp = _data(X)
    cdef const float *wp = _data(W)
    cdef const float *bp = _data(b)
    cdef float *kp = _data(work)
    cdef float a = alpha
    cdef bint ref = bool(reference)
    cdef int status
    with nogil:
        if ref:
            status = c.cnn_conv2d_forward_ref(yp, xp, wp, bp, &s, <c.cnn_activation>code, a)
        else:
            status = c.cnn_conv2d_forward(yp, xp, wp, bp, &s, <c.cnn_activation>code, a, kp,
                                          threads)
    _raise_for(status)
    return Y


def conv2d_backward(X, W, dY, stride=1, padding="valid", *, compute_dX=True, n_threads=None,
                    reference=False):
    """Return (dX, dW, db) of a Conv2D from dY, the gradient of its pre-activation output.

    X (batch, in_h, in_w, in_c), W (kernel_h, kernel_w, in_c, out_c) and dY (batch, out_h,
    out_w, out_c): float32 C-contiguous.  dX has X's shape (None when compute_dX is
    false), dW W's, db (out_c,).  reference=True runs the plain loops.
    """
    cdef c.cnn_conv2d_shape s
    _conv_operands(&s, X, W, stride, padding)
    _contiguous(dY, "dY", np.float32, 4)
    expected = (s.batch, s.out_h, s.out_w, s.out_c)
    if dY.shape != expected:
        raise ValueError(f"dY must have shape {expected}, got {dY.shape}")
    cdef int threads = _threads(n_threads)
    dX = np.empty(X.shape, dtype=np.float32) if compute_dX else None
    dW = np.empty(W.shape, dtype=np.float32)
    db = np.empty(s.out_c, dtype=np.float32)
    work = _workspace(max(c.cnn_conv2d_workspace_floats(&s, threads), 16))
    cdef float *dxp = _data(dX) if compute_dX else NULL
    cdef float *dwp = _data(dW)
    cdef float *dbp = _data(db)
    cdef const float *dyp = _data(dY)
    cdef const float *xp = _data(X)
    cdef const float *wp = _data(W)
    cdef float *kp = _data(work)
    cdef bint ref = bool(reference)
    cdef int status
    with nogil:
        if ref:
            status = c.cnn_conv2d_backward_ref(dxp, dwp, dbp, dyp, xp, wp, &s)
        else:
            status = c.cnn_conv2d_backward(dxp, dwp, dbp, dyp, xp, wp, &s, kp, threads)
    _raise_for(status)
    return dX, dW, db


cdef int _pool_shape(c.cnn_pool2d_shape *s, x_shape, size, stride) except -1:
    """Fill *s for an NHWC input of x_shape, or raise naming the offending argument."""
    cdef int64_t k = _int_arg(size, "size", 1)
    cdef int64_t st = k if stride is None else _int_arg(stride, "stride", 1)
    batch, in_h, in_w, ch = x_shape
    if k > in_h or k > in_w:
        raise ValueError(f"pool size {k} does not fit a {in_h}x{in_w} input")
    if c.cnn_pool2d_shape_init(s, batch, in_h, in_w, ch, k, st) != c.CNN_OK:
        raise ValueError(f"invalid pooling: input {tuple(x_shape)}, size {k}, stride {st}")
    return 0


def _pool_forward(X, size, stride, n_threads, bint reference, bint average):
    cdef c.cnn_pool2d_shape s
    _image_batch(X, "X")
    _pool_shape(&s, X.shape, size, stride)
    cdef int threads = _threads(n_threads)
    Y = np.empty((s.batch, s.out_h, s.out_w, s.channels), dtype=np.float32)
    cdef float *yp = _data(Y)
    cdef const float *xp = _data(X)
    cdef int status
    with nogil:
        if average:
            status = (c.cnn_avgpool2d_forward_ref(yp, xp, &s) if reference
                      else c.cnn_avgpool2d_forward(yp, xp, &s, threads))
        else:
            status = (c.cnn_maxpool2d_forward_ref(yp, xp, &s) if reference
                      else c.cnn_maxpool2d_forward(yp, xp, &s, threads))
    _raise_for(status)
    return Y


def _pool_backward(dY, X, input_shape, size, stride, n_threads, bint reference,
                   bint average):
    cdef c.cnn_pool2d_shape s
    if not average:
        _image_batch(X, "X")
        input_shape = X.shape
    elif (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 4):
        raise ValueError(f"input_shape must be (batch, in_h, in_w, channels), "
                         f"got {input_shape!r}")
    input_shape = tuple(_int_arg(v, "input_shape", 0) for v in input_shape)
    _pool_shape(&s, input_shape, size, stride)
    _contiguous(dY, "dY", np.float32, 4)
    expected = (s.batch, s.out_h, s.out_w, s.channels)
    if dY.shape != expected:
        raise ValueError(f"dY must have shape {expected}, got {dY.shape}")
    cdef int threads = _threads(n_threads)
    dX = np.empty(input_shape, dtype=np.float32)
    cdef float *dxp = _data(dX)
    cdef const float *dyp = _data(dY)
    cdef const float *xp = _data(X) if not average else NULL
    cdef int status
    with nogil:
        if average:
            status = (c.cnn_avgpool2d_backward_ref(dxp, dyp, &s) if reference
                      else c.cnn_avgpool2d_backward(dxp, dyp, &s, threads))
        else:
            status = (c.cnn_maxpool2d_backward_ref(dxp, dyp, xp, &s) if reference
                      else c.cnn_maxpool2d_backward(dxp, dyp, xp, &s, threads))
    _raise_for(status)
    return dX


def maxpool2d_forward(X, size, stride=None, *, n_threads=None, reference=False):
    """Return the maxima of size x size windows moved by stride (default size), valid
    padding ; X float32 (batch, in_h, in_w, channels) C-contiguous -> (batch, out_h,
    out_w, channels), out = (in - size) // stride + 1."""
    return _pool_forward(X, size, stride, n_threads, bool(reference), False)


def maxpool2d_backward(dY, X, size, stride=None, *, n_threads=None, reference=False):
    """Return dX: each dY routed to the first maximum (row-major) of its window in X,
    summed where windows overlap ; dY (batch, out_h, out_w, channels), X as forward."""
    return _pool_backward(dY, X, None, size, stride, n_threads, bool(reference), False)


def avgpool2d_forward(X, size, stride=None, *, n_threads=None, reference=False):
    """Return the means of size x size windows moved by stride (default size), valid
    padding ; shapes as :func:`maxpool2d_forward`."""
    return _pool_forward(X, size, stride, n_threads, bool(reference), True)


def avgpool2d_backward(dY, input_shape, size, stride=None, *, n_threads=None,
                       reference=False):
    """Return dX of input_shape (batch, in_h, in_w, channels): each dY / size**2 added
    to every input of its window."""
    return _pool_backward(dY, None, input_shape, size, stride, n_threads, bool(reference),
                          True)


def _dropout(X, str name, rate, seed, offset, n_threads, bint reference):
    _contiguous(X, name, np.float32, X.ndim if isinstance(X, np.ndarray) else 1)
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise TypeError(f"rate must be a float, got {rate!r}")
    if not (0.0 <= rate < 1.0):
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    cdef uint64_t sd = _int_arg(seed, "seed", 0, (1 << 64) - 1)
    cdef uint64_t off = _int_arg(offset, "offset", 0, (1 << 64) - 1)
    cdef int threads = _threads(n_threads)
    Y = np.empty_like(X)
    cdef float *yp = _data(Y)
    cdef const float *xp = _data(X)
    cdef int64_t n = X.size
    cdef float r = rate
    cdef int status
    with nogil:
        status = (c.cnn_dropout_forward_ref(yp, xp, n, r, sd, off) if reference
                  else c.cnn_dropout_forward(yp, xp, n, r, sd, off, threads))
    _raise_for(status)
    return Y


def dropout_forward(X, rate, seed, offset=0, *, n_threads=None, reference=False):
    """Return X * keep / (1 - rate) (inverted dropout) ; X float32 C-contiguous, any shape.

    Element i (in C order) is kept with probability 1 - rate, decided by a hash of
    (seed, offset + i) alone, so the mask does not depend on n_threads.
    """
    return _dropout(X, "X", rate, seed, offset, n_threads, bool(reference))


def dropout_backward(dY, rate, seed, offset=0, *, n_threads=None, reference=False):
    """Return dY * keep / (1 - rate) with the mask of :func:`dropout_forward`."""
    return _dropout(dY, "dY", rate, seed, offset, n_threads, bool(reference))


# ---- the Network engine -------------------------------------------------------------

def _workspace(int64_t n_floats):
    """A float32 buffer of n_floats whose data pointer is 64-byte aligned."""
    raw = np.empty(n_floats + 16, dtype=np.float32)
    cdef float[::1] view = raw
    cdef size_t offset = ((64 - (<size_t>&view[0]) % 64) % 64) // 4
    return raw[offset:offset + n_floats]


cdef class _WorkspaceCache:
    """One reusable aligned workspace: `take` lends it (or a fresh one if it is lent out
    or too small), `give_back` returns it.  Runs with the GIL held, so it is thread-safe."""
    cdef object buffer
    cdef int64_t size
    cdef bint lent

    cdef object take(self, int64_t n_floats):
        if self.lent:
            return _workspace(max(n_floats, 16))
        if self.buffer is None or self.size < n_floats:
            self.size = max(n_floats, 16)
            self.buffer = _workspace(self.size)
        self.lent = True
        return self.buffer

    cdef void give_back(self, buffer):
        if buffer is self.buffer:
            self.lent = False


cdef _WorkspaceCache _GEMM_WORK = _WorkspaceCache()


_UINT8 = np.dtype(np.uint8)
_FLOAT32 = np.dtype(np.float32)


def _as_input(X, int64_t n_features, str name="X", bint check_finite=True):
    """X as a C-contiguous uint8 or float32 (n, n_features) array, n >= 1, all finite.

    uint8 stays uint8 (the kernels scale it by 1/255); other floating types are converted
    to float32 once.  Raises TypeError / ValueError naming `name` otherwise.  With
    check_finite false the caller leaves the NaN/infinity check to the kernel
    (_Net.predict does it chunk by chunk, while the rows are in cache).
    """
    if type(X) is not np.ndarray:
        try:
            X = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be array-like: {exc}") from None
    dtype = X.dtype
    if dtype is not _UINT8 and dtype is not _FLOAT32 and dtype != _UINT8 and dtype.kind != "f":
        raise TypeError(f"{name} must be uint8 (pixels, scaled by 1/255) or floating point, "
                        f"got dtype {dtype.name}")
    if X.ndim != 2 or X.shape[1] != n_features:
        hint = " (flatten images with X.reshape(len(X), -1))" if X.ndim > 2 else ""
        raise ValueError(f"{name} must have shape (n_samples, {n_features}), "
                         f"got {X.shape}{hint}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty: it needs at least one sample")
    if dtype is _UINT8 or dtype == _UINT8:
        return X if X.flags.c_contiguous else np.ascontiguousarray(X)
    if dtype is not _FLOAT32 or not X.flags.c_contiguous or not X.flags.aligned:
        X = _float32_copy(X, name)
    if not check_finite:
        return X
    cdef const float[:, ::1] v = X
    cdef bint finite
    with nogil:
        finite = _all_finite(&v[0, 0], v.shape[0] * v.shape[1])
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def _float32_copy(X, str name):
    """A new aligned, native-endian, C-contiguous float32 copy of floating X (the kernels
    read floats through aligned pointers); ValueError if a finite value of a wider type
    overflows float32."""
    try:
        with np.errstate(over="raise"):
            return np.array(X, dtype=np.float32, order="C")
    except FloatingPointError:
        finite = X[np.isfinite(X)]
        raise ValueError(f"{name} holds values too large for float32 (largest magnitude "
                         f"{np.abs(finite).max():.3g}; float32 holds at most "
                         f"{np.finfo(np.float32).max:.3g}): rescale {name}") from None


cdef bint _all_finite(const float *x, int64_t n) noexcept nogil:
    """True if no element of x (n,) is NaN or infinite (all exponent bits set)."""
    cdef const uint32_t *bits = <const uint32_t *>x
    cdef uint32_t bad = 0
    cdef int64_t i
    for i in range(n):
        bad |= (bits[i] & 0x7f800000u) == 0x7f800000u
    return bad == 0


cdef const void *_data_pointer(X) except? NULL:
    """Address of the data of a C-contiguous uint8 or float32 2-D array (any size)."""
    cdef const uint8_t[:, ::1] u
    cdef const float[:, ::1] f
    if X.size == 0:
        return <const void *>_EMPTY
    if X.dtype == np.uint8:
        u = X
        return <const void *>&u[0, 0]
    f = X
    return <const void *>&f[0, 0]


cdef int _fill_layer(c.cnn_layer *out, layer) except -1:
    """*out = the C description of a cnn_core.layers layer (not Input)."""
    config = layer.config()
    out.kind = LAYER_KINDS[layer.kind]
    out.activation = ACTIVATIONS[config.get("activation", "identity")]
    out.alpha = config.get("leaky_slope", 0.0)
    out.rate = config.get("rate", 0.0)
    out.units = config.get("units", config.get("filters", 0))
    out.kernel_h, out.kernel_w = config.get("kernel_size", (config.get("size", 0),) * 2)
    out.stride = config.get("stride", 1)
    out.same_padding = config.get("padding") == "same"
    return 0


cdef class _Net:
    """A C view (cnn_net) of a layer stack (cnn_core.layers, Input first), a loss and a
    Network's flat parameter vector, with a prediction workspace kept between calls."""
    cdef c.cnn_net net
    cdef readonly object params
    cdef readonly int64_t n_features, n_outputs
    cdef readonly str loss
    cdef _WorkspaceCache _work   # predict workspace kept between calls
    cdef int64_t _work_batch     # the (batch, threads) last sized for, and that size
    cdef int _work_threads
    cdef int64_t _work_floats
    # how training steps chose their thread count, kept between fits of the same batch
    # size and thread count (the step times it measured still hold)
    cdef c.cnn_step_threads step_threads
    cdef int64_t _step_batch
    cdef int _step_n_threads

    def __cinit__(self, stack, str loss, params, uint64_t seed=0):
        stack = list(stack)
        if not 1 <= len(stack) - 1 <= c.CNN_MAX_LAYERS:
            raise ValueError(f"a network has 1 to {c.CNN_MAX_LAYERS} layers after Input, "
                             f"got {len(stack) - 1}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        _contiguous(params, "params", np.float32, 1, writable=True)
        shape = tuple(stack[0].shape)
        if len(shape) == 1:
            shape = (1, 1) + shape
        self.net.in_h, self.net.in_w, self.net.in_c = shape
        self.net.n_layers = len(stack) - 1
        for i, layer in enumerate(stack[1:]):
            _fill_layer(&self.net.layers[i], layer)
        self.net.loss = LOSSES[loss]
        self.net.seed = seed
        if c.cnn_net_check(&self.net) != c.CNN_OK:
            raise ValueError(f"the C engine cannot build this layer stack: {stack}")
        if c.cnn_net_param_count(&self.net) != params.shape[0]:
            raise ValueError(f"params has {params.shape[0]} values, the layers need "
                             f"{c.cnn_net_param_count(&self.net)}")
        self.loss = loss
        self.n_features = self.net.in_h * self.net.in_w * self.net.in_c
        self.n_outputs = c.cnn_net_n_outputs(&self.net)
        self.params = params
        self._work = _WorkspaceCache()
        self._work_batch = -1
        cdef float[::1] p = params
        self.net.params = &p[0]

    def with_params(self, stack, params):
        """The same network (stack as given here) over another parameter vector."""
        return _Net(stack, self.loss, params, self.net.seed)

    cdef int64_t _workspace_floats(self, int64_t batch, int threads):
        """Predict workspace size, recomputed only when batch or threads change."""
        if batch != self._work_batch or threads != self._work_threads:
            self._work_floats = c.cnn_net_predict_workspace_floats(&self.net, batch, threads)
            self._work_batch = batch
            self._work_threads = threads
        return self._work_floats

    cdef cnp.ndarray _input(self, X):
        """X itself when the kernels can read it as it is (checked in C: the common case,
        and the one that must be fast for single samples), else _as_input(X)."""
        cdef cnp.ndarray a
        if type(X) is np.ndarray:
            a = <cnp.ndarray>X
            if (cnp.PyArray_NDIM(a) == 2 and cnp.PyArray_DIMS(a)[0] > 0
                    and cnp.PyArray_DIMS(a)[1] == self.n_features
                    and cnp.PyArray_ISCARRAY_RO(a)
                    and (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
                         or cnp.PyArray_TYPE(a) == cnp.NPY_UINT8)):
                return a
        return _as_input(X, self.n_features, "X", False)

    cdef int _forward(self, cnp.ndarray X, float *out, bint logits, int n_threads) except -1:
        """out (n, n_outputs) = probabilities (or raw outputs) for X from _input."""
        cdef int64_t n = cnp.PyArray_DIMS(X)[0]
        cdef int64_t batch = min(_PREDICT_BATCH, n)
        work = self._work.take(self._workspace_floats(batch, n_threads))
        cdef float *wk = <float *>cnp.PyArray_DATA(work)
        cdef const void *xp = cnp.PyArray_DATA(X)
        cdef c.cnn_dtype dtype = (c.CNN_DTYPE_UINT8 if cnp.PyArray_TYPE(X) == cnp.NPY_UINT8
                                  else c.CNN_DTYPE_FLOAT32)
        cdef int status
        try:
            with nogil:
                status = c.cnn_net_predict(out, &self.net, xp, dtype, n, batch, logits, wk,
                                           n_threads)
        finally:
            self._work.give_back(work)
        return _raise_for(status)

    def predict(self, X, bint logits, int n_threads):
        """Probabilities (or raw outputs) float32 (n, n_outputs) for X (n, n_features).
        FloatingPointError if a row's outputs are not all finite (see predict_labels)."""
        cdef cnp.ndarray a = self._input(X)
        cdef cnp.npy_intp shape[2]
        shape[0] = cnp.PyArray_DIMS(a)[0]
        shape[1] = self.n_outputs
        out = cnp.PyArray_EMPTY(2, shape, cnp.NPY_FLOAT32, 0)
        self._forward(a, <float *>cnp.PyArray_DATA(out), logits, n_threads)
        _check_finite_rows(<float *>cnp.PyArray_DATA(out), shape[0], shape[1])
        return out

    def predict_labels(self, X, int n_threads):
        """Predicted classes int64 (n,) for X (n, n_features): the first maximum, as
        numpy.argmax.  FloatingPointError if a row's outputs are not all finite (finite
        inputs too large for the weights overflow float32 inside the network)."""
        cdef cnp.ndarray a = self._input(X)
        cdef cnp.npy_intp n = cnp.PyArray_DIMS(a)[0]
        cdef cnp.npy_intp shape[2]
        shape[0] = n
        shape[1] = self.n_outputs
        logits = cnp.PyArray_EMPTY(2, shape, cnp.NPY_FLOAT32, 0)
        labels = cnp.PyArray_EMPTY(1, shape, cnp.NPY_INT64, 0)
        cdef const float *z = <float *>cnp.PyArray_DATA(logits)
        cdef int64_t *out = <int64_t *>cnp.PyArray_DATA(labels)
        cdef int64_t C = shape[1], i, j, best
        self._forward(a, <float *>z, True, n_threads)
        with nogil:
            for i in range(n):
                best = 0
                for j in range(1, C):
                    if z[best] != z[best]:
                        break
                    if z[j] > z[best] or z[j] != z[j]:
                        best = j
                out[i] = best
                z += C
        _check_finite_rows(<float *>cnp.PyArray_DATA(logits), n, C)
        return labels


cdef _check_finite_rows(const float *z, int64_t n, int64_t k):
    """FloatingPointError naming the rows of z (n, k) that are not all finite: inference
    on inputs checked to be finite, which are so large that float32 overflows inside the
    network."""
    cdef int64_t i, j, first = -1, n_bad = 0
    cdef float v
    for i in range(n):      # a pass over the outputs only: too short to release the GIL
        for j in range(k):
            v = z[i * k + j]
            if not v - v == 0:      # NaN or infinite
                n_bad += 1
                if first < 0:
                    first = i
                break
    if n_bad:
        raise FloatingPointError(
            f"the network's outputs are not finite for {n_bad} of {n} rows (the first is "
            f"row {first}): those inputs are finite but so large that float32 overflows "
            f"inside the network; scale the inputs as in training")


def _step_threads_choices(step_seconds, int n_threads):
    """The thread count training would pick for each step when a step with n_threads
    threads takes step_seconds[i, 0] and one with one thread step_seconds[i, 1]."""
    cdef c.cnn_step_threads s
    memset(&s, 0, sizeof(s))
    t = np.asarray(step_seconds, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"step_seconds must have shape (n, 2), got {t.shape}")
    chosen = np.empty(t.shape[0], dtype=np.int64)
    cdef Py_ssize_t i
    cdef int T
    for i in range(t.shape[0]):
        T = c.cnn_step_threads_begin(&s, n_threads)
        chosen[i] = T
        c.cnn_step_threads_record(&s, t[i, 0 if T == n_threads else 1] * 1e9, 1)
    return chosen


def _trainer_floats(_Net net, str optimizer, int64_t batch_size, int n_threads):
    """Floats a _Trainer allocates: gradients, optimizer state and workspace."""
    cdef int64_t n = net.params.shape[0]
    return (n * (2 if optimizer == "sgd" else 3)
            + c.cnn_net_train_workspace_floats(&net.net, batch_size, n_threads))


cdef class _Trainer:
    """Gradients, optimizer state and workspace for one fit, allocated once.
    ``batch_count`` counts the minibatches trained (it picks the dropout masks)."""
    cdef _Net net
    cdef c.cnn_optimizer opt
    cdef readonly object grads, state1, state2, work
    cdef readonly int64_t batch_size
    cdef readonly int n_threads
    cdef public int64_t batch_count

    def __cinit__(self, _Net net, str optimizer, float learning_rate, float momentum,
                  bint nesterov, float weight_decay, float beta1, float beta2, float eps,
                  int64_t batch_size, int n_threads):
        self.net = net
        self.opt.kind = <c.cnn_optimizer_kind>OPTIMIZERS[optimizer]
        self.opt.learning_rate = learning_rate
        self.opt.momentum = momentum
        self.opt.nesterov = nesterov
        self.opt.weight_decay = weight_decay
        self.opt.beta1 = beta1
        self.opt.beta2 = beta2
        self.opt.eps = eps
        self.opt.step = 0
        self.batch_size = batch_size
        self.n_threads = n_threads
        self.batch_count = 0
        if net._step_batch != batch_size or net._step_n_threads != n_threads:
            memset(&net.step_threads, 0, sizeof(net.step_threads))
            net._step_batch = batch_size
            net._step_n_threads = n_threads
        n = net.params.shape[0]
        self.grads = _workspace(n)
        self.state1 = np.zeros(n, dtype=np.float32)
        self.state2 = np.zeros(n if optimizer != "sgd" else 1, dtype=np.float32)
        self.work = _workspace(c.cnn_net_train_workspace_floats(&net.net, batch_size, n_threads))

    @property
    def learning_rate(self):
        """The optimizer's learning rate; set it between calls to follow a schedule."""
        return self.opt.learning_rate

    @learning_rate.setter
    def learning_rate(self, float value):
        if not value >= 0.0:
            raise ValueError(f"learning_rate must be >= 0, got {value}")
        self.opt.learning_rate = value

    @property
    def step(self):
        """The optimizer's update count (Adam's bias correction); set it to continue the
        state of an earlier trainer."""
        return self.opt.step

    @step.setter
    def step(self, int64_t value):
        if value < 0:
            raise ValueError(f"step must be >= 0, got {value}")
        self.opt.step = value

    @property
    def step_threads(self):
        """How the network's training steps chose their thread count: steps timed, the
        preferred count, and the mean step time (seconds) with n_threads and with one
        thread (0: not measured yet)."""
        cdef c.cnn_step_threads *s = &self.net.step_threads
        return {"steps": s.steps, "threads": 1 if s.preferred else self.n_threads,
                "seconds": (s.mean_ns[0] * 1e-9, s.mean_ns[1] * 1e-9)}

    def train_batches(self, X, y, sample_weight, order, int64_t first_batch,
                      int64_t n_batches, double loss_sum=0.0):
        """Train on minibatches [first_batch, first_batch + n_batches) of `order`.

        X: uint8/float32 (n, n_features) C-contiguous; y: int32 (n,) valid labels for
        cross-entropy, float32 (n, n_outputs) C-contiguous targets for squared error;
        sample_weight: float32 (n,) or None; order: int64 (m,) indices into X.
        Returns (loss_sum plus the summed loss of those batches, number correct): each
        batch's loss is added to the running total in turn, so how an epoch is cut into
        calls never changes the total.
        """
        cdef const int32_t[::1] labels
        cdef const float[:, ::1] targets
        cdef const int32_t *lp = NULL
        cdef const float *tp = NULL
        if self.net.net.loss == c.CNN_LOSS_SQUARED_ERROR:
            targets = y
            tp = &targets[0, 0]
        else:
            labels = y
            lp = &labels[0]
        cdef const int64_t[::1] ov = order
        cdef const float[::1] wv
        cdef const float *wp = NULL
        if sample_weight is not None:
            wv = sample_weight
            wp = &wv[0]
        cdef float[::1] g = self.grads
        cdef float[::1] s1 = self.state1
        cdef float[::1] s2 = self.state2
        cdef float[::1] wk = self.work
        cdef const void *xp = _data_pointer(X)
        cdef c.cnn_dtype dtype = c.CNN_DTYPE_UINT8 if X.dtype == np.uint8 else c.CNN_DTYPE_FLOAT32
        cdef double loss = loss_sum
        cdef int64_t correct = 0
        cdef int status
        with nogil:
            status = c.cnn_net_train_batches(&self.net.net, &self.opt, &s1[0], &s2[0], &g[0],
                                             &wk[0], xp, dtype, lp, tp, wp, &ov[0],
                                             ov.shape[0], self.batch_size, first_batch,
                                             n_batches, &self.batch_count, &loss, &correct,
                                             &self.net.step_threads, self.n_threads)
        _raise_for(status)
        return loss, int(correct)
