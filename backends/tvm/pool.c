/* splice's thread pool for the parallel loops of a TVM CPU library (linked into model.so by
 * backends/tvm/build.py; installed by runtime/tvm_runtime.py, which points the library's
 * __TVMBackendParallelLaunch at splice_pool_launch and sets the thread count).
 *
 * Why: TVM's own pool wakes its workers and waits for them with sched_yield, which costs about
 * 2.5 us a parallel loop on the 2-core machine the benchmarks run on; a SmolLM2 decode step runs
 * ~360 parallel loops. Here an idle worker spins on a generation counter with the CPU's pause
 * instruction for up to SPIN_NS, then sleeps on a condition variable. Every thread, the caller
 * too, takes the loop's tasks one at a time from a shared counter, so a worker that another
 * process keeps off its core delays only a task it has already started. Measured on SmolLM2
 * fastest (int8 activations), 2 threads: decode ~5% faster on an idle machine; with a busy loop
 * on one of the two cores, 7-12 ms a step against TVM's pool's 16-28.
 *
 * Task t of a loop of n runs exactly once, on some thread, with env.num_task = n: the kernels
 * split their iterations by (task_id, num_task) alone, so which thread runs a task does not
 * change any result. Barriers inside a parallel loop (TVMBackendParallelBarrier) are not
 * supported: splice's kernels use none, and sync_handle is NULL. A launch from inside a task, or
 * while another thread's launch is running, runs its tasks serially on the calling thread.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

#define MAX_THREADS 64
#define MAX_TASKS 0xffff
#define SPIN_NS 1000000L /* an idle worker spins this long before it sleeps */

#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ __volatile__("yield")
#else
#define RELAX() ((void)0)
#endif

/* The job's claim word: generation (32 bits) | number of tasks (16) | next task (16). A thread
 * takes task i of job g by a compare-and-swap from (g, n, i) to (g, n, i + 1): it cannot take a
 * task of a job other than the one whose fields it read, nor a task twice. */
#define GEN(v) ((v) >> 32)
#define COUNT(v) (((v) >> 16) & 0xffff)
#define NEXT(v) ((v) & 0xffff)

static struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  _Atomic uint64_t claim;
  _Atomic int sleepers;
  _Atomic int busy; /* a launch is running */
  _Atomic int done;
  _Atomic int failed;
  FTVMParallelLambda fn;
  void* cdata;
  TVMParallelGroupEnv env;
  int threads; /* the caller and threads - 1 workers */
  int started; /* workers created */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static _Thread_local int in_task;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Take and run the tasks of job `gen` until none is left. */
static void work(uint64_t gen) {
  uint64_t v = atomic_load_explicit(&pool.claim, memory_order_acquire);
  while (GEN(v) == gen && NEXT(v) < COUNT(v)) {
    if (!atomic_compare_exchange_weak_explicit(&pool.claim, &v, v + 1, memory_order_acq_rel,
                                               memory_order_acquire))
      continue;
    in_task = 1;
    if (pool.fn((int)NEXT(v), &pool.env, pool.cdata) != 0) atomic_store(&pool.failed, 1);
    in_task = 0;
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    v = atomic_load_explicit(&pool.claim, memory_order_acquire);
  }
}

/* Wait for a job newer than `seen`: spin, then sleep; its generation. */
static uint64_t next_job(uint64_t seen) {
  uint64_t g;
  long start = 0;
  for (unsigned spins = 0;; ++spins) {
    g = GEN(atomic_load_explicit(&pool.claim, memory_order_acquire));
    if (g != seen) return g;
    RELAX();
    if ((spins & 1023) == 0) {
      long t = now_ns();
      if (start == 0) start = t;
      if (t - start > SPIN_NS) break;
    }
  }
  pthread_mutex_lock(&pool.lock);
  atomic_fetch_add(&pool.sleepers, 1);
  while ((g = GEN(atomic_load(&pool.claim))) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
  atomic_fetch_sub(&pool.sleepers, 1);
  pthread_mutex_unlock(&pool.lock);
  return g;
}

static void* worker(void* arg) {
  uint64_t seen = (uint64_t)(uintptr_t)arg;
  for (;;) {
    seen = next_job(seen);
    work(seen);
  }
  return 0;
}

/* The number of threads (the caller included) that later launches use; 1 runs every loop
 * serially. Workers are created at the first launch that needs them and are never stopped. */
int splice_pool_threads(int threads) {
  if (threads < 1 || threads > MAX_THREADS) return -1;
  pool.threads = threads;
  return 0;
}

static int serial(FTVMParallelLambda fn, void* cdata, int n) {
  TVMParallelGroupEnv env = {0, n};
  int status = 0;
  for (int t = 0; t < n; ++t)
    if (fn(t, &env, cdata) != 0) status = -1;
  return status;
}

int splice_pool_launch(FTVMParallelLambda fn, void* cdata, int num_task) {
  int threads = pool.threads > 0 ? pool.threads : 1;
  int n = num_task > 0 ? num_task : threads;
  if (threads == 1 || n == 1 || n > MAX_TASKS || in_task || atomic_exchange(&pool.busy, 1))
    return serial(fn, cdata, n);
  uint64_t gen = GEN(atomic_load(&pool.claim));
  while (pool.started < threads - 1) {
    pthread_t th;
    if (pthread_create(&th, 0, worker, (void*)(uintptr_t)gen) != 0) {
      atomic_store(&pool.busy, 0);
      return serial(fn, cdata, n);
    }
    pthread_detach(th);
    pool.started++;
  }
  pool.fn = fn;
  pool.cdata = cdata;
  pool.env.sync_handle = 0;
  pool.env.num_task = n;
  atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
  atomic_store_explicit(&pool.failed, 0, memory_order_relaxed);
  gen = (gen + 1) & 0xffffffffu;
  /* publishes the job: its fields are written before (sequentially consistent store) */
  atomic_store(&pool.claim, (gen << 32) | ((uint64_t)n << 16));
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
  }
  work(gen);
  for (unsigned spins = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n; ++spins) {
    RELAX();
    if ((spins & 4095) == 0) sched_yield(); /* a worker kept off its core: let it run */
  }
  int status = atomic_load(&pool.failed) ? -1 : 0;
  atomic_store(&pool.busy, 0);
  return status;
}
