//! One parallel region for a whole sequence of loops: a CPU decode step runs
//! about 150 small loops (projections, attention, norms), and opening an
//! OpenMP region for each leaves the other threads spinning at its end and
//! at the start of the next, and idle through the steps between loops that
//! the model thread ran alone. A team's threads all run the same body; each
//! loop's chunks are shared out among them and a barrier ends the loop.
//!
//! The team is libtorch's OpenMP team, entered through `GOMP_parallel` as in
//! `parallel.rs`, or scoped threads of our own where libgomp is missing.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::parallel::{for_each_chunk, gomp_parallel, GompParallel};

/// Spins at a barrier before a waiting thread starts yielding its core (a
/// neighbour process or a CPU quota may be holding the thread it waits for).
const SPINS: u32 = 1 << 12;

/// What runs a loop's chunks: a parallel region of its own ([`Regions`]) or
/// the members of a running team ([`Member`]).
pub trait Chunks {
    /// Threads the chunks are spread over.
    fn threads(&self) -> usize;

    /// Calls `body` on every chunk of `0..total` (`chunk` long, the last one
    /// shorter) and returns when all are done. On a team every member must
    /// make the same calls in the same order.
    fn for_each_chunk(&self, total: usize, chunk: usize, body: &(dyn Fn(Range<usize>) + Sync));
}

/// A parallel region for each loop, on up to this many threads.
#[derive(Clone, Copy, Debug)]
pub struct Regions(pub usize);

impl Chunks for Regions {
    fn threads(&self) -> usize {
        self.0.max(1)
    }

    fn for_each_chunk(&self, total: usize, chunk: usize, body: &(dyn Fn(Range<usize>) + Sync)) {
        for_each_chunk(total, chunk, self.threads(), body)
    }
}

/// What the team's threads share.
struct Team<'a> {
    body: &'a (dyn Fn(&Member) + Sync),
    /// Hands out member ids on entry.
    joined: AtomicUsize,
    /// Members at the current barrier.
    arrived: AtomicUsize,
    /// Barriers completed.
    generation: AtomicUsize,
    /// The next chunk of the current loop, and of the one after it.
    next: [AtomicUsize; 2],
    /// A member panicked: the others stop waiting for it. (On libgomp's
    /// threads a panic aborts the process; this is for scoped threads.)
    poisoned: AtomicBool,
}

/// One thread of a running team.
pub struct Member<'a> {
    team: &'a Team<'a>,
    id: usize,
    size: usize,
    /// Loops this member has run.
    loops: Cell<usize>,
}

impl Member<'_> {
    /// Returns once every member has called it.
    pub fn barrier(&self) {
        let team = self.team;
        let generation = team.generation.load(Ordering::Acquire);
        if team.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            team.arrived.store(0, Ordering::Relaxed);
            team.generation.store(generation + 1, Ordering::Release);
            return;
        }
        let mut spins = 0;
        while team.generation.load(Ordering::Acquire) == generation {
            if team.poisoned.load(Ordering::Relaxed) {
                panic!("another member of the CPU thread team panicked");
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Chunks for Member<'_> {
    fn threads(&self) -> usize {
        self.size
    }

    fn for_each_chunk(&self, total: usize, chunk: usize, body: &(dyn Fn(Range<usize>) + Sync)) {
        let n = self.loops.get();
        self.loops.set(n + 1);
        let team = self.team;
        // Loops alternate between two counters. The next loop's was last
        // used by the loop before this one, which every member has left
        // (they passed its barrier), and it is next used after this loop's
        // barrier, which member 0 reaches only after resetting it.
        if self.id == 0 {
            team.next[(n + 1) % 2].store(0, Ordering::Relaxed);
        }
        let next = &team.next[n % 2];
        let chunk = chunk.max(1);
        loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= total {
                break;
            }
            body(start..(start + chunk).min(total));
        }
        self.barrier();
    }
}

type OmpGetNumThreads = unsafe extern "C" fn() -> c_int;

fn omp_get_num_threads() -> Option<OmpGetNumThreads> {
    static ENTRY: OnceLock<Option<OmpGetNumThreads>> = OnceLock::new();
    *ENTRY.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name over the global scope.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_num_threads".as_ptr()) };
        // SAFETY: libgomp's omp_get_num_threads takes nothing, returns int.
        (!sym.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut c_void, OmpGetNumThreads>(sym) })
    })
}

