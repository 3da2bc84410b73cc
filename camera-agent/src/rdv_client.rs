//! The camera's side of the rendezvous protocol: register, stay registered, answer
//! introductions.
//!
//! Reconnects after any loss with exponential backoff and full jitter, moving on to the
//! next configured rendezvous when one cannot be reached. After a rendezvous' `GoingAway`
//! the first reconnect waits a random delay within the window it announced
//! (`common::going_away`), so that a restart does not bring the whole fleet back at once.
//! An introduction is checked against the camera's own access list before anything is
//! sent to the viewer.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercam_common::backoff::Backoff;
use peercam_common::frame;
use peercam_common::going_away;
use peercam_common::rdv::{
    self, close, Capabilities, FromRendezvous, RelayOffer, ToRendezvous, RELAY_HELLO,
};
use peercam_common::{net, SessionId, ViewerId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

use crate::punch;
use crate::{GoingAway, RendezvousAddr, State};

/// How long to wait for the handshake and the registration answer.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Client {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) punch: Arc<UdpSocket>,
    pub(crate) config: quinn::ClientConfig,
    pub(crate) targets: Vec<RendezvousAddr>,
    pub(crate) backoff: Backoff,
    pub(crate) punching: bool,
}

/// How a registration session ended.
enum Ended {
    /// Never got registered: try the next rendezvous.
    Failed(String),
    /// Was registered, then lost the connection.
    Lost(String),
    /// Was registered; the rendezvous is shutting down and asked for the first reconnect
    /// within this many milliseconds.
    GoingAway(u64),
}

pub(crate) async fn run(mut client: Client, state: Arc<State>, cancel: CancellationToken) {
    let mut index = 0;
    loop {
        let target = client.targets[index % client.targets.len()].clone();
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = session(&client, &target, &state) => ended,
        };
        state.status.send_modify(|s| s.registered = None);
        state.set_registered(false);
        let delay = match ended {
            Ended::Lost(why) => {
                warn!(rendezvous = %target.addr, reason = %why, "lost the rendezvous, reconnecting");
                client.backoff.reset();
                client.backoff.next_delay(rand::random::<f64>())
            }
            Ended::GoingAway(within_ms) => {
                // Later attempts, if this one fails, use the backoff from its base.
                client.backoff.reset();
                let delay = going_away::first_reconnect_delay(within_ms, rand::random::<f64>());
                let window = going_away::accepted_window(within_ms);
                info!(
                    rendezvous = %target.addr, ?window, ?delay,
                    "rendezvous going away, reconnecting within its window"
                );
                state
                    .status
                    .send_modify(|s| s.going_away = Some(GoingAway { window, delay }));
                delay
            }
            Ended::Failed(why) => {
                warn!(rendezvous = %target.addr, reason = %why, "cannot register");
                state.status.send_modify(|s| s.last_error = Some(why));
                index += 1;
                client.backoff.next_delay(rand::random::<f64>())
            }
        };
        debug!(?delay, "waiting before reconnecting");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(client: &Client, target: &RendezvousAddr, state: &State) -> Ended {
    let local = client
        .endpoint
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Some(addr) = peercam_common::net::for_socket(local, target.addr) else {
        return Ended::Failed(format!(
            "this socket ({local}) cannot reach {}",
            target.addr
        ));
    };
    let connecting =
        match client
            .endpoint
            .connect_with(client.config.clone(), addr, &target.server_name)
        {
            Ok(c) => c,
            Err(e) => return Ended::Failed(format!("cannot dial {}: {e}", target.addr)),
        };
    let conn = match tokio::time::timeout(REGISTER_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Ended::Failed(format!("handshake with {} failed: {e}", target.addr)),
        Err(_) => return Ended::Failed(format!("{} did not answer", target.addr)),
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Ended::Failed(format!("cannot open control stream: {e}")),
    };
    let register = ToRendezvous::Register {
        local_addrs: net::host_candidates(local),
        access: state.access_list(),
        caps: Capabilities {
            codecs: vec!["h264".into()],
            version: rdv::AGENT_VERSION,
        },
    };
    if let Err(e) = frame::write(&mut send, &register).await {
        return Ended::Failed(format!("cannot register: {e}"));
    }
    let first = tokio::time::timeout(REGISTER_TIMEOUT, frame::read(&mut recv)).await;
    match first {
        Ok(Ok(Some(FromRendezvous::Registered { observed }))) => {
            info!(rendezvous = %target.addr, %observed, "registered");
            state.set_registered(true);
            state.status.send_modify(|s| {
                s.registered = Some(observed);
                s.registrations += 1;
                s.last_error = None;
            });
        }
        Ok(Ok(Some(FromRendezvous::Error { message }))) => {
            error!(rendezvous = %target.addr, %message, "registration refused");
            return Ended::Failed(format!("registration refused: {message}"));
        }
        Ok(Ok(_)) | Ok(Err(_)) => {
            let why = conn
                .close_reason()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "unexpected answer".into());
            return Ended::Failed(format!("registration failed: {why}"));
        }
        Err(_) => return Ended::Failed("no answer to registration".into()),
    }
    // Later punch rounds run here, owned by this session.
    let mut punches = JoinSet::new();
    // A reader task, so that waiting for a message never cuts a frame in half when the
    // access list changes.
    let (msg_tx, mut messages) = mpsc::channel(16);
    let _reader = AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            let msg = frame::read::<FromRendezvous, _>(&mut recv).await;
            let end = !matches!(msg, Ok(Some(_)));
            if msg_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    }));
    let mut access_changes = state.access_gen.subscribe();
    access_changes.mark_unchanged();
    loop {
        while punches.try_join_next().is_some() {}
        let msg = tokio::select! {
            msg = messages.recv() => msg.unwrap_or(Ok(None)),
            Ok(()) = access_changes.changed() => {
                let update = ToRendezvous::SetAccess { access: state.access_list() };
                if let Err(e) = frame::write(&mut send, &update).await {
                    return Ended::Lost(format!("cannot update the access list: {e}"));
                }
                info!("access list sent to the rendezvous");
                continue;
            }
        };
        match msg {
            Ok(Some(FromRendezvous::Introduce {
                session,
                viewer,
                viewer_observed,
                viewer_local,
                relay,
                viewer_rtt_us,
            })) => {
                let mut candidates = vec![viewer_observed];
                candidates.extend(viewer_local);
                let intro = Intro {
                    session,
                    viewer,
                    candidates,
                    relay,
                    rtt: conn.rtt() + Duration::from_micros(viewer_rtt_us),
                };
                let reply = introduce(client, state, local, intro, &mut punches);
                if let Err(e) = frame::write(&mut send, &reply).await {
                    return Ended::Lost(format!("cannot answer introduction: {e}"));
                }
            }
            Ok(Some(FromRendezvous::GoingAway {
                reconnect_within_ms,
            })) => {
                // Hang up now rather than wait for its close: it is draining.
                conn.close(quinn::VarInt::from_u32(close::OK), b"rendezvous going away");
                return Ended::GoingAway(reconnect_within_ms);
            }
            Ok(Some(other)) => debug!(?other, "ignoring unexpected message"),
            Ok(None) => return Ended::Lost("rendezvous closed the stream".into()),
            Err(e) => {
                let why = conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| e.to_string());
                return Ended::Lost(why);
            }
        }
    }
}

