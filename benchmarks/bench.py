#!/usr/bin/env python
"""Side-by-side benchmarks of cnn_core against its peers, in one run.

    python benchmarks/bench.py                  # everything (several minutes)
    python benchmarks/bench.py --quick          # smoke run, about a minute
    python benchmarks/bench.py --only gemm,predict --threads 2 --json results.json

Sections (see benchmarks/README.md for the method):

1. gemm     cnn_core.kernels.gemm vs numpy's float32 matmul (its BLAS), 1 and N threads.
2. train    seconds per epoch on 60,000 MNIST-shaped rows vs PyTorch, a numpy MLP,
            scikit-learn's MLPClassifier and a jitted JAX epoch.
3. predict  one-sample latency and 10,000-sample throughput vs PyTorch and numpy.
4. memory   cnn_core's peak RSS while training, above the loaded-data baseline.

Peers that are not installed are skipped with a note.  Every measurement runs in a fresh
subprocess per library (and thread count or configuration), so the thread pool of one
library (OpenMP, OpenBLAS, XLA), spinning idle after its last call, never takes the cores
another library is being timed on.
Results are printed; ``--json PATH`` also writes them as JSON.
"""
import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# the real MNIST images kept beside the project checkout (repo root /../shared/data)
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mnist-t10k-split"
RESULT_PREFIX = "BENCH-RESULT "
SECTIONS = ("gemm", "train", "predict", "memory")
PEERS = ("cnn_core", "torch", "numpy", "sklearn", "jax")
TRAIN_ROWS = 60_000
PREDICT_ROWS = 10_000
PREDICT_SIZES = [784, 128, 10]
MEMORY_TARGET_MB = 50.0
SEED = 0

# (label, A shape as stored, B shape as stored, trans_a, trans_b, what it is in training)
GEMM_CASES = [
    ("1x784x128", (1, 784), (784, 128), False, False, "forward, 1 sample"),
    ("64x784x128", (64, 784), (784, 128), False, False, "forward, batch 64"),
    ("128x784x512", (128, 784), (784, 512), False, False, "forward, batch 128"),
    ("256x1024x1024", (256, 1024), (1024, 1024), False, False, "forward, batch 256"),
    ("A^T B 784x64x128", (64, 784), (64, 128), True, False, "dW = X^T dY"),
    ("A B^T 64x128x784", (64, 128), (784, 128), False, True, "dX = dY W^T"),
    ("1x1x1", (1, 1), (1, 1), False, False, "per-call overhead"),
]
QUICK_GEMM = ("1x784x128", "64x784x128", "A^T B 784x64x128", "A B^T 64x128x784", "1x1x1")

# (layer sizes, batch size)
TRAIN_CONFIGS = [
    ([784, 128, 10], 64),
    ([784, 128, 10], 128),
    ([784, 512, 256, 10], 128),
    ([784, 1024, 1024, 10], 256),
]

FULL = {"gemm_reps": 7, "gemm_block_s": 0.1, "train_min_reps": 3, "train_max_reps": 5,
        "train_budget_s": 90.0, "predict_calls": 2000, "predict_batch_reps": 20,
        "configs": TRAIN_CONFIGS, "gemm_cases": [c[0] for c in GEMM_CASES]}
QUICK = {"gemm_reps": 3, "gemm_block_s": 0.02, "train_min_reps": 1, "train_max_reps": 2,
         "train_budget_s": 4.0, "predict_calls": 300, "predict_batch_reps": 3,
         "configs": TRAIN_CONFIGS[:1], "gemm_cases": list(QUICK_GEMM)}


# ---- small utilities -------------------------------------------------------------------

def log(message):
    """Progress on stderr, so stdout holds only the report."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def fmt_time(seconds):
    """A duration with a readable unit."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def fmt_num(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(headers, rows, indent="  ", n_left=1):
    """Print rows (lists of str) under headers; the first n_left columns left-aligned,
    the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells):
        parts = [str(c).ljust(w) if i < n_left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return indent + "  ".join(parts).rstrip()

    print(line(headers))
    print(indent + "  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def config_name(sizes, batch_size):
    return f"{'-'.join(map(str, sizes))} batch {batch_size}"


# ---- memory readings -------------------------------------------------------------------

def current_rss_mb():
    """Resident set size now, in MB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Peak resident set size of this process so far (getrusage ru_maxrss), in MB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- contention on a shared machine ----------------------------------------------------

