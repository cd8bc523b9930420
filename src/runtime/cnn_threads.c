/* cnn_threads.c -- the thread pool behind every threaded kernel, and the default
   thread count.

   cnn_parallel_for hands out the tasks of one loop to the calling thread and up to
   n_threads - 1 pool workers, one task at a time from a shared counter.  Nothing waits
   on a partner except the caller at the end, and only for tasks a worker has already
   claimed: a worker that is descheduled, or wakes late, simply claims fewer tasks.
   Waiting is bounded spinning (the gaps between the loops of one training step are
   shorter than a wake-up) and then sleeping on a condition variable, so a waiting
   thread gives its core back instead of holding it for a time slice.

   Which thread runs a task never changes what the task computes (tasks only get a
   thread index to pick their scratch space), so results do not depend on n_threads.
   A call made while the pool is busy (another caller, or from inside a task) runs its
   tasks on the calling thread. */
#if !defined(_WIN32) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE 1 /* sched_getaffinity, CPU_COUNT */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cnn_core.h"
#include "cnn_internal.h"

#if defined(_WIN32)
#include <windows.h>
#include <process.h>
#else
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#endif

/* ---- platform layer: mutex, condition variable, thread, clock, atomics ---------- */

#if defined(_WIN32)
typedef SRWLOCK cnn_mutex;
typedef CONDITION_VARIABLE cnn_cond;
static void mutex_init(cnn_mutex *m) { InitializeSRWLock(m); }
static void mutex_lock(cnn_mutex *m) { AcquireSRWLockExclusive(m); }
static void mutex_unlock(cnn_mutex *m) { ReleaseSRWLockExclusive(m); }
static void cond_init(cnn_cond *c) { InitializeConditionVariable(c); }
static void cond_wait(cnn_cond *c, cnn_mutex *m) { SleepConditionVariableSRW(c, m, INFINITE, 0); }
static void cond_broadcast(cnn_cond *c) { WakeAllConditionVariable(c); }
static int64_t now_ns(void)
{
    static LARGE_INTEGER freq;
    LARGE_INTEGER t;
    if (!freq.QuadPart)
        QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&t);
    return (int64_t)((double)t.QuadPart * 1e9 / (double)freq.QuadPart);
}
#define atomic_load_acq(p) InterlockedCompareExchange64((volatile LONG64 *)(p), 0, 0)
#define atomic_store_rel(p, v) InterlockedExchange64((volatile LONG64 *)(p), (LONG64)(v))
#define atomic_add(p, v) (InterlockedExchangeAdd64((volatile LONG64 *)(p), (LONG64)(v)) + (v))
#define atomic_cas(p, expected, v) \
    (InterlockedCompareExchange64((volatile LONG64 *)(p), (LONG64)(v), (LONG64)(expected)) == \
     (LONG64)(expected))
