//! `nat-matrix`: runs every NAT case of the lab with the real binaries, prints a table and
//! writes the same as JSON. Needs root (network namespaces, nftables).
//!
//! Usage: nat-matrix [--json PATH] [--only SUBSTRING] [--baseline]
//!
//! With `--baseline`, every case also runs without punching and without relay (a plain
//! client dialling the camera), side by side, to show what traversal buys.

use std::process::ExitCode;

use peercam_tests::lab::{require_root, sweep_stale};
use peercam_tests::matrix::{baseline_table, cases, run_baseline, run_case, table};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut json = "target/nat-matrix.json".to_string();
    let mut only: Option<String> = None;
    let baseline = args.iter().any(|a| a == "--baseline");
    let mut it = args.iter().filter(|a| *a != "--baseline");
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--json", Some(p)) => json = p.clone(),
            ("--only", Some(f)) => only = Some(f.clone()),
            _ => {
                eprintln!("usage: nat-matrix [--json PATH] [--only SUBSTRING] [--baseline]");
                return ExitCode::from(2);
            }
        }
    }
    if let Err(why) = require_root() {
        eprintln!("nat-matrix cannot run: {why}");
        return ExitCode::from(2);
    }
    sweep_stale();
    let mut outcomes = Vec::new();
    for case in cases() {
        let label = format!("{:?}", case.spec);
        if only
            .as_ref()
            .is_some_and(|f| !label.to_lowercase().contains(&f.to_lowercase()))
        {
            continue;
        }
        let o = run_case(&case);
        eprintln!(
            "{} {} -> {}: {} {}",
            o.camera,
            o.viewer,
            o.path.as_deref().unwrap_or("-"),
            if o.ok { "ok" } else { "FAIL" },
            o.error.as_deref().unwrap_or("")
        );
        outcomes.push(o);
    }
    print!("{}", table(&outcomes));
    if baseline {
        let base: Vec<_> = cases()
            .iter()
            .filter(|c| {
                only.as_ref().is_none_or(|f| {
                    format!("{:?}", c.spec)
                        .to_lowercase()
                        .contains(&f.to_lowercase())
                })
            })
            .map(run_baseline)
            .collect();
        println!("\nbaseline (no punching, no relay):");
        print!("{}", baseline_table(&base));
    }
    match serde_json::to_string_pretty(&outcomes) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&json, text) {
                eprintln!("cannot write {json}: {e}");
            } else {
                eprintln!("wrote {json}");
            }
        }
        Err(e) => eprintln!("cannot encode JSON: {e}"),
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    println!("{} passed, {} failed", outcomes.len() - failed, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
