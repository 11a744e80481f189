//! `broadcaster-loadtest SCENARIO [options]`: see `--help`, and `loadtest/README.md`.

use clap::Parser;
use loadtest::cli::{Cli, Common, Scenario};
use loadtest::report::Report;
use loadtest::{scenario, soak};

fn main() {
    let cli = Cli::parse();
    match &cli.scenario {
        Scenario::Fanout(a) => conclude(scenario::fanout(a), &a.common),
        Scenario::Chat(a) => conclude(scenario::chat(a), &a.common),
        Scenario::Idle(a) => conclude(scenario::idle(a), &a.common),
        Scenario::Storm(a) => conclude(scenario::storm(a), &a.common),
        Scenario::Recovery(a) => conclude(scenario::recovery(a), &a.common),
        Scenario::Scoreboard(a) => conclude(scenario::scoreboard(a), &a.common),
        Scenario::Proxy(a) => conclude(scenario::proxy(a), &a.common),
        Scenario::Presence(a) => conclude(scenario::presence(a), &a.common),
        Scenario::Soak(a) => conclude(soak::run(a), &a.common),
        Scenario::Floor(a) => std::process::exit(run_floor(a)),
    }
}

/// Prints the table, writes the files asked for, and exits 1 loudly when the run failed (2 when
/// it could not run).
fn conclude<F: serde::Serialize>(report: Result<Report<F>, String>, common: &Common) {
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broadcaster-loadtest: cannot run: {e}");
            std::process::exit(2);
        }
    };
    print!("{}", report.table());
    if let Err(e) = report.write_outputs(common) {
        eprintln!("broadcaster-loadtest: writing outputs failed: {e}");
        std::process::exit(2);
    }
    if !report.passed {
        eprintln!();
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!!! LOAD TEST FAILED: {}", report.failures.join("; "));
        for e in report.errors.iter().take(10) {
            eprintln!("!!!   {e}");
        }
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        std::process::exit(1);
    }
}

fn run_floor(a: &loadtest::cli::FloorArgs) -> i32 {
    match scenario::floor_only(a) {
        Ok(f) => {
            println!(
                "  kernel floor: {} loopback sockets, {}-byte frames, sender {}",
                f.sockets,
                f.frame_bytes,
                if a.pin {
                    "on CPU 0, reader on CPU 1"
                } else {
                    "unpinned"
                }
            );
            println!(
                "  {:>15} {:>12} {:>14} {:>16} {:>16}",
                "frames/send", "frames", "sends", "sender µs/frame", "reader µs/frame"
            );
            for p in &f.points {
                println!(
                    "  {:>15} {:>12} {:>14} {:>16.3} {:>16.3}",
                    p.frames_per_send,
                    p.frames,
                    p.sends,
                    p.sender_cpu_us_per_frame,
                    p.reader_cpu_us_per_frame
                );
            }
            if let Some(path) = &a.json {
                let text = serde_json::to_string_pretty(&f).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text + "\n") {
                    eprintln!("broadcaster-loadtest: writing {}: {e}", path.display());
                    return 2;
                }
            }
            0
        }
        Err(e) => {
            eprintln!("broadcaster-loadtest: floor failed: {e}");
            2
        }
    }
}
