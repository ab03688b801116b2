//! Raft's messages on the framework's links: a [`Transport`] that keeps one outgoing
//! link to each peer (dialled, authenticated with the cluster secret, redialled with
//! backoff), and the acceptor's side, [`serve_peer`], for a server whose listener takes
//! clients and peers alike.
//!
//! Each link carries messages **one way**, from its dialer to its acceptor: a replica
//! sends on the links it dialled and receives on the ones it accepted, so no link has
//! two writers and a slow reader never blocks a writer's answers.
//!
//! ```text
//!  dialer (replica FROM)                       acceptor (replica TO), on its client port
//!  ── raft-hello,CLUSTER,FROM,TO ────────────▶ (in the service's framing; any first frame
//!                                              not starting `raft-hello,` is a client)
//!  ◀─ link handshake (with --secret-file) ──▶ identities: the replica ids in decimal
//!  ◀──────── raft-welcome,TO | raft-refused,WHY
//!  ── u32 frames, each one encoded Message ──▶ an empty frame is a heartbeat (idle 500 ms)
//! ```
//! From the welcome on, every frame is `u32`-framed whatever the service's framing, since
//! messages are binary. A message whose `from`/`to` differ from the hello's is dropped.
//!
//! A frame whose first byte is [`SERVICE`] (`S`, 0x53) is not Raft's but the service's
//! own (the messenger's forwarding, `messenger::majority::forward`), handed to the
//! [`PeerService`] given to [`serve_peer_with`] and sent with [`LinkTransport::post`]. A
//! Raft message never starts with it: it starts with its sender's id, big-endian, whose
//! first byte is 0 for every member (ids 1–5).

use super::driver::{RaftHandle, Transport};
use super::message::{decode, ReplicaId};
use crate::framing::{encode_frame, FrameReader, Framing, Limits};
use crate::group::Group;
use crate::link::{self, Answer, Auth, Dialer, LinkError, Timeouts, Verdict};
use crate::outbox::{Outbox, OutboxConfig};
use crate::server::{Connection, HandlerError};
use crate::{log_debug, log_info};
use std::io::Read;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The first word of a peer's hello.
pub const HELLO: &[u8] = b"raft-hello,";
/// A message frame's limit: one snapshot chunk ([`Config::max_chunk`](super::Config),
/// 1 MiB) or one Append, whose entries beyond the first hold at most a chunk's bytes and
/// whose first is a client's request (at most the framework's default frame limit), with
/// room for the headers.
pub const MAX_MESSAGE: usize = crate::framing::DEFAULT_MAX_FRAME + (2 << 20);
/// The first byte of a service's frame on a link.
pub const SERVICE: u8 = b'S';
/// Messages waiting on one link before it is given up (and redialled).
const OUTBOX_LIMIT: usize = 4096;
/// A service's frames are let onto a link only while it holds fewer bytes than this (and
/// fewer than half the 4,096 frames that close a link; see [`LinkTransport::has_room`]): a
/// service's traffic (the messenger's forwarded requests, and the answers relayed back)
/// can then never fill the queue that Raft's own messages need, and get the link closed
/// under them.
pub const SERVICE_QUEUE: usize = 8 << 20;
/// A Raft Append is dropped, as a lossy network would drop it, rather than queued on a
/// link that would then hold more than this many bytes: a follower that does not read
/// (cut off, or stopped) could otherwise make the leader queue up to its whole in-flight
/// window of Appends, 512 entries of up to 16 MiB each. Raft resends what was lost (the
/// follower rejects the Append after the gap, or the next heartbeat's answer tells the
/// leader where it is), and the simulator runs it under loss. Other messages are never
/// dropped so: votes and heartbeats are small, and a snapshot's chunks are sent all at
/// once and taken only in order (see `message::is_append`).
pub const RAFT_QUEUE: usize = 64 << 20;
/// An idle link sends an empty frame this often; its acceptor gives up after `idle`.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Who a replica is on its links.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// This replica's id.
    pub id: ReplicaId,
    /// Every member's address as this replica dials it, by id (its own entry included,
    /// not dialled).
    pub addrs: Vec<(ReplicaId, String)>,
    /// The service's name, in the hello and bound into the handshake's proofs.
    pub cluster: String,
    /// The framing of the hello, the handshake and the answer (the service's).
    pub framing: Framing,
    /// The cluster secret, if any.
    pub secret: Option<crate::auth::Secret>,
    /// Each step's bound; `idle` declares a silent link dead.
    pub timeouts: Timeouts,
}

