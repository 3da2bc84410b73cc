//! The TUN link of the kernel-TCP baseline: real packets between two namespaces get the
//! configured delay and loss. Needs root; in CI (which runs as root) it must run, never skip.

use std::time::Duration;

use peercam_tests::lab::{leftovers, require_root, run_bounded};
use peercam_tests::tunlink::{TunLink, ADDR_B};

/// Pings B from A through a link with `spec`: (replies received, average RTT in ms).
fn ping(spec: &str, count: u32) -> (u32, Option<f64>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let link = TunLink::build(spec.parse().unwrap()).expect("the TUN link builds");
    let mut cmd = link.command(link.ns_a(), "ping");
    cmd.args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "1"])
        .arg(ADDR_B.to_string());
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).expect("ping ends");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{spec}:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    let received = text
        .lines()
        .find_map(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" received")?
                .parse()
                .ok()
        })
        .expect("ping prints a summary");
    // rtt min/avg/max/mdev = 50.1/50.3/50.6/0.2 ms
    let avg = text
        .lines()
        .find_map(|l| l.split(" = ").nth(1)?.split('/').nth(1)?.parse().ok());
    (received, avg)
}

#[test]
fn ping_through_the_tun_link_shows_the_configured_rtt_and_loss() {
    if let Err(why) = require_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the TUN link test must run in CI: {why}"
        );
        eprintln!("SKIPPED: TUN link test not run because {why}");
        return;
    }
    let (got, clean) = ping("", 5);
    assert_eq!(got, 5, "a clean link loses nothing");
    let clean = clean.expect("ping prints an average");
    assert!(clean < 15.0, "a clean link adds no delay, got {clean} ms");

    let (got, avg) = ping("rtt=50ms", 5);
    assert_eq!(got, 5, "no loss configured");
    let avg = avg.expect("ping prints an average");
    assert!(
        (49.0..80.0).contains(&avg),
        "rtt=50ms should show ~50 ms, got {avg} ms"
    );

    let (got, _) = ping("loss=100%", 3);
    assert_eq!(got, 0, "every packet lost");

    let mine: Vec<_> = leftovers();
    assert!(mine.is_empty(), "namespaces left behind: {mine:?}");
}
