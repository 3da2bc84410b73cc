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
    let _turn = crate::nat::one_lab_at_a_time();
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

fn condition(link: &str, secs: u64) -> peercam_tests::live::Condition {
    peercam_tests::live::Condition {
        name: "test".into(),
        link: link.into(),
        clip: peercam_tests::live::Clip::Hd4M,
        secs,
        ttff_samples: 1,
    }
}

#[test]
fn kernel_tcp_baseline_is_live_on_a_clean_link_and_falls_behind_at_half_capacity() {
    let _turn = crate::nat::one_lab_at_a_time();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(kernel_tcp_baseline());
}

async fn kernel_tcp_baseline() {
    use peercam_tests::live::{run_baseline_tcp, Clip};
    let clip = Clip::Hd4M
        .ensure(&std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-clips"))
        .expect("ffmpeg encodes the test clip");
    let clean = peercam_tests::within(
        30,
        "tcp baseline",
        run_baseline_tcp(&condition("rtt=50ms", 5), &clip),
    )
    .await;
    if let Some(why) = &clean.skipped {
        assert!(
            std::env::var_os("CI").is_none(),
            "the kernel-TCP baseline must run in CI: {why}"
        );
        eprintln!("SKIPPED: kernel-TCP baseline not run because {why}");
        return;
    }
    assert!(clean.error.is_none(), "{:?}", clean.error);
    assert!(
        clean.delivered > 0.95,
        "delivered {:.0} %",
        clean.delivered * 100.0
    );
    let p99 = clean.latency_p99_ms.expect("frames arrived");
    assert!(
        (25.0..400.0).contains(&p99),
        "one way over rtt=50ms: p99 {p99} ms"
    );
    let half = peercam_tests::within(
        40,
        "tcp baseline",
        run_baseline_tcp(&condition("rtt=50ms,rate=2000kbit,queue=200ms", 10), &clip),
    )
    .await;
    assert!(half.error.is_none(), "{:?}", half.error);
    let behind = half.latency_max_ms.expect("frames arrived");
    assert!(
        behind > 3000.0,
        "one TCP stream on half the capacity should fall behind: max {behind} ms"
    );
    assert_eq!(leftovers(), Vec::<String>::new(), "namespaces left behind");
}
