//! Running a plan on tract's thread pool with the pool's workers kept awake.
//!
//! tract splits a layer across threads with rayon: the thread that runs the
//! plan hands chunks to the pool's workers and waits for them. Between two
//! layers a worker finds no work, spins a few rounds and goes to sleep, and
//! waking a sleeping thread costs the kernel a wake-up and, in a virtual
//! machine, the host an interrupt to a halted vCPU. Measured on a 2-vCPU
//! Sapphire Rapids VM: a parallel loop over two items takes 5 µs when the
//! worker was busy a moment before and 70–90 µs when it had been idle for
//! 100 µs or more — and an inference has about a hundred such layers, most of
//! them shorter than a millisecond (docs/performance.md, "Threads").
//!
//! [`scope`] runs the whole inference on one worker of the pool (so that a
//! layer's chunks are pushed to that worker's own deque, not injected from
//! outside) while every other worker busy-waits for work until it returns, as
//! onnxruntime's pool spins for the length of a run. The spinning stops when
//! the inference does: between frames the workers sleep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tract_onnx::tract_core::tract_linalg::multithread::{
    current_threading_mac_threshold, multithread_tract_scope, set_threading_mac_threshold, Executor,
};

/// Runs `f` (an inference) with `executor` as tract's executor. On a
/// multithreaded executor `f` runs on one of the pool's workers while the
/// others wait for work without sleeping; on a single thread it runs here.
pub fn scope<R: Send>(executor: &Executor, f: impl FnOnce() -> R + Send) -> R {
    let Executor::MultiThread(pool) = executor else {
        return multithread_tract_scope(executor.clone(), f);
    };
    pool.install(|| {
        let done = Arc::new(AtomicBool::new(false));
        let runner = rayon::current_thread_index();
        let flag = done.clone();
        pool.spawn_broadcast(move |ctx| {
            // The worker that runs `f` may pick up its own copy of this job
            // while it waits inside a parallel loop: it must return at once,
            // or it would wait for the end of the inference it is running.
            if Some(ctx.index()) == runner {
                return;
            }
            while !flag.load(Ordering::Acquire) {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => {}
                    _ => std::hint::spin_loop(),
                }
            }
        });
        // Set on every way out of `f`, a panic included.
        let _stop = Stop(done);
        multithread_tract_scope(executor.clone(), f)
    })
}

/// Multiply-accumulates from which tract splits a matrix-vector product
/// across threads, as Tern sets it.
const GEMV_MACS: usize = 1 << 20;

/// Lets tract split a classifier's head across threads. tract splits a
/// matrix-vector product (a fully connected layer on one image) only from
/// 2²¹ multiply-accumulates, and EfficientNet-Lite0's 1280 → 1000 head has
/// 1.3 M: it ran on one thread (0.39–0.42 ms of a 7 ms inference at two
/// threads; 0.23–0.29 ms split). tract's setting is one for the process:
/// this only ever lowers it.
pub fn split_heads() {
    if current_threading_mac_threshold() > GEMV_MACS {
        set_threading_mac_threshold(GEMV_MACS);
    }
}

/// Tells the spinning workers to stop when dropped.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tract_onnx::tract_core::tract_linalg::multithread::{current_tract_executor, par_chunks_mut};

    #[test]
    fn parallel_loops_inside_the_scope_run_on_the_pool_and_end() {
        let executor = Executor::multithread(3);
        let mut workers = vec![];
        for _ in 0..20 {
            let seen = scope(&executor, || {
                assert!(matches!(current_tract_executor(), Executor::MultiThread(_)));
                let mut seen = vec![usize::MAX; 64];
                par_chunks_mut(&mut seen, 1, 1 << 20, |_, chunk| {
                    let until = Instant::now() + Duration::from_micros(100);
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    chunk.fill(rayon::current_thread_index().unwrap_or(usize::MAX));
                    Ok(())
                })
                .unwrap();
                seen
            });
            assert!(seen.iter().all(|&t| t < 3), "a chunk ran outside the pool: {seen:?}");
            workers.extend(seen);
        }
        workers.sort();
        workers.dedup();
        assert!(workers.len() >= 2, "every chunk of 20 loops ran on worker {workers:?}");
    }

    /// CPU time each worker of `pool` has used so far, by worker index.
    fn cpu_times(pool: &rayon::ThreadPool) -> Vec<Duration> {
        let times = std::sync::Mutex::new(vec![Duration::ZERO; pool.current_num_threads()]);
        pool.broadcast(|ctx| {
            let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `t` is a valid, writable timespec for the call.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            assert_eq!(rc, 0);
            times.lock().unwrap()[ctx.index()] = Duration::new(t.tv_sec as u64, t.tv_nsec as u32);
        });
        times.into_inner().unwrap()
    }

    #[test]
    fn the_workers_stop_spinning_when_the_inference_ends_even_by_a_panic() {
        let executor = Executor::multithread(2);
        let Executor::MultiThread(pool) = &executor else { unreachable!() };
        assert_eq!(scope(&executor, || 7), 7);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scope(&executor, || panic!("boom"))));
        assert!(r.is_err());
        let before = cpu_times(pool);
        std::thread::sleep(Duration::from_millis(300));
        let after = cpu_times(pool);
        for (b, a) in before.iter().zip(&after) {
            // A worker still spinning would have used most of the 300 ms.
            assert!(*a - *b < Duration::from_millis(30), "a worker kept running: {before:?} -> {after:?}");
        }
    }

    #[test]
    fn the_other_workers_spin_while_the_inference_runs() {
        let executor = Executor::multithread(2);
        let Executor::MultiThread(pool) = &executor else { unreachable!() };
        let before = cpu_times(pool);
        // A single-threaded stretch of an inference (no parallel loop).
        scope(&executor, || std::thread::sleep(Duration::from_millis(300)));
        let after = cpu_times(pool);
        let used: Vec<Duration> = before.iter().zip(&after).map(|(b, a)| *a - *b).collect();
        assert!(used.iter().any(|&u| u > Duration::from_millis(30)), "no worker spun while the inference slept: {used:?}");
    }

    #[test]
    fn a_single_thread_runs_here() {
        let here = std::thread::current().id();
        assert_eq!(scope(&Executor::SingleThread, || std::thread::current().id()), here);
    }
}
