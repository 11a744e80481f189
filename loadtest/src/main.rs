//! `broadcaster-loadtest SCENARIO [options]`: see `--help`, and `loadtest/README.md`.

use clap::Parser;
use loadtest::cli::{Cli, Scenario};
use loadtest::scenario;

fn main() {
    let cli = Cli::parse();
    let (report, common) = match &cli.scenario {
        Scenario::Fanout(a) => (scenario::fanout(a), &a.common),
        Scenario::Chat(a) => (scenario::chat(a), &a.common),
        Scenario::Idle(a) => (scenario::idle(a), &a.common),
        Scenario::Storm(a) => (scenario::storm(a), &a.common),
        Scenario::Recovery(a) => (scenario::recovery(a), &a.common),
        Scenario::Soak(a) => (scenario::soak(a), &a.common),
        Scenario::Floor(a) => {
            std::process::exit(run_floor(a));
        }
    };
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
