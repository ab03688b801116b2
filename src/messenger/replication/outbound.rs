//! Outbound replication links, on the framework's link and outbox: dial a peer with the
//! HELLO (and, with a cluster secret, [`crate::auth`]'s handshake) and wait for the
//! WELCOME ([`Dialer::dial_with_auth`]), then hand whatever the replica has
//! due into the link's [`Outbox`], whose writer runs in the replica's group, until the link
//! fails or the replica stops; pause ([`Backoff`]: jittered, at most 1 s, short again once
//! a link has been up) and dial again, for as long as the replica runs, so a link comes
//! back by itself when the network does. What to send is decided elsewhere, behind
//! [`Outgoing`].

use super::timing::{CONNECT_TIMEOUT, LINK_TIMEOUT};
use crate::auth::{NONCE_LEN, TAG_LEN};
use crate::framing::{encode_frame, Framing, Limits};
use crate::group::Group;
use crate::link::{Answer, Auth, Backoff, Dialer, Link, LinkError, Timeouts};
use crate::log_debug;
use crate::outbox::{Bytes, Outbox, OutboxConfig};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Frames (batches) that may wait in a link's outbox. Records and snapshots are held back
/// while [`FEED_AHEAD`] batches wait (see [`Outgoing::next_frames`]), so what else piles
/// up is heartbeats and answers, a few a tenth of a second, until a stuck write fails
/// after [`LINK_TIMEOUT`]: far below this; and clients' requests forwarded by a backup,
/// which stop at half of it ([`FORWARD_QUEUE`]).
pub(super) const LINK_OUTBOX: usize = 4096;
/// Bytes a link may hold unwritten (with the forwarded requests not yet handed to it)
/// beyond which a backup forwards no more of its clients' requests on it, and fewer than
/// half [`LINK_OUTBOX`]'s frames: a client that asks faster than the link carries its
/// requests has its connection closed (it fails over), rather than piling them onto the
/// link until it is closed for being behind, taking the backup's acknowledgements with it.
pub(super) const FORWARD_QUEUE: usize = 8 << 20;
/// Batches queued on a link beyond which no more records or snapshots are added: the
/// writer's back-pressure, which a socket write used to give. A batch is at most 4,096
/// records, or one snapshot.
pub(super) const FEED_AHEAD: usize = 2;

/// The longest handshake answer a server sends: `auth2 `, its nonce and tag in hex, and
/// its identity (a server id, at most 20 decimal digits) in hex, space-separated.
const AUTH_ANSWER_MAX: usize = 6 + 2 * NONCE_LEN + 1 + 2 * TAG_LEN + 1 + 2 * 20;

/// Where and how to dial one peer.
pub(super) struct Dial {
    /// The peer's id, passed back to [`Outgoing`].
    pub(super) to: usize,
    /// Its address.
    pub(super) addr: SocketAddr,
    /// The first frame's payload.
    pub(super) hello: Vec<u8>,
    /// The only answer that accepts the link.
    pub(super) welcome: Vec<u8>,
    /// Who dials, for the logs.
    pub(super) name: String,
    /// This server's proof, when a secret is configured: the peer must then prove it is
    /// server `to` of this cluster.
    pub(super) auth: Option<Auth>,
}

/// The replica's side of its outbound links.
pub(super) trait Outgoing {
    /// What a writer remembers between batches on one connection; each new connection
    /// starts from the default.
    type Cursor: Default;
    /// Whether the replica is stopping: no more dialing.
    fn stopping(&self) -> bool;
    /// The link to peer `to` is up (handshake done), before anything is written on it.
    fn linked(&self, to: usize);
    /// Dialing peer `to` failed, or it refused the link; `dead` when nothing listens at its
    /// address (the connection itself was refused).
    fn refused(&self, to: usize, dead: bool);
    /// The link to peer `to` is down.
    fn unlinked(&self, to: usize);
    /// Waits until something is due on the link to peer `to` and appends its frames to
    /// `out`; false when the replica is stopping, or the link is dead (it is dialled again).
    /// `queued` tells how many batches, and bytes, wait unwritten: at [`FEED_AHEAD`]
    /// batches or more, only heartbeats and answers are added.
    fn next_frames(
        &self,
        to: usize,
        cursor: &mut Self::Cursor,
        queued: &dyn Fn() -> (usize, usize),
        out: &mut Vec<u8>,
    ) -> bool;
    /// Waits `d`, or less if the replica stops.
    fn pause(&self, d: Duration);
}

/// Keeps a link to one peer up until the replica stops; the link's socket and writer
/// belong to `group`.
pub(super) fn run<R: Outgoing>(replica: &R, dial: &Dial, group: &Group) {
    let dialer = Dialer {
        framing: Framing::U32,
        // The acceptor's frames are short: a longer one is no WELCOME (nor, with a secret,
        // the handshake's answer).
        limits: Limits {
            max_frame: if dial.auth.is_some() {
                AUTH_ANSWER_MAX
            } else {
                16
            },
            ..Limits::default()
        },
        timeouts: Timeouts {
            connect: CONNECT_TIMEOUT,
            handshake: LINK_TIMEOUT,
            write: LINK_TIMEOUT,
            idle: Some(LINK_TIMEOUT),
        },
        group: Some(group.clone()),
    };
    let mut backoff = Backoff::default();
    while !replica.stopping() {
        match connect(&dialer, dial) {
            Ok(link) => {
                backoff.reset();
                replica.linked(dial.to);
                log_debug!("{}: linked to server {}", dial.name, dial.to);
                let name = format!("{}: the link to server {}", dial.name, dial.to);
                let (outbox, writer) = link.outbox(OutboxConfig::new(name, LINK_OUTBOX));
                let thread = format!("{}-write-{}", dial.name, dial.to);
                if group.spawn(thread, move || writer.run()).is_ok() {
                    write_due(replica, dial, &outbox);
                }
                // Dropping the outbox lets the writer send what is queued and half-close;
                // the peer then sees the link end.
                drop(outbox);
                replica.unlinked(dial.to);
            }
            Err(e) => {
                log_debug!("{}: cannot link to server {}: {e}", dial.name, dial.to);
                let dead = matches!(
                    &e,
                    LinkError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused
                );
                replica.refused(dial.to, dead);
            }
        }
        replica.pause(backoff.next_delay());
    }
}