#define load_relaxed(p) (*(p))
#define store_relaxed(p, v) (*(p) = (v))
#define fence_acq() MemoryBarrier()
#define fence_rel() MemoryBarrier()
#define cpu_relax() YieldProcessor()
#else
typedef pthread_mutex_t cnn_mutex;
typedef pthread_cond_t cnn_cond;
static void mutex_init(cnn_mutex *m) { pthread_mutex_init(m, NULL); }
static void mutex_lock(cnn_mutex *m) { pthread_mutex_lock(m); }
static void mutex_unlock(cnn_mutex *m) { pthread_mutex_unlock(m); }
static void cond_init(cnn_cond *c) { pthread_cond_init(c, NULL); }
static void cond_wait(cnn_cond *c, cnn_mutex *m) { pthread_cond_wait(c, m); }
static void cond_broadcast(cnn_cond *c) { pthread_cond_broadcast(c); }
static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
/* Every access below is sequentially consistent unless it says otherwise. */
#define atomic_load_acq(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define atomic_store_rel(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define atomic_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
static int atomic_cas(int64_t *p, int64_t expected, int64_t v)
{
    return __atomic_compare_exchange_n(p, &expected, v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define fence_acq() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define fence_rel() __atomic_thread_fence(__ATOMIC_RELEASE)
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif
#endif

/* How long a worker spins for the next loop before it sleeps, and how long the caller
   spins for claimed tasks to finish before it sleeps (nanoseconds). */
#define CNN_WORKER_SPIN_NS 50000
#define CNN_CALLER_SPIN_NS 20000
/* Most workers the pool starts, beside the caller. */
#define CNN_POOL_MAX (CNN_MAX_THREADS - 1)
/* A claim word whose generation is no job's: set while a job's fields are rewritten. */
#define CLAIM_CLOSED ((int64_t)0x7fffffff << 32)

/* The pool.  A job's claim word holds its generation (high 32 bits) and the next task to
   hand out (low 32 bits), so a worker still holding an old job's fields can never claim a
   task of a newer one: its compare-and-swap expects the old generation. */
typedef struct pool {
    int64_t claim;           /* generation << 32 | next task */
    int64_t done;            /* tasks of the current job finished */
    int64_t gen;             /* generation of the published job (0: none yet) */
    int64_t n_tasks;         /* the current job */
    int64_t n_threads;
    cnn_task_fn fn;
    void *ctx;
    int64_t busy;            /* 1 while a caller owns the pool */
    int64_t sleepers;        /* workers asleep on `work` */
    int64_t caller_asleep;   /* 1 while the caller sleeps on `finished` */
    int64_t n_workers;
    cnn_mutex lock;
    cnn_cond work, finished;
    int ready;
} pool;

static pool the_pool;

/* Claim and run tasks of job `gen` as thread `thread` until none is left. */
static void run_tasks(pool *p, int64_t gen, cnn_task_fn fn, void *ctx, int64_t n, int thread)
{
    /* tasks of job gen -> run, each counted in p->done */
    for (;;) {
        const int64_t v = atomic_load_acq(&p->claim);
        if ((v >> 32) != gen || (v & 0xffffffff) >= n)
            return;
        if (!atomic_cas(&p->claim, v, v + 1))
            continue;
        fn(ctx, v & 0xffffffff, thread);
        if (atomic_add(&p->done, 1) == n && atomic_load_acq(&p->caller_asleep)) {
            mutex_lock(&p->lock);
            cond_broadcast(&p->finished);
            mutex_unlock(&p->lock);
        }
    }
}

/* A worker: wait for each new job (spin, then sleep) and take part in it. */
static void worker_loop(pool *p, int index)
{
    /* index >= 1: this worker's thread index in every job */
    int64_t seen = atomic_load_acq(&p->gen);
    for (;;) {
        int64_t gen = atomic_load_acq(&p->gen);
        if (gen == seen) {
            const int64_t until = now_ns() + CNN_WORKER_SPIN_NS;
            for (int i = 1; (gen = atomic_load_acq(&p->gen)) == seen; ++i) {
                cpu_relax();
                if ((i & 31) == 0 && now_ns() > until) {
                    mutex_lock(&p->lock);
                    atomic_add(&p->sleepers, 1);
                    while ((gen = atomic_load_acq(&p->gen)) == seen)
                        cond_wait(&p->work, &p->lock);
                    atomic_add(&p->sleepers, -1);
                    mutex_unlock(&p->lock);
                    break;
                }
            }
        }
        seen = gen;
        /* The job's fields, then (after the fence) its claim word: if any field read saw
           a newer job's value, the claim word shows a newer generation too. */
        const int64_t n = load_relaxed(&p->n_tasks), T = load_relaxed(&p->n_threads);
        cnn_task_fn fn = load_relaxed(&p->fn);
        void *ctx = load_relaxed(&p->ctx);
        fence_acq();
        if (index < T)
            run_tasks(p, gen, fn, ctx, n, index);
    }
}

#if defined(_WIN32)
static unsigned __stdcall worker_main(void *arg)
{
    worker_loop(&the_pool, (int)(intptr_t)arg);
    return 0;
}
static int start_worker(int index)
{
    uintptr_t h = _beginthreadex(NULL, 0, worker_main, (void *)(intptr_t)index, 0, NULL);
    if (!h)
        return 0;
    CloseHandle((HANDLE)h);
    return 1;
}
#else
static void *worker_main(void *arg)
{
    worker_loop(&the_pool, (int)(intptr_t)arg);
    return NULL;
}
static int start_worker(int index)
{
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)index) == 0;
    pthread_attr_destroy(&attr);
    return ok;
}

