#!/usr/bin/env python
"""Side-by-side benchmarks of cnn_core against its peers, in one run.

    python benchmarks/bench.py                  # everything (about 20 minutes)
    python benchmarks/bench.py --quick          # smoke run (under 3 minutes)
    python benchmarks/bench.py --load           # the same under a busy loop on one CPU
    python benchmarks/bench.py --only train,lenet --json results.json

Sections (see benchmarks/README.md for the method):

1. gemm     cnn_core.kernels.gemm vs numpy's float32 matmul (its BLAS), 1 and N threads.
2. train    seconds per MLP epoch on 60,000 MNIST rows, real pixels and dense standardised
            features, 1 and N threads, vs PyTorch eager and a jitted JAX epoch, and
            against the epoch's GEMM-bound limit.
3. twoproc  two cnn_core trainings with N threads each at once, vs each one alone.
4. lenet    LeNet-5: training epoch vs PyTorch and JAX, 10,000-image predict vs PyTorch.
5. predict  MLP one-sample latency and 10,000-sample throughput vs PyTorch, numpy and
            ONNX Runtime (on the file Network.to_onnx writes), 1 and N threads.
6. memory   cnn_core's peak RSS while training, above the loaded-data baseline.

Every measurement runs in a fresh subprocess per library, configuration and thread count,
so the thread pool of one library (OpenBLAS, XLA, ONNX Runtime), spinning idle after its
last call, never takes the cores another library is being timed on.  One-thread
processes are all pinned (taskset) to the same CPU.  With --load a busy loop runs on
another CPU during every measurement.  The targets are checked at the end.
"""
import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# the real MNIST images kept beside the project checkout (repo root /../shared/data)
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mnist-t10k-split"
RESULT_PREFIX = "BENCH-RESULT "
READY, GO, END = "BENCH-READY", "GO", "END"
EPOCH_PREFIX = "BENCH-EPOCH "
SECTIONS = ("gemm", "train", "twoproc", "lenet", "predict", "memory")
TRAIN_PEERS = ("cnn_core", "torch", "jax")
PREDICT_PEERS = ("cnn_core", "torch", "numpy", "onnxruntime")
PEERS = ("cnn_core", "torch", "jax", "numpy", "onnxruntime")
INPUTS = {"real": "real pixels (uint8)", "dense": "dense input (standardised float32)"}
TRAIN_ROWS = 60_000
PREDICT_ROWS = 10_000
PREDICT_SIZES = [784, 128, 10]
LENET = "lenet5"
LENET_BATCH = 64
MEMORY_TARGET_MB = 50.0
SEED = 0

# the CPUs: one-thread processes all run on the last usable one, the --load busy loop on
# the first (so it competes with multi-threaded runs, not with the one-thread rows)
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN_CPU = _CPUS[-1] if _CPUS else None
LOAD_CPU = _CPUS[0] if _CPUS else None
LOAD_PIDS = []   # processes of the --load busy loop (their CPU time is not "other")

# (label, A shape as stored, B shape as stored, trans_a, trans_b, what it is in training)
RATE_CASE = "1536x1536x1536"
GEMM_CASES = [
    ("1x784x128", (1, 784), (784, 128), False, False, "forward, 1 sample"),
    ("64x784x128", (64, 784), (784, 128), False, False, "forward, batch 64"),
    ("128x784x512", (128, 784), (784, 512), False, False, "forward, batch 128"),
    ("256x1024x1024", (256, 1024), (1024, 1024), False, False, "forward, batch 256"),
    ("A^T B 784x64x128", (64, 784), (64, 128), True, False, "dW = X^T dY"),
    ("A B^T 64x128x784", (64, 128), (784, 128), False, True, "dX = dY W^T"),
    (RATE_CASE, (1536, 1536), (1536, 1536), False, False, "large SGEMM (the rate)"),
    ("1x1x1", (1, 1), (1, 1), False, False, "per-call overhead"),
]
QUICK_GEMM = ("1x784x128", "64x784x128", "A^T B 784x64x128", "A B^T 64x128x784",
              RATE_CASE, "1x1x1")

# (layer sizes, batch size)
TRAIN_CONFIGS = [
    ([784, 128, 10], 64),
    ([784, 512, 256, 10], 128),
    ([784, 1024, 1024, 10], 256),
]

FULL = {"gemm_reps": 7, "gemm_block_s": 0.1, "rate_reps": 5, "train_min_reps": 3,
        "train_max_reps": 5, "train_budget_s": 60.0, "predict_calls": 2000,
        "predict_batch_reps": 20, "configs": TRAIN_CONFIGS,
        "gemm_cases": [c[0] for c in GEMM_CASES], "lenet_rows": 19_200,
        "twoproc_configs": TRAIN_CONFIGS[:2], "twoproc_epochs": 3}
