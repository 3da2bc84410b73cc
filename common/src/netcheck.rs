//! netcheck: what this network lets peercam do, measured against the rendezvous.
//!
//! From one UDP socket, ask the rendezvous on its main and its probe port which address it
//! sees. No answer: UDP is blocked. The same answer as a local address: no NAT. Two
//! different answers: the NAT's mapping depends on the destination (symmetric), so only
//! peers with easy NATs can connect directly. Owns the measurement and the verdict; the
//! programs only print.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::net::{canonical, for_socket, host_candidates, RendezvousAddr};
use crate::rdv::{FromRendezvous, ToRendezvous, ALPN};
use crate::tls::{self, Credentials, Expect, Trust};
use crate::{frame, quic};

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// No NAT: a public address.
    Public,
    /// A NAT that keeps one public address and port for all destinations.
    EasyNat,
    /// A NAT whose mapping depends on the destination.
    SymmetricNat,
    /// No answer over UDP.
    NoUdp,
}

/// What netcheck found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The rendezvous asked.
    pub rendezvous: String,
    /// Whether UDP to the rendezvous works.
    pub udp: bool,
    /// This socket's address as the rendezvous sees it.
    pub public_address: Option<SocketAddr>,
    /// The same, seen on the rendezvous' probe port.
    pub public_address_probe: Option<SocketAddr>,
    /// Whether a NAT sits between this host and the rendezvous.
    pub behind_nat: Option<bool>,
    /// Whether the NAT maps one socket to different public ports per destination.
    pub mapping_varies: Option<bool>,
    /// A global IPv6 address of this host, if any.
    pub ipv6: Option<Ipv6Addr>,
    /// Round-trip time to the rendezvous, ms.
    pub rtt_ms: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
    /// The verdict in a sentence.
    pub summary: String,
}

/// Runs netcheck from a socket bound to `bind`, as the holder of `creds`.
pub async fn run(
    creds: &Credentials,
    trust: &Trust,
    rendezvous: &RendezvousAddr,
    bind: SocketAddr,
    timeout: Duration,
) -> Result<Report, tls::TlsError> {
    let tls = tls::client_config(creds, trust, Expect::Rendezvous, ALPN)?;
    let config = quic::quic_client(tls, quic::rendezvous_transport())?;
    let mut report = Report {
        rendezvous: rendezvous.to_string(),
        udp: false,
        public_address: None,
        public_address_probe: None,
        behind_nat: None,
        mapping_varies: None,
        ipv6: global_ipv6(),
        rtt_ms: None,
        verdict: Verdict::NoUdp,
        summary: String::new(),
    };
    let endpoint = match quic::bind_endpoint(bind, None) {
        Ok(shared) => shared.endpoint,
        Err(e) => {
            report.summary = format!("cannot open a UDP socket on {bind}: {e}");
            return Ok(report);
        }
    };
    let local = endpoint.local_addr().unwrap_or(bind);
    let name = &rendezvous.server_name;
    let first = ask(&endpoint, &config, local, rendezvous.addr, name, timeout).await;
    if let Some((observed, probe_port, rtt)) = first {
        report.udp = true;
        report.public_address = Some(observed);
        report.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
        let mine = crate::net::interface_ips();
        report.behind_nat =
            Some(!(mine.contains(&observed.ip()) && observed.port() == local.port()));
        if let Some(port) = probe_port {
            let probe = SocketAddr::new(rendezvous.addr.ip(), port);
            if let Some((seen, _, _)) = ask(&endpoint, &config, local, probe, name, timeout).await {
                report.public_address_probe = Some(seen);
                report.mapping_varies = Some(seen != observed);
            }
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"netcheck done");
    (report.verdict, report.summary) = verdict(&report);
    Ok(report)
}

async fn ask(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    local: SocketAddr,
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Option<(SocketAddr, Option<u16>, Duration)> {
    let target = for_socket(local, addr)?;
    let exchange = async {
        let conn = endpoint
            .connect_with(config.clone(), target, name)
            .ok()?
            .await
            .ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        frame::write(&mut send, &ToRendezvous::WhoAmI).await.ok()?;
        let answer = frame::read::<FromRendezvous, _>(&mut recv).await.ok()??;
        let rtt = conn.rtt();
        conn.close(quinn::VarInt::from_u32(0), b"");
        match answer {
            FromRendezvous::YouAre {
                observed,
                probe_port,
            } => Some((canonical(observed), probe_port, rtt)),
            _ => None,
        }
    };
    tokio::time::timeout(timeout, exchange).await.ok()?
}

fn verdict(r: &Report) -> (Verdict, String) {
    let Some(public) = r.public_address else {
        return (
            Verdict::NoUdp,
            format!(
                "UDP to the rendezvous at {} gets no answer: peercam cannot work from this network; allow outbound UDP to that port (or check the address and certificates)",
                r.rendezvous
            ),
        );
    };
    match (r.behind_nat, r.mapping_varies) {
        (Some(false), _) => (
            Verdict::Public,
            format!("no NAT: your address {public} is public; direct connections likely"),
        ),
        (_, Some(true)) => (
            Verdict::SymmetricNat,
            "your NAT is symmetric (its public port changes per destination): peers with easy NATs will connect directly, others through the relay".to_string(),
        ),
        (_, Some(false)) => (
            Verdict::EasyNat,
            format!("your NAT keeps one public address ({public}) for all destinations: direct connections likely"),
        ),
        (_, None) => (
            Verdict::EasyNat,
            format!("behind a NAT (public address {public}); whether it is symmetric could not be measured (the rendezvous has no probe port): direct connections probably work"),
        ),
    }
}

/// A global unicast IPv6 address of this host.
fn global_ipv6() -> Option<Ipv6Addr> {
    let any: SocketAddr = "[::]:0".parse().ok()?;
    host_candidates(any).into_iter().find_map(|a| match a.ip() {
        // Global unicast is 2000::/3.
        IpAddr::V6(v6) if (v6.segments()[0] & 0xe000) == 0x2000 => Some(v6),
        _ => None,
    })
}

impl Report {
    /// The report as lines for a terminal.
    pub fn human(&self) -> String {
        let yes_no = |b: Option<bool>, yes: &str, no: &str| match b {
            Some(true) => yes.to_string(),
            Some(false) => no.to_string(),
            None => "unknown".to_string(),
        };
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        format!(
            "netcheck via rendezvous {}\n  UDP:             {}\n  public address:  {}\n  behind NAT:      {}\n  mapping varies:  {}\n  IPv6:            {}\n  rendezvous RTT:  {}\nverdict: {}\n",
            self.rendezvous,
            if self.udp { "yes" } else { "no answer" },
            addr(self.public_address),
            yes_no(self.behind_nat, "yes", "no"),
            yes_no(
                self.mapping_varies,
                &format!("yes ({} seen on the probe port)", addr(self.public_address_probe)),
                "no (the same public port towards two destinations)"
            ),
            self.ipv6
                .map(|a| format!("yes ({a})"))
                .unwrap_or_else(|| "no global address".into()),
            self.rtt_ms
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            self.summary
        )
    }
}
