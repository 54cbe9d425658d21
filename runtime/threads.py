"""The thread pool behind compiled code's parallel loops: `mlc_parallel_for`, in native code.

Compiled code calls `void mlc_parallel_for(ptr fn, ptr ctx, i64 lo, i64 hi)` (codegen/llvm.py) for a
large parallel loop; `fn(ctx, a, b)` runs trips a..b. The pool splits [lo, hi) into four chunks per
thread (at most one per trip), each smaller than the one before, the caller and native worker threads
take chunks until none is left, and the call returns when all are done: no Python and no GIL on the
way. (One chunk per thread left a core idle for a third of a convolution whose 3 or 11 blocks of rows,
or ragged halves, split unevenly; equal chunks left the last one's worth: SGEMM 1024, 44 tasks in 8
chunks of 5 or 6, ran at 193-197 GFLOP/s, with shrinking chunks 208-209.)
runtime/jit.py compiles POOL once per process (`native_pool`).

How a region is handed over (one region at a time: the caller holds `@lock`):
  - the caller writes the job (fn, ctx, lo, hi, chunks) between two increments of `@gen`, a seqlock:
    `@gen` is odd while the job is being written, and a worker that read it across a change reads again.
  - chunks are claimed from `@ticket` (the job's generation, next chunk) by compare-and-swap: a late
    worker's claim fails on the generation, and a worker that is slow to wake leaves its chunk to the
    caller instead of being waited for (these cores are shared with other processes). `@done` counts
    finished chunks; the caller returns when it reaches the job's count.
  - a waiting thread spins for `@mlc_pool_spin_cycles` time-stamp-counter cycles (the next region
    usually follows within microseconds; ~0.1 ms covers the single-threaded kernels between a model's
    regions: at ~10 us, ResNet-18's ~45 regions a call paid wake-ups, median 27-29 ms against 25),
    then sleeps on a futex; `@sleepers` / `@caller_sleeping` say whether a wake-up call is needed. Only
    workers that ran a chunk spin.
  - a region that finds the pool busy (another thread's region, or a parallel loop inside a chunk)
    runs whole on its caller: no deadlock, no nesting.
  - `@lock` holds the pid of its holder and `@owner_pid` the process whose workers exist, so a child
    forked while the parent's pool was busy takes the pool over and starts its own workers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# Only x86-64 Linux: the futex system call's number and `pause` are the platform's.
SUPPORTED = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
LIBC_FUNCTIONS = ("pthread_create", "syscall", "sched_yield", "getpid")

POOL = r"""
; --- state: set and read from Python (the `mlc_pool_` globals), the rest private ---
@mlc_pool_threads = global i64 1                ; threads per region, the caller's included
@mlc_pool_spin_cycles = global i64 200000       ; how long a waiting thread spins before sleeping (~0.1 ms)
@mlc_pool_regions = global i64 0                ; regions handed to workers (tests read it)
@mlc_pool_workers = global i64 0                ; workers started by this process

@lock = internal global i32 0                   ; pid of the thread holding the pool, 0 when free
@owner_pid = internal global i32 0              ; the process whose workers exist
@gen = internal global i32 0                    ; job generation, odd while the job is written
@job_fn = internal global ptr null
@job_ctx = internal global ptr null
@job_lo = internal global i64 0
@job_hi = internal global i64 0
@job_chunks = internal global i64 0
@ticket = internal global i64 0                 ; generation << 32 | the next chunk to claim
@done = internal global i32 0                   ; chunks finished
@sleepers = internal global i32 0               ; workers asleep (or about to be) on @gen
@caller_sleeping = internal global i32 0        ; the caller asleep (or about to be) on @done

declare i32 @pthread_create(ptr, ptr, ptr, ptr)
declare i64 @syscall(i64, ...)
declare i32 @sched_yield()
declare i32 @getpid()
declare i64 @llvm.readcyclecounter()
declare void @llvm.x86.sse2.pause()
declare i64 @llvm.smin.i64(i64, i64)

define internal void @futex_wait(ptr %word, i32 %expected) {
  %e = zext i32 %expected to i64
  call i64 (i64, ...) @syscall(i64 202, ptr %word, i64 128, i64 %e, ptr null)  ; FUTEX_WAIT_PRIVATE
  ret void
}