QUICK = {"gemm_reps": 3, "gemm_block_s": 0.02, "rate_reps": 3, "train_min_reps": 1,
         "train_max_reps": 2, "train_budget_s": 4.0, "predict_calls": 300,
         "predict_batch_reps": 3, "configs": TRAIN_CONFIGS[:1],
         "gemm_cases": list(QUICK_GEMM), "lenet_rows": 3_200,
         "twoproc_configs": TRAIN_CONFIGS[:1], "twoproc_epochs": 2}

# the targets of the speed work (README.md, "Targets")
DENSE_TARGETS = {"jax": 1.1, "torch": 2.5, "limit": 1.25}
REAL_TARGETS = {"first": {"jax": 1.5, "torch": 4.0}, "other": {"jax": 1.3}}
LOAD_TARGET = 1.15        # cnn_core N threads / 1 thread under load, at most
TWOPROC_TARGET = 2.5      # together / alone, at most
LENET_TARGETS = {"jax": 1.5, "torch": 4.0, "predict_torch": 3.0}


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


def config_name(model, batch_size):
    import peers

    return f"{peers.model_name(model)} batch {batch_size}"


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
    CPUs busy with processes that are neither this one, nor its finished children, nor
    the --load busy loop; `steal` the share the hypervisor took.  Either above a few
    percent makes timings noisy.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import resource

        own = sum(getattr(resource.getrusage(who), f) for who in
                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        own += sum(process_cpu_seconds(pid) for pid in LOAD_PIDS)
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


def dense_features(X):
    """The pixels standardised per column, float32: (X / 255 - mean) / std, with std 1 for
    constant columns (MNIST's blank border), so almost every entry is nonzero."""
    Xf = X.astype(np.float32)
    Xf *= np.float32(1.0 / 255.0)
    mean = Xf.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = Xf.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std == 0] = 1.0
    Xf -= mean
    Xf /= std
    return Xf


