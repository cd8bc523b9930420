"""The safety contract (SECURITY.md, ARCHITECTURE.md "Safety"): crash-safe saves that leave
nothing behind, bounded memory, and what concurrent use of one Network does.

- SIGKILL at random moments during save never tears the file; leftovers of killed saves
  are removed by the next save; a file size limit or a full disk raises OSError and keeps
  the previous file.
- A network too large for memory is refused with a MemoryError naming the layer before
  anything large is allocated; initialisation allocates no float64 weights; repeated
  fit/save/load cycles keep the resident memory flat.
- predict/predict_proba/evaluate from 8 threads give the serial answer; predict while fit
  runs returns the weights of a completed epoch; Ctrl-C during fit leaves the network as
  it was at the end of its last recorded epoch.
"""
import errno
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

from cnn_core import Network, kernels, model_file, network

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and POSIX signals")
MODES = [pytest.param(True, id="unnamed-tmpfile"), pytest.param(False, id="named-fallback")]


@pytest.fixture(params=MODES)
def unnamed(request, monkeypatch):
    """Run a test with O_TMPFILE saves and again with the named-temporary fallback."""
    if request.param and not hasattr(os, "O_TMPFILE"):
        pytest.skip("this OS has no O_TMPFILE")
    monkeypatch.setattr(model_file, "_USE_UNNAMED", request.param)
    return request.param


def leftovers(folder, keep="m.cnn"):
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


# ---- saving ----------------------------------------------------------------------------

@posix_only
def test_sigkill_during_save_never_tears_the_file(tmp_path, unnamed):
    path = tmp_path / "m.cnn"
    nets = [Network([784, 64, 10], seed=s) for s in (0, 1)]
    versions = set()
    for net in nets:
        net.save(path)
        versions.add(path.read_bytes())
    rng = random.Random(13)
    orphans = 0
    for _ in range(50):
        pid = os.fork()
        if pid == 0:    # child: save the two versions in turn until killed
            try:
                k = 0
                while True:
                    nets[k % 2].save(path)
                    k += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes() in versions            # never torn, never missing
        left = leftovers(tmp_path)
        assert len(left) <= 1, left                     # older orphans were cleaned
        orphans += len(left)
    nets[0].save(path)
    assert leftovers(tmp_path) == []                    # the next save cleans up
    assert Network.load(path).predict(np.zeros((1, 784), np.uint8)).shape == (1,)
    if unnamed:     # only a kill between link and rename can leave a name behind
        assert orphans <= 5, orphans


@posix_only
def test_file_size_limit_during_save_raises_and_keeps_the_previous_file(tmp_path, unnamed):
    path = tmp_path / "m.cnn"
    Network([4, 3, 2], seed=0).save(path)
    before = path.read_bytes()
    big = Network([784, 64, 10], seed=1)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
            try:
                big.save(path)
            except OSError as e:
                code = 0 if e.errno == errno.EFBIG and str(path) in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_full_disk_during_save_raises_and_keeps_the_previous_file(tmp_path, unnamed,
                                                                  monkeypatch):
    path = tmp_path / "m.cnn"
    Network([4, 3, 2], seed=0).save(path)
    before = path.read_bytes()

    def full(fd, data):
        os.write(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(model_file, "_write_all", full)
    with pytest.raises(OSError, match="cannot save to .*m.cnn.*No space left") as info:
        Network([4, 3, 2], seed=1).save(path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_saving_to_a_folder_names_the_users_path(tmp_path, unnamed):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"cannot save to {folder}: it is a folder"):
        Network([4, 2]).save(folder)
    assert list(folder.iterdir()) == []


@posix_only
def test_next_save_removes_only_the_orphans_of_dead_writers(tmp_path, unnamed):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)                  # a process that no longer exists
    dead = tmp_path / f".m.cnn.{pid}.k2j4.tmp"
    alive = tmp_path / f".m.cnn.{os.getpid()}.x8q1.tmp"    # another thread's save
    other = tmp_path / f".n.cnn.{pid}.abcd.tmp"            # a save to another file
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    Network([4, 2]).save(tmp_path / "m.cnn")
    assert leftovers(tmp_path) == sorted([alive.name, other.name])


def test_saving_non_finite_weights_is_refused(tmp_path):
    net = Network([4, 3, 2], seed=0)
    net.weights[0][1, 2] = np.nan
    with pytest.raises(ValueError, match="1 parameters are NaN or infinite"):
        net.save(tmp_path / "m.cnn")
    assert list(tmp_path.iterdir()) == []


# ---- memory ----------------------------------------------------------------------------

def test_network_too_large_for_memory_names_the_layer(monkeypatch):
    monkeypatch.setattr(network, "_memory_limit", lambda: 8 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=r"layer 1, Dense\(16777216, activation=.relu.\) with weights 784 x 16777216, alone needs 52\.7 GB"):
            Network([784, 2**24, 10])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20               # refused before anything large was allocated


