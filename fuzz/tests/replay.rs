//! The committed seed corpora and regression inputs go through every target body: no
//! assertion fails (see `regressions/README.md` for what each regression input was).

use broadcaster_fuzz::replay::{inputs, TARGETS};

fn replay(dir: &str, require_some: bool) -> Vec<String> {
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        let files = inputs(dir, target);
        assert!(!require_some || !files.is_empty(), "no {dir} for {target}");
        for f in files {
            let data = std::fs::read(&f).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                failed.push(format!("{target}: {}", f.display()));
            }
        }
    }
    failed
}

#[test]
fn seed_corpora_pass_every_target() {
    let failed = replay("corpus", true);
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn regression_inputs_pass() {
    let failed = replay("regressions", false);
    assert!(failed.is_empty(), "{failed:#?}");
}
