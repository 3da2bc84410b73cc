//! The load generator, CI-sized: it must keep working (the figures in `BENCHMARKS.md` come
//! from the same code with more cameras, in release).

use std::time::Duration;

use peercam_tests::load::{self, Options};
use peercam_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_registers_every_camera_answers_every_connect_and_survives_a_restart() {
    init_tracing();
    let mut opts = Options::new(binary("rendezvous"), 200);
    opts.endpoints = 4;
    opts.idle = Duration::from_millis(500);
    opts.connect_rate = 100.0;
    opts.duration = Duration::from_secs(2);
    opts.viewer_conns = 4;
    opts.restart = true;
    opts.register_timeout = Duration::from_secs(30);
    // 200 cameras at 100 registrations/s: a 2 s reconnect window (above the 0.5 s minimum).
    opts.extra_config = vec!["registration_rate = 100.0".into()];
    let report = within(90, "load run", load::run(&opts))
        .await
        .expect("load run completes");
    let text = report.text();
    assert_eq!(report.metrics_registered, 200.0, "{text}");
    assert_eq!(report.register_failures, 0, "{text}");
    assert!(report.rss_per_camera_bytes > 0.0, "{text}");
    let b = report.brokering.as_ref().expect("connect phase ran");
    assert_eq!((b.ok, b.failed, b.saturated), (200, 0, 0), "{text}");
    assert!(b.p50_ms > 0.0 && b.p99_ms >= b.p50_ms, "{text}");
    let r = report.restart.as_ref().expect("restart ran");
    assert!(r.all_back, "{text}");
    assert_eq!(r.failures, 0, "{text}");
    // Every camera was told how long to spread its reconnect over, sized to the fleet.
    assert_eq!((r.going_away, r.going_away_ms), (200, 2000), "{text}");
}