/* In a child of fork() only the forking thread exists: forget the workers. */
static void pool_after_fork(void)
{
    memset(&the_pool, 0, sizeof the_pool);
    mutex_init(&the_pool.lock);
    cond_init(&the_pool.work);
    cond_init(&the_pool.finished);
    the_pool.ready = 1;
}
#endif

/* Set the pool up once; called by the caller that owns it. */
static void pool_init(pool *p)
{
    if (p->ready)
        return;
    mutex_init(&p->lock);
    cond_init(&p->work);
    cond_init(&p->finished);
#if !defined(_WIN32)
    pthread_atfork(NULL, NULL, pool_after_fork);
#endif
    p->ready = 1;
}

void cnn_parallel_for(int n_threads, int64_t n_tasks, cnn_task_fn fn, void *ctx)
{
    /* fn(ctx, task, thread) for every task in [0, n_tasks), thread < n_threads */
    pool *p = &the_pool;
    if (n_tasks <= 0)
        return;
    if (n_threads > n_tasks)
        n_threads = (int)n_tasks;
    if (n_threads > CNN_POOL_MAX + 1)
        n_threads = CNN_POOL_MAX + 1;
    if (n_threads <= 1 || n_tasks > 0x7fffffff || !atomic_cas(&p->busy, 0, 1)) {
        for (int64_t t = 0; t < n_tasks; ++t)
            fn(ctx, t, 0);
        return;
    }
    pool_init(p);
    while (p->n_workers < n_threads - 1 && start_worker((int)p->n_workers + 1))
        ++p->n_workers;
    /* generations run 1 .. 2^31 - 2 (2^31 - 1 marks a closed claim word) */
    const int64_t gen = p->gen + 1 < 0x7fffffff ? p->gen + 1 : 1;
    /* Close the old claim word before rewriting the fields (see worker_loop). */
    atomic_store_rel(&p->claim, CLAIM_CLOSED);
    fence_rel();
    store_relaxed(&p->n_tasks, n_tasks);
    store_relaxed(&p->n_threads, (int64_t)n_threads);
    store_relaxed(&p->fn, fn);
    store_relaxed(&p->ctx, ctx);
    store_relaxed(&p->done, (int64_t)0);
    atomic_store_rel(&p->claim, gen << 32);
    atomic_store_rel(&p->gen, gen);
    if (atomic_load_acq(&p->sleepers) > 0) {
        mutex_lock(&p->lock);
        cond_broadcast(&p->work);
        mutex_unlock(&p->lock);
    }
    run_tasks(p, gen, fn, ctx, n_tasks, 0);
    /* Wait only for tasks that workers have claimed. */
    if (atomic_load_acq(&p->done) != n_tasks) {
        const int64_t until = now_ns() + CNN_CALLER_SPIN_NS;
        for (int i = 1; atomic_load_acq(&p->done) != n_tasks; ++i) {
            cpu_relax();
            if ((i & 31) == 0 && now_ns() > until) {
                mutex_lock(&p->lock);
                atomic_store_rel(&p->caller_asleep, 1);
                while (atomic_load_acq(&p->done) != n_tasks)
                    cond_wait(&p->finished, &p->lock);
                atomic_store_rel(&p->caller_asleep, 0);
                mutex_unlock(&p->lock);
                break;
            }
        }
    }
    atomic_store_rel(&p->busy, 0);
}

/* ---- the default thread count ------------------------------------------------- */