impl PeerConfig {
    fn auth(&self, id: ReplicaId) -> Option<Auth> {
        self.secret.as_ref().map(|secret| Auth {
            secret: secret.clone(),
            cluster: self.cluster.as_bytes().to_vec(),
            identity: id.to_string().into_bytes(),
        })
    }
}

/// The outgoing links: one dialling thread per peer, in a [`Group`] that
/// [`PeerLinks::close`] shuts down.
pub struct PeerLinks {
    slots: Arc<Vec<(ReplicaId, Mutex<Option<Outbox>>)>>,
    group: Group,
    stopping: Arc<AtomicBool>,
}

impl PeerLinks {
    /// Starts dialling every peer in `cfg`.
    ///
    /// # Errors
    /// When a thread cannot be started.
    pub fn start(cfg: &PeerConfig) -> Result<PeerLinks, crate::group::GroupError> {
        let group = Group::new("raft-links");
        let peers: Vec<(ReplicaId, String)> = cfg
            .addrs
            .iter()
            .filter(|(p, _)| *p != cfg.id)
            .cloned()
            .collect();
        let slots: Arc<Vec<_>> =
            Arc::new(peers.iter().map(|(p, _)| (*p, Mutex::new(None))).collect());
        let stopping = Arc::new(AtomicBool::new(false));
        for (at, (peer, addr)) in peers.into_iter().enumerate() {
            let (cfg, slots, stopping, g) = (
                cfg.clone(),
                Arc::clone(&slots),
                Arc::clone(&stopping),
                group.clone(),
            );
            group.spawn(format!("raft-dial-{peer}"), move || {
                dial_loop(&cfg, peer, &addr, &slots[at].1, &stopping, &g);
            })?;
        }
        Ok(PeerLinks {
            slots,
            group,
            stopping,
        })
    }

    /// A [`Transport`] sending on these links.
    pub fn transport(&self) -> LinkTransport {
        LinkTransport {
            slots: Arc::clone(&self.slots),
        }
    }

    /// Stops dialling and closes every link, within `within`.
    pub fn close(&self, within: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, slot) in self.slots.iter() {
            slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
        self.group.close(within);
    }
}

/// Sends each message on the link to its peer, if that link is up; else drops it.
#[derive(Clone)]
pub struct LinkTransport {
    slots: Arc<Vec<(ReplicaId, Mutex<Option<Outbox>>)>>,
}