class CpuWatch:
    """How much CPU other processes (and the hypervisor) took while we measured.

    Linux only (/proc/stat); elsewhere the shares are None.  `other` is the share of all
    CPUs busy with processes that are neither this one nor its finished children; `steal`
    the share the hypervisor took.  Either above a few percent makes timings noisy.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import resource

        own = sum(getattr(resource.getrusage(who), f) for who in
                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return time.perf_counter(), own, None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:3]) + sum(fields[5:7])) / tick   # user nice system irq softirq
        steal = fields[7] / tick if len(fields) > 7 else 0.0
        return time.perf_counter(), own, (busy, steal)

    def shares(self):
        """{"other": fraction, "steal": fraction} of all CPUs since construction."""
        (t0, own0, sys0), (t1, own1, sys1) = self.start, self._sample()
        if sys0 is None or sys1 is None or t1 <= t0:
            return {"other": None, "steal": None}
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        other = (sys1[0] - sys0[0]) - (own1 - own0)
        return {"other": max(0.0, other) / capacity, "steal": (sys1[1] - sys0[1]) / capacity}


def wait_until_idle(max_wait_s, threshold=0.05):
    """Sleep in 2 s windows until other processes use under `threshold` of the CPUs, for
    at most max_wait_s seconds; returns the last window's share (None if unknown)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        watch = CpuWatch()
        time.sleep(2.0)
        other = watch.shares()["other"]
        if other is None or other < threshold or time.monotonic() >= deadline:
            return other
        log(f"  waiting: other processes use {100 * other:.0f}% of the CPUs")


def fmt_contention(shares):
    if shares.get("other") is None:
        return "contention unknown"
    text = (f"other processes used {100 * shares['other']:.0f}% of the CPUs, "
            f"hypervisor steal {100 * shares['steal']:.0f}%")
    if shares["other"] + shares["steal"] > 0.05:
        text += " -- timings are noisy"
    return text


# ---- data ------------------------------------------------------------------------------

def load_images(data_dir):
    """All images (n, 784) uint8 and labels (n,) uint8 of an MNIST folder, train then test.

    data_dir None: the real-image folder beside the checkout if present, else cnn_core's
    MNIST cache (never downloads).
    """
    import cnn_core

    if data_dir is None and DEFAULT_DATA.is_dir():
        data_dir = DEFAULT_DATA
    (X_a, y_a), (X_b, y_b) = cnn_core.load_mnist(data_dir, download=False, verbose=False)
    return np.concatenate([X_a, X_b]), np.concatenate([y_a, y_b])


def tile_rows(a, n):
    """The first n rows of `a` repeated end to end, as a new C-contiguous array."""
    out = np.empty((n,) + a.shape[1:], dtype=a.dtype)
    for start in range(0, n, len(a)):
        stop = min(n, start + len(a))
        out[start:stop] = a[:stop - start]
    return out


def training_data(spec):
    """(X uint8 (rows, 784), y uint8 (rows,)) tiled from the real images."""
    X, y = load_images(spec.get("data"))
    return tile_rows(X, spec["rows"]), tile_rows(y, spec["rows"])


# ---- timing ----------------------------------------------------------------------------

def calls_per_block(f, block_s):
    """Calls of f (after one warm-up call) that take about block_s seconds."""
    f()
    t0 = time.perf_counter()
    f()
    once = time.perf_counter() - t0
    return max(1, min(100_000, int(block_s / max(once, 1e-7))))


