//! `live-bench`: peercam against one ordered stream on the same impaired link, for every
//! condition of the live-video issue; prints a table and writes the same as JSON.
//!
//! Usage: live-bench [--json PATH] [--only NAME] [--scale F] [--clips DIR]
//!
//! Run it from a release build (`cargo build --release --workspace --bins`): it starts
//! the `camera-agent` binary found next to itself. `--scale 0.25` shortens every session.

use std::path::PathBuf;
use std::process::ExitCode;

use peercam_tests::live::{conditions, run_all, table};

const USAGE: &str = "usage: live-bench [--json PATH] [--only NAME] [--scale F] [--clips DIR]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Hidden: the kernel-TCP baseline's two ends, run by the bench itself inside the
    // namespaces of its TUN link.
    match args.first().map(String::as_str) {
        Some("tcp-send") => return peercam_tests::tcp_baseline::send_main(&args[1..]),
        Some("tcp-recv") => return peercam_tests::tcp_baseline::recv_main(&args[1..]),
        _ => {}
    }
    let mut json = PathBuf::from("target/live-bench.json");
    let mut clips = PathBuf::from("target/bench-clips");
    let mut only: Option<String> = None;
    let mut scale = 1.0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--json", Some(p)) => json = PathBuf::from(p),
            ("--clips", Some(p)) => clips = PathBuf::from(p),
            ("--only", Some(n)) => only = Some(n.clone()),
            ("--scale", Some(f)) => match f.parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 10.0 => scale = f,
                _ => {
                    eprintln!("live-bench: --scale wants a number between 0 and 10\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let all = conditions(scale);
    let exact = only
        .as_ref()
        .is_some_and(|o| all.iter().any(|c| c.name == *o));
    let conds: Vec<_> = all
        .into_iter()
        .filter(|c| match &only {
            // An exact name picks one condition; otherwise every name containing it.
            Some(o) if exact => c.name == *o,
            Some(o) => c.name.contains(o.as_str()),
            None => true,
        })
        .collect();
    if conds.is_empty() {
        eprintln!("live-bench: no condition matches {only:?}");
        return ExitCode::from(2);
    }
    let camera = peercam_tests::binary("camera-agent");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("live-bench: cannot start tokio: {e}");
            return ExitCode::from(1);
        }
    };
    let rows = runtime.block_on(run_all(&conds, &clips, &camera));
    print!("{}", table(&rows));
    let failed = rows.iter().any(|r| {
        [&r.peercam, &r.baseline, &r.baseline_bbr, &r.baseline_tcp]
            .iter()
            .any(|o| o.error.is_some())
    });
    match serde_json::to_string_pretty(&rows) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&json, text) {
                eprintln!("live-bench: cannot write {}: {e}", json.display());
                return ExitCode::from(1);
            }
            eprintln!("live-bench: wrote {}", json.display());
        }
        Err(e) => eprintln!("live-bench: {e}"),
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
