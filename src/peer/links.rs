//! A peer's links: dialling a member, accepting one, the hello exchange (authenticated
//! when the room has a secret) and the reader loop that feeds the peer's state.

use super::*;

/// Serves one link after its hello exchange, on the calling thread, until it closes.
/// `dialing` (a dialled link's entry in the dialling set) is released once the link is
/// registered, so the periodic dial never opens a second link in between. The link's
/// socket stays registered with the peer's group until this returns.
pub(super) fn run_link<R: Read>(
    shared: &Arc<Shared>,
    peer: Member,
    mut link: Link<R>,
    id: u64,
    dialing: Option<Dialing>,
) {
    let attached = shared.attach(&peer, &link, id, dialing.is_some());
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
    let end = link.read_frames(&name, |frame| {
        match PeerMessage::parse(frame) {
            Ok(PeerMessage::Heartbeat) => {}
            Ok(msg) => shared.with_node(|node, now, out| node.receive(&peer, msg, now, out)),
            Err(e) => log_info!("peer: from {peer}: {e}"),
        }
        ControlFlow::<()>::Continue(())
    });
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

/// A peer message as a link line, `\n` included.
pub(super) fn line(msg: &PeerMessage) -> Vec<u8> {
    let mut line = msg.format().into_bytes();
    line.push(b'\n');
    line
}

/// An address being dialled; taken off the dialling set however the dial ends.
pub(super) struct Dialing(Arc<Shared>, SocketAddr);

impl Drop for Dialing {
    fn drop(&mut self) {
        self.0.state().dialing.remove(&self.1);
    }
}

/// Opens a link to `addr`: hello, and on the answering hello serves it on this thread.
pub(super) fn dial(shared: Arc<Shared>, addr: SocketAddr) {
    let guard = Dialing(Arc::clone(&shared), addr);
    let me = {
        let st = shared.state();
        if st.closing {
            return;
        }
        st.node.me().clone()
    };
    let hello = line(&PeerMessage::Hello(me.clone()));
    let answer = |line: &[u8]| -> Result<Answer<Member>, HandlerError> {
        match PeerMessage::parse(line)? {
            PeerMessage::Hello(peer) => Ok(Answer::Welcome(peer)),
            PeerMessage::Refused(reason) => Ok(Answer::Refused(reason)),
            other => Err(format!("unexpected answer {}", other.format()).into()),
        }
    };
    // The dialer registers the socket with `links` from the connect on, so shutdown
    // either sees it or refuses it: a handshake never outlives the peer.
    match shared
        .dialer
        .dial_with_auth(shared.auth.as_ref(), addr, &hello, answer)
    {
        // The answering hello must name the member that proved itself: one member's proof
        // cannot stand for another.
        Ok((link, peer)) if link.peer_identity().is_some_and(|p| p != identity(&peer)) => {
            log_info!("peer: link to {addr}: {peer} is not who proved itself; closed");
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        Ok((link, peer)) if peer != me => {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            run_link(&shared, peer, link, id, Some(guard));
        }
        Ok((link, _)) => {
            log_info!("peer: link to {addr}: that is this peer");
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        Err(LinkError::Refused(reason)) => {
            shared.state().node.direct_refused(addr);
            log_info!("peer: link to {addr}: refused ({reason}); traffic to it is routed");
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
    let mut reader = FrameReader::with_limits(&**stream, Framing::Line, link_limits());
    let first = match reader.read_frame()? {
        Some(line) => PeerMessage::parse(line),
        None => return Ok(()),
    };
    // A hello is proven before the node hears of it: a stranger's link ends here, logged.
    if let Ok(PeerMessage::Hello(peer)) = &first {
        let auth = shared.auth.as_ref();
        if link::authenticate(stream, &mut reader, &TIMEOUTS, auth, &identity(peer)).is_err() {
            return Ok(());
        }
    }
    let (peer, verdict) = match first {
        Ok(PeerMessage::Hello(peer)) => {
            let (allowed, me) = {
                let st = shared.state();
                (
                    !st.closing && st.node.allows_direct(peer.addr),
                    st.node.me().clone(),
                )
            };
            if allowed {
                (Some(peer), Verdict::Welcome(line(&PeerMessage::Hello(me))))
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
    let (Some(peer), Some(mut link)) = (peer, link::accept(stream, reader, &TIMEOUTS, verdict)?)
    else {
        return Ok(());
    };
    // Links need no arrival order across connections; let younger ones through at once.
    if link.register(&shared.links).is_err() {
        return Ok(()); // shutting down: the socket is shut down already
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    run_link(shared, peer, link, id, None);
    Ok(())
}
