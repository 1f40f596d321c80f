//! Runs a loop over chunks on libtorch's own OpenMP threads.
//!
//! libtorch's intra-op threads are an OpenMP (libgomp) team that spins
//! between ATen's ops. Work of ours started on other threads would compete
//! with those spinning workers for the same cores; started through
//! `GOMP_parallel` from the model thread, it runs on that same team, as
//! ATen's own parallel loops do. The entry point is looked up at run time
//! (libtorch brings libgomp into the process); where it is missing (a
//! libtorch built with another threading library) the loop runs on scoped
//! threads of our own.

use std::ffi::{c_uint, c_void};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub(super) type GompParallel =
    unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

pub(super) fn gomp_parallel() -> Option<GompParallel> {
    static ENTRY: OnceLock<Option<GompParallel>> = OnceLock::new();
    *ENTRY.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name over the global scope.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        if sym.is_null() {
            tracing::warn!("GOMP_parallel not found: CPU products run on threads of their own");
            None
        } else {
            // SAFETY: libgomp's GOMP_parallel has this signature (GOMP_4.0 ABI).
            Some(unsafe { std::mem::transmute::<*mut c_void, GompParallel>(sym) })
        }
    })
}

/// Whether loops run on libtorch's OpenMP team.
pub fn on_openmp() -> bool {
    gomp_parallel().is_some()
}

/// The shared state of one parallel loop.
struct Loop<'a> {
    next: AtomicUsize,
    total: usize,
    chunk: usize,
    body: &'a (dyn Fn(Range<usize>) + Sync),
}

impl Loop<'_> {
    /// Takes chunks until none are left.
    fn work(&self) {
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.total {
                return;
            }
            (self.body)(start..(start + self.chunk).min(self.total));
        }
    }
}

extern "C" fn run_loop(data: *mut c_void) {
    // SAFETY: `data` is the `Loop` that `for_each_chunk` keeps alive until
    // GOMP_parallel returns, which is after every thread has left here.
    let state = unsafe { &*(data as *const Loop) };
    state.work();
}

/// Calls `body` on every chunk of `0..total` (`chunk` long, the last one
/// shorter), spread over `threads` threads, and returns when all are done.
pub fn for_each_chunk(
    total: usize,
    chunk: usize,
    threads: usize,
    body: &(dyn Fn(Range<usize>) + Sync),
) {
    let chunk = chunk.max(1);
    if threads <= 1 || total <= chunk {
        if total > 0 {
            body(0..total);
        }
        return;
    }
    let state = Loop {
        next: AtomicUsize::new(0),
        total,
        chunk,
        body,
    };
    let threads = threads.min(total.div_ceil(chunk));
    match gomp_parallel() {
        // SAFETY: `state` outlives the call; `run_loop` only reads it.
        Some(parallel) => unsafe {
            parallel(
                run_loop,
                &state as *const Loop as *mut c_void,
                threads as c_uint,
                0,
            )
        },
        None => std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(|| state.work());
            }
            state.work();
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_chunk_runs_once() {
        for (total, chunk, threads) in [(0, 4, 2), (3, 4, 2), (100, 7, 2), (64, 16, 4), (5, 1, 3)] {
            let seen = Mutex::new(vec![0u32; total]);
            for_each_chunk(total, chunk, threads, &|r: Range<usize>| {
                let mut seen = seen.lock().unwrap();
                for i in r {
                    seen[i] += 1;
                }
            });
            assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
        }
    }
}
