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
//! onnxruntime's pool spins for the length of a run, or until it has found
//! no work for 200 µs. The spinning stops when the inference does: between
//! frames the workers sleep.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
            // A worker waiting inside a parallel loop runs whatever job it
            // finds, this one included: on top of a chunk that the
            // inference waits for. Waiting there for the inference to end
            // would never end (seen: a spinner still running when the next
            // inference began stole one of its chunks, and found this
            // inference's spinner while that chunk waited). So the worker
            // that runs `f` and a worker already spinning return at once,
            // and any spinner stops after `MAX_IDLE` without work.
            if Some(ctx.index()) == runner || SPINNING.get() {
                return;
            }
            SPINNING.set(true);
            let _spinning = Spinning;
            let mut idle = Instant::now();
            while !flag.load(Ordering::Acquire) {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => idle = Instant::now(),
                    _ if idle.elapsed() > MAX_IDLE => break,
                    _ => std::hint::spin_loop(),
                }
            }
        });
        // Set on every way out of `f`, a panic included.
        let _stop = Stop(done);
        multithread_tract_scope(executor.clone(), f)
    })
}

/// How long a worker spins without finding work before it goes back to
/// rayon (and sleeps): a few wake-ups' worth, so that a gap of
/// single-threaded work between two layers keeps it awake, and a spinner
/// that ended up on top of work it blocks holds it up at most this long.
const MAX_IDLE: Duration = Duration::from_micros(200);

thread_local! {
    /// Whether this worker is running a spinner (further down its stack).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
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

/// Clears [`SPINNING`] when its spinner ends, a panic included.
struct Spinning;

impl Drop for Spinning {
    fn drop(&mut self) {
        SPINNING.set(false);
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

    /// Held by the tests that measure CPU time or load the CPU, so that
    /// they do not run at the same time.
    static CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
        let _cpu = CPU.lock().unwrap_or_else(|e| e.into_inner());
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
        let _cpu = CPU.lock().unwrap_or_else(|e| e.into_inner());
        let executor = Executor::multithread(2);
        let Executor::MultiThread(pool) = &executor else { unreachable!() };
        let before = cpu_times(pool);
        // Inferences made of single-threaded stretches shorter than
        // `MAX_IDLE` (no parallel loop at all): 1000 × 150 µs.
        for _ in 0..1000 {
            scope(&executor, || {
                let until = Instant::now() + Duration::from_micros(150);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            });
        }
        let after = cpu_times(pool);
        let used: Vec<Duration> = before.iter().zip(&after).map(|(b, a)| *a - *b).collect();
        // The runner used about 150 ms; the other worker spun for most of it.
        assert!(used.iter().all(|&u| u > Duration::from_millis(50)), "a worker did not spin while the inferences ran: {used:?}");
    }

    /// Inferences back to back whose parallel loops split again inside
    /// their chunks (rayon's joins), as tract's and Tern's ops do. A worker
    /// waiting inside such a join runs whatever it finds, the next
    /// inference's spinner included: a spinner that waited for its inference
    /// to end would then sit on top of the very chunk that inference waits
    /// for. Run on a thread of its own with a deadline, so that a hang fails.
    /// The hang needs a worker preempted at one point of rayon's loop: with
    /// the spinner as it was, 100 000 inferences hung in 1 run of 4 and
    /// 20 000 in 1 of 2; 300 000 take 10–15 s when nothing hangs.
    #[test]
    fn back_to_back_inferences_with_nested_parallel_loops_never_hang() {
        let _cpu = CPU.lock().unwrap_or_else(|e| e.into_inner());
        // Busy threads beside the pool, so that its workers are preempted
        // at any point (as a camera, MQTT and web threads do on a device).
        let stop = Arc::new(AtomicBool::new(false));
        let hogs: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let executor = Executor::multithread(2);
            for _ in 0..300_000 {
                scope(&executor, || {
                    for _ in 0..4 {
                        let mut v = vec![0u32; 4096];
                        par_chunks_mut(&mut v, 1, 1 << 20, |first, chunk| {
                            for (i, e) in chunk.iter_mut().enumerate() {
                                *e = (first + i) as u32;
                            }
                            Ok(())
                        })
                        .unwrap();
                        assert!(v.iter().enumerate().all(|(i, &e)| e == i as u32));
                    }
                });
            }
            tx.send(()).unwrap();
        });
        let ended = rx.recv_timeout(Duration::from_secs(120)).is_ok();
        stop.store(true, Ordering::Relaxed);
        for h in hogs {
            h.join().unwrap();
        }
        assert!(ended, "300000 inferences did not end within 120 s");
    }

    #[test]
    fn a_single_thread_runs_here() {
        let here = std::thread::current().id();
        assert_eq!(scope(&Executor::SingleThread, || std::thread::current().id()), here);
    }
}
