//! `tuning/check-host.sh` reports and never fails on an untuned host (CI machines are untuned).

use std::process::Command;

fn script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tuning/check-host.sh")
}

#[test]
fn check_host_reports_every_setting_and_exits_zero() {
    let out = Command::new("bash")
        .arg(script())
        .output()
        .expect("running bash tuning/check-host.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "fs.nr_open",
        "fs.file-max",
        "net.core.netdev_max_backlog",
        "fs.epoll.max_user_watches",
        "nofile",
        "memlock",
        "kernel version",
        "seccomp",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(
        text.contains("Nothing to change.") || text.contains("To change ("),
        "{text}"
    );
}

#[test]
fn check_host_quiet_and_bad_usage() {
    let quiet = Command::new("bash")
        .arg(script())
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(quiet.status.success());
    let bad = Command::new("bash")
        .arg(script())
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
