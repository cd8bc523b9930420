"""The fast GEMM (cnn_sgemm_ex behind kernels.gemm) against a float64 numpy oracle, for
every kernel family this CPU can run: odd shapes, all four transpose cases, alpha/beta,
strided operands, NaN garbage in C, kernel selection, and bit-identical results for any
thread count."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cnn_core import kernels

KERNELS = kernels.available_kernels()
TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]
DIMS = [0, 1, 2, 3, 7, 13, 17, 31, 33, 63, 65, 97, 129, 257, 300]
# A spread of (M, N, K) over DIMS: every size appears as M, N and K, paired with small,
# prime, power-of-two-adjacent and large partners (not the full cube, to stay fast).
SHAPES = sorted({(m, DIMS[(i + step) % len(DIMS)], DIMS[(i + 2 * step + 1) % len(DIMS)])
                 for i, m in enumerate(DIMS) for step in (4, 9)})


@pytest.fixture(autouse=True)
def restore_kernel():
    """Leave the kernel selection as each test found it."""
    saved = kernels.get_kernel()
    yield
    kernels.set_kernel(saved)


def operands(rng, M, N, K, trans_a, trans_b, pad_a=0, pad_b=0):
    """A and B as stored for op(A) (M, K) and op(B) (K, N); pad_x > 0 makes the stored
    array a column slice of a wider one (leading dimension larger than the row)."""
    a_shape = (K, M) if trans_a else (M, K)
    b_shape = (N, K) if trans_b else (K, N)
    A = rng.standard_normal((a_shape[0], a_shape[1] + pad_a)).astype(np.float32)
    B = rng.standard_normal((b_shape[0], b_shape[1] + pad_b)).astype(np.float32)
    return A[:, :a_shape[1]], B[:, :b_shape[1]]


def assert_gemm_close(C, A, B, trans_a, trans_b, alpha=1.0, beta=0.0, C0=None):
    """C must equal alpha op(A) op(B) + beta C0 within 1e-4 of sum |alpha a b| + |beta c|."""
    a = (A.T if trans_a else A).astype(np.float64)
    b = (B.T if trans_b else B).astype(np.float64)
    expected = alpha * (a @ b)
    scale = abs(alpha) * (np.abs(a) @ np.abs(b))
    if beta != 0.0:
        expected = expected + beta * C0.astype(np.float64)
        scale = scale + abs(beta) * np.abs(C0.astype(np.float64))
    assert C.dtype == np.float32 and C.shape == expected.shape
    assert np.all(np.isfinite(C))
    err = np.abs(C.astype(np.float64) - expected)
    assert np.all(err <= 1e-4 * scale + 1e-30), f"max error {err.max()}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_shapes_against_float64(kernel, trans_a, trans_b):
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(4 * KERNELS.index(kernel) + 2 * trans_a + trans_b)
    for M, N, K in SHAPES:
        A, B = operands(rng, M, N, K, trans_a, trans_b)
        C = kernels.gemm(A, B, trans_a=trans_a, trans_b=trans_b)
        assert C.flags.c_contiguous
        assert_gemm_close(C, A, B, trans_a, trans_b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 0.0), (-1.5, 0.25), (2.0, -1.0),
                                        (0.0, 0.5), (0.0, 0.0)])
def test_alpha_beta_in_place(kernel, alpha, beta):
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(7)
    for (M, N, K), (trans_a, trans_b) in zip([(65, 97, 33), (13, 300, 129), (257, 17, 63),
                                             (31, 33, 0)], TRANSPOSES):
        A, B = operands(rng, M, N, K, trans_a, trans_b)
        C0 = rng.standard_normal((M, N)).astype(np.float32)
        C = C0.copy()
        out = kernels.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
        assert out is C
        assert_gemm_close(C, A, B, trans_a, trans_b, alpha, beta, C0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_beta_zero_ignores_nan_in_c(kernel):
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(11)
    for (M, N, K), (trans_a, trans_b) in zip([(63, 65, 129), (7, 257, 31), (300, 3, 17),
                                             (33, 31, 0)], TRANSPOSES):
        A, B = operands(rng, M, N, K, trans_a, trans_b)
        C = np.full((M, N), np.nan, dtype=np.float32)
        kernels.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b, alpha=0.75, beta=0.0)
        assert_gemm_close(C, A, B, trans_a, trans_b, alpha=0.75)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_leading_dimensions(kernel, trans_a, trans_b):
    """Operands that are column slices of wider arrays (lda, ldb > row length)."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(13)
    for (M, N, K), (pad_a, pad_b) in zip([(97, 65, 129), (17, 300, 33), (129, 31, 257)],
                                         [(1, 7), (16, 3), (5, 32)]):
        A, B = operands(rng, M, N, K, trans_a, trans_b, pad_a, pad_b)
        assert A.strides[0] > A.shape[1] * 4 and B.strides[0] > B.shape[1] * 4
        C0 = rng.standard_normal((M, N)).astype(np.float32)
        C = kernels.gemm(A, B, C0.copy(), trans_a=trans_a, trans_b=trans_b, beta=0.5)
        assert_gemm_close(C, A, B, trans_a, trans_b, beta=0.5, C0=C0)
        # The same values stored contiguously give the same bits.
        C2 = kernels.gemm(np.ascontiguousarray(A), np.ascontiguousarray(B), C0.copy(),
                          trans_a=trans_a, trans_b=trans_b, beta=0.5)
        assert np.array_equal(C, C2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_thread_count_is_bit_identical(kernel):
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(17)
    cases = [((64, 128, 784), (False, False)), ((784, 128, 64), (True, False)),
             ((64, 784, 128), (False, True)), ((300, 257, 129), (True, True)),
             ((97, 1000, 65), (False, False)), ((1000, 33, 97), (True, True)),
             ((2, 3000, 31), (False, True))]
    for (M, N, K), (trans_a, trans_b) in cases:
        A, B = operands(rng, M, N, K, trans_a, trans_b, pad_a=3)
        C0 = rng.standard_normal((M, N)).astype(np.float32)
        results = [kernels.gemm(A, B, C0.copy(), trans_a=trans_a, trans_b=trans_b,
                                alpha=1.25, beta=0.5, n_threads=n) for n in (1, 2, 3, 4)]
        for other in results[1:]:
            assert np.array_equal(results[0], other)
        assert_gemm_close(results[0], A, B, trans_a, trans_b, 1.25, 0.5, C0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("N,K", [(1, 1), (10, 128), (128, 784), (129, 33), (300, 7)])
def test_single_rows_match_tiled_rows_bitwise(kernel, trans_a, N, K):
    """One or two rows take the no-packing row path; rows of a taller product take the
    tiled path; each element must come out with the same bits either way."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(23)
    A, B = operands(rng, 5, N, K, trans_a, False)
    C0 = rng.standard_normal((5, N)).astype(np.float32)
    tall = kernels.gemm(A, B, C0.copy(), trans_a=trans_a, alpha=0.75, beta=0.5)
    for rows in (slice(0, 1), slice(3, 5)):
        part = A[:, rows] if trans_a else A[rows]
        small = kernels.gemm(part, B, C0[rows].copy(), trans_a=trans_a, alpha=0.75, beta=0.5)
        assert np.array_equal(small, tall[rows])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("N,K", [(1, 784), (10, 128), (17, 31), (128, 784), (129, 1000),
                                 (300, 513), (1024, 784)])
def test_sparse_single_rows_equal_tiled_rows(kernel, trans_a, N, K):
    """The row path skips zero entries of op(A) (mostly-zero images, ReLU outputs): the
    values must still equal those of the same rows in a taller product (a zero may only
    differ in sign) and the float64 product, for rows that are mostly zeros, all zeros
    and signed zeros, with any thread count (wide rows are split over threads by
    columns)."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(N + K)
    A, B = operands(rng, 5, N, K, trans_a, False)
    a = A.T if trans_a else A           # a view: zeroing it zeroes A
    a[rng.random(a.shape) < 0.8] = 0.0
    a[0, rng.random(K) < 0.1] = -0.0
    a[3, :] = 0.0
    C0 = rng.standard_normal((5, N)).astype(np.float32)
    tall = kernels.gemm(A, B, C0.copy(), trans_a=trans_a, alpha=0.75, beta=0.5)
    assert_gemm_close(tall, A, B, trans_a, False, 0.75, 0.5, C0)
    for rows in (slice(0, 1), slice(3, 4), slice(3, 5)):
        part = A[:, rows] if trans_a else A[rows]
        for n_threads in (1, 2, 3):
            small = kernels.gemm(part, B, C0[rows].copy(), trans_a=trans_a, alpha=0.75,
                                 beta=0.5, n_threads=n_threads)
            np.testing.assert_array_equal(small, tall[rows])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("M,N,K", [(16, 128, 784), (5, 97, 513), (33, 7, 1100), (17, 300, 64),
                                   (1, 1, 1), (40, 1, 31), (19, 1000, 200), (6, 129, 97)])
def test_sparse_rows_equal_dense_tiles(kernel, trans_a, M, N, K):
    """Mostly-zero rows of op(A) take the sparse row path (only their nonzero terms,
    over pieces of op(B)'s rows with long K blocks); stacked under dense rows, the same
    rows take the tiled path with every term.  Both must give the same values (a zero
    may only differ in sign): odd N and K over several blocks, whole zero rows, signed
    zeros, a row whose only term is the last, a long run without terms, a dense run."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(M + N + K + trans_a)
    sparse = rng.standard_normal((M, K)).astype(np.float32)
    sparse[rng.random((M, K)) < 0.85] = 0.0
    sparse[M // 2] = 0.0
    sparse[0, rng.random(K) < 0.05] = -0.0
    if M > 3:
        sparse[1] = 0.0
        sparse[1, K - 1] = 3.0
        sparse[2, : K // 2] = 0.0
        sparse[3, K // 4: K // 2] = rng.standard_normal(K // 2 - K // 4)
    dense = rng.standard_normal((4 * M + 3, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C0 = rng.standard_normal((M, N)).astype(np.float32)

    def product(a, c):
        A = np.ascontiguousarray(a.T) if trans_a else a
        return kernels.gemm(A, B, c, trans_a=trans_a, alpha=1.25, beta=0.5)

    alone = product(sparse, C0.copy())
    stacked = product(np.vstack([dense, sparse]),
                      np.vstack([np.zeros((len(dense), N), np.float32), C0]))
    np.testing.assert_array_equal(alone, stacked[len(dense):])
    assert_gemm_close(alone, sparse, B, False, False, 1.25, 0.5, C0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_mostly_zero_A_matches_rows_and_float64(kernel, trans_a, trans_b):
    """A mostly-zero op(A) (an image batch) lets a family drop the all-zero steps of each
    packed panel.  Every row must keep the value the row path gives it alone (the same
    arithmetic with the zeros skipped) and agree with float64, for odd shapes, K spanning
    several blocks, whole zero rows and steps, and any thread count."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(7 + 2 * trans_a + trans_b)
    for M, N, K in [(3, 5, 7), (15, 33, 64), (29, 128, 784), (64, 97, 1100), (200, 31, 13),
                    (784, 300, 64), (37, 129, 513)]:
        A, B = operands(rng, M, N, K, trans_a, trans_b, pad_a=3)
        a = A.T if trans_a else A
        a[rng.random(a.shape) < 0.85] = 0.0
        a[:, : K // 3] = 0.0
        a[M // 2] = 0.0
        C0 = rng.standard_normal((M, N)).astype(np.float32)
        results = [kernels.gemm(A, B, C0.copy(), trans_a=trans_a, trans_b=trans_b,
                                alpha=1.25, beta=0.5, n_threads=n) for n in (1, 2, 3)]
        for other in results[1:]:
            assert np.array_equal(results[0], other)
        assert_gemm_close(results[0], A, B, trans_a, trans_b, 1.25, 0.5, C0)
        if not trans_b:
            for i in (0, M // 2, M - 1):
                part = A[:, i:i + 1] if trans_a else A[i:i + 1]
                row = kernels.gemm(part, B, C0[i:i + 1].copy(), trans_a=trans_a, alpha=1.25,
                                   beta=0.5)
                np.testing.assert_array_equal(row, results[0][i:i + 1])


def test_an_output_sharing_memory_with_an_operand_is_refused():
    rng = np.random.default_rng(4)
    buf = rng.standard_normal((64, 192)).astype(np.float32)
    A, B = buf[:, :64], buf[:, 64:128]
    for C, name in [(A, "A"), (B, "B"), (buf[:, 32:96], "A")]:
        before = buf.copy()
        with pytest.raises(ValueError, match=f"C shares memory with {name}"):
            kernels.gemm(A, B, C)
        assert np.array_equal(buf, before)
    C = buf[:, 128:]        # the same buffer, but columns neither operand uses
    kernels.gemm(A, B, C)
    np.testing.assert_allclose(C, A.astype(np.float64) @ B, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_agrees_with_reference(kernel):
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(19)
    for trans_a, trans_b in TRANSPOSES:
        A, B = operands(rng, 33, 65, 257, trans_a, trans_b)
        fast = kernels.gemm(A, B, trans_a=trans_a, trans_b=trans_b)
        ref = kernels.gemm_reference(A, B, trans_a=trans_a, trans_b=trans_b)
        np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-4)


def test_kernel_selection():
    assert "generic" in KERNELS
    assert kernels.get_kernel() in KERNELS
    for name in KERNELS:
        kernels.set_kernel(name)
        assert kernels.get_kernel() == name
    before = kernels.get_kernel()
    for name in {"generic", "avx2", "avx512", "neon"} - set(KERNELS):
        with pytest.raises(ValueError):
            kernels.set_kernel(name)
        assert kernels.get_kernel() == before
    with pytest.raises(ValueError):
        kernels.set_kernel("sse9")
    assert kernels.get_kernel() == before


def kernel_in_subprocess(value):
    """get_kernel() in a fresh interpreter with CNN_CORE_KERNEL=value (None: unset)."""
    env = dict(os.environ)
    env.pop("CNN_CORE_KERNEL", None)
    if value is not None:
        env["CNN_CORE_KERNEL"] = value
    code = "from cnn_core import kernels; print(kernels.get_kernel())"
    # Run beside this file, where cnn_core is not importable as source.
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env,
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip().splitlines()[-1]


def test_environment_override():
    best = kernel_in_subprocess(None)
    assert best in KERNELS
    assert kernel_in_subprocess("generic") == "generic"
    # Unknown or unsupported values keep the best kernel.
    assert kernel_in_subprocess("no-such-kernel") == best
    unsupported = sorted({"avx2", "avx512", "neon"} - set(KERNELS))
    if unsupported:
        assert kernel_in_subprocess(unsupported[0]) == best


def same_bits(a, b):
    """Equal arrays, zeros of the same sign, NaN where the other is NaN."""
    nan = np.isnan(a)
    return (np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan], b[~nan])
            and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan])))