define internal void @futex_wake(ptr %word, i64 %count) {
  call i64 (i64, ...) @syscall(i64 202, ptr %word, i64 129, i64 %count)      ; FUTEX_WAKE_PRIVATE
  ret void
}

; Wait until *%word != %old and return its new value: spin with `pause` for %budget cycles, then
; sleep on the futex, counted in *%sleeping so that whoever changes the word knows to wake us.
define internal i32 @wait_change(ptr %word, i32 %old, ptr %sleeping, i64 %budget) {
entry:
  %start = call i64 @llvm.readcyclecounter()
  br label %spin
spin:
  %v = load atomic i32, ptr %word acquire, align 4
  %changed = icmp ne i32 %v, %old
  br i1 %changed, label %done, label %pause
pause:
  call void @llvm.x86.sse2.pause()
  %now = call i64 @llvm.readcyclecounter()
  %spent = sub i64 %now, %start
  %more = icmp ult i64 %spent, %budget
  br i1 %more, label %spin, label %sleep
sleep:
  atomicrmw add ptr %sleeping, i32 1 seq_cst
  %again = load atomic i32, ptr %word seq_cst, align 4
  %still = icmp eq i32 %again, %old
  br i1 %still, label %wait, label %awake
wait:
  call void @futex_wait(ptr %word, i32 %old)   ; (returns at once if the word has changed)
  br label %awake
awake:
  atomicrmw sub ptr %sleeping, i32 1 seq_cst
  %w = load atomic i32, ptr %word acquire, align 4
  %woken = icmp ne i32 %w, %old
  br i1 %woken, label %done, label %sleep
done:
  %new = phi i32 [ %v, %spin ], [ %w, %awake ]
  ret i32 %new
}

; Where chunk k of `chunks` over [lo, hi) starts: chunks shrink in turn (chunk k ends at the fraction
; 1 - (1 - (k + 1) / chunks)^2 of the trips), so that the last ones, which decide who finishes last, are small.
define internal i64 @chunk_start(i64 %lo, i64 %hi, i64 %k, i64 %chunks) {
  %trips = sub i64 %hi, %lo
  %twice = shl i64 %chunks, 1
  %rest = sub i64 %twice, %k
  %area = mul i64 %k, %rest
  %t = mul i64 %trips, %area
  %square = mul i64 %chunks, %chunks
  %q = sdiv i64 %t, %square
  %start = add i64 %lo, %q
  ret i64 %start
}

; Claim and run chunks of job %gen until none is left; returns whether this thread ran any.
define internal i1 @run_chunks(i32 %gen, ptr %fn, ptr %ctx, i64 %lo, i64 %hi, i64 %chunks) {
entry:
  %want_gen = zext i32 %gen to i64
  br label %claim
claim:
  %ran = phi i1 [ false, %entry ], [ %ran, %take ], [ true, %finished ]
  %t = load atomic i64, ptr @ticket monotonic, align 8
  %t_gen = lshr i64 %t, 32
  %k = and i64 %t, 4294967295
  %current = icmp eq i64 %t_gen, %want_gen
  %left = icmp slt i64 %k, %chunks
  %open = and i1 %current, %left
  br i1 %open, label %take, label %out
take:
  %t1 = add i64 %t, 1
  %swap = cmpxchg ptr @ticket, i64 %t, i64 %t1 acq_rel monotonic
  %mine = extractvalue { i64, i1 } %swap, 1
  br i1 %mine, label %run, label %claim
run:
  %a = call i64 @chunk_start(i64 %lo, i64 %hi, i64 %k, i64 %chunks)
  %k1 = add i64 %k, 1
  %b = call i64 @chunk_start(i64 %lo, i64 %hi, i64 %k1, i64 %chunks)
  call void %fn(ptr %ctx, i64 %a, i64 %b)
  %before = atomicrmw add ptr @done, i32 1 seq_cst
  %after = add i32 %before, 1
  %count = trunc i64 %chunks to i32
  %last = icmp eq i32 %after, %count
  br i1 %last, label %tell, label %finished
tell:                                            ; the last chunk: wake the caller if it sleeps
  %asleep = load atomic i32, ptr @caller_sleeping seq_cst, align 4
  %wake = icmp ne i32 %asleep, 0
  br i1 %wake, label %wakeup, label %finished
wakeup:
  call void @futex_wake(ptr @done, i64 1)
  br label %finished
finished:
  br label %claim
out:
  ret i1 %ran
}