impl LinkTransport {
    /// Queues one frame (`parts` concatenated) on the link to `to`; false when that link
    /// is down (or `to` is not a peer), or would then hold more than `cap` bytes, and the
    /// frame is dropped. A frame queued may still be lost if the link fails before it is
    /// written: the receiver sees that link end.
    fn queue(&self, to: ReplicaId, parts: &[&[u8]], cap: Option<usize>) -> bool {
        let Some((_, slot)) = self.slots.iter().find(|(p, _)| *p == to) else {
            return false;
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let Ok(header) = u32::try_from(len) else {
            return false;
        };
        let mut frame = Vec::with_capacity(len + 4);
        frame.extend_from_slice(&header.to_be_bytes());
        parts.iter().for_each(|p| frame.extend_from_slice(p));
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(outbox) = slot.as_ref() else {
            return false;
        };
        if cap.is_some_and(|cap| outbox.queued_bytes().saturating_add(frame.len()) > cap) {
            return false;
        }
        // A full outbox closes its link; the dialling thread redials.
        if outbox.send(Arc::from(frame)).is_err() {
            *slot = None;
            return false;
        }
        true
    }

    /// Queues a service frame ([`SERVICE`], then `body`) on the link to `to`; false when
    /// that link is down. Frames queued to one peer arrive in order, or the link ends.
    /// Unless the frame is a small one that must not be lost (a close), ask
    /// [`has_room`](Self::has_room) first.
    pub fn post(&self, to: ReplicaId, body: &[u8]) -> bool {
        self.queue(to, &[&[SERVICE], body], None)
    }

    /// Whether the link to `to` is up and has room for service frames of `bytes` in all
    /// (bodies, as [`post`](Self::post) takes them; one frame's header counted): it holds
    /// at most [`SERVICE_QUEUE`] bytes with them, and fewer than half the frames that
    /// close it. A service that is told no refuses or sheds that work (a client on the far
    /// side of a slow link is closed, and fails over) rather than queue it: the rest of the
    /// queue is Raft's, and a link closed for being full would cost the cluster its
    /// heartbeats and acknowledgements until redialled.
    pub fn has_room(&self, to: ReplicaId, bytes: usize) -> bool {
        let Some((_, slot)) = self.slots.iter().find(|(p, _)| *p == to) else {
            return false;
        };
        let slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref().is_some_and(|outbox| {
            outbox.len() < OUTBOX_LIMIT / 2
                && outbox.queued_bytes().saturating_add(bytes + 5) <= SERVICE_QUEUE
        })
    }

    /// Whether the link to `to` is up (dialled and welcomed, not yet ended).
    pub fn is_up(&self, to: ReplicaId) -> bool {
        self.slots.iter().any(|(p, slot)| {
            *p == to
                && slot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_some()
        })
    }

    /// A transport over these outboxes, by peer (a test's, whose writers need not run).
    #[cfg(test)]
    pub(crate) fn over(outboxes: Vec<(ReplicaId, Outbox)>) -> LinkTransport {
        let slots = outboxes
            .into_iter()
            .map(|(peer, outbox)| (peer, Mutex::new(Some(outbox))))
            .collect();
        LinkTransport {
            slots: Arc::new(slots),
        }
    }
}

impl Transport for LinkTransport {
    /// Queues `message` on the link to `to`, unless that link is down, or `message` is an
    /// Append and the link would then hold more than [`RAFT_QUEUE`] bytes: then it is
    /// dropped.
    fn send(&mut self, to: ReplicaId, message: Vec<u8>) {
        let cap = super::message::is_append(&message).then_some(RAFT_QUEUE);
        self.queue(to, &[&message], cap);
    }
}

/// What a service does with its own frames on the links it accepts.
pub trait PeerService {
    /// A service frame (after its [`SERVICE`] byte) from peer `from`.
    fn frame(&self, from: ReplicaId, body: &[u8]);
    /// The link from `from` ended: whatever it carried after its last frame is lost.
    fn ended(&self, from: ReplicaId);
}

/// A service with no frames of its own: they are dropped.
struct NoService;

impl PeerService for NoService {
    fn frame(&self, _: ReplicaId, _: &[u8]) {}
    fn ended(&self, _: ReplicaId) {}
}

/// Dials `peer` until stopped: a link up is run until it fails, then the next dial waits
/// the framework's [`Backoff`](crate::link::Backoff) (jittered, at most 1 s; reset by a
/// link that came up).
fn dial_loop(
    cfg: &PeerConfig,
    peer: ReplicaId,
    addr: &str,
    slot: &Mutex<Option<Outbox>>,
    stopping: &AtomicBool,
    group: &Group,
) {
    let dialer = Dialer {
        group: Some(group.clone()),
        ..Dialer::new(cfg.framing, cfg.timeouts)
    };
    let mut hello = Vec::new();
    let text = format!("raft-hello,{},{},{peer}", cfg.cluster, cfg.id);
    encode_frame(cfg.framing, text.as_bytes(), &mut hello).expect("a short hello fits");
    let auth = cfg.auth(cfg.id);
    let mut backoff = crate::link::Backoff::default();
    let mut failures = 0u32;
    while !stopping.load(Ordering::SeqCst) && !group.is_closing() {
        let answer = |frame: &[u8]| -> Result<Answer<()>, std::io::Error> {
            let want = format!("raft-welcome,{peer}");
            Ok(if frame == want.as_bytes() {
                Answer::Welcome(())
            } else {
                Answer::Refused(String::from_utf8_lossy(frame).into_owned())
            })
        };
        match dialer.dial_with_auth(auth.as_ref(), addr, &hello, answer) {
            Ok((link, ())) => {
                if auth.is_some() && link.peer_identity() != Some(peer.to_string().as_bytes()) {
                    log_info!("raft {}: {addr} proved another identity; dropped", cfg.id);
                } else {
                    log_debug!("raft {}: link to {peer} at {addr} up", cfg.id);
                    failures = 0;
                    backoff.reset();
                    let mut beat = Vec::new();
                    encode_frame(Framing::U32, b"", &mut beat).expect("empty frame");
                    let config =
                        OutboxConfig::new(format!("raft {} to {peer}", cfg.id), OUTBOX_LIMIT)
                            .heartbeat(HEARTBEAT, Arc::from(beat));
                    let (outbox, writer) = link.outbox(config);
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(outbox);
                    writer.run();
                    slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                    log_debug!("raft {}: link to {peer} down", cfg.id);
                }
            }
            Err(e) => {
                failures += 1;
                // Logged once per outage, not once per attempt.
                if failures == 1 && !matches!(e, LinkError::Io(_)) {
                    log_info!("raft {}: cannot link to {peer} at {addr}: {e}", cfg.id);
                }
            }
        }
        let wait = backoff.next_delay();
        let mut slept = Duration::ZERO;
        while slept < wait && !stopping.load(Ordering::SeqCst) && !group.is_closing() {
            std::thread::sleep(Duration::from_millis(10));
            slept += Duration::from_millis(10);
        }
    }
}

/// Serves a connection whose first frame (`hello`, read by `reader` in the service's
/// framing) starts with [`HELLO`]: checks it names this cluster, a member and this
/// replica, runs the handshake, welcomes, and hands each message to `raft` until the
/// link ends.
///
/// # Errors
/// When the answer cannot be written or the link fails other than by ending.
pub fn serve_peer<R: Read>(
    cfg: &PeerConfig,
    raft: &RaftHandle,
    conn: &Connection,
    hello: &[u8],
    reader: FrameReader<R>,
) -> Result<(), HandlerError> {
    serve_peer_with(cfg, raft, conn, hello, reader, &NoService)
}

/// [`serve_peer`], handing the service's own frames ([`SERVICE`]) to `service`, and
/// telling it when a welcomed link ends.
///
/// # Errors
/// When the answer cannot be written or the link fails other than by ending.
pub fn serve_peer_with<R: Read>(
    cfg: &PeerConfig,
    raft: &RaftHandle,
    conn: &Connection,
    hello: &[u8],
    mut reader: FrameReader<R>,
    service: &dyn PeerService,
) -> Result<(), HandlerError> {
    let text = String::from_utf8_lossy(&hello[HELLO.len()..]).into_owned();
    let parts: Vec<&str> = text.split(',').collect();
    let ids = match parts.as_slice() {
        [cluster, from, to] if *cluster == cfg.cluster => from
            .parse::<ReplicaId>()
            .ok()
            .zip(to.parse::<ReplicaId>().ok()),
        _ => None,
    };
    let member = |id: ReplicaId| cfg.addrs.iter().any(|(p, _)| *p == id);
    let refuse = |why: &str| -> Result<(), HandlerError> {
        log_info!(
            "raft {}: refused a peer link from {}: {why}",
            cfg.id,
            conn.peer
        );
        let mut frame = Vec::new();
        encode_frame(
            cfg.framing,
            format!("raft-refused,{why}").as_bytes(),
            &mut frame,
        )?;
        let _ = std::io::Write::write_all(&mut &*conn.stream, &frame);
        Ok(())
    };
    let from = match ids {
        Some((from, to)) if to == cfg.id && from != cfg.id && member(from) => from,
        Some(_) => return refuse("not a member of this cluster, or not this replica"),
        None => return refuse("a malformed hello"),
    };
    let auth = cfg.auth(cfg.id);
    if link::authenticate(
        &conn.stream,
        &mut reader,
        &cfg.timeouts,
        auth.as_ref(),
        from.to_string().as_bytes(),
    )
    .is_err()
    {
        return Ok(());
    }
    // A proven member: it may hold a reserve slot (`ServerConfig::reserved_connections`).
    conn.opened();
    if reader.buffered_len() > 0 {
        return refuse("frames before the welcome");
    }
    let limits = Limits {
        max_frame: MAX_MESSAGE,
        ..Limits::default()
    };
    // Not charged to the client memory budget, unlike a client's reader: an authenticated
    // member's message (a snapshot chunk, up to MAX_MESSAGE) must be read whatever clients
    // hold, or a budget smaller than one message (or clients pressing on it) would stop
    // the cluster catching up. A link per member, each at most MAX_MESSAGE.
    let messages = FrameReader::with_limits(&*conn.stream, Framing::U32, limits);
    let mut welcome = Vec::new();
    encode_frame(
        cfg.framing,
        format!("raft-welcome,{}", cfg.id).as_bytes(),
        &mut welcome,
    )?;
    let Some(mut link) = link::accept(
        &conn.stream,
        messages,
        &cfg.timeouts,
        Verdict::Welcome(welcome),
    )?
    else {
        return Ok(());
    };
    let me = cfg.id;
    let end = link.read_frames(&format!("raft {me}: link from {from}"), |frame| {
        if frame.is_empty() {
            return ControlFlow::Continue(());
        }
        if frame[0] == SERVICE {
            service.frame(from, &frame[1..]);
            return ControlFlow::Continue(());
        }
        match decode(frame) {
            Ok(m) if m.from == from && m.to == me => raft.deliver(m),
            Ok(m) => log_info!(
                "raft {me}: a message from {} to {} on {from}'s link; dropped",
                m.from,
                m.to
            ),
            Err(e) => log_info!("raft {me}: a message from {from} does not decode: {e}; dropped"),
        }
        ControlFlow::<()>::Continue(())
    });
    log_debug!("raft {me}: link from {from} ended: {end:?}");
    service.ended(from);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::testing::pair;

    /// Service frames stop at the mark, bytes or frames, and the link stays up for Raft's
    /// own messages.
    #[test]
    fn service_frames_stop_at_the_mark_and_leave_the_link_to_raft() {
        let link = || {
            let (client, served) = pair();
            let config = OutboxConfig::new("test", OUTBOX_LIMIT);
            let (outbox, writer) = Outbox::new(Arc::new(served), config);
            (outbox, writer, client)
        };
        let (outbox, _writer, _client) = link();
        let mut links = LinkTransport::over(vec![(2, outbox.clone())]);
        assert!(!links.has_room(3, 1) && !links.is_up(3), "not a peer");
        let chunk = vec![b'x'; 1 << 20];
        let mut posted = 0;
        while links.has_room(2, chunk.len()) {
            assert!(links.post(2, &chunk));
            posted += 1;
        }
        // Each frame is 1 MiB and 5 bytes: seven fit under 8 MiB.
        assert_eq!(posted, 7);
        assert!(links.has_room(2, 1000), "a small one still fits");
        links.send(2, vec![1, 2, 3]);
        assert_eq!(outbox.len(), 8, "Raft's message queued, the link up");

        let (outbox, _writer, _client) = link();
        let links = LinkTransport::over(vec![(2, outbox.clone())]);
        let mut posted = 0;
        while links.has_room(2, 1) {
            assert!(links.post(2, b"x"));
            posted += 1;
        }
        assert_eq!(posted, OUTBOX_LIMIT / 2);
        assert!(links.is_up(2), "full, not down");
        assert!(links.post(2, b"a close"), "a frame that must go still goes");
    }

    /// Raft's Appends to a peer that does not read stop at [`RAFT_QUEUE`] bytes queued:
    /// the rest are dropped, as a lossy network drops them, and the link stays up. A
    /// snapshot's chunks and small messages still go (a snapshot is taken only whole and
    /// in order: dropping its tail every time would stall the follower for good).
    #[test]
    fn raft_appends_to_a_peer_that_does_not_read_stop_at_the_byte_bound() {
        use super::super::message::{encode, Body, Entry, Message, SnapshotChunk};
        let (client, served) = pair();
        let (outbox, _writer) =
            Outbox::new(Arc::new(served), OutboxConfig::new("test", OUTBOX_LIMIT));
        let mut links = LinkTransport::over(vec![(2, outbox.clone())]);
        let message = |body| {
            encode(&Message {
                from: 1,
                to: 2,
                term: 3,
                body,
            })
        };
        let append = message(Body::Append {
            prev_index: 0,
            prev_term: 0,
            commit: 0,
            entries: vec![Entry {
                index: 1,
                term: 3,
                data: vec![b'x'; 1 << 20],
            }],
        });
        for _ in 0..200 {
            links.send(2, append.clone());
        }
        let queued = outbox.queued_bytes();
        assert!(queued <= RAFT_QUEUE, "{queued}");
        assert_eq!(outbox.len(), RAFT_QUEUE / (append.len() + 4));
        assert!(links.is_up(2), "the link stays up");
        let chunk = message(Body::Snapshot(SnapshotChunk {
            index: 1,
            term: 3,
            offset: 0,
            total: 1 << 20,
            data: vec![b's'; 1 << 20],
        }));
        links.send(2, chunk);
        links.send(
            2,
            message(Body::Heartbeat {
                commit: 0,
                round: 1,
            }),
        );
        assert_eq!(outbox.len(), RAFT_QUEUE / (append.len() + 4) + 2);
        drop(client);
    }
}
