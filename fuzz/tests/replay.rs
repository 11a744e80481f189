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

/// tracing-subscriber's `EnvFilter::try_new` panics on some non-ASCII directives; a
/// `log.level` that reaches it must be an error naming the key (fixed in 3737eda).
#[test]
fn a_log_level_that_tracing_subscriber_cannot_parse_is_an_error() {
    use broadcaster::config::{Config, Overrides};
    let path = std::env::temp_dir().join(format!("bc-fuzz-log-{}.toml", std::process::id()));
    std::fs::write(&path, "[log]\nlevel = \" \u{6ae}=q\"\n").unwrap();
    let r =
        std::panic::catch_unwind(|| Config::load(Some(&path), &|_| None, &Overrides::default()));
    let _ = std::fs::remove_file(&path);
    let e = r.expect("Config::load panicked").expect_err("accepted");
    assert!(e.0.contains("log.level"), "{e}");
}
