"""cnn_core's thread pool: results that do not depend on the thread count, the default
thread count (affinity, OMP_NUM_THREADS, threadpoolctl), and a pool that survives
concurrent callers and fork()."""
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import threadpoolctl

import cnn_core
from cnn_core import Network, kernels

KERNELS = kernels.available_kernels()
THREADS = (1, 2, 3, 5, 8)


def standardised(X):
    """Pixels standardised per column: dense float32 input with no zeros to skip."""
    X = X.astype(np.float32)
    return ((X - X.mean(0)) / (X.std(0) + 1.0)).astype(np.float32)


@pytest.fixture(autouse=True)
def best_kernel_afterwards():
    yield
    kernels.set_kernel(kernels.best_kernel())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_dense_layer_is_bit_identical_for_any_thread_count(kernel, activation):
    """The GEMM cuts C into blocks by a cost model that looks at the thread count; the
    fused epilogue (bias, activation) and every block split must give the same bits,
    close to the reference, over shapes that are not multiples of any tile."""
    kernels.set_kernel(kernel)
    rng = np.random.default_rng(3)
    for B, n_in, n_out in [(64, 784, 128), (67, 129, 1031), (257, 1024, 1023), (13, 512, 301),
                           (3, 700, 97), (1000, 31, 17)]:
        X = rng.standard_normal((B, n_in), dtype=np.float32)
        W = rng.standard_normal((n_in, n_out), dtype=np.float32) / np.float32(np.sqrt(n_in))
        b = rng.standard_normal(n_out, dtype=np.float32)
        results = [kernels.dense_forward(X, W, b, activation, n_threads=n) for n in THREADS]
        for other in results[1:]:
            np.testing.assert_array_equal(other, results[0])
        Z = X.astype(np.float64) @ W + b
        expected = {"relu": np.maximum(Z, 0), "tanh": np.tanh(Z), "identity": Z}[activation]
        np.testing.assert_allclose(results[0], expected, rtol=1e-4, atol=1e-4)
        dY = rng.standard_normal((B, n_out), dtype=np.float32)
        grads = [kernels.dense_backward(X, dY, W, n_threads=n) for n in THREADS]
        for other in grads[1:]:
            for a, e in zip(other, grads[0]):
                np.testing.assert_array_equal(a, e)
        np.testing.assert_allclose(grads[0][0], X.T.astype(np.float64) @ dY, rtol=1e-4,
                                   atol=1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_image_gemms_are_bit_identical_for_any_thread_count(kernel, mnist):
    """Real pixels are mostly zeros: the GEMMs skip them (compacted panels, the sparse
    transposed path) and split the work differently for the thread count; the bits must
    not change, at the training shapes and at odd ones."""
    kernels.set_kernel(kernel)
    _, _, X, _ = mnist
    rng = np.random.default_rng(7)
    for B, n_out in [(64, 128), (67, 97), (128, 512), (13, 1031)]:
        A = np.ascontiguousarray(X[:B])
        W = rng.standard_normal((784, n_out), dtype=np.float32)
        dY = rng.standard_normal((B, n_out), dtype=np.float32)
        forward = [kernels.gemm(A, W, n_threads=n) for n in THREADS]
        weights = [kernels.gemm(A, dY, trans_a=True, n_threads=n) for n in THREADS]
        for results in (forward, weights):
            for other in results[1:]:
                np.testing.assert_array_equal(other, results[0])
        np.testing.assert_allclose(forward[0], A.astype(np.float64) @ W, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(weights[0], A.T.astype(np.float64) @ dY, rtol=1e-4,
                                   atol=1e-3)


def test_dense_training_is_bit_identical_for_any_thread_count(mnist_split):
    """Dense input (no zeros to skip) through gather, every GEMM, the loss and the
    optimizer, at a batch size that is not a multiple of any tile."""
    (X, y), _ = mnist_split
    X, y = standardised(X[:1500]), y[:1500]
    weights = []
    for n_threads in (1, 2, 3, 4):
        net = Network([784, 96, 33, 10], seed=4)
        net.fit(X, y, epochs=1, batch_size=67, optimizer="sgd", momentum=0.9,
                learning_rate=0.01, n_threads=n_threads)
        weights.append(np.concatenate([w.ravel() for w in net.weights + net.biases]))
    for other in weights[1:]:
        np.testing.assert_array_equal(other, weights[0])
    assert np.isfinite(weights[0]).all()



def test_training_under_competing_load_is_bit_identical(mnist_split):
    """With a busy process on every CPU, workers get descheduled in the middle of their
    tasks and the caller takes over the tasks they have not claimed: the weights must
    still be those of one thread."""
    (X, y), _ = mnist_split
    X, y = standardised(X[:3000]), y[:3000]

    def train(n_threads):
        net = Network([784, 96, 10], seed=5)
        net.fit(X, y, epochs=2, batch_size=50, optimizer="sgd", momentum=0.9,
                learning_rate=0.01, n_threads=n_threads)
        return np.concatenate([w.ravel() for w in net.weights + net.biases])

    alone = train(1)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        loaded = [train(n_threads) for n_threads in (2, 3)]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    for weights in loaded:
        np.testing.assert_array_equal(weights, alone)

PERIOD = 8  # CNN_STEP_PERIOD: the first gap between trials of the other thread count
LONGEST = 1024  # trials come at most this many steps apart


def step_choices(seconds_n, seconds_1, n_steps, n_threads=2, jitter=0.0, seed=0):
    """The thread counts training picks when its steps take these times."""
    rng = np.random.default_rng(seed)
    times = np.empty((n_steps, 2))
    times[:, 0], times[:, 1] = seconds_n, seconds_1
    times *= 1.0 + jitter * rng.standard_normal(times.shape)
    return kernels._step_threads_choices(times, n_threads)


def trial_starts(chosen, preferred):
    """Steps where a run of the count not preferred begins."""
    other = chosen != preferred
    return np.flatnonzero(other & ~np.r_[False, other[:-1]])


@pytest.mark.parametrize("n_threads", [2, 3])
def test_steps_keep_the_threads_that_pay(n_threads):
    chosen = step_choices(1e-4, 2e-4, 4 * LONGEST, n_threads)
    assert np.mean(chosen[8 * PERIOD:] == n_threads) > 0.98
    # one thread is still tried now and then, less often while it keeps losing
    starts = trial_starts(chosen, n_threads)
    gaps = np.diff(starts)
    assert len(starts) >= 4 and gaps.max() <= LONGEST
    assert all(later >= earlier for earlier, later in zip(gaps, gaps[1:]))


def test_steps_drop_a_thread_that_does_not_pay():
    """A second thread waiting for a busy core: one thread is chosen."""
    for slower in (3.0, 1.1):
        chosen = step_choices(slower * 1e-4, 1e-4, 4 * LONGEST)
        assert np.mean(chosen[8 * PERIOD:] == 1) > 0.98, slower


def test_step_threads_follow_a_change_of_load():
    """A busy neighbour that starts and stops: the choice follows within the longest
    gap between trials."""
    n = 3 * LONGEST
    seconds_n = np.r_[np.full(n, 1e-4), np.full(n, 4e-4), np.full(n, 1e-4)]
    chosen = step_choices(seconds_n, 2e-4, 3 * n)
    for start, best in [(0, 2), (n, 1), (2 * n, 2)]:
        settled = chosen[start + LONGEST + PERIOD:start + n]
        assert np.mean(settled == best) > 0.95, (start, best)


def test_step_threads_are_robust_to_noise():
    """Steps 10% apart in speed with 10% noise: the faster count wins, and the choice
    does not flap."""
    for seconds_n, best in [(1e-4, 2), (1.4e-4, 1)]:
        chosen = step_choices(seconds_n, 1.4e-4 if best == 2 else 1e-4, 4 * LONGEST,
                              jitter=0.1, seed=best)
        assert np.mean(chosen[8 * PERIOD:] == best) > 0.95
    chosen = step_choices(1e-4, 1e-4, 4 * LONGEST, jitter=0.1, seed=3)
    runs = np.count_nonzero(np.diff(chosen) != 0)
    assert runs < 2 * len(trial_starts(chosen, 2)) + 10


def test_one_thread_is_never_more():
    assert set(step_choices(1e-4, 2e-4, 300, n_threads=1)) == {1}


def test_step_threads_need_two_columns():
    with pytest.raises(ValueError, match="shape"):
        kernels._step_threads_choices(np.zeros((5, 3)), 2)


def test_training_times_both_thread_counts(mnist_split):
    """Every minibatch is timed, and after one period both counts have a measured time."""
    (X, y), _ = mnist_split
    net = Network([784, 32, 10], seed=0)
    trainer = kernels._Trainer(net._net, "sgd", 0.01, 0.9, False, 0.0, 0.9, 0.999, 1e-8, 20, 2)
    order = np.arange(2 * PERIOD * 20, dtype=np.int64)
    trainer.train_batches(X, y.astype(np.int32), None, order, 0, 2 * PERIOD)
    report = trainer.step_threads
    assert report["steps"] == 2 * PERIOD
    assert report["threads"] in (1, 2)
    assert all(0.0 < t < 1.0 for t in report["seconds"])


@pytest.mark.parametrize("n", [1, 16383, 16384, 3 * 16384 + 7])
def test_optimizer_chunks_do_not_change_the_update(n):
    """The update is handed out in chunks; sizes around a chunk boundary."""
    rng = np.random.default_rng(n)
    g = rng.standard_normal(n, dtype=np.float32)
    results = []
    for n_threads in THREADS:
        p = np.linspace(-1, 1, n, dtype=np.float32)
        s = np.full(n, 0.5, dtype=np.float32)
        kernels.optimizer_update(p, g, s, optimizer="sgd", learning_rate=0.1, momentum=0.9,
                                 n_threads=n_threads)
        results.append((p, s))
    p_ref = np.linspace(-1, 1, n, dtype=np.float32)
    v_ref = np.float32(0.9) * np.float32(0.5) + g
    np.testing.assert_allclose(results[0][0], p_ref - np.float32(0.1) * v_ref, rtol=1e-6,
                               atol=1e-6)
    for p, s in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(s, results[0][1])


def test_predict_reports_the_first_bad_chunk_with_threads(mnist):
    """Chunks run on several threads; a NaN in a late chunk is still a ValueError."""
    _, _, X, _ = mnist
    net = Network([784, 32, 10], seed=0)
    X = X[:1500].copy()     # a copy: X is the session-wide fixture
    X[1400, 5] = np.nan
    for n_threads in (1, 2, 4):
        with pytest.raises(ValueError, match="NaN"):
            net.predict(X, n_threads=n_threads)


def test_concurrent_callers_get_correct_results():
    """Python threads calling the kernels at once (the GIL is released): a caller that
    finds the pool busy runs its tasks itself, with the same bits."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((300, 400), dtype=np.float32)
    B = rng.standard_normal((400, 200), dtype=np.float32)
    expected = kernels.gemm(A, B, n_threads=1)
    failures = []

    def work():
        for _ in range(30):
            if not np.array_equal(kernels.gemm(A, B, n_threads=2), expected):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def _gemm_in_child(queue):
    rng = np.random.default_rng(5)
    A = rng.standard_normal((300, 400), dtype=np.float32)
    B = rng.standard_normal((400, 200), dtype=np.float32)
    queue.put(kernels.gemm(A, B, n_threads=2).sum(dtype=np.float64))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_pool_works_in_a_forked_child():
    """A child forked after the pool started has no workers: it must start its own."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((300, 400), dtype=np.float32)
    B = rng.standard_normal((400, 200), dtype=np.float32)
    expected = kernels.gemm(A, B, n_threads=2).sum(dtype=np.float64)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_gemm_in_child, args=(queue,))
    child.start()
    result = queue.get(timeout=120)  # a hang guard, not a timing
    child.join(timeout=120)
    assert child.exitcode == 0 and result == expected


def test_threadpool_limits_caps_the_default():
    default = kernels.max_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert kernels.max_threads() == 1
        assert cnn_core.info()["threads"] == 1
    assert kernels.max_threads() == default
    with threadpoolctl.threadpool_limits(limits={"cnn_core": 1}):
        assert kernels.max_threads() == 1
    assert kernels.max_threads() == default


def test_threadpool_info_lists_the_installed_pool():
    """threadpoolctl finds cnn_core's pool in the installed extension module."""
    found = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "cnn_core"]
    assert len(found) == 1
    lib = found[0]
    assert os.path.samefile(lib["filepath"], kernels.__file__)
    assert lib["num_threads"] == kernels.max_threads()
    assert lib["version"] == cnn_core.__version__


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("ldd") is None,
                    reason="ldd lists a Linux extension's shared libraries")
