//! Through real NATs: the whole matrix of LAB.md, with the real binaries in network
//! namespaces. Needs root; in CI (which runs as root) it must run, never skip.

use peercam_tests::lab::{leftovers, require_root, sweep_stale};
use peercam_tests::matrix::{cases, run_case, table};

#[test]
fn every_nat_case_connects_on_the_expected_path() {
    if let Err(why) = require_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the NAT lab must run in CI: {why}"
        );
        eprintln!("SKIPPED: NAT matrix not run because {why}");
        return;
    }
    sweep_stale();
    let outcomes: Vec<_> = cases().iter().map(run_case).collect();
    let report = table(&outcomes);
    eprintln!("{report}");
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(failed.is_empty(), "NAT cases failed:\n{report}");
    assert_eq!(leftovers(), Vec::<String>::new(), "namespaces left behind");
}
