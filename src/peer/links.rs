//! A peer's links: dialling a member, accepting one, the hello exchange (authenticated
//! when the room has a secret) and the reader loop that feeds the peer's state.

use super::*;
use crate::log::{Preview, Quota, BAD_REQUEST_LINES, PREVIEW};

/// Serves one link after its hello exchange, on the calling thread, until it closes.
/// `dialing` (a dialled link's entry in the dialling set) is released once the link is
/// registered, so the periodic dial never opens a second link in between. The link's
/// socket stays registered with the peer's group until this returns.
pub(super) fn run_link<R: Read>(
    shared: &Arc<Shared>,
    peer: Member,
    mut link: Link<R>,
    id: u64,
    mut dialing: Option<Dialing>,
) {
    let attached = shared.attach(&peer, &mut link, id, dialing.is_some());
    if let Some(d) = &mut dialing {
        d.up = matches!(attached, Attached::Registered);
    }
    drop(dialing);
    let stream = Arc::clone(link.stream());
    match attached {
        Attached::Registered => {}
        // The other end keeps the other link too and half-closes this one: read on to
        // its end, so nothing it sent here is lost.
        Attached::Duplicate => {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Attached::Closing => {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
    let name = format!("peer: from {peer}");
    let mut logged = Quota::new(BAD_REQUEST_LINES);
    let end = link.read_frames(&name, |frame| {
        match PeerMessage::parse(frame) {
            Ok(PeerMessage::Heartbeat) => {}
            Ok(msg) => shared.with_node(|node, now, out| node.receive(&peer, msg, now, out)),
            // A member's line this peer cannot read may be a newer peer's message: skip
            // it (logged the first few times on a link, then counted). A stranger's
            // garbage (a peer on no list held) ends its own link.
            Err(e) if shared.state().node.members().contains(&peer) => {
                if logged.allow() {
                    log_info!("peer: from {peer}: {e}; skipped");
                }
            }
            Err(e) => {
                log_info!("peer: from {peer}: {e}; not a member: link closed");
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    if logged.suppressed() > 0 {
        log_info!(
            "peer: from {peer}: {} more unreadable line(s), skipped and not logged",
            logged.suppressed()
        );
    }
    if let End::Lost(e) = &end {
        log_debug!("peer: link to {peer}: {e}");
    }
    shared.detach(&peer, id);
    // At a clean end (the other end half-closed: it replaced this link, or it is
    // leaving) our writer may still be sending what was queued here, which the other end
    // reads to the end: let it finish and half-close, bounded by its write timeout. A
    // broken link is shut at once, which also stops its writer.
    if !matches!(end, End::Closed) {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// The acceptor's `{refused,Reason}` to a peer of another room.
const OTHER_ROOM: &str = "other_room";

/// A peer message as a link line, `\n` included.
pub(super) fn line(msg: &PeerMessage) -> Vec<u8> {
    let mut line = msg.format().into_bytes();
    line.push(b'\n');
    line
}

/// An address being dialled; taken off the dialling set however the dial ends. A dial
/// that ends without a registered link (`up` false) puts off the next dial of that address
/// by its [`Backoff`]; one that brought a link up forgets the backoff.
pub(super) struct Dialing {
    shared: Arc<Shared>,
    addr: SocketAddr,
    up: bool,
}

impl Drop for Dialing {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        st.dialing.remove(&self.addr);
        if self.up {
            st.redial.remove(&self.addr);
        } else {
            let (backoff, at) = st
                .redial
                .entry(self.addr)
                .or_insert_with(|| (Backoff::default(), Instant::now()));
            *at = Instant::now() + backoff.next_delay();
        }
    }
}

/// Opens a link to `addr`: hello, and on the answering hello serves it on this thread.
pub(super) fn dial(shared: Arc<Shared>, addr: SocketAddr) {
    let guard = Dialing {
        shared: Arc::clone(&shared),
        addr,
        up: false,
    };
    let (me, room, via) = {
        let st = shared.state();
        if st.closing {
            return;
        }
        (st.node.me().clone(), st.node.room().cloned(), st.node.via())
    };
    let hello = line(&PeerMessage::Hello(me.clone(), room));
    let answer = |line: &[u8]| -> Result<Answer<(Member, Option<Member>)>, HandlerError> {
        match PeerMessage::parse(line)? {
            PeerMessage::Hello(peer, room) => Ok(Answer::Welcome((peer, room))),
            PeerMessage::Refused(reason) => Ok(Answer::Refused(reason)),
            other => Err(format!("unexpected answer {}", other.format()).into()),
        }
    };
    // The dialer registers the socket with `links` from the connect on, so shutdown
    // either sees it or refuses it: a handshake never outlives the peer.
    let target = shared.reach.get(&addr).copied().unwrap_or(addr);
    match shared
        .dialer
        .dial_with_auth(shared.auth.as_ref(), target, &hello, answer)
    {
        // The answering hello must name the member that proved itself: one member's proof
        // cannot stand for another.
        Ok((link, (peer, _))) if link.peer_identity().is_some_and(|p| p != identity(&peer)) => {
            log_info!("peer: link to {addr}: {peer} is not who proved itself; closed");
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        // A member is dialled at the address it advertises, and must answer as the member
        // there. Otherwise a process that took over a lost member's port could pass our
        // handshake on to another member and sit between the two, each side's proof
        // checking out at the other. Only the `--via` address, typed by hand, may answer
        // as a member advertising another.
        Ok((link, (peer, _))) if peer.addr != addr && via != Some(addr) => {
            log_info!("peer: link to {addr}: answered as {peer}, at another address; closed");
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        Ok((link, (peer, room))) if !shared.state().node.same_room(room.as_ref()) => {
            log_info!("peer: link to {addr}: {peer} is in another room; closed");
            shared.state().node.other_room(addr);
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        Ok((link, (peer, _))) if peer != me => {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            run_link(&shared, peer, link, id, Some(guard));
        }
        Ok((link, _)) => {
            log_info!("peer: link to {addr}: that is this peer");
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        Err(LinkError::Refused(reason)) if reason.contains(OTHER_ROOM) => {
            shared.state().node.other_room(addr);
            log_info!(
                "peer: link to {addr}: refused ({}): it is in another room",
                Preview(&reason, PREVIEW)
            );
        }
        Err(LinkError::Refused(reason)) => {
            shared.state().node.direct_refused(addr);
            log_info!(
                "peer: link to {addr}: refused ({}); traffic to it is routed",
                Preview(&reason, PREVIEW)
            );
        }
        Err(e @ LinkError::Protocol(_)) => log_info!("peer: link to {addr}: {e}"),
        Err(LinkError::Io(e)) => {
            log_debug!("peer: cannot dial {addr}: {e}");
            // A joiner with no link yet has nowhere else to go: it fails at once.
            if shared.state().node.awaits_via(addr) {
                let _ = shared.events.try_send(Event::ViaUnreachable(addr, e));
            }
        }
        Err(e) => log_debug!("peer: link to {addr}: {e}"),
    }
}

/// A reader of link lines, none longer than [`MAX_LINE`]: a peer cannot make this one
/// buffer more than that (a longer line is skipped, and the link goes on).
pub(super) fn link_limits() -> Limits {
    Limits {
        max_line: MAX_LINE,
        ..Limits::default()
    }
}

/// The server side of a link: read the dialler's hello, answer, serve.
pub(super) fn accept_link(shared: &Arc<Shared>, conn: Connection) -> Result<(), HandlerError> {
    let stream = &conn.stream;
    let timeouts = &shared.timeouts;
    // Charged to the connection's share of the budget until the link's own account takes
    // it over ([`Link::charged_outbox`]): a stranger's hello that never ends costs its
    // buffer there.
    let mut reader =
        FrameReader::with_limits(&**stream, Framing::Line, link_limits()).accounted(conn.account());
    let first = match reader.read_frame()? {
        Some(line) => PeerMessage::parse(line),
        None => return Ok(()),
    };
    // A hello is proven before the node hears of it: a stranger's link ends here, logged.
    if let Ok(PeerMessage::Hello(peer, _)) = &first {
        let auth = shared.auth.as_ref();
        if link::authenticate(stream, &mut reader, timeouts, auth, &identity(peer)).is_err() {
            return Ok(());
        }
    }
    let (peer, verdict) = match first {
        Ok(PeerMessage::Hello(peer, room)) => {
            let (allowed, same_room, me, my_room) = {
                let st = shared.state();
                (
                    !st.closing && st.node.allows_direct(peer.addr),
                    st.node.same_room(room.as_ref()),
                    st.node.me().clone(),
                    st.node.room().cloned(),
                )
            };
            if !same_room {
                log_info!("peer: refusing a link from {peer}: it is in another room");
                let refused = PeerMessage::Refused(OTHER_ROOM.into());
                (None, Verdict::Refuse(line(&refused)))
            } else if allowed {
                let hello = PeerMessage::Hello(me, my_room);
                (Some(peer), Verdict::Welcome(line(&hello)))
            } else {
                log_info!("peer: refusing a direct link from {peer} (--no-direct)");
                let refused = PeerMessage::Refused("no_direct".into());
                (None, Verdict::Refuse(line(&refused)))
            }
        }
        _ => (
            None,
            Verdict::Refuse(b"{refused,expected_hello}\n".to_vec()),
        ),
    };
    let (Some(peer), Some(mut link)) = (peer, link::accept(stream, reader, timeouts, verdict)?)
    else {
        return Ok(());
    };
    // Up: from now on the link's idle timeout bounds it, not the opening deadline.
    conn.opened();
    // Links need no arrival order across connections; let younger ones through at once.
    if link.register(&shared.links).is_err() {
        return Ok(()); // shutting down: the socket is shut down already
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    run_link(shared, peer, link, id, None);
    Ok(())
}