/// Dials, says HELLO and waits for the WELCOME.
fn connect(dialer: &Dialer, dial: &Dial) -> Result<Link, LinkError> {
    let mut hello = Vec::new();
    encode_frame(Framing::U32, &dial.hello, &mut hello).map_err(io::Error::other)?;
    let answer = |frame: &[u8]| {
        Ok::<_, io::Error>(if frame == dial.welcome {
            Answer::Welcome(())
        } else {
            Answer::Refused("not a WELCOME".into())
        })
    };
    let (link, ()) = dialer.dial_with_auth(dial.auth.as_ref(), dial.addr, &hello, answer)?;
    // With a secret, the far end proved an identity: it must be the server dialled, not
    // another member (or a process) that took over its address.
    if dial.auth.is_some() && link.peer_identity() != Some(dial.to.to_string().as_bytes()) {
        return Err(LinkError::Unauthenticated(
            "the peer proved another server id than the one dialled",
        ));
    }
    Ok(link)
}

/// Hands whatever is due on the link to its outbox, until the link fails or the replica
/// stops.
fn write_due<R: Outgoing>(replica: &R, dial: &Dial, outbox: &Outbox) {
    let mut cursor = R::Cursor::default();
    let mut out = Vec::new();
    let queued = || (outbox.len(), outbox.queued_bytes());
    while replica.next_frames(dial.to, &mut cursor, &queued, &mut out) {
        if let Err(e) = outbox.send(Bytes::from(&out[..])) {
            log_debug!("{}: link to server {} failed: {e}", dial.name, dial.to);
            return;
        }
        out.clear();
        // A snapshot can make this buffer large; keep it only while it is not.
        if out.capacity() > 1 << 20 {
            out = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::thread;

    /// A replica that hands out its batches in turn, then stops; it notes every call.
    struct Script {
        batches: Mutex<Vec<Vec<u8>>>,
        calls: Mutex<Vec<String>>,
        stop: AtomicBool,
    }

    impl Script {
        fn new(batches: &[&[u8]]) -> Script {
            Script {
                batches: Mutex::new(batches.iter().rev().map(|b| b.to_vec()).collect()),
                calls: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            }
        }

        fn note(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl Outgoing for Script {
        /// Batches written on this connection.
        type Cursor = usize;

        fn stopping(&self) -> bool {
            self.stop.load(Ordering::SeqCst)
        }

        fn linked(&self, to: usize) {
            self.note(format!("linked {to}"));
        }

        fn refused(&self, to: usize, _dead: bool) {
            self.note(format!("refused {to}"));
            self.stop.store(true, Ordering::SeqCst);
        }

        fn unlinked(&self, to: usize) {
            self.note(format!("unlinked {to}"));
            self.stop.store(true, Ordering::SeqCst);
        }

        fn next_frames(
            &self,
            _to: usize,
            written: &mut usize,
            _queued: &dyn Fn() -> (usize, usize),
            out: &mut Vec<u8>,
        ) -> bool {
            let Some(batch) = self.batches.lock().unwrap().pop() else {
                return false;
            };
            *written += 1;
            out.extend_from_slice(&batch);
            true
        }

        fn pause(&self, _d: Duration) {}
    }

    /// A peer that reads the HELLO, answers `answer`, and returns everything it read.
    fn peer(answer: &'static [u8]) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut hello = [0; 4 + 5];
            s.read_exact(&mut hello).unwrap();
            let mut frame = (answer.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(answer);
            s.write_all(&frame).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            [&hello[..], &rest].concat()
        });
        (addr, peer)
    }

    fn dial(addr: SocketAddr) -> Dial {
        Dial {
            to: 1,
            addr,
            hello: b"hello".to_vec(),
            welcome: b"w".to_vec(),
            name: "test".into(),
            auth: None,
        }
    }

    #[test]
    fn a_welcomed_link_carries_the_batches_in_order_then_closes() {
        let (addr, peer) = peer(b"w");
        let script = Script::new(&[b"one", b"two"]);
        let group = Group::new("test");
        run(&script, &dial(addr), &group);
        // The writer flushes, then half-closes: the peer reads everything, then the end.
        assert_eq!(peer.join().unwrap(), b"\0\0\0\x05helloonetwo");
        assert!(group.close(Duration::from_secs(5)).stragglers.is_empty());
        assert_eq!(*script.calls.lock().unwrap(), ["linked 1", "unlinked 1"]);
    }

    #[test]
    fn any_answer_but_the_welcome_is_a_refusal() {
        let (addr, peer) = peer(b"x");
        let script = Script::new(&[b"one"]);
        run(&script, &dial(addr), &Group::new("test"));
        assert_eq!(peer.join().unwrap(), b"\0\0\0\x05hello");
        assert_eq!(*script.calls.lock().unwrap(), ["refused 1"]);
        assert_eq!(script.batches.lock().unwrap().len(), 1);
    }
}
