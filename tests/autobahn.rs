//! The real Autobahn|Testsuite (fuzzingclient, Python 2.7, pinned in `tests/autobahn/`) against
//! this build's server: `tests/autobahn/run.sh --quick` (every group but 9 and the slowest cases,
//! permessage-deflate groups 12 and 13 included; about 70 s). It fails when a case misbehaves,
//! as `classify.py` judges from the per-case reports, and when compression was not negotiated
//! (12 and 13 "unimplemented"). The full run is the same script without `--quick` (README,
//! "Robustness").

use std::process::Command;

#[test]
fn autobahn_finds_no_case_where_the_server_misbehaves() {
    let out_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("autobahn-quick");
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/autobahn/run.sh"
        ))
        .arg("--quick")
        .arg("--server")
        .arg(env!("CARGO_BIN_EXE_broadcaster"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("running tests/autobahn/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "Autobahn run failed:\n{text}");
    assert!(text.contains("no case misbehaved"), "{text}");
    // The table: group, total, ok, answered, limit, unimplemented, MISBEHAVED.
    let rows: Vec<Vec<u64>> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<u64> = l
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect();
            (cols.len() == 7 && l.split_whitespace().count() == 7).then_some(cols)
        })
        .collect();
    assert!(rows.len() >= 9, "per-group table not found:\n{text}");
    for row in &rows {
        assert_eq!(row[6], 0, "group {} misbehaved:\n{text}", row[0]);
    }
    for group in [12, 13] {
        let row = rows
            .iter()
            .find(|r| r[0] == group)
            .unwrap_or_else(|| panic!("group {group} did not run:\n{text}"));
        assert_eq!(
            row[5], 0,
            "group {group}: compression not negotiated:\n{text}"
        );
        assert!(
            row[1] > 50 && row[2] + row[3] == row[1],
            "group {group}: {row:?}"
        );
    }
}