def test_fit_too_large_for_memory_is_refused_before_allocating(monkeypatch, mnist):
    X, y = mnist[0][:64], mnist[1][:64]
    net = Network([784, 4096, 10], seed=0)    # 13 MB of parameters
    # a limit between what SGD and Adam need (Adam keeps one more copy of the parameters)
    needs = [4 * kernels._trainer_floats(net._net, opt, 64, kernels.max_threads())
             + net._params.nbytes for opt in ("sgd", "adam")]
    monkeypatch.setattr(network, "_memory_limit", lambda: sum(needs) // 2)
    with pytest.raises(MemoryError, match=r"fit\(batch_size=64\).*layer 1, Dense\(4096.*with weights 784 x 4096"):
        net.fit(X, y, epochs=1, optimizer="adam")
    net.fit(X, y, epochs=1, optimizer="sgd", momentum=0.0)   # SGD needs less: it fits


@posix_only
def test_memory_limit_follows_rlimit_as():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limit = vm + (256 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
            os.write(write, f"{network._memory_limit()} {limit}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    got, limit = map(int, os.read(read, 100).split())
    assert got <= limit


def test_initialisation_allocates_no_float64_weights():
    sizes = [784, 1500, 10]
    tracemalloc.start()
    try:
        net = Network(sizes, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    params = net._params.nbytes
    assert peak < params * 1.2, (peak, params)      # float64 weights would need 3x
    for activation in ("relu", "tanh"):
        W = Network(sizes, activation, seed=0).weights[0]
        limit = np.sqrt(2 / 784) * 6 if activation == "relu" else np.sqrt(6 / (784 + 1500))
        assert W.dtype == np.float32 and 0 < np.abs(W).max() <= limit
        assert abs(W.mean()) < 1e-3 and W.std() > limit / 12


RSS_SCRIPT = """
import sys
import numpy as np
from cnn_core import Network
from cnn_core.datasets import load_mnist
(X, y), _ = load_mnist(sys.argv[1], download=False, verbose=False)
X, y = X[:1000], y[:1000]
path = sys.argv[2]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])

for cycle in range(40):
    net = Network([784, 64, 10], seed=cycle)
    net.fit(X, y, epochs=1, batch_size=50, optimizer="adam")
    net.save(path)
    again = Network.load(path)
    assert (again.predict(X) == net.predict(X)).all()
    if cycle == 9:
        start = rss()
print(start, rss())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_rss_stays_flat_over_fit_save_load_cycles(tmp_path, mnist_split_dir):
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env or "LD_PRELOAD" in env:   # the sanitizer run keeps freed
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=0"
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(mnist_split_dir),
                             str(tmp_path / "m.cnn")], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    start, end = map(int, result.stdout.split())
    pages = 8 << 20 >> 12      # 8 MB: one network, its optimizer state and workspace
    assert end - start < pages, (start, end)


# ---- threads ---------------------------------------------------------------------------

def run_threads(n, target):
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as e:      # reported in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_inference_from_8_threads_gives_the_serial_answer(trained, mnist):
    X, y = mnist[2], mnist[3]
    inputs = [X[:1], X[:7], X[:300], X, mnist[0][:513]]
    serial = [(trained.predict(a), trained.predict_proba(a)) for a in inputs]
    loss = trained.evaluate(X, y)

    def work(i):
        for round in range(4):
            for k in np.random.default_rng(i * 10 + round).permutation(len(inputs)):
                labels, probs = serial[k]
                np.testing.assert_array_equal(trained.predict(inputs[k], n_threads=1 + i % 2),
                                              labels)
                np.testing.assert_array_equal(trained.predict_proba(inputs[k]), probs)
            assert trained.evaluate(X, y) == loss
    run_threads(8, work)


def test_predict_during_fit_sees_only_completed_epochs(mnist):
    X, y, X_test, _ = mnist
    X, y, probe = X[:2000], y[:2000], X_test[:200]
    fit_args = dict(batch_size=32, momentum=0.0, shuffle=False, learning_rate=0.05)
    # without momentum or shuffling, epoch k of one fit equals k one-epoch fits
    twin = Network([784, 64, 10], seed=5)
    epochs = [twin.predict_proba(probe)]
    for _ in range(3):
        twin.fit(X, y, epochs=1, **fit_args)
        epochs.append(twin.predict_proba(probe))
    net = Network([784, 64, 10], seed=5)
    trainer = threading.Thread(target=net.fit, args=(X, y), kwargs=dict(epochs=3, **fit_args))
    seen = []
    trainer.start()
    while trainer.is_alive():
        seen.append(net.predict_proba(probe))
    trainer.join()
    seen.append(net.predict_proba(probe))
    for probs in seen:
        assert any(np.array_equal(probs, e) for e in epochs), "weights from no epoch"
    np.testing.assert_array_equal(seen[-1], epochs[-1])


def test_a_second_concurrent_fit_is_refused(mnist):
    net = Network([784, 16, 10], seed=0)
    before = net._params.copy()
    with net._fitting:      # as while fit runs in another thread
        with pytest.raises(RuntimeError, match="already being trained"):
            net.fit(mnist[0][:100], mnist[1][:100], epochs=1)
    np.testing.assert_array_equal(net._params, before)


@posix_only
def test_ctrl_c_during_fit_keeps_the_last_recorded_epoch(mnist):
    X, y = mnist[0][:2000], mnist[1][:2000]
    net = Network([784, 32, 10], seed=3)
    # Python's Ctrl-C handler, even if this process started with SIGINT ignored (as
    # commands started in the background by a non-interactive shell do)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            net.fit(X, y, epochs=1000, batch_size=16, optimizer="adam")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    done = len(net.history_ or [])
    assert done < 1000
    twin = Network([784, 32, 10], seed=3)
    if done:
        twin.fit(X, y, epochs=done, batch_size=16, optimizer="adam")
    np.testing.assert_array_equal(net._params, twin._params)
    # the optimizer's state from the middle of the epoch does not match those weights: a
    # continued fit says it starts the optimizer anew (an interruption between epochs,
    # from a callback, keeps it: see test_training)
    if net._optimizer_state is None:
        with pytest.warns(RuntimeWarning, match="optimizer starts anew"):
            net.fit(X, y, epochs=1, batch_size=16, optimizer="adam", reset=False)
