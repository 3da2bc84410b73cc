//! Through real NATs: the whole matrix of LAB.md, with the real binaries in network
//! namespaces. Needs root; in CI (which runs as root) it must run, never skip.

use std::sync::{Mutex, MutexGuard};

use peercam_tests::lab::{leftovers, require_root, sweep_stale};

/// The lab tests take turns: a leftover check sees only the labs of the test that makes
/// it, and NAT timings are not disturbed by another lab's load.
pub(crate) fn one_lab_at_a_time() -> MutexGuard<'static, ()> {
    static LAB: Mutex<()> = Mutex::new(());
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}
use peercam_tests::matrix::{cases, run_case, table};

#[test]
fn every_nat_case_connects_on_the_expected_path() {
    let _turn = one_lab_at_a_time();
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

#[test]
fn viewer_ping_tells_direct_relay_only_and_unreachable_apart() {
    let _turn = one_lab_at_a_time();
    use peercam_tests::lab::Nat::{PortRestricted, Symmetric};
    use peercam_tests::matrix::{case, Scene, SceneOptions};
    if let Err(why) = require_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the NAT lab must run in CI: {why}"
        );
        eprintln!("SKIPPED: ping lab test not run because {why}");
        return;
    }
    let scenarios = [
        (
            case(PortRestricted, PortRestricted, 0, "direct"),
            false,
            0,
            "reachable directly",
        ),
        (
            case(Symmetric, Symmetric, 0, "relay"),
            false,
            6,
            "only through the relay",
        ),
        (
            case(Symmetric, Symmetric, 0, "-"),
            true,
            4,
            "could not reach camera cam-1",
        ),
    ];
    for (c, no_relay, code, sentence) in scenarios {
        let opts = SceneOptions {
            no_punch: false,
            no_relay,
        };
        let scene = Scene::start(&c, &opts).expect("scene starts");
        let out = scene
            .run_viewer(&["ping", "cam-1", "--count", "3"])
            .expect("ping runs");
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(code) {
            eprintln!(
                "viewer stderr: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                scene.logs()
            );
        }
        assert_eq!(
            out.status.code(),
            Some(code),
            "{:?}/{:?}: {text}",
            c.spec.camera,
            c.spec.viewer
        );
        assert!(text.contains(sentence), "{text}");
        assert!(text.contains("probe 1:"), "{text}");
        if code == 6 {
            assert_eq!(
                text.matches(": relay ").count(),
                3,
                "one line per probe: {text}"
            );
        }
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "namespaces left behind");
}

#[test]
fn netcheck_gives_the_right_verdict_behind_each_kind_of_nat() {
    let _turn = one_lab_at_a_time();
    use peercam_tests::lab::Nat::*;
    use peercam_tests::matrix::{case, Family, Scene, SceneOptions};
    if let Err(why) = require_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the NAT lab must run in CI: {why}"
        );
        eprintln!("SKIPPED: netcheck lab test not run because {why}");
        return;
    }
    let kinds = [
        (Public, "public"),
        (FullCone, "easy-nat"),
        (PortRestricted, "easy-nat"),
        (Symmetric, "symmetric-nat"),
        (DoubleNat, "easy-nat"),
        (Ipv6Firewall, "easy-nat"),
    ];
    for (nat, verdict) in kinds {
        // The side that runs netcheck has `nat`; the other side is irrelevant here.
        let mut c = case(nat, nat, 0, "-");
        if nat == Ipv6Firewall {
            c.family = Family::Dual;
        }
        let scene = Scene::start(&c, &SceneOptions::default()).expect("scene starts");
        let out = scene
            .run_viewer(&["netcheck", "--json"])
            .expect("viewer netcheck runs");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{nat:?}: no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(
            report["verdict"], verdict,
            "viewer behind {nat:?}: {report}"
        );
        assert_eq!(report["udp"], true);
        assert_eq!(
            report["ipv6"].is_string(),
            matches!(nat, Ipv6Firewall | Public),
            "{nat:?}: {report}"
        );
        let public = report["public_address"].as_str().expect("public address");
        assert!(
            public.starts_with(
                &scene
                    .lab
                    .public_ip(peercam_tests::lab::Side::Viewer)
                    .to_string()
            ),
            "{public}"
        );
        // The same from the camera's side, as text.
        let out = scene
            .run_camera_tool(&["netcheck"])
            .expect("camera netcheck runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let words = match verdict {
            "public" => "no NAT",
            "symmetric-nat" => "your NAT is symmetric",
            _ => "direct connections likely",
        };
        assert!(
            text.contains("verdict: ") && text.contains(words),
            "camera behind {nat:?}: {text}"
        );
    }
    // UDP that gets no answer (nothing listens there): a clear verdict and exit status 4.
    let scene = Scene::start(
        &case(PortRestricted, PortRestricted, 0, "-"),
        &SceneOptions::default(),
    )
    .expect("scene");
    let out = scene
        .viewer_to(&["netcheck"], "198.18.0.1:9")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gets no answer"));
    drop(scene);
    assert_eq!(leftovers(), Vec::<String>::new(), "namespaces left behind");
}