/* CPUs this process may run on (its affinity mask), at least 1. */
static int usable_cpus(void)
{
    /* () -> count */
#if defined(_WIN32)
    DWORD_PTR mask = 0, system = 0;
    if (GetProcessAffinityMask(GetCurrentProcess(), &mask, &system) && mask) {
        int n = 0;
        for (; mask; mask &= mask - 1)
            ++n;
        return n;
    }
    SYSTEM_INFO info;
    GetSystemInfo(&info);
    return info.dwNumberOfProcessors > 0 ? (int)info.dwNumberOfProcessors : 1;
#else
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#endif
}

#if defined(__linux__)
/* CPUs' worth of quota in the cgroup v2 cpu.max file at `path`, or 0 if none. */
static int quota_v2(const char *path)
{
    /* "quota period" or "max period" -> ceil(quota / period) */
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char quota[32] = {0};
    long long period = 0;
    const int got = fscanf(f, "%31s %lld", quota, &period);
    fclose(f);
    if (got != 2 || period <= 0 || strcmp(quota, "max") == 0)
        return 0;
    const long long q = atoll(quota);
    return q > 0 ? (int)((q + period - 1) / period) : 0;
}

/* CPUs' worth of the tightest CPU quota of this process's cgroup (v2: its cpu.max and
   its ancestors'; v1: cpu.cfs_quota_us / cpu.cfs_period_us), or 0 if none. */
static int cgroup_cpus(void)
{
    /* () -> count or 0 */
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f)
        return 0;
    char line[1024], v2[1024] = "", v1[1024] = "";
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "0::", 3) == 0)
            snprintf(v2, sizeof v2, "%s", line + 3);
        else if (strstr(line, ":cpu,") || strstr(line, ":cpu:") || strstr(line, ",cpu:"))
            snprintf(v1, sizeof v1, "%s", strrchr(line, ':') + 1);
    }
    fclose(f);
    int best = 0;
    char path[1200];
    if (v2[0]) {
        /* the cgroup and each ancestor below the root */
        for (char *end = v2 + strlen(v2); end > v2; ) {
            *end = 0;
            snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.max", v2);
            const int q = quota_v2(path);
            if (q > 0 && (best == 0 || q < best))
                best = q;
            end = strrchr(v2, '/');
            if (!end)
                break;
        }
    }
    if (v1[0]) {
        long long quota = 0, period = 0;
        snprintf(path, sizeof path, "/sys/fs/cgroup/cpu%s/cpu.cfs_quota_us", v1);
        FILE *q = fopen(path, "r");
        if (q) {
            if (fscanf(q, "%lld", &quota) != 1)
                quota = 0;
            fclose(q);
        }
        snprintf(path, sizeof path, "/sys/fs/cgroup/cpu%s/cpu.cfs_period_us", v1);
        q = fopen(path, "r");
        if (q) {
            if (fscanf(q, "%lld", &period) != 1)
                period = 0;
            fclose(q);
        }
        if (quota > 0 && period > 0) {
            const int n = (int)((quota + period - 1) / period);
            if (best == 0 || n < best)
                best = n;
        }
    }
    return best;
}
#endif

/* The first number of OMP_NUM_THREADS ("4" or "4,2"), or 0 if unset or not positive. */
static int omp_num_threads(void)
{
    /* () -> count or 0 */
    const char *s = getenv("OMP_NUM_THREADS");
    if (!s)
        return 0;
    const long n = strtol(s, NULL, 10);
    return n > 0 && n <= 1024 ? (int)n : 0;
}

/* The default before any cnn_set_max_threads: computed once, 0 until then. */
static volatile int detected_threads = 0;
/* The limit set by cnn_set_max_threads (threadpoolctl), 0 if none. */
static volatile int thread_limit = 0;

int cnn_max_threads(void)
{
    /* () -> threads a kernel uses by default */
    int n = detected_threads;
    if (n == 0) {
        n = usable_cpus();
#if defined(__linux__)
        const int q = cgroup_cpus();
        if (q > 0 && q < n)
            n = q;
#endif
        const int omp = omp_num_threads();
        if (omp > 0)
            n = omp;
        if (n > CNN_POOL_MAX + 1)
            n = CNN_POOL_MAX + 1;
        detected_threads = n;
    }
    const int limit = thread_limit;
    return limit > 0 && limit < n ? limit : n;
}

