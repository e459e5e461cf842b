//! The compute pool the step's parallel loops run on: one thread per core,
//! the caller included. A step makes a few hundred small parallel loops (a
//! matrix product, the attention of one layer...), one after the other; a
//! general-purpose pool puts its idle threads to sleep between them and pays
//! a wake-up through the kernel for each. Here idle threads spin for a while
//! (a loop starts in well under a microsecond while steps run), and park only
//! after `PARK_AFTER` without work, so an idle server costs no CPU.
//!
//! A loop is `run(n, f)`: tasks `0..n` are claimed one at a time from a
//! shared counter by every thread, the caller included, and `run` returns
//! when all have finished. The counter carries the loop's number in its high
//! half, so a thread can only claim a task of the loop it read the job of.
//! A panic in a task is caught, the other tasks still finish, and it resumes
//! in the caller.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle thread spins before it parks.
const PARK_AFTER: Duration = Duration::from_millis(2);

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// Loop number (high 32 bits) and next unclaimed task (low 32 bits).
    claim: AtomicU64,
    /// The current loop's number, function and task count, written by the
    /// submitter before it publishes the loop number in `claim`.
    job: Mutex<Option<(u64, *const Task, usize)>>,
    /// Tasks of the current loop finished.
    done: AtomicUsize,
    /// The first panic of the current loop.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Parking: a thread checks the loop number under this lock before it
    /// waits on `wake`, and the submitter notifies under it.
    parked: Mutex<()>,
    wake: Condvar,
    /// Threads parked or about to park: the submitter takes the lock and
    /// notifies only when there are some, so a loop that finds every thread
    /// spinning costs no system call.
    sleepers: AtomicUsize,
}

// SAFETY: the raw task pointer is only dereferenced while its loop runs,
// and the submitter keeps the function alive until every task has finished.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One loop at a time.
    submit: Mutex<()>,
}

thread_local! {
    /// True while this thread runs a task: loops inside tasks run inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sizes the pool (0: one thread per core). Only the first call counts;
/// without one, the first loop sizes it to the cores.
pub fn init(threads: usize) {
    POOL.get_or_init(|| Pool::new(threads));
}

/// The pool's threads, the caller included.
pub fn threads() -> usize {
    global().threads
}

fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(0))
}

/// Runs `f(0..n)` on the pool and returns when every call has returned.
pub fn run(n: usize, f: impl Fn(usize) + Sync) {
    global().run(n, &f);
}

/// Runs `f` on each of `parts` on the pool, each part in a task of its
/// own: for work that writes disjoint pieces of one buffer (the parts hold
/// `&mut` slices of it).
pub fn run_parts<P: Send>(parts: Vec<P>, f: impl Fn(&mut P) + Sync) {
    // Each task locks only its own part: never contended.
    let parts: Vec<Mutex<P>> = parts.into_iter().map(Mutex::new).collect();
    run(parts.len(), |i| {
        f(&mut parts[i].lock().unwrap_or_else(|e| e.into_inner()))
    });
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            parked: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("aquila-compute-{i}"))
                .spawn(move || helper(&s))
                .expect("spawning a compute thread");
        }
        Pool {
            shared,
            threads,
            submit: Mutex::new(()),
        }
    }

    fn run<'a>(&self, n: usize, f: &'a (dyn Fn(usize) + Sync + 'a)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads == 1 || IN_TASK.get() {
            (0..n).for_each(f);
            return;
        }
        assert!(n < 1 << 32, "{n} tasks do not fit the claim counter");
        let _one_at_a_time = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY (of the lifetime erasure): `run` does not return before
        // every task of this loop has finished, and no thread reads the
        // pointer after finishing its task.
        let f_static: *const Task =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Task>(f) };
        let epoch = (s.claim.load(Relaxed) >> 32) + 1;
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some((epoch, f_static, n));
        s.done.store(0, Relaxed);
        // SeqCst here and in `helper`: either this sees a parking thread
        // counted in `sleepers`, or that thread sees the new loop number.
        s.claim.store(epoch << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            // Wake parked threads (they check the loop number under this
            // lock before waiting, so none can miss it).
            let _g = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, epoch);
        while s.done.load(Acquire) < n {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }
}

/// Claims and runs tasks of loop `epoch` until none is left.
fn work(s: &Shared, epoch: u64) {
    loop {
        let c = s.claim.load(Acquire);
        if c >> 32 != epoch {
            return;
        }
        let i = (c & 0xFFFF_FFFF) as usize;
        // The job may already be the next loop's (published before its
        // number): then it is not ours to run.
        let Some((job_epoch, f, n)) = *s.job.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        if job_epoch != epoch || i >= n {
            return;
        }
        // The claim succeeds only if the counter is still at (epoch, i): the
        // loop has not finished, so its job is the one just read.
        if s.claim
            .compare_exchange_weak(c, c + 1, AcqRel, Relaxed)
            .is_err()
        {
            continue;
        }
        IN_TASK.set(true);
        // SAFETY: task i of this loop is claimed, so the loop has not
        // finished and its function is alive (see `Pool::run`).
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*f)(i) }));
        IN_TASK.set(false);
        if let Err(p) = result {
            s.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(p);
        }
        s.done.fetch_add(1, Release);
    }
}

/// A helper thread: spins for new loops, parks after a quiet while.
fn helper(s: &Shared) {
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = s.claim.load(Acquire) >> 32;
        if epoch != seen {
            seen = epoch;
            work(s, epoch);
            idle_since = Instant::now();
            continue;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) && idle_since.elapsed() > PARK_AFTER {
            let guard = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            if s.claim.load(SeqCst) >> 32 == seen {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            }
            s.sleepers.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        init(0);
        for n in [1, 2, 3, 17, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                run(n, |i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn loops_inside_tasks_run_inline() {
        let total = AtomicU32::new(0);
        run(8, |_| {
            run(4, |_| {
                total.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(total.load(Relaxed), 32);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_still_works() {
        let r = catch_unwind(|| {
            run(16, |i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        });
        assert!(r.is_err());
        let count = AtomicU32::new(0);
        run(100, |_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 100);
    }

    /// After a quiet while the helpers park; the next loop must wake one.
    /// Task 0 waits for task 1 to start, which only another thread can do:
    /// a helper left asleep fails the test instead of hanging it.
    #[test]
    fn parked_threads_wake_for_the_next_loop() {
        if threads() < 2 {
            return;
        }
        for _ in 0..3 {
            std::thread::sleep(PARK_AFTER * 10);
            let started = AtomicU32::new(0);
            let waited = AtomicU32::new(0);
            run(2, |i| {
                if i == 1 {
                    started.store(1, SeqCst);
                    return;
                }
                let t = Instant::now();
                while started.load(SeqCst) == 0 && t.elapsed() < Duration::from_secs(10) {
                    std::hint::spin_loop();
                }
                waited.store(started.load(SeqCst), SeqCst);
            });
            assert_eq!(waited.load(SeqCst), 1, "no helper woke up");
        }
    }

    #[test]
    fn loops_from_several_threads_take_turns() {
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    for _ in 0..100 {
                        let sum = AtomicU32::new(0);
                        run(10, |i| {
                            sum.fetch_add(i as u32 + t, Relaxed);
                        });
                        assert_eq!(sum.load(Relaxed), 45 + 10 * t);
                    }
                });
            }
        });
    }
}