def median_call_time(f, reps, block_s):
    """Median seconds per call of f() over `reps` blocks of about block_s seconds each,
    every block preceded by one untimed call (unless a single call fills the block)."""
    k = calls_per_block(f, block_s)
    times = []
    for _ in range(reps):
        if k > 1:
            f()
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def per_call_median(f, x, calls):
    """Median seconds of single calls f(x), each timed on its own, after calls // 10 warm-up."""
    for _ in range(max(10, calls // 10)):
        f(x)
    samples = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        f(x)
        samples.append(clock() - t0)
    return statistics.median(samples)


# ---- section 1: GEMM -------------------------------------------------------------------

def gemm_operands(case):
    """(A, B, C, a, b, M, K, N) for a GEMM_CASES entry: stored operands A, B, an output C,
    and the numpy views a = op(A), b = op(B); same values in every process."""
    label, a_shape, b_shape, trans_a, trans_b, _ = case
    rng = np.random.default_rng(SEED)
    A = rng.standard_normal(a_shape, dtype=np.float32)
    B = rng.standard_normal(b_shape, dtype=np.float32)
    a = A.T if trans_a else A
    b = B.T if trans_b else B
    C = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    return A, B, C, a, b, a.shape[0], a.shape[1], b.shape[1]


def gemm_call(library, case, n_threads):
    """A no-argument function running one case's GEMM into its preallocated output."""
    A, B, C, a, b, *_ = gemm_operands(case)
    if library == "numpy":
        return lambda: np.matmul(a, b, out=C)
    from cnn_core import kernels

    trans_a, trans_b = case[3], case[4]
    return lambda: kernels.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b,
                                n_threads=n_threads)


def worker_gemm(spec):
    """Median seconds per call of one library's GEMM for each case (in a worker process)."""
    library, n_threads = spec["library"], spec["threads"]
    limiter = "environment"
    limit = None
    if library == "numpy":
        try:
            from threadpoolctl import threadpool_limits
            limit = threadpool_limits(limits=n_threads, user_api="blas")
            limiter = "threadpoolctl"
        except ImportError:
            pass
    cases = [case for case in GEMM_CASES if case[0] in spec["cases"]]
    times = {}
    for case in cases:
        f = gemm_call(library, case, n_threads)
        times[case[0]] = median_call_time(f, spec["reps"], spec["block_s"])
    if limit is not None:
        limit.restore_original_limits()
    # checked after all timing, so numpy's threads never run beside cnn_core's timing
    errors = {case[0]: gemm_error(case) for case in cases} if library == "cnn_core" else {}
    return {"times": times, "limiter": limiter, "errors": errors}


def gemm_error(case):
    """max |C_cnn_core - C_numpy| / max |C_numpy| for one case."""
    C_cnn = gemm_call("cnn_core", case, 1)()
    _, _, C_np, a, b, *_ = gemm_operands(case)
    np.matmul(a, b, out=C_np)
    return float(np.abs(C_cnn - C_np).max()) / (float(np.abs(C_np).max()) or 1.0)


def bench_gemm(args, settings):
    """Each library and thread count runs in its own process: a library's idle threads
    (OpenBLAS keeps its workers spinning for a while after a call) would otherwise take
    the cores the other one is timed on."""
    cases = settings["gemm_cases"]
    watch = CpuWatch()
    rows, limiters, errors = [], set(), {}
    for t in sorted({1, args.threads}):
        times = {}
        for library in ("cnn_core", "numpy"):
            log(f"  gemm {library}, {t} thread(s)")
            spec = {"task": "gemm", "library": library, "threads": t, "cases": cases,
                    "reps": settings["gemm_reps"], "block_s": settings["gemm_block_s"]}
            result = run_worker(spec, t)
            times[library] = result["times"]
            errors = result["errors"] or errors
            if library == "numpy":
                limiters.add(result["limiter"])
        for case in GEMM_CASES:
            if case[0] not in cases:
                continue
            *_, M, K, N = gemm_operands(case)
            t_cnn, t_np = times["cnn_core"][case[0]], times["numpy"][case[0]]
            flop = 2.0 * M * N * K
            big = flop > 100
            rows.append({
                "case": case[0], "role": case[5], "M": M, "K": K, "N": N, "threads": t,
                "cnn_core_s": t_cnn, "numpy_s": t_np,
                "cnn_core_gflops": flop / t_cnn / 1e9 if big else None,
                "numpy_gflops": flop / t_np / 1e9 if big else None,
                "speed_ratio": t_np / t_cnn, "max_rel_err": errors[case[0]]})
    contention = watch.shares()
    how = ("threadpoolctl and OPENBLAS_NUM_THREADS" if limiters == {"threadpoolctl"} else
           "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS (threadpoolctl is not installed)")
    notes = [f"each library and thread count timed in its own process; numpy's BLAS "
             f"threads set with {how}.",
             "kernels.gemm checks its arguments in Python on every call (its packing "
             "workspace is reused); the 1x1x1 row shows the fixed per-call cost of each "
             "library."]
    return {"rows": rows, "notes": notes, "contention": contention}


def print_gemm(result, settings):
    print(f"\n== 1. GEMM: cnn_core.kernels.gemm vs numpy float32 matmul "
          f"(median of {settings['gemm_reps']} blocks, outputs preallocated)")
    print("   M x K x N is op(A) (M, K) times op(B) (K, N); ratio > 1: cnn_core is faster\n")
    table = []
    for r in result["rows"]:
        table.append([r["case"], r["role"], r["threads"], fmt_time(r["cnn_core_s"]),
                      fmt_num(r["cnn_core_gflops"]), fmt_time(r["numpy_s"]),
                      fmt_num(r["numpy_gflops"]), fmt_ratio(r["speed_ratio"]),
                      f"{r['max_rel_err']:.1e}"])
    print_table(["case", "role", "thr", "cnn_core", "GFLOP/s", "numpy", "GFLOP/s",
                 "cnn/numpy", "max rel err"], table, n_left=2)
    for note in result["notes"]:
        print(f"  note: {note}")
    print(f"  during this section: {fmt_contention(result['contention'])}")


# ---- subprocess workers ----------------------------------------------------------------

def worker_env(n_threads):
    """Environment for a worker process limited to n_threads (set before any import)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(n_threads)
    multi = "true" if n_threads > 1 else "false"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={multi}"
                        f" intra_op_parallelism_threads={n_threads}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


class WorkerError(RuntimeError):
    """A worker process failed; the message holds the end of its stderr."""


def run_worker(spec, n_threads, timeout=3600):
    """Run `spec` in a fresh `python bench.py --worker` process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=worker_env(n_threads), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"timed out after {timeout} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    raise WorkerError(lines[-1] if lines else f"exit status {proc.returncode}, no output")


def blas_description():
    """The BLAS libraries loaded in this process, e.g. 'openblas 0.3.x (Haswell, pthreads),
    2 threads [numpy.libs]', from threadpoolctl; without it, numpy's build-time BLAS."""
    try:
        from threadpoolctl import threadpool_info
        libs = [f"{lib.get('internal_api')} {lib.get('version')} "
                f"({lib.get('architecture')}, {lib.get('threading_layer')}), "
                f"{lib.get('num_threads')} threads [{Path(lib.get('filepath', '')).parent.name}]"
                for lib in threadpool_info() if lib.get("user_api") == "blas"]
        if libs:
            return "; ".join(libs)
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # the layout of show_config differs between numpy versions
        return "unknown"


def peer_detail(peer, n_threads):
    """One line on how a peer ran (threads, backend), from inside its worker."""
    if peer == "cnn_core":
        from cnn_core import kernels
        return (f"kernel {kernels.get_kernel()}, OpenMP {kernels.openmp_enabled()}, "
                f"n_threads={n_threads}")
    if peer == "torch":
        import torch
        return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                f"MKL {torch.backends.mkl.is_available()}, "
                f"oneDNN {torch.backends.mkldnn.is_available()}")
    if peer == "jax":
        import jax
        return (f"jax {jax.__version__} on {jax.devices()[0].platform}, "
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    return f"BLAS {blas_description()}"


def plan_rows(epoch, n, batch_size, cap_s):
    """How many rows one timed epoch may use so that it takes at most about cap_s seconds.

    After one untimed batch (first-call costs), times epoch(rows) on growing prefixes (2,
    8, 32, ... batches) until one takes 0.25 s -- or, while the estimate for all n rows
    still exceeds cap_s, until one takes cap_s / 4, so that a single stalled probe cannot
    condemn a fast library.  Returns (rows, estimated seconds for all n rows): rows is n
    unless the estimate exceeds cap_s, then a multiple of batch_size scaled down to fit.
    """
    epoch(min(n, batch_size))
    rows = min(n, 2 * batch_size)
    while True:
        t0 = time.perf_counter()
        epoch(rows)
        elapsed = time.perf_counter() - t0
        estimate = elapsed * n / rows
        if rows >= n or (elapsed >= 0.25 and (estimate <= cap_s or elapsed >= cap_s / 4)):
            break
        rows = min(n, rows * 4)
    if estimate <= cap_s:
        return n, estimate
    fit = int(n * cap_s / estimate) // batch_size * batch_size
    return max(batch_size, min(n, fit)), estimate


def worker_train(spec):
    """Time epochs of one peer on one configuration (runs inside a worker process)."""
    import peers

    peer, sizes, batch, threads = spec["peer"], spec["sizes"], spec["batch"], spec["threads"]
    X, y = training_data(spec)
    epoch = peers.TRAINERS[peer](X, y, sizes, batch, threads, SEED)
    gc.collect()
    baseline = current_rss_mb()
    peak_reset = reset_peak_rss()
    n = len(X)
    cap = spec["budget_s"] / spec["min_reps"]
    if peer == "jax":
        rows, estimate = n, None  # every new row count would be a new compilation
    else:
        rows, estimate = plan_rows(epoch, n, batch, cap)
    warmup = None
    if rows == n:
        t0 = time.perf_counter()
        epoch(n)
        warmup = time.perf_counter() - t0
    times, loss = [], None
    while len(times) < spec["max_reps"]:
        t0 = time.perf_counter()
        loss = epoch(rows)
        times.append((time.perf_counter() - t0) * n / rows)
        spent = sum(times) * rows / n
        # min_reps epochs unless they overrun the budget; more while under half of it
        if spent >= spec["budget_s"] or (len(times) >= spec["min_reps"]
                                         and spent >= spec["budget_s"] / 2):
            break
    peak = peak_rss_mb()
    return {"peer": peer, "rows": n, "rows_timed": rows, "epoch_s": times,
            "median_s": statistics.median(times), "warmup_s": warmup,
            "estimate_s": estimate, "loss": loss, "baseline_mb": baseline,
            "peak_over_mb": None if baseline is None else peak - baseline,
            "peak_reset": peak_reset, "detail": peer_detail(peer, threads)}


def worker_predict(spec):
    """Time each prediction call of one peer (runs inside a worker process)."""
    import peers

    X, _ = load_images(spec.get("data"))
    X = peers.scaled_float32(tile_rows(X, PREDICT_ROWS))
    convert, funcs = peers.PREDICTORS[spec["peer"]](peers.mlp_weights(spec["sizes"], SEED),
                                                    spec["threads"])
    x1, X = convert(np.ascontiguousarray(X[:1])), convert(X)
    rows = []
    for name, f in funcs.items():
        one = per_call_median(f, x1, spec["calls"])
        f(X)
        batch = []
        for _ in range(spec["batch_reps"]):
            t0 = time.perf_counter()
            out = f(X)
            batch.append(time.perf_counter() - t0)
        out = np.asarray(out)
        labels = out.argmax(axis=1) if out.ndim == 2 else out
        rows.append({"name": name, "one_s": one, "batch_s": statistics.median(batch),
                     "labels": labels.astype(int).tolist()})
    return {"peer": spec["peer"], "rows": rows,
            "detail": peer_detail(spec["peer"], spec["threads"])}


def worker_memory(spec):
    """cnn_core's peak RSS during fit above the baseline taken just before the Network is
    built (after imports and the tiled data); runs inside a worker process."""
    import cnn_core

    X, y = training_data(spec)
    gc.collect()
    baseline = current_rss_mb()
    peak_reset = reset_peak_rss()
    peak_before = peak_rss_mb()
    net = cnn_core.Network(spec["sizes"], activation="relu", seed=SEED)

    def epoch(rows):
        net.fit(X[:rows], y[:rows], epochs=1, batch_size=spec["batch"], optimizer="sgd",
                learning_rate=0.01, momentum=0.9, shuffle=True, n_threads=spec["threads"])

    rows, _ = plan_rows(epoch, len(X), spec["batch"], spec["budget_s"])
    epoch(rows)
    peak = peak_rss_mb()
    return {"sizes": spec["sizes"], "batch": spec["batch"], "rows": len(X),
            "rows_fitted": rows, "data_mb": X.nbytes / 2**20, "baseline_mb": baseline,
            "peak_before_mb": peak_before, "peak_mb": peak, "peak_reset": peak_reset,
            "params_mb": sum(w.nbytes + b.nbytes for w, b in zip(net.weights, net.biases)) / 2**20,
            "over_mb": peak - baseline if baseline is not None else None}


WORKERS = {"train": worker_train, "predict": worker_predict, "memory": worker_memory,
           "gemm": worker_gemm}


def worker_main(spec):
    sys.path.insert(0, str(HERE))
    result = WORKERS[spec["task"]](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- section 2: training ---------------------------------------------------------------

def installed_peers(args):
    import peers

    chosen = [p for p in PEERS if p in args.peers]
    return [p for p in chosen if peers.available(p)], [p for p in chosen if not peers.available(p)]


def bench_train(args, settings):
    present, missing = installed_peers(args)
    configs = []
    for sizes, batch in settings["configs"]:
        entry = {"sizes": sizes, "batch": batch, "results": {}, "errors": {}}
        for peer in present:
            log(f"  train {peer} {config_name(sizes, batch)}")
            spec = {"task": "train", "peer": peer, "sizes": sizes, "batch": batch,
                    "threads": args.threads, "rows": TRAIN_ROWS, "data": args.data,
                    "min_reps": settings["train_min_reps"],
                    "max_reps": settings["train_max_reps"],
                    "budget_s": settings["train_budget_s"]}
            watch = CpuWatch()
            try:
                entry["results"][peer] = run_worker(spec, args.threads)
                entry["results"][peer]["contention"] = watch.shares()
            except WorkerError as exc:
                entry["errors"][peer] = str(exc)
        configs.append(entry)
    return {"configs": configs, "missing": missing, "threads": args.threads}


def print_train(result, settings):
    print(f"\n== 2. Training: seconds per epoch on {TRAIN_ROWS:,} MNIST-shaped rows "
          f"(SGD lr 0.01 momentum 0.9, relu, {result['threads']} threads)")
    print(f"   median of up to {settings['train_max_reps']} epochs after a warm-up; "
          "speedup = peer s/epoch / cnn_core s/epoch (> 1: cnn_core is faster)\n")
    details, flagged = {}, False
    for entry in result["configs"]:
        print(f"  {config_name(entry['sizes'], entry['batch'])}")
        base = entry["results"].get("cnn_core")
        table = []
        for peer, r in entry["results"].items():
            details[peer] = r["detail"]
            mark = ""
            if r["rows_timed"] < r["rows"]:
                mark, flagged = "*", True
            speedup = r["median_s"] / base["median_s"] if base and peer != "cnn_core" else None
            other = r["contention"]["other"]
            table.append([peer, f"{r['median_s']:.3f}{mark}", f"{min(r['epoch_s']):.3f}",
                          len(r["epoch_s"]), fmt_num(r["warmup_s"], 2), fmt_num(r["loss"], 3),
                          fmt_num(r["peak_over_mb"], 0),
                          "-" if other is None else f"{100 * other:.0f}%", fmt_ratio(speedup)])
        for peer, err in entry["errors"].items():
            table.append([peer, "failed", "", "", "", "", "", "", err[:60]])
        print_table(["peer", "s/epoch", "min", "runs", "warm-up s", "loss", "+MB peak",
                     "other CPU", "cnn_core speedup"], table, indent="    ")
        print()
    if flagged:
        print("  * too slow for the time budget: timed on a prefix of the rows and scaled "
              "to the full epoch (warm-up was the row-count probe).")
    print("  +MB peak: peak RSS above the RSS once data and model are prepared (peers "
          "train on a float32 copy, cnn_core on the uint8 pixels; copies are not counted;\n"
          "  for JAX it includes compiling the epoch).")
    print("  loss: mean training loss of the last timed epoch (sanity check, not a score).")
    print("  other CPU: share of the machine used by other processes meanwhile (> 5%: noisy).")
    for peer, detail in details.items():
        print(f"  {peer}: {detail}")
    for peer in result["missing"]:
        print(f"  {peer}: not installed, skipped")


# ---- section 3: prediction -------------------------------------------------------------

def bench_predict(args, settings):
    present, missing = installed_peers(args)
    results, errors = [], {}
    watch = CpuWatch()
    for peer in present:
        if peer not in ("cnn_core", "torch", "numpy"):
            continue
        log(f"  predict {peer}")
        spec = {"task": "predict", "peer": peer, "sizes": PREDICT_SIZES,
                "threads": args.threads, "calls": settings["predict_calls"],
                "batch_reps": settings["predict_batch_reps"], "data": args.data}
        try:
            results.append(run_worker(spec, args.threads))
        except WorkerError as exc:
            errors[peer] = str(exc)
    reference = None
    for r in results:
        for row in r["rows"]:
            if reference is None:
                reference = np.array(row["labels"])
            row["agreement"] = float(np.mean(np.array(row.pop("labels")) == reference))
    return {"peers": results, "errors": errors, "threads": args.threads,
            "contention": watch.shares(),
            "missing": [p for p in missing if p in ("cnn_core", "torch", "numpy")]}


def print_predict(result, settings):
    print(f"\n== 3. Inference, {'-'.join(map(str, PREDICT_SIZES))} relu, same weights "
          f"everywhere, {result['threads']} threads")
    print(f"   one sample: float32 (1, 784), median of {settings['predict_calls']} single "
          f"calls; batch: {PREDICT_ROWS:,} samples, median of "
          f"{settings['predict_batch_reps']} calls")
    print("   ratio = this row's time / cnn_core predict's time (> 1: cnn_core is faster)\n")
    rows = [row for r in result["peers"] for row in r["rows"]]
    base = next((row for row in rows if row["name"] == "cnn_core predict"), None)
    table = []
    for row in rows:
        table.append([row["name"], fmt_time(row["one_s"]),
                      fmt_ratio(row["one_s"] / base["one_s"]) if base else "-",
                      fmt_time(row["batch_s"]),
                      fmt_ratio(row["batch_s"] / base["batch_s"]) if base else "-",
                      f"{row['agreement']:.4f}"])
    for peer, err in result["errors"].items():
        table.append([peer, "failed", "", "", "", err[:60]])
    print_table(["call", "1 sample", "ratio", f"{PREDICT_ROWS:,} samples", "ratio",
                 "same labels"], table)
    print("  same labels: fraction of the 10,000 argmax labels equal to the first row's.")
    print(f"  during this section: {fmt_contention(result['contention'])}")
    for r in result["peers"]:
        print(f"  {r['peer']}: {r['detail']}")
    for peer in result["missing"]:
        print(f"  {peer}: not installed, skipped")


# ---- section 4: memory -----------------------------------------------------------------

def bench_memory(args, settings):
    rows, errors = [], {}
    for sizes, batch in settings["configs"]:
        log(f"  memory cnn_core {config_name(sizes, batch)}")
        spec = {"task": "memory", "sizes": sizes, "batch": batch, "threads": args.threads,
                "rows": TRAIN_ROWS, "data": args.data,
                "budget_s": settings["train_budget_s"] / settings["train_min_reps"]}
        try:
            rows.append(run_worker(spec, args.threads))
        except WorkerError as exc:
            errors[config_name(sizes, batch)] = str(exc)
    return {"rows": rows, "errors": errors, "target_mb": MEMORY_TARGET_MB}


def print_memory(result):
    print(f"\n== 4. Peak memory of cnn_core training on {TRAIN_ROWS:,} uint8 rows "
          f"(target: at most {result['target_mb']:.0f} MB above the baseline)")
    print("   baseline: RSS after importing numpy + cnn_core and tiling the data, before "
          "building the Network; peak: ru_maxrss after fit\n")
    table = []
    for r in result["rows"]:
        over = r["over_mb"]
        status = "-" if over is None else ("ok" if over <= result["target_mb"] else "OVER")
        partial = "" if r["rows_fitted"] == r["rows"] else f" ({r['rows_fitted']:,} rows*)"
        table.append([config_name(r["sizes"], r["batch"]) + partial,
                      fmt_num(r["data_mb"]), fmt_num(r["params_mb"]),
                      fmt_num(r["baseline_mb"]), fmt_num(r["peak_mb"]), fmt_num(over),
                      status])
    for name, err in result["errors"].items():
        table.append([name, "failed", "", "", "", err[:60], ""])
    print_table(["configuration", "data MB", "params MB", "baseline MB", "peak MB",
                 "peak - baseline", "target"], table)
    if any(r["rows_fitted"] < r["rows"] for r in result["rows"]):
        print("  * the epoch was too slow for the time budget and ran on a prefix of the "
              "rows (memory does not grow with the number of rows trained).")
    if result["rows"] and not result["rows"][0]["peak_reset"]:
        print("  note: the peak-RSS mark could not be reset, so the peak may include "
              "data loading; the figure is an upper bound.")


# ---- machine description ---------------------------------------------------------------

def cpu_description():
    """CPU model, core counts and the SIMD extensions that matter here."""
    model, cores = None, None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("Model name")
        if "Core(s) per socket" in fields and "Socket(s)" in fields:
            cores = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not model and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "asimd")
            if f in flags]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"model": model or platform.processor() or platform.machine(),
            "physical_cores": cores, "logical_cpus": os.cpu_count(),
            "usable_cpus": affinity, "simd": simd}


