//! A host that cannot run the server (issue 14): io_uring blocked by seccomp, as Docker 25+,
//! containerd, Podman and Docker Desktop do in their default profiles. The real binary runs
//! under a seccomp filter installed in its own process before exec; it must print one error
//! that says what is wrong and how to fix it, and exit non-zero, never hang half alive.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How long a server that cannot start may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// A filter that answers EPERM to the io_uring system calls matched by `rules` and allows
/// everything else.
fn filter(rules: BTreeMap<i64, Vec<SeccompRule>>) -> BpfProgram {
    let arch = TargetArch::try_from(std::env::consts::ARCH).expect("a seccomp architecture");
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .expect("a valid filter")
    .try_into()
    .expect("a BPF program")
}

/// Runs `broadcaster serve` under `program`; returns its exit code and stderr.
fn run_under(program: BpfProgram) -> (Option<i32>, String) {
    let stderr_path = temp_path(".stderr.log");
    let mut cmd = Command::new(bin());
    clean_env(&mut cmd);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
        .env("BROADCASTER_AUTH_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    kill_with_parent(&mut cmd);
    // SAFETY: the filter is built before the fork; applying it is two prctl/seccomp calls,
    // which allocate nothing, in the child only.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&program).map_err(|e| std::io::Error::other(e.to_string()))
        });
    }
    let mut child = cmd.spawn().expect("spawn the server");
    let deadline = Instant::now() + EXIT_WITHIN;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not exit within {EXIT_WITHIN:?}: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    (status.code(), stderr)
}

#[test]
fn io_uring_blocked_by_seccomp_is_one_clear_error_and_an_exit() {
    let rules = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, vec![]))
    .collect();
    let (code, stderr) = run_under(filter(rules));
    assert_eq!(code, Some(1), "exit status; stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    for says in [
        "io_uring is not available",
        "seccomp filter blocks",
        "--security-opt seccomp=tuning/seccomp.json",
        "Kubernetes",
    ] {
        assert!(errors[0].contains(says), "{says:?} missing: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A shard that panics ends the process with a log line and status 101. Here glommio
/// panics when its first `io_uring_enter` is refused (the start-up check only builds and
/// probes a ring, so it passes).
#[test]
fn a_panicking_shard_ends_the_process() {
    let rules = [(libc::SYS_io_uring_enter, vec![])].into_iter().collect();
    let (code, stderr) = run_under(filter(rules));
    assert_eq!(code, Some(101), "exit status; stderr: {stderr}");
    assert!(stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("a thread panicked; stopping the process thread=\"shard-"),
        "{stderr}"
    );
}

/// A shard whose executor cannot be built (glommio refused its 4,096-entry ring, while the
/// start-up check's small ring is allowed) ends the start with the reason, not a hang.
#[test]
fn a_shard_that_cannot_start_ends_the_start_with_its_reason() {
    let large_rings = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Gt,
        512,
    )
    .expect("a condition")])
    .expect("a rule");
    let rules = [(libc::SYS_io_uring_setup, vec![large_rings])]
        .into_iter()
        .collect();
    let (code, stderr) = run_under(filter(rules));
    assert_eq!(code, Some(1), "exit status; stderr: {stderr}");
    assert!(
        stderr.contains(
            "broadcaster: shard 0 stopped during start (glommio could not build its executor): "
        ),
        "{stderr}"
    );
}

/// The profile named in the error allows io_uring and keeps the syscalls Docker's default
/// profile denies denied.
#[test]
fn the_shipped_seccomp_profile_allows_io_uring() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/seccomp.json");
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("tuning/seccomp.json"))
            .expect("the profile is JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ALLOW", "{profile}");
    let denied: Vec<&str> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|rule| rule["action"] == "SCMP_ACT_ERRNO")
        .flat_map(|rule| rule["names"].as_array().expect("names"))
        .map(|n| n.as_str().expect("a name"))
        .collect();
    for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(!denied.contains(&name), "{name} denied");
    }
    for name in [
        "mount",
        "ptrace",
        "kexec_load",
        "bpf",
        "init_module",
        "unshare",
        "keyctl",
    ] {
        assert!(denied.contains(&name), "{name} allowed");
    }
}
