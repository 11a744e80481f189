//! What is checked before any shard starts, so that a host that cannot run the server gets one
//! clear error and an exit instead of a panic inside a shard: io_uring must be allowed.

use std::io;

/// Opens and probes a small io_uring as glommio will (glommio registers a probe on each ring
/// it builds); on refusal, says what refused it and how to fix that.
pub(crate) fn check_io_uring() -> Result<(), String> {
    let refused = match io_uring::IoUring::new(8) {
        Ok(ring) => {
            let mut probe = io_uring::Probe::new();
            match ring.submitter().register_probe(&mut probe) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    Err(explain(&refused, &Host::read()))
}

/// What the host says about itself, for the explanation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    /// `uname -r`.
    pub kernel_release: Option<String>,
    /// `kernel.io_uring_disabled` (Linux 6.6+): 0 allowed, 1 only for `kernel.io_uring_group`,
    /// 2 for nobody.
    pub io_uring_disabled: Option<u8>,
    /// The `Seccomp:` field of `/proc/self/status`: 2 while a filter is installed.
    pub seccomp_mode: Option<u8>,
}

impl Host {
    pub(crate) fn read() -> Host {
        let number = |text: &str| text.trim().parse::<u8>().ok();
        Host {
            kernel_release: crate::sys::kernel_release(),
            io_uring_disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .and_then(|t| number(&t)),
            seccomp_mode: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find_map(|l| number(l.strip_prefix("Seccomp:")?))),
        }
    }

    /// (major, minor) of the kernel release.
    fn kernel_version(&self) -> Option<(u32, u32)> {
        let release = self.kernel_release.as_deref()?;
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }
}

/// The profile shipped with the server that allows io_uring.
const PROFILE: &str = "tuning/seccomp.json";

/// The one error printed when io_uring is refused: what refused it, and how to fix it.
pub(crate) fn explain(e: &io::Error, host: &Host) -> String {
    let what = format!(
        "io_uring is not available ({e}); Broadcaster's shards run on glommio, which needs it"
    );
    let release = host.kernel_release.as_deref().unwrap_or("unknown");
    if host.kernel_version().is_some_and(|v| v < (5, 8)) {
        return format!(
            "{what}. The kernel is {release}: glommio needs Linux 5.8 or newer; upgrade the kernel."
        );
    }
    let errno = e.raw_os_error();
    match host.io_uring_disabled {
        Some(2) => {
            return format!(
                "{what}. The sysctl kernel.io_uring_disabled is 2 (io_uring off for every \
                 process): set it to 0 (sysctl -w kernel.io_uring_disabled=0, and in \
                 /etc/sysctl.d/ to keep it)."
            )
        }
        Some(1) if errno == Some(libc::EPERM) && host.seccomp_mode != Some(2) => {
            return format!(
                "{what}. The sysctl kernel.io_uring_disabled is 1: only members of the group \
                 kernel.io_uring_group may use io_uring. Run the server in that group, or set \
                 the sysctl to 0."
            )
        }
        _ => {}
    }
    if host.seccomp_mode == Some(2) && matches!(errno, Some(libc::EPERM | libc::ENOSYS)) {
        return format!(
            "{what}. A seccomp filter blocks the io_uring system calls, as the default profiles \
             of Docker 25+, containerd, Podman and Docker Desktop do. Run with the profile \
             {PROFILE}, which allows them: `docker run --security-opt seccomp={PROFILE} ...`, \
             `podman run --security-opt seccomp={PROFILE} ...`, or in Kubernetes copy it into \
             the kubelet's seccomp directory and set securityContext.seccompProfile to \
             {{type: Localhost, localhostProfile: broadcaster-seccomp.json}}."
        );
    }
    match errno {
        Some(libc::ENOSYS) => format!(
            "{what}. The kernel ({release}) has no io_uring (built without CONFIG_IO_URING): \
             use a kernel with io_uring, Linux 5.8 or newer."
        ),
        Some(libc::ENOMEM) => format!(
            "{what}. The locked-memory limit is too low for the ring: raise it (ulimit -l, or \
             LimitMEMLOCK=infinity in the systemd unit, tuning/broadcaster.service)."
        ),
        Some(libc::EPERM) => format!(
            "{what}. The kernel refused it with EPERM: a security policy (seccomp, SELinux, \
             AppArmor, or the sysctl kernel.io_uring_disabled) blocks io_uring; allow the \
             io_uring system calls (the seccomp profile {PROFILE} does)."
        ),
        _ => format!("{what}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(release: &str, disabled: Option<u8>, seccomp: Option<u8>) -> Host {
        Host {
            kernel_release: Some(release.into()),
            io_uring_disabled: disabled,
            seccomp_mode: seccomp,
        }
    }

    #[test]
    fn each_cause_is_named_with_its_fix() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        let cases = [
            (
                &enosys,
                host("5.4.0-150-generic", None, None),
                "Linux 5.8 or newer",
            ),
            (
                &eperm,
                host("6.8.0", Some(2), Some(0)),
                "kernel.io_uring_disabled is 2",
            ),
            (
                &eperm,
                host("6.8.0", Some(1), Some(0)),
                "kernel.io_uring_group",
            ),
            (
                &eperm,
                host("6.1.0", None, Some(2)),
                "--security-opt seccomp=tuning/seccomp.json",
            ),
            (
                &enosys,
                host("6.1.0", Some(0), Some(2)),
                "seccomp filter blocks",
            ),
            (&enosys, host("6.1.0", None, Some(0)), "CONFIG_IO_URING"),
            (&eperm, host("6.1.0", None, Some(0)), "security policy"),
        ];
        for (e, h, says) in cases {
            let text = explain(e, &h);
            assert!(text.contains(says), "{h:?}: {text}");
            assert!(text.starts_with("io_uring is not available"), "{text}");
        }
        let mem = io::Error::from_raw_os_error(libc::ENOMEM);
        assert!(explain(&mem, &host("6.1.0", None, Some(0))).contains("LimitMEMLOCK"));
    }

    #[test]
    fn this_host_is_read() {
        let h = Host::read();
        assert!(h.kernel_version().is_some_and(|v| v >= (5, 8)), "{h:?}");
        assert!(h.seccomp_mode.is_some(), "{h:?}");
    }
}