SPECIAL_BIAS = np.array([-0.0, 0.0, np.inf, -np.inf, 1e30, -3.0], np.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "sigmoid", "tanh"])
def test_epilogue_equals_separate_passes(kernel, name):
    """The GEMM applies a dense layer's bias and activation, and on the way back the
    derivative of its input's activation, as it stores each tile (in registers where the
    family can): the same bits as the separate passes, over tiles of every height and
    partial width, K over several blocks, with NaN, infinities, zeros and negatives."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(len(name))
    for B, n_in, n_out in [(1, 1, 1), (15, 7, 33), (64, 784, 128), (37, 1100, 65),
                           (29, 129, 97), (200, 64, 10)]:
        X = rng.standard_normal((B, n_in)).astype(np.float32)
        W = (0.1 * rng.standard_normal((n_in, n_out))).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        k = min(len(b[::3]), len(SPECIAL_BIAS))
        b[: 3 * k: 3] = SPECIAL_BIAS[:k]
        X[B // 2] = 0.0                          # a row of exact zeros: Z = bias there
        X[B - 1, 0] = np.nan
        Z = kernels.gemm(X, W)
        separate = kernels.activation_forward(kernels.bias_forward(Z, b), name, alpha=0.2)
        fused = kernels.dense_forward(X, W, b, name, alpha=0.2)
        assert same_bits(fused, separate), (B, n_in, n_out)

        Y = kernels.activation_forward(X, name, alpha=0.2)   # the layer's input
        dY = rng.standard_normal((B, n_out)).astype(np.float32)
        dY[0, -1] = np.inf
        G = kernels.gemm(dY, W, trans_b=True)
        separate = kernels.activation_backward(G, Y, name, alpha=0.2)
        _, _, fused = kernels.dense_backward(Y, dY, W, activation=name, alpha=0.2)
        assert same_bits(fused, separate), (B, n_in, n_out)