int cnn_set_max_threads(int n_threads)
{
    /* limit -> status; 0 removes the limit */
    if (n_threads < 0 || n_threads > 1024)
        return CNN_ERR_ARG;
    thread_limit = n_threads;
    return CNN_OK;
}

/* ---- the thread count of training steps ---------------------------------------- */

/* Steps of each trial of the count not preferred (the first of them, like the first step
   after any change of count, is not timed: it moves data between caches). */
#define CNN_STEP_TRIAL 3
/* Trials come CNN_STEP_PERIOD steps apart, twice as far apart after each trial that
   keeps the preference, up to this many steps or four seconds of steps. */
#define CNN_STEP_PERIOD_MAX 1024
#define CNN_STEP_PERIOD_NS 4e9
/* Switch from n_threads to one thread when n_threads takes this much longer, and back
   when it takes this much less: the gap keeps a noisy step from flipping the choice. */
#define CNN_STEP_TO_ONE 1.05
#define CNN_STEP_TO_MANY 0.9

int cnn_step_threads_begin(cnn_step_threads *s, int n_threads)
{
    /* (state, n_threads) -> 1 or n_threads for the next step */
    if (!s || n_threads <= 1)
        return n_threads < 1 ? 1 : n_threads;
    const int64_t k = s->steps - s->next_trial;
    s->current = k >= 0 && k < CNN_STEP_TRIAL ? 1 - s->preferred : s->preferred;
    s->start_ns = now_ns();
    return s->current ? 1 : n_threads;
}

void cnn_step_threads_end(cnn_step_threads *s, int full)
{
    if (s && s->start_ns)
        cnn_step_threads_record(s, (double)(now_ns() - s->start_ns), full);
}

/* A trial has ended: keep or switch the preferred count, and schedule the next trial. */
static void end_trial(cnn_step_threads *s)
{
    const int before = s->preferred;
    if (s->mean_ns[0] > 0.0 && s->mean_ns[1] > 0.0) {
        const double ratio = s->mean_ns[0] / s->mean_ns[1];   /* n_threads / one */
        if (s->preferred == 0 && ratio > CNN_STEP_TO_ONE)
            s->preferred = 1;
        else if (s->preferred == 1 && ratio < CNN_STEP_TO_MANY)
            s->preferred = 0;
    }
    int64_t period = CNN_STEP_PERIOD;
    if (s->preferred == before && s->period > 0) {
        period = 2 * s->period < CNN_STEP_PERIOD_MAX ? 2 * s->period : CNN_STEP_PERIOD_MAX;
        if ((double)period * s->mean_ns[s->preferred] > CNN_STEP_PERIOD_NS)
            period = s->period;
    }
    s->period = period;
    s->next_trial += period;
}

void cnn_step_threads_record(cnn_step_threads *s, double step_ns, int full)
{
    /* the step in progress took step_ns -> state for the next one */
    const int64_t k = s->steps - s->next_trial;
    const int a = s->current ? 1 : 0;
    const int timed = full && a == s->previous && step_ns > 0.0;
    if (k >= 0 && k < CNN_STEP_TRIAL) {
        if (timed) {
            s->trial_ns += step_ns;
            ++s->trial_n;
        }
        if (k == CNN_STEP_TRIAL - 1) {
            if (s->trial_n)
                s->mean_ns[a] = s->trial_ns / (double)s->trial_n;
            s->trial_ns = 0.0;
            s->trial_n = 0;
            end_trial(s);
        }
    } else if (timed) {
        /* a running mean over the last ten or so steps */
        s->mean_ns[a] += s->mean_ns[a] > 0.0 ? (step_ns - s->mean_ns[a]) / 8.0 : step_ns;
    }
    s->previous = a;
    s->start_ns = 0;
    ++s->steps;
}