; A worker (%arg: @gen when it was created) takes chunks of each job. It spins for the next job only
; after running a chunk: idle workers (fewer threads wanted than started) go straight to sleep.
define internal ptr @worker(ptr %arg) {
entry:
  %gen0 = ptrtoint ptr %arg to i32
  br label %next
next:
  %seen = phi i32 [ %gen0, %entry ], [ %seen, %torn ], [ %g, %take ]
  %busy = phi i1 [ false, %entry ], [ %busy, %torn ], [ %ran, %take ]
  %spin = load i64, ptr @mlc_pool_spin_cycles
  %budget = select i1 %busy, i64 %spin, i64 0
  %g = call i32 @wait_change(ptr @gen, i32 %seen, ptr @sleepers, i64 %budget)
  %odd = and i32 %g, 1
  %writing = icmp ne i32 %odd, 0
  br i1 %writing, label %torn, label %read
read:
  %fn = load atomic ptr, ptr @job_fn monotonic, align 8
  %ctx = load atomic ptr, ptr @job_ctx monotonic, align 8
  %lo = load atomic i64, ptr @job_lo monotonic, align 8
  %hi = load atomic i64, ptr @job_hi monotonic, align 8
  %chunks = load atomic i64, ptr @job_chunks monotonic, align 8
  fence seq_cst
  %g2 = load atomic i32, ptr @gen monotonic, align 4
  %same = icmp eq i32 %g2, %g
  br i1 %same, label %take, label %torn
take:
  %ran = call i1 @run_chunks(i32 %g, ptr %fn, ptr %ctx, i64 %lo, i64 %hi, i64 %chunks)
  br label %next
torn:                                            ; the caller is writing the next job: read it again
  call i32 @sched_yield()
  br label %next
}

; Take the pool for this thread, or say it is busy. A holder of another pid is a parent that forked
; us while its pool was busy: nobody here will release it, so we take it over.
define internal i1 @try_lock(i32 %pid) {
entry:
  %got = cmpxchg ptr @lock, i32 0, i32 %pid acquire monotonic
  %ok = extractvalue { i32, i1 } %got, 1
  br i1 %ok, label %yes, label %held
held:
  %holder = extractvalue { i32, i1 } %got, 0
  %ours = icmp eq i32 %holder, %pid
  br i1 %ours, label %no, label %steal
steal:
  %stolen = cmpxchg ptr @lock, i32 %holder, i32 %pid acquire monotonic
  %took = extractvalue { i32, i1 } %stolen, 1
  ret i1 %took
yes:
  ret i1 true
no:
  ret i1 false
}

; Start workers until there are %wanted (with the pool held); returns how many there are.
define internal i64 @start_workers(i64 %wanted) {
entry:
  %tid = alloca i64
  br label %loop
loop:
  %have = load i64, ptr @mlc_pool_workers
  %enough = icmp sge i64 %have, %wanted
  br i1 %enough, label %done, label %start
start:
  %g = load i32, ptr @gen
  %arg = inttoptr i32 %g to ptr
  %err = call i32 @pthread_create(ptr %tid, ptr null, ptr @worker, ptr %arg)
  %failed = icmp ne i32 %err, 0
  br i1 %failed, label %done, label %started
started:
  %have1 = add i64 %have, 1
  store i64 %have1, ptr @mlc_pool_workers
  br label %loop
done:
  %n = load i64, ptr @mlc_pool_workers
  ret i64 %n
}

