//! Process metrics under the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), so
//! that stock dashboards and alerts work; read from `/proc` at each
//! collection. Elsewhere than Linux they are simply not reported.

use opentelemetry::metrics::Meter;

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    /// Seconds since the Unix epoch.
    start_time: f64,
}

/// Registers the process gauges and counter on `meter`.
pub(crate) fn observe(meter: &Meter) {
    meter
        .f64_observable_counter("process.cpu")
        .with_unit("s")
        .with_description("Total user and system CPU time spent in seconds")
        .with_callback(|o| {
            if let Some(s) = sample() {
                o.observe(s.cpu_seconds, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.resident_memory")
        .with_unit("By")
        .with_description("Resident memory size in bytes")
        .with_callback(|o| {
            if let Some(s) = sample() {
                o.observe(s.resident_bytes, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.virtual_memory")
        .with_unit("By")
        .with_description("Virtual memory size in bytes")
        .with_callback(|o| {
            if let Some(s) = sample() {
                o.observe(s.virtual_bytes, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.threads")
        .with_description("Number of OS threads in the process")
        .with_callback(|o| {
            if let Some(s) = sample() {
                o.observe(s.threads, &[]);
            }
        })
        .build();
    meter
        .f64_observable_gauge("process.start_time")
        .with_unit("s")
        .with_description("Start time of the process since unix epoch in seconds")
        .with_callback(|o| {
            if let Some(s) = sample() {
                o.observe(s.start_time, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.open_fds")
        .with_description("Number of open file descriptors")
        .with_callback(|o| {
            if let Some(n) = open_fds() {
                o.observe(n, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.max_fds")
        .with_description("Maximum number of open file descriptors")
        .with_callback(|o| {
            if let Some(n) = max_fds() {
                o.observe(n, &[]);
            }
        })
        .build();
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| boot_time(&s));
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    parse_stat(&stat, ticks as f64, page as u64, boot_time?)
}

/// Parses `/proc/<pid>/stat` (see proc(5)). The command name (field 2) is
/// in parentheses and may hold spaces: fields are counted after its `)`.
fn parse_stat(stat: &str, ticks_per_sec: f64, page_size: u64, boot_time: u64) -> Option<Sample> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // fields[0] is field 3 (state).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let cpu_ticks = field(14)? + field(15)?;
    Some(Sample {
        cpu_seconds: cpu_ticks as f64 / ticks_per_sec,
        threads: field(20)?,
        start_time: boot_time as f64 + field(22)? as f64 / ticks_per_sec,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
    })
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn open_fds() -> Option<u64> {
    // The directory's own handle is counted too: as the client libraries do.
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let stat = "4242 (model (x) 1) S 1 4242 4242 0 -1 4194560 9000 0 12 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let s = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123456789);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample().expect("/proc is readable");
        assert!(s.resident_bytes > 0 && s.threads >= 1, "{s:?}");
        assert!(s.start_time > 1.5e9, "{s:?}");
        assert!(open_fds().unwrap() >= 3);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }
}
