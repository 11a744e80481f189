//! Process accounting: the server's CPU time and RSS from /proc, the load generator's own CPU time,
//! the open-files limit, and CPU pinning.

use std::time::Duration;

/// One sample of a process's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ProcSample {
    /// utime + stime from /proc/PID/stat (clock-tick resolution, includes exited threads).
    pub(crate) cpu_ticks_ns: u64,
    /// The system-time part of `cpu_ticks_ns` (stime): the kernel's share, mostly TCP.
    pub(crate) sys_ticks_ns: u64,
    /// Sum of the threads' run time from /proc/PID/task/*/schedstat (nanosecond resolution, live
    /// threads only); 0 when schedstat is unavailable.
    cpu_sched_ns: u64,
    /// VmRSS in bytes.
    pub(crate) rss_bytes: u64,
}

impl ProcSample {
    /// The best CPU figure: schedstat when present (precise), otherwise the tick count.
    pub(crate) fn cpu_ns(&self) -> u64 {
        if self.cpu_sched_ns > 0 {
            self.cpu_sched_ns
        } else {
            self.cpu_ticks_ns
        }
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// (utime, stime) in ticks from the contents of /proc/PID/stat.
fn parse_stat_user_sys_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may contain spaces: fields count from after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 overall, index 0 here; utime is field 14 (index 11), stime 15 (12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// VmRSS in bytes from the contents of /proc/PID/status.
fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads a sample of process `pid`.
pub(crate) fn sample(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let (user, sys) = parse_stat_user_sys_ticks(&stat).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable /proc/PID/stat")
    })?;
    let rss = parse_status_rss(&status).unwrap_or(0);
    let mut sched = 0u64;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat")) {
                sched += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(ProcSample {
        cpu_ticks_ns: (user + sys) * (1_000_000_000 / clk_tck()),
        sys_ticks_ns: sys * (1_000_000_000 / clk_tck()),
        cpu_sched_ns: sched,
        rss_bytes: rss,
    })
}

/// The sum of samples of every process in `pids` (several cluster nodes, or a node and its Redis):
/// `None` when `pids` is empty or any of them cannot be read. The schedstat figure is kept only when
/// every process has one, so `cpu_ns` never mixes the two sources.
pub(crate) fn sample_all(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    let samples: Vec<ProcSample> = pids
        .iter()
        .map(|&p| sample(p).ok())
        .collect::<Option<_>>()?;
    Some(sum_samples(&samples))
}

/// Adds samples up (see [`sample_all`]).
fn sum_samples(samples: &[ProcSample]) -> ProcSample {
    let mut t = ProcSample::default();
    let all_sched = samples.iter().all(|s| s.cpu_sched_ns > 0);
    for s in samples {
        t.cpu_ticks_ns += s.cpu_ticks_ns;
        t.sys_ticks_ns += s.sys_ticks_ns;
        t.cpu_sched_ns += s.cpu_sched_ns;
        t.rss_bytes += s.rss_bytes;
    }
    if !all_sched {
        t.cpu_sched_ns = 0;
    }
    t
}

/// Open file descriptors of process `pid` (entries of /proc/PID/fd).
pub(crate) fn fd_count(pid: u32) -> std::io::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The server's RSS alone (VmRSS of /proc/PID/status), bytes.
pub(crate) fn rss(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_rss(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no VmRSS in /proc/PID/status",
        )
    })
}

/// This process's user + system CPU time (getrusage, microsecond resolution, all threads).
pub(crate) fn self_cpu() -> Duration {
    let (u, s) = self_cpu_user_sys();
    u + s
}

/// This process's (user, system) CPU time.
pub(crate) fn self_cpu_user_sys() -> (Duration, Duration) {
    // SAFETY: getrusage fills a rusage struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// This process's RSS in bytes.
pub(crate) fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_rss(&s))
        .unwrap_or(0)
}

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the resulting soft limit.
pub(crate) fn raise_nofile() -> u64 {
    // SAFETY: get/setrlimit read and write one rlimit struct we own.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// Pins the calling thread to `cpu`; a failure (CPU absent, not allowed) is reported, not fatal.
pub(crate) fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Number of CPUs this process may run on.
pub(crate) fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_spaces_in_comm() {
        let stat = "1234 (my (weird) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 1000 50";
        assert_eq!(parse_stat_user_sys_ticks(stat), Some((250, 75)));
        assert_eq!(parse_stat_user_sys_ticks("garbage"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1536 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss(status), Some(1536 * 1024));
        assert_eq!(parse_status_rss("Name: x\n"), None);
    }

    #[test]
    fn sampling_ourselves_works() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::spin_loop();
        }
        let t = sample(std::process::id()).unwrap();
        assert!(t.cpu_ns() > s.cpu_ns());
        assert!(self_cpu() > Duration::ZERO);
        assert!(thread_cpu_ns() > 0);
        assert!(raise_nofile() >= 1);
    }

    #[test]
    fn samples_add_up() {
        let a = ProcSample {
            cpu_ticks_ns: 10,
            sys_ticks_ns: 4,
            cpu_sched_ns: 11,
            rss_bytes: 100,
        };
        let mut b = a;
        b.rss_bytes = 50;
        let t = sum_samples(&[a, b]);
        assert_eq!(
            (t.cpu_ticks_ns, t.sys_ticks_ns, t.cpu_sched_ns, t.rss_bytes),
            (20, 8, 22, 150)
        );
        assert_eq!(t.cpu_ns(), 22);
        // One process without schedstat: ticks for everyone.
        b.cpu_sched_ns = 0;
        let t = sum_samples(&[a, b]);
        assert_eq!(t.cpu_ns(), 20);
        assert_eq!(sample_all(&[]), None);
        let me = std::process::id();
        let two = sample_all(&[me, me]).unwrap();
        assert!(two.rss_bytes > 0);
        assert_eq!(sample_all(&[me, u32::MAX]), None, "an unreadable pid");
    }

    #[test]
    fn fds_and_rss_of_ourselves() {
        let n = fd_count(std::process::id()).unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(fd_count(std::process::id()).unwrap() > n.saturating_sub(2));
        drop(f);
        assert!(rss(std::process::id()).unwrap() > 0);
        assert!(fd_count(u32::MAX).is_err());
    }
}