def training_data(spec):
    """(X, y uint8 (rows,)) tiled from the real images: X uint8 pixels (rows, 784) for
    input "real", their standardised float32 features for input "dense"."""
    X, y = load_images(spec.get("data"))
    X, y = tile_rows(X, spec["rows"]), tile_rows(y, spec["rows"])
    return (dense_features(X) if spec.get("input") == "dense" else X), y


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
    """Median seconds of single calls f(x), each timed on its own, after a warm-up of at
    least calls // 10 calls and 1 s (a core that has been idle runs slower for the
    first half second or so)."""
    start = time.perf_counter()
    warm = 0
    while warm < max(10, calls // 10) or time.perf_counter() - start < 1.0:
        f(x)
        warm += 1
    samples = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        f(x)
        samples.append(clock() - t0)
    return statistics.median(samples)


def spread(times):
    """Run-to-run spread of repeated timings: (slowest - fastest) / median."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else None


def fmt_spread(value):
    return "-" if value is None else f"{100 * value:.0f}%"


# ---- processes: workers, pinning, the --load busy loop ---------------------------------

def process_cpu_seconds(pid):
    """User + system CPU seconds of a live process (Linux /proc; 0 where unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pinned(cmd, cpu):
    """(command, preexec_fn) running cmd on CPU `cpu` only: taskset where installed, else
    the same affinity set in the child before exec."""
    if cpu is None:
        return cmd, None
    taskset = shutil.which("taskset")
    if taskset:
        return [taskset, "-c", str(cpu)] + cmd, None
    return cmd, lambda: os.sched_setaffinity(0, {cpu})


class BusyLoad:
    """--load: a CPU-bound Python busy loop pinned to LOAD_CPU while the block runs."""

    def __init__(self, active):
        self.active, self.proc = active, None

    def __enter__(self):
        if self.active:
            cmd, preexec = pinned([sys.executable, "-c", "while True: pass"], LOAD_CPU)
            self.proc = subprocess.Popen(cmd, preexec_fn=preexec)
            LOAD_PIDS.append(self.proc.pid)
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            LOAD_PIDS.remove(self.proc.pid)


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


def start_worker(spec, n_threads):
    """Start `python bench.py --worker SPEC` (pinned to PIN_CPU for one thread)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    cmd, preexec = pinned(cmd, PIN_CPU if n_threads == 1 else None)
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=worker_env(n_threads), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True,
                            preexec_fn=preexec)
    proc.err_file = err
    return proc


def finish_worker(proc, timeout=3600):
    """Wait for a worker; returns its JSON result or raises WorkerError."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WorkerError(f"timed out after {timeout} s") from None
    finally:
        proc.err_file.seek(0)
        err = proc.err_file.read()
        proc.err_file.close()
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    raise WorkerError(lines[-1] if lines else f"exit status {proc.returncode}, no output")


def run_worker(spec, n_threads):
    """Run `spec` in a fresh worker process; returns its JSON result."""
    return finish_worker(start_worker(spec, n_threads))


def threads_list(args):
    return sorted({1, args.threads})


def installed(args, candidates):
    import peers

    chosen = [p for p in candidates if p in args.peers]
    return [p for p in chosen if peers.available(p)], [p for p in chosen if not peers.available(p)]


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


def gemm_rows(args, cases, reps, block_s):
    """Time `cases` with cnn_core and numpy at 1 and N threads, each library and thread
    count in its own process (a library's idle threads -- OpenBLAS keeps its workers
    spinning for a while after a call -- would otherwise take the other one's cores)."""
    rows, limiters, errors = [], set(), {}
    for t in threads_list(args):
        times = {}
        for library in ("cnn_core", "numpy"):
            log(f"  gemm {library}, {t} thread(s)")
            spec = {"task": "gemm", "library": library, "threads": t, "cases": cases,
                    "reps": reps, "block_s": block_s}
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
    return rows, limiters


def sgemm_rates(rows):
    """{threads: GFLOP/s} of the large SGEMM, the faster of cnn_core and numpy."""
    return {r["threads"]: max(r["cnn_core_gflops"], r["numpy_gflops"])
            for r in rows if r["case"] == RATE_CASE}


def bench_gemm(args, settings):
    watch = CpuWatch()
    rows, limiters = gemm_rows(args, settings["gemm_cases"], settings["gemm_reps"],
                               settings["gemm_block_s"])
    how = ("threadpoolctl and OPENBLAS_NUM_THREADS" if limiters == {"threadpoolctl"} else
           "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS (threadpoolctl is not installed)")
    notes = [f"each library and thread count timed in its own process; numpy's BLAS "
             f"threads set with {how}.",
             "kernels.gemm checks its arguments in Python on every call (its packing "
             "workspace is reused); the 1x1x1 row shows the fixed per-call cost of each "
             "library."]
    return {"rows": rows, "notes": notes, "contention": watch.shares()}


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


# ---- training workers ------------------------------------------------------------------

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


def peer_detail(peer, n_threads):
    """One line on how a peer ran (threads, backend), from inside its worker."""
    if peer == "cnn_core":
        from cnn_core import kernels
        return f"kernel {kernels.get_kernel()}, n_threads={n_threads}"
    if peer == "torch":
        import torch
        return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                f"MKL {torch.backends.mkl.is_available()}, "
                f"oneDNN {torch.backends.mkldnn.is_available()}")
    if peer == "jax":
        import jax
        return (f"jax {jax.__version__} on {jax.devices()[0].platform}, "
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    if peer == "onnxruntime":
        import onnxruntime
        return (f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, "
                f"intra_op_num_threads={n_threads}")
    return f"BLAS {blas_description()}"


def worker_train(spec):
    """Time epochs of one peer on one configuration (runs inside a worker process).

    With spec["sync"] (the two-process section) all rows are timed for a fixed number of
    epochs, after a warm-up epoch and a handshake: the worker prints READY and waits for
    GO on stdin, so that two workers start timing together.  With spec["rounds"] (the
    peers of one configuration in turn, see run_rounds) the worker prints READY after its
    warm-up, then times one epoch per GO, printing its time, until END.
    """
    import peers

    peer, model, batch, threads = spec["peer"], spec["model"], spec["batch"], spec["threads"]
    X, y = training_data(spec)
    epoch = peers.TRAINERS[peer](X, y, model, batch, threads, SEED)
    gc.collect()
    baseline = current_rss_mb()
    peak_reset = reset_peak_rss()
    n = len(X)
    most = min(n, spec.get("max_rows") or n)
    if spec.get("sync") or peer == "jax":   # for JAX every row count is a compilation
        rows = most
    else:
        rows, _ = plan_rows(epoch, most, batch, spec["budget_s"] / spec["min_reps"])
    warmup = None
    if rows == most:   # otherwise the probes of plan_rows were the warm-up
        t0 = time.perf_counter()
        epoch(rows)
        warmup = time.perf_counter() - t0
    rounds = spec.get("rounds")
    if spec.get("sync") or rounds:
        print(READY, flush=True)
    if spec.get("sync"):
        sys.stdin.readline()
    times, loss = [], None
    started = time.perf_counter()
    while rounds or len(times) < spec["max_reps"]:   # rounds: until END
        if rounds and sys.stdin.readline().strip() != GO:
            break
        t0 = time.perf_counter()
        loss = epoch(rows)
        times.append((time.perf_counter() - t0) * n / rows)
        spent = time.perf_counter() - started
        if rounds:
            print(EPOCH_PREFIX + json.dumps(times[-1]), flush=True)
            continue
        # min_reps epochs unless they overrun the budget; more while under half of it
        if spec.get("sync"):
            continue
        if spent >= spec["budget_s"] or (len(times) >= spec["min_reps"]
                                         and spent >= spec["budget_s"] / 2):
            break
    peak = peak_rss_mb()
    return {"peer": peer, "rows": n, "rows_timed": rows, "epoch_s": times,
            "median_s": statistics.median(times), "spread": spread(times),
            "total_s": time.perf_counter() - started, "warmup_s": warmup,
            "loss": loss, "baseline_mb": baseline,
            "peak_over_mb": None if baseline is None else peak - baseline,
            "peak_reset": peak_reset, "detail": peer_detail(peer, threads)}


def train_spec(args, settings, peer, model, batch, kind, threads, **extra):
    spec = {"task": "train", "peer": peer, "model": model, "batch": batch, "input": kind,
            "threads": threads, "rows": TRAIN_ROWS, "data": args.data,
            "min_reps": settings["train_min_reps"], "max_reps": settings["train_max_reps"],
            "budget_s": settings["train_budget_s"]}
    spec.update(extra)
    return spec


def read_line(proc, prefix):
    """The worker's next stdout line that starts with prefix (None at its end)."""
    while True:
        line = proc.stdout.readline()
        if not line or line.startswith(prefix):
            return line or None


def run_rounds(specs, threads):
    """({peer: result}, {peer: error}) for the peers of one configuration, timed in turn.

    Each worker loads its data and warms up alone (the others wait on their stdin), then
    every round runs one epoch of each peer, one after another, so that a slow or busy
    minute of a shared machine falls on all peers alike instead of on whichever ran
    then.  Rounds stop at max_reps, or after min_reps once they have taken half the
    peers' budgets together (all of it: stop).  Every result gets the contention of the
    whole configuration.
    """
    procs, results, errors = {}, {}, {}
    for spec in specs:
        peer = spec["peer"]
        log(f"  train {peer} {config_name(spec['model'], spec['batch'])} {spec['input']}, "
            f"{threads} thread(s): setup")
        proc = start_worker(dict(spec, rounds=True), threads)
        if read_line(proc, READY) is None:
            try:
                finish_worker(proc)
                errors[peer] = "no READY from the worker"
            except WorkerError as exc:
                errors[peer] = str(exc)
            continue
        procs[peer] = proc
    watch = CpuWatch()
    budget = sum(spec["budget_s"] for spec in specs)
    started = time.perf_counter()
    for done in range(1, max(spec["max_reps"] for spec in specs) + 1):
        for peer, proc in list(procs.items()):
            try:
                proc.stdin.write(GO + "\n")
                proc.stdin.flush()
                ok = read_line(proc, EPOCH_PREFIX) is not None
            except OSError:
                ok = False
            if not ok:   # the worker died: its error is in finish_worker's
                del procs[peer]
                try:
                    results[peer] = finish_worker(proc)
                except WorkerError as exc:
                    errors[peer] = str(exc)
        spent = time.perf_counter() - started
        log(f"    round {done}: {spent:.0f} s")
        if spent >= budget or (done >= min(s["min_reps"] for s in specs) and
                               spent >= budget / 2):
            break
    for peer, proc in procs.items():
        try:
            proc.stdin.write(END + "\n")
            proc.stdin.flush()
        except OSError:
            pass
        try:
            results[peer] = finish_worker(proc)
        except WorkerError as exc:
            errors[peer] = str(exc)
    contention = watch.shares()
    for result in results.values():
        result["contention"] = contention
    return results, errors


# ---- section 2: MLP training -----------------------------------------------------------

def mlp_epoch_flops(sizes, rows):
    """Floating-point operations of one training epoch's GEMMs: forward Y = XW and
    gradient dW = X^T dY for every layer, dX = dY W^T for all but the first (the input
    needs no gradient); 2 flops per multiply-add."""
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2.0 * rows * (3 * sum(macs) - macs[0])


def bench_train(args, settings):
    present, missing = installed(args, TRAIN_PEERS)
    log("  large SGEMM rate (for the GEMM-bound limit)")
    watch = CpuWatch()
    rate_rows, _ = gemm_rows(args, [RATE_CASE], settings["rate_reps"], 0.1)
    rates = sgemm_rates(rate_rows)
    entries = []
    for sizes, batch in settings["configs"]:
        for kind in INPUTS:
            for t in threads_list(args):
                specs = [train_spec(args, settings, peer, sizes, batch, kind, t)
                         for peer in present]
                results, errors = run_rounds(specs, t)
                entry = {"sizes": sizes, "batch": batch, "input": kind, "threads": t,
                         "results": results, "errors": errors}
                flops = mlp_epoch_flops(sizes, TRAIN_ROWS)
                entry["flops"] = flops
                entry["limit_s"] = flops / (rates[t] * 1e9)
                base = entry["results"].get("cnn_core")
                entry["speedup"] = {p: r["median_s"] / base["median_s"]
                                    for p, r in entry["results"].items()
                                    if base and p != "cnn_core"}
                entry["over_limit"] = base["median_s"] / entry["limit_s"] if base else None
                entries.append(entry)
    return {"entries": entries, "rates_gflops": rates, "rate_rows": rate_rows,
            "missing": missing, "peers": present, "contention": watch.shares()}


def print_train(result, settings, args):
    under = " under --load" if args.load else ""
    print(f"\n== 2. MLP training{under}: seconds per epoch on {TRAIN_ROWS:,} MNIST rows "
          f"(SGD lr 0.01 momentum 0.9, relu, softmax cross-entropy)")
    print(f"   median of up to {settings['train_max_reps']} epochs after a warm-up, the peers "
          "timed in turn; spread (max - min) / median; peer/cnn > 1: cnn_core is faster;")
    rates = ", ".join(f"{t} thread(s) {g:.1f}" for t, g in sorted(result["rates_gflops"].items()))
    print(f"   GEMM limit = the epoch's GEMM flops / the large-SGEMM rate measured now "
          f"({RATE_CASE}, faster of cnn_core and numpy: {rates} GFLOP/s)\n")
    peers_shown = result["peers"]
    details, flagged = {}, False
    groups = {}
    for e in result["entries"]:
        groups.setdefault((tuple(e["sizes"]), e["batch"], e["input"]), []).append(e)
    for (sizes, batch, kind), entries in groups.items():
        print(f"  {config_name(list(sizes), batch)}, {INPUTS[kind]}, "
              f"{entries[0]['flops'] / 1e9:.1f} GFLOP per epoch")
        table = []
        for e in entries:
            row = [e["threads"]]
            for peer in peers_shown:
                r = e["results"].get(peer)
                if r is None:
                    row += ["failed" if peer in e["errors"] else "-", ""]
                    continue
                details[peer] = r["detail"]
                mark = ""
                if r["rows_timed"] < r["rows"]:
                    mark, flagged = "*", True
                row += [f"{r['median_s']:.3f}{mark}", fmt_spread(r["spread"])]
            row += [fmt_ratio(e["speedup"].get(p)) for p in peers_shown if p != "cnn_core"]
            row += [f"{e['limit_s']:.3f}", fmt_ratio(e["over_limit"])]
            others = [r["contention"]["other"] for r in e["results"].values()
                      if r["contention"]["other"] is not None]
            row.append(f"{100 * max(others):.0f}%" if others else "-")
            table.append(row)
        headers = ["thr"]
        for peer in peers_shown:
            headers += [f"{peer} s", "spread"]
        headers += [f"{p}/cnn" for p in peers_shown if p != "cnn_core"]
        headers += ["limit s", "cnn/limit", "other CPU"]
        print_table(headers, table, indent="    ")
        for e in entries:
            for peer, err in e["errors"].items():
                print(f"    {e['threads']} thread(s) {peer} failed: {err[:100]}")
            losses = ", ".join(f"{p} {r['loss']:.3f}" for p, r in e["results"].items())
            print(f"    {e['threads']} thread(s) last-epoch loss: {losses}")
        print()
    if flagged:
        print("  * too slow for the time budget: timed on a prefix of the rows and scaled "
              "to the full epoch.")
    print(f"  one-thread rows: every library pinned to CPU {PIN_CPU}"
          + (f"; the --load busy loop runs on CPU {LOAD_CPU}" if args.load else "") + ".")
    print("  other CPU: largest share of the machine used by other processes during a row "
          "(> 5%: noisy).")
    for peer, detail in details.items():
        print(f"  {peer}: {detail}")
    for peer in result["missing"]:
        print(f"  {peer}: not installed, skipped")


# ---- section 3: two trainings at once --------------------------------------------------

def run_together(specs, threads):
    """Start the workers of `specs`, wait for all to be READY, send GO; their results."""
    procs = [start_worker(spec, threads) for spec in specs]
    try:
        for proc in procs:
            while True:
                line = proc.stdout.readline()
                if not line or line.strip() == READY:
                    break
        for proc in procs:
            proc.stdin.write(GO + "\n")
            proc.stdin.flush()
    except OSError:
        pass
    return [finish_worker(proc) for proc in procs]


def bench_twoproc(args, settings):
    t = args.threads
    rows, errors = [], {}
    for sizes, batch in settings["twoproc_configs"]:
        name = config_name(sizes, batch)
        spec = train_spec(args, settings, "cnn_core", sizes, batch, "dense", t, sync=True,
                          max_reps=settings["twoproc_epochs"])
        log(f"  two processes: {name} alone, then two at once")
        try:
            alone = run_together([spec], t)[0]
            pair = run_together([spec, spec], t)
        except WorkerError as exc:
            errors[name] = str(exc)
            continue
        rows.append({"sizes": sizes, "batch": batch, "threads": t,
                     "epochs": settings["twoproc_epochs"], "alone_s": alone["total_s"],
                     "together_s": [r["total_s"] for r in pair],
                     "ratios": [r["total_s"] / alone["total_s"] for r in pair]})
    return {"rows": rows, "errors": errors, "threads": t}


def print_twoproc(result, args):
    under = " under --load" if args.load else ""
    print(f"\n== 3. Two cnn_core trainings at once{under}, n_threads={result['threads']} "
          "each, dense input (seconds for the same epochs)")
    print("   both start timing together (after a warm-up epoch each); ratio = time with the "
          "other running / time alone\n")
    table = []
    for r in result["rows"]:
        table.append([config_name(r["sizes"], r["batch"]), r["epochs"], f"{r['alone_s']:.2f}",
                      " / ".join(f"{s:.2f}" for s in r["together_s"]),
                      " / ".join(fmt_ratio(x) for x in r["ratios"])])
    for name, err in result["errors"].items():
        table.append([name, "failed", err[:60], "", ""])
    print_table(["configuration", "epochs", "alone s", "together s (each)", "ratio (each)"],
                table)


# ---- section 4: LeNet-5 ----------------------------------------------------------------

def bench_lenet(args, settings):
    present, missing = installed(args, TRAIN_PEERS)
    entries = []
    for t in threads_list(args):
        specs = [train_spec(args, settings, peer, LENET, LENET_BATCH, "real", t,
                            max_rows=settings["lenet_rows"]) for peer in present]
        results, errors = run_rounds(specs, t)
        entry = {"threads": t, "results": results, "errors": errors, "predict": {}}
        base = entry["results"].get("cnn_core")
        entry["speedup"] = {p: r["median_s"] / base["median_s"]
                            for p, r in entry["results"].items() if base and p != "cnn_core"}
        for peer in [p for p in present if p in ("cnn_core", "torch")]:
            log(f"  predict LeNet-5 {peer}, {t} thread(s)")
            spec = {"task": "predict", "peer": peer, "model": LENET, "threads": t,
                    "calls": settings["predict_calls"] // 4,
                    "batch_reps": settings["predict_batch_reps"], "data": args.data}
            try:
                entry["predict"][peer] = run_worker(spec, t)
            except WorkerError as exc:
                entry["errors"][f"{peer} predict"] = str(exc)
        agree_labels(entry["predict"].values())
        entries.append(entry)
    return {"entries": entries, "missing": missing, "peers": present}


def print_lenet(result, settings, args):
    under = " under --load" if args.load else ""
    print(f"\n== 4. LeNet-5{under} (conv 6@5x5 same, maxpool 2, conv 16@5x5, maxpool 2, "
          f"dense 120-84-10, relu), real pixels, batch {LENET_BATCH}, SGD momentum 0.9")
    print(f"   training: seconds per epoch on {TRAIN_ROWS:,} rows (median, spread); "
          f"predict: {PREDICT_ROWS:,} float32 images\n")
    table = []
    for e in result["entries"]:
        row = [e["threads"]]
        for peer in result["peers"]:
            r = e["results"].get(peer)
            mark = "*" if r and r["rows_timed"] < r["rows"] else ""
            row += [f"{r['median_s']:.3f}{mark}" if r else "failed",
                    fmt_spread(r["spread"]) if r else ""]
        row += [fmt_ratio(e["speedup"].get(p)) for p in result["peers"] if p != "cnn_core"]
        table.append(row)
    headers = ["thr"]
    for peer in result["peers"]:
        headers += [f"{peer} s", "spread"]
    headers += [f"{p}/cnn" for p in result["peers"] if p != "cnn_core"]
    print("  training epoch")
    print_table(headers, table, indent="    ")
    print("  predict")
    table = []
    for e in result["entries"]:
        rows = [row for r in e["predict"].values() for row in r["rows"]]
        base = next((row for row in rows if row["name"] == "cnn_core predict"), None)
        for row in rows:
            table.append([e["threads"], row["name"], fmt_time(row["one_s"]),
                          fmt_time(row["batch_s"]),
                          fmt_ratio(row["batch_s"] / base["batch_s"]) if base else "-",
                          f"{row['agreement']:.4f}"])
    print_table(["thr", "call", "1 image", f"{PREDICT_ROWS:,} images", "ratio", "same labels"],
                table, indent="    ", n_left=2)
    for e in result["entries"]:
        for name, err in e["errors"].items():
            print(f"  {e['threads']} thread(s) {name} failed: {err[:100]}")
    if any(r["rows_timed"] < r["rows"] for e in result["entries"]
           for r in e["results"].values()):
        print("  * timed on a prefix of the rows and scaled to the full epoch.")


# ---- section 5: MLP inference ----------------------------------------------------------

def worker_predict(spec):
    """Time each prediction call of one peer (runs inside a worker process)."""
    import peers

    model = spec["model"]
    X, _ = load_images(spec.get("data"))
    X = peers.as_float32(tile_rows(X, PREDICT_ROWS))
    convert, funcs = peers.PREDICTORS[spec["peer"]](model, peers.model_weights(model, SEED),
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
                     "batch_spread": spread(batch), "labels": labels.astype(int).tolist()})
    return {"peer": spec["peer"], "rows": rows,
            "detail": peer_detail(spec["peer"], spec["threads"])}


def agree_labels(results):
    """Replace each row's labels by the fraction equal to the first row's."""
    reference = None
    for r in results:
        for row in r["rows"]:
            if reference is None:
                reference = np.array(row["labels"])
            row["agreement"] = float(np.mean(np.array(row.pop("labels")) == reference))


def bench_predict(args, settings):
    present, missing = installed(args, PREDICT_PEERS)
    entries = []
    watch = CpuWatch()
    for t in threads_list(args):
        results, errors = [], {}
        for peer in present:
            log(f"  predict {peer}, {t} thread(s)")
            spec = {"task": "predict", "peer": peer, "model": PREDICT_SIZES, "threads": t,
                    "calls": settings["predict_calls"],
                    "batch_reps": settings["predict_batch_reps"], "data": args.data}
            try:
                results.append(run_worker(spec, t))
            except WorkerError as exc:
                errors[peer] = str(exc)
        agree_labels(results)
        entries.append({"threads": t, "peers": results, "errors": errors})
    return {"entries": entries, "missing": missing, "contention": watch.shares()}


def print_predict(result, settings, args):
    under = " under --load" if args.load else ""
    print(f"\n== 5. MLP inference{under}, {'-'.join(map(str, PREDICT_SIZES))} relu, same "
          "weights everywhere")
    print(f"   one sample: float32 (1, 784), median of {settings['predict_calls']} single "
          f"calls; batch: {PREDICT_ROWS:,} samples, median of "
          f"{settings['predict_batch_reps']} calls")
    print("   ratio = this row's time / cnn_core predict's time (> 1: cnn_core is faster)\n")
    table, details = [], {}
    for e in result["entries"]:
        rows = [row for r in e["peers"] for row in r["rows"]]
        base = next((row for row in rows if row["name"] == "cnn_core predict"), None)
        for row in rows:
            table.append([e["threads"], row["name"], fmt_time(row["one_s"]),
                          fmt_ratio(row["one_s"] / base["one_s"]) if base else "-",
                          fmt_time(row["batch_s"]), fmt_spread(row["batch_spread"]),
                          fmt_ratio(row["batch_s"] / base["batch_s"]) if base else "-",
                          f"{row['agreement']:.4f}"])
        for peer, err in e["errors"].items():
            table.append([e["threads"], peer, "failed", "", "", "", "", err[:60]])
        details.update({r["peer"]: r["detail"] for r in e["peers"]})
    print_table(["thr", "call", "1 sample", "ratio", f"{PREDICT_ROWS:,} samples", "spread",
                 "ratio", "same labels"], table, n_left=2)
    print("  same labels: fraction of the 10,000 argmax labels equal to the first row's.")
    print(f"  during this section: {fmt_contention(result['contention'])}")
    for peer, detail in details.items():
        print(f"  {peer}: {detail}")
    for peer in result["missing"]:
        print(f"  {peer}: not installed, skipped")


# ---- section 6: memory -----------------------------------------------------------------

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
    print(f"\n== 6. Peak memory of cnn_core training on {TRAIN_ROWS:,} uint8 rows "
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


WORKERS = {"train": worker_train, "predict": worker_predict, "memory": worker_memory,
           "gemm": worker_gemm}


def worker_main(spec):
    sys.path.insert(0, str(HERE))
    result = WORKERS[spec["task"]](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- the targets -----------------------------------------------------------------------

def check_targets(results, args):
    """[{"target", "value", "ok"}]: every target the run has figures for.  Without --load
    the plain targets; with --load the targets under load."""
    checks = []

    def add(text, value, ok):
        checks.append({"target": text, "value": value, "ok": bool(ok)})

    train = results.get("train", {}).get("entries", [])
    if not args.load:
        first = [784, 128, 10]
        for e in train:
            where = f"{config_name(e['sizes'], e['batch'])} {e['input']} {e['threads']}thr"
            if e["input"] == "dense":
                need = DENSE_TARGETS
                if e["over_limit"] is not None:
                    add(f"{where}: cnn_core / GEMM limit <= {need['limit']}",
                        e["over_limit"], e["over_limit"] <= need["limit"])
            else:
                need = REAL_TARGETS["first" if e["sizes"] == first else "other"]
            for peer, x in e["speedup"].items():
                if peer in need:
                    add(f"{where}: {peer}/cnn_core >= {need[peer]}", x, x >= need[peer])
        for r in results.get("twoproc", {}).get("rows", []):
            where = f"two processes {config_name(r['sizes'], r['batch'])}"
            add(f"{where}: together / alone <= {TWOPROC_TARGET}", max(r["ratios"]),
                max(r["ratios"]) <= TWOPROC_TARGET)
        for e in results.get("lenet", {}).get("entries", []):
            where = f"LeNet-5 {e['threads']}thr"
            for peer, x in e["speedup"].items():
                add(f"{where} training: {peer}/cnn_core >= {LENET_TARGETS[peer]}", x,
                    x >= LENET_TARGETS[peer])
            rows = {row["name"]: row for r in e["predict"].values() for row in r["rows"]}
            if "cnn_core predict" in rows and "torch no_grad model(x)" in rows:
                x = rows["torch no_grad model(x)"]["batch_s"] / rows["cnn_core predict"]["batch_s"]
                need = LENET_TARGETS["predict_torch"]
                add(f"{where} predict 10k: torch no_grad/cnn_core >= {need}", x, x >= need)
        for e in results.get("predict", {}).get("entries", []):
            rows = {row["name"]: row for r in e["peers"] for row in r["rows"]}
            if "cnn_core predict" in rows and "onnxruntime run (label)" in rows:
                cnn, ort = rows["cnn_core predict"], rows["onnxruntime run (label)"]
                for key, what in (("one_s", "1 sample"), ("batch_s", "10k samples")):
                    x = ort[key] / cnn[key]
                    add(f"MLP predict {what} {e['threads']}thr: onnxruntime/cnn_core > 1", x,
                        x > 1)
    else:
        by_key = {(tuple(e["sizes"]), e["batch"], e["input"], e["threads"]): e for e in train}
        for (sizes, batch, kind, t), e in by_key.items():
            where = f"{config_name(list(sizes), batch)} {kind} {t}thr under load"
            for peer, x in e["speedup"].items():
                add(f"{where}: {peer}/cnn_core > 1", x, x > 1)
            one = by_key.get((sizes, batch, kind, 1))
            if t > 1 and one and "cnn_core" in e["results"] and "cnn_core" in one["results"]:
                x = e["results"]["cnn_core"]["median_s"] / one["results"]["cnn_core"]["median_s"]
                add(f"{config_name(list(sizes), batch)} {kind} under load: cnn_core {t}thr / "
                    f"1thr <= {LOAD_TARGET}", x, x <= LOAD_TARGET)
    return checks


def print_targets(checks, args):
    print(f"\n== Targets{' under --load' if args.load else ''} (value, and whether it is met)\n")
    if not checks:
        print("  (no section with a target was run)")
        return
    print_table(["target", "value", ""],
                [[c["target"], f"{c['value']:.2f}", "ok" if c["ok"] else "MISSED"]
                 for c in checks])
    missed = sum(not c["ok"] for c in checks)
    print(f"\n  {len(checks) - missed} of {len(checks)} met")


# ---- machine description ---------------------------------------------------------------

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
    return {"model": model or platform.processor() or platform.machine(),
            "physical_cores": cores, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(_CPUS) or None, "simd": simd}


def package_versions():
    versions = {}
    for name in ("numpy", "cnn_core", "torch", "jax", "jaxlib", "onnxruntime",
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
            "numpy_blas": blas_description(), "pin_cpu": PIN_CPU, "load_cpu": LOAD_CPU,
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
    print(f"  run:      {' '.join(sys.argv[1:]) or '(defaults)'}; threads 1 (pinned to CPU "
          f"{PIN_CPU}) and {args.threads}"
          + (f"; busy loop on CPU {LOAD_CPU} throughout" if args.load else ""))


# ---- main ------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (under 3 min): fewer repetitions, fewer GEMM shapes, "
                        "one training configuration, short time budgets")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections to run: " + ",".join(SECTIONS))
    p.add_argument("--threads", type=int, default=2,
                   help="the multi-threaded setting (default 2); every section also runs "
                        "one thread, except twoproc and memory")
    p.add_argument("--load", action="store_true",
                   help=f"run a CPU-bound busy loop on CPU {LOAD_CPU} during every "
                        "measurement (peers alike) and check the targets under load")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated libraries (default all: " + ",".join(PEERS) + ")")
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
        if args.threads < 2:
            p.error("--threads must be >= 2 (one thread is always measured too)")
        if args.data is not None:
            args.data = str(Path(args.data).resolve())
    return args


SECTION_RUNS = {  # section -> (title, bench, print)
    "gemm": ("GEMM", bench_gemm, lambda r, s, a: print_gemm(r, s)),
    "train": ("MLP training", bench_train, print_train),
    "twoproc": ("two processes", bench_twoproc, lambda r, s, a: print_twoproc(r, a)),
    "lenet": ("LeNet-5", bench_lenet, print_lenet),
    "predict": ("MLP inference", bench_predict, print_predict),
    "memory": ("memory", bench_memory, lambda r, s, a: print_memory(r)),
}


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
    with BusyLoad(args.load):
        for section in SECTIONS:
            if section not in args.only:
                continue
            title, bench, show = SECTION_RUNS[section]
            log(f"{title} ...")
            results[section] = bench(args, settings)
            show(results[section], settings, args)
    results["targets"] = check_targets(results, args)
    print_targets(results["targets"], args)
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