def package_versions():
    versions = {}
    for name in ("numpy", "cnn_core", "torch", "scikit-learn", "jax", "jaxlib",
                 "threadpoolctl"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info():
    import cnn_core

    return {"cpu": cpu_description(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": package_versions(),
            "cnn_core_info": cnn_core.info(),
            "cnn_core_location": str(Path(cnn_core.__file__).parent),
            "numpy_blas": blas_description(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def print_machine(m, args):
    cpu = m["cpu"]
    print("== Machine")
    print(f"  CPU:      {cpu['model']}; {cpu['physical_cores']} cores, "
          f"{cpu['logical_cpus']} logical CPUs ({cpu['usable_cpus']} usable); "
          f"SIMD: {' '.join(cpu['simd']) or '?'}")
    print(f"  system:   {m['platform']}, Python {m['python']}")
    if m["load_average"]:
        load = "{:.2f} {:.2f} {:.2f}".format(*m["load_average"])
        print(f"  load:     {load} (1/5/15 min) at start")
    print(f"  cnn_core: {m['cnn_core_info']} from {m['cnn_core_location']}")
    print(f"  numpy BLAS: {m['numpy_blas']}")
    if "avx512f" in cpu["simd"] and "(Haswell" in m["numpy_blas"]:
        print("  note:     this CPU has AVX-512 but OpenBLAS chose its AVX2 (Haswell) kernels; "
              "OPENBLAS_CORETYPE=SkylakeX\n            (set before the run) selects the "
              "AVX-512 ones, so numpy-based peers here are not at their best.")
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["versions"].items())
    print(f"  versions: {versions}")
    print(f"  run:      {' '.join(sys.argv[1:]) or '(defaults)'}; threads {args.threads}")


# ---- main ------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~1 min): fewer repetitions, fewer GEMM shapes, one "
                        "training configuration, short time budgets")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections to run: gemm,train,predict,memory")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for training, prediction and memory (default 2); GEMM "
                        "runs at 1 and this many")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated libraries for train/predict (default all: "
                        + ",".join(PEERS) + ")")
    p.add_argument("--data", default=None,
                   help="MNIST folder (default: ../shared/data/mnist-t10k-split beside the "
                        "checkout, else cnn_core's cache)")
    p.add_argument("--wait-idle", metavar="SECONDS", type=float, default=0.0,
                   help="first wait up to SECONDS for other processes to leave the CPUs "
                        "idle (default 0: start at once)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write all results to PATH as JSON (default: print only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in args.only if s not in SECTIONS]
        if bad:
            p.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
        args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
        bad = [s for s in args.peers if s not in PEERS]
        if bad:
            p.error(f"unknown peer(s) {bad}; choose from {list(PEERS)}")
        if args.threads < 1:
            p.error("--threads must be >= 1")
        if args.data is not None:
            args.data = str(Path(args.data).resolve())
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return 0
    sys.path.insert(0, str(HERE))
    settings = QUICK if args.quick else FULL
    if set(args.only) - {"gemm"}:
        try:
            load_images(args.data)
        except (OSError, ValueError) as exc:
            print(f"bench.py: cannot load MNIST ({exc}); pass --data DIR", file=sys.stderr)
            return 2
    if args.wait_idle > 0:
        wait_until_idle(args.wait_idle)
    started = time.perf_counter()
    results = {"machine": machine_info(), "args": vars(args), "settings": settings}
    print_machine(results["machine"], args)
    if "gemm" in args.only:
        log("GEMM ...")
        results["gemm"] = bench_gemm(args, settings)
        print_gemm(results["gemm"], settings)
    if "train" in args.only:
        log("training ...")
        results["train"] = bench_train(args, settings)
        print_train(results["train"], settings)
    if "predict" in args.only:
        log("prediction ...")
        results["predict"] = bench_predict(args, settings)
        print_predict(results["predict"], settings)
    if "memory" in args.only:
        log("memory ...")
        results["memory"] = bench_memory(args, settings)
        print_memory(results["memory"])
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    end_load = results["load_average_end"]
    print(f"\nTotal {results['seconds']:.0f} s" + (
        "; load average at end {:.2f} {:.2f} {:.2f}".format(*end_load) if end_load else ""))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        print(f"Results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