extern "C" fn enter(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `run_team` keeps alive until
    // GOMP_parallel returns, after every thread has left here.
    let team = unsafe { &*(data as *const Team) };
    let size = omp_get_num_threads().map_or(1, |f| {
        // SAFETY: called inside the parallel region, as OpenMP allows.
        unsafe { f() }.max(1) as usize
    });
    join(team, size);
}

fn join(team: &Team, size: usize) {
    let member = Member {
        team,
        id: team.joined.fetch_add(1, Ordering::Relaxed),
        size,
        loops: Cell::new(0),
    };
    let run = std::panic::AssertUnwindSafe(|| (team.body)(&member));
    if let Err(panic) = std::panic::catch_unwind(run) {
        team.poisoned.store(true, Ordering::Relaxed);
        std::panic::resume_unwind(panic);
    }
}

/// The team on scoped threads of our own; a panic in any member reaches
/// the caller.
fn run_scoped(team: &Team, threads: usize) {
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(|| join(team, threads));
        }
        join(team, threads);
    })
}

fn new_team<'a>(body: &'a (dyn Fn(&Member) + Sync)) -> Team<'a> {
    Team {
        body,
        joined: AtomicUsize::new(0),
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        next: [AtomicUsize::new(0), AtomicUsize::new(0)],
        poisoned: AtomicBool::new(false),
    }
}

/// Runs `body` on a team of up to `threads` threads and returns when every
/// member has returned from it.
pub fn run_team(threads: usize, body: &(dyn Fn(&Member) + Sync)) {
    let team = new_team(body);
    let threads = threads.max(1);
    let entries: Option<(GompParallel, _)> = gomp_parallel().zip(omp_get_num_threads());
    match entries {
        _ if threads == 1 => join(&team, 1),
        // SAFETY: `team` outlives the call; `enter` only reads it.
        Some((parallel, _)) => unsafe {
            parallel(
                enter,
                &team as *const Team as *mut c_void,
                threads as std::ffi::c_uint,
                0,
            )
        },
        None => run_scoped(&team, threads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn loops_see_the_loop_before_them_whole() {
        for threads in [1, 2, 3] {
            // Loop r reads buffer r % 2 and writes the other: a missing
            // barrier, a lost or repeated chunk, or a counter not reset
            // changes the sums.
            let bufs = [Mutex::new(vec![1u64; 97]), Mutex::new(vec![0u64; 97])];
            let firsts = Mutex::new(Vec::new());
            run_team(threads, &|m: &Member| {
                assert!(m.id < m.threads());
                for round in 0..50 {
                    let total = 97 - round;
                    m.for_each_chunk(total, 1 + round % 7, &|r| {
                        let (a, b) = (bufs[0].lock().unwrap(), bufs[1].lock().unwrap());
                        let (src, mut dst) = if round % 2 == 0 { (a, b) } else { (b, a) };
                        for i in r {
                            dst[i] = src[i].wrapping_add(src[(i + 1) % total]).wrapping_add(1);
                        }
                    });
                    if m.id == 0 {
                        let first = bufs[(round + 1) % 2].lock().unwrap()[0];
                        firsts.lock().unwrap().push(first);
                    }
                    m.barrier();
                }
            });
            let (mut src, mut dst) = (vec![1u64; 97], vec![0u64; 97]);
            let mut want = Vec::new();
            for round in 0..50 {
                let total = 97 - round;
                for i in 0..total {
                    dst[i] = src[i].wrapping_add(src[(i + 1) % total]).wrapping_add(1);
                }
                want.push(dst[0]);
                std::mem::swap(&mut src, &mut dst);
            }
            assert_eq!(firsts.into_inner().unwrap(), want, "threads {threads}");
        }
    }

    #[test]
    fn a_panicking_member_does_not_leave_the_others_waiting() {
        // Scoped threads, as where libgomp is missing: the panic reaches
        // the caller instead of a member waiting at the barrier forever.
        let body = |m: &Member| {
            if m.id == 1 {
                panic!("member 1 fails");
            }
            m.barrier();
        };
        let team = new_team(&body);
        let scoped = std::panic::AssertUnwindSafe(|| run_scoped(&team, 3));
        let result = std::panic::catch_unwind(scoped);
        assert!(result.is_err());
    }

    #[test]
    fn the_team_is_the_size_asked_for() {
        let ids = Mutex::new(Vec::new());
        run_team(2, &|m: &Member| {
            ids.lock().unwrap().push((m.id, m.threads()));
            m.barrier();
        });
        let mut ids = ids.into_inner().unwrap();
        ids.sort();
        assert_eq!(ids, [(0, 2), (1, 2)]);
    }
}