def test_extension_loads_no_openmp_runtime():
    """The pool is the only thread runtime: the extension links no OpenMP library."""
    libraries = subprocess.run(["ldd", kernels.__file__], capture_output=True, text=True,
                               check=True).stdout
    assert "libc" in libraries, libraries  # ldd did list them
    assert not re.search(r"lib(g|i)?omp", libraries), libraries


def _default_threads_in_child(env_update, affinity=None):
    """kernels.max_threads() in a fresh interpreter with the given environment."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_update)
    code = ("import os\n"
            f"if {affinity!r} is not None: os.sched_setaffinity(0, {affinity!r})\n"
            "from cnn_core import kernels\n"
            "print(kernels.max_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return int(out.stdout.strip())


def test_default_follows_omp_num_threads():
    """OMP_NUM_THREADS is also how joblib's process workers get their share of CPUs."""
    assert _default_threads_in_child({"OMP_NUM_THREADS": "1"}) == 1
    assert _default_threads_in_child({"OMP_NUM_THREADS": "3,2"}) == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity masks")
def test_default_follows_the_affinity_mask():
    cpus = sorted(os.sched_getaffinity(0))
    assert _default_threads_in_child({}, affinity={cpus[0]}) == 1
    assert 1 <= _default_threads_in_child({}) <= len(cpus)