struct Intro {
    session: SessionId,
    viewer: ViewerId,
    candidates: Vec<SocketAddr>,
    relay: Option<RelayOffer>,
    rtt: Duration,
}

/// Answers one introduction: checks the access list, punches, accepts.
fn introduce(
    client: &Client,
    state: &State,
    local: SocketAddr,
    intro: Intro,
    punches: &mut JoinSet<()>,
) -> ToRendezvous {
    let Intro {
        session,
        viewer,
        candidates,
        relay,
        rtt,
    } = intro;
    if !state.allowed(&viewer) {
        warn!(%viewer, "introduction for a viewer not on the access list: declined");
        return ToRendezvous::Decline { session };
    }
    if !state.take_intro_token(Instant::now()) {
        warn!(%viewer, "introductions arriving too fast: declined");
        return ToRendezvous::Decline { session };
    }
    let mut ips: Vec<_> = candidates.iter().map(|a| a.ip().to_canonical()).collect();
    ips.extend(relay.map(|r| r.addr.ip().to_canonical()));
    let relay_addr = relay.map(|r| peercam_common::net::canonical(r.addr));
    if !state.expect_session(
        Instant::now(),
        session,
        viewer.clone(),
        ips,
        relay_addr,
        rtt,
    ) {
        warn!(%viewer, "too many pending introductions: declined");
        return ToRendezvous::Decline { session };
    }
    let targets = if client.punching {
        punch::targets(&candidates, local)
    } else {
        Vec::new()
    };
    // The relay gets a hello carrying its token: that is how it learns our address.
    let hello = relay.and_then(|r| {
        let addr = peercam_common::net::for_socket(local, r.addr)?;
        Some((addr, [RELAY_HELLO, &r.token[..]].concat()))
    });
    let send_round = move |socket: &UdpSocket| {
        for addr in &targets {
            let _ = socket.send_to(punch::PUNCH, addr);
        }
        if let Some((addr, packet)) = &hello {
            let _ = socket.send_to(packet, addr);
        }
    };
    // First round now, before the Accept leaves, so our NAT is open when the viewer's
    // first packet arrives; later rounds cover a lost punch.
    send_round(&client.punch);
    let socket = client.punch.clone();
    punches.spawn(async move {
        let start = tokio::time::Instant::now();
        for at in &punch::ROUNDS[1..] {
            tokio::time::sleep_until(start + *at).await;
            send_round(&socket);
        }
    });
    info!(%viewer, %session, relay = relay.is_some(), "introduction accepted");
    ToRendezvous::Accept {
        session,
        local_addrs: net::host_candidates(local),
    }
}