define void @mlc_parallel_for(ptr %fn, ptr %ctx, i64 %lo, i64 %hi) {
entry:
  %threads = load i64, ptr @mlc_pool_threads
  %trips = sub i64 %hi, %lo
  %wanted = call i64 @llvm.smin.i64(i64 %trips, i64 %threads)
  %worth = icmp sge i64 %wanted, 2
  br i1 %worth, label %lock, label %inline
lock:
  %pid = call i32 @getpid()
  %mine = call i1 @try_lock(i32 %pid)
  br i1 %mine, label %ours, label %inline
ours:
  %owner = load i32, ptr @owner_pid
  %forked = icmp ne i32 %owner, %pid
  br i1 %forked, label %fresh, label %workers
fresh:                                           ; first region of this process: nothing inherited
  store i32 %pid, ptr @owner_pid
  store i64 0, ptr @mlc_pool_workers
  store i32 0, ptr @gen
  store i32 0, ptr @sleepers
  store i32 0, ptr @caller_sleeping
  br label %workers
workers:
  %want_workers = sub i64 %wanted, 1
  %have = call i64 @start_workers(i64 %want_workers)
  %helpers = call i64 @llvm.smin.i64(i64 %have, i64 %want_workers)
  %team = add i64 %helpers, 1
  %alone = icmp slt i64 %team, 2
  %split = mul i64 %team, 4                      ; chunks claimed in turn: uneven trips even out
  %chunks = call i64 @llvm.smin.i64(i64 %split, i64 %trips)
  br i1 %alone, label %unlock_inline, label %post
post:
  %old = atomicrmw add ptr @gen, i32 1 seq_cst
  %g = add i32 %old, 2
  store atomic ptr %fn, ptr @job_fn monotonic, align 8
  store atomic ptr %ctx, ptr @job_ctx monotonic, align 8
  store atomic i64 %lo, ptr @job_lo monotonic, align 8
  store atomic i64 %hi, ptr @job_hi monotonic, align 8
  store atomic i64 %chunks, ptr @job_chunks monotonic, align 8
  store atomic i32 0, ptr @done monotonic, align 4
  %g64 = zext i32 %g to i64
  %first = shl i64 %g64, 32
  store atomic i64 %first, ptr @ticket monotonic, align 8
  atomicrmw add ptr @gen, i32 1 seq_cst
  %asleep = load atomic i32, ptr @sleepers seq_cst, align 4
  %wake = icmp ne i32 %asleep, 0
  br i1 %wake, label %wakeup, label %run
wakeup:
  call void @futex_wake(ptr @gen, i64 %helpers)
  br label %run
run:
  %regions = load i64, ptr @mlc_pool_regions
  %regions1 = add i64 %regions, 1
  store i64 %regions1, ptr @mlc_pool_regions
  call i1 @run_chunks(i32 %g, ptr %fn, ptr %ctx, i64 %lo, i64 %hi, i64 %chunks)
  %count = trunc i64 %chunks to i32
  %spin = load i64, ptr @mlc_pool_spin_cycles
  br label %wait
wait:                                            ; for chunks that workers are still running
  %finished = load atomic i32, ptr @done acquire, align 4
  %all = icmp eq i32 %finished, %count
  br i1 %all, label %release, label %sleep
sleep:
  call i32 @wait_change(ptr @done, i32 %finished, ptr @caller_sleeping, i64 %spin)
  br label %wait
release:
  store atomic i32 0, ptr @lock release, align 4
  ret void
unlock_inline:
  store atomic i32 0, ptr @lock release, align 4
  br label %inline
inline:
  call void %fn(ptr %ctx, i64 %lo, i64 %hi)
  ret void
}
"""


def libc_functions() -> dict[str, int]:
    """The addresses of the C library functions POOL calls (pthread_create from libpthread where the C
    library lacks it: glibc before 2.34)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    addresses = {}
    for name in LIBC_FUNCTIONS:
        try:
            fn = getattr(libc, name)
        except AttributeError:
            fn = getattr(ctypes.CDLL(ctypes.util.find_library("pthread")), name)
        addresses[name] = ctypes.cast(fn, ctypes.c_void_p).value
    return addresses


class NativePool:
    """POOL loaded in this process (`engine`: llvmlite's, kept for good: workers run its code): the
    address of its `mlc_parallel_for`, the threads per region, and `spin_cycles.value`, how long a
    waiting thread spins before it sleeps."""

    def __init__(self, engine):
        self.engine = engine
        self.parallel_for = engine.get_function_address("mlc_parallel_for")
        self._threads, self.spin_cycles, self._regions, self._workers = (
            ctypes.c_int64.from_address(engine.get_global_value_address(f"mlc_pool_{name}"))
            for name in ("threads", "spin_cycles", "regions", "workers"))

    @property
    def threads(self) -> int:
        return self._threads.value

    @threads.setter
    def threads(self, n: int):
        self._threads.value = max(1, n)

    def stats(self) -> dict:
        """Regions handed to workers and workers started, by this process (counted under the pool's lock)."""
        return {"regions": self._regions.value, "workers": self._workers.value}
