//! The link layer's tests: handshakes (with and without a secret), refusals, timeouts,
//! the reader loops and group shutdown, over real loopback sockets.
use super::*;
use crate::outbox::OutboxConfig;
use std::net::TcpListener;
use std::thread;

const T: Duration = Duration::from_secs(5);

fn parse(frame: &[u8]) -> Result<Answer<String>, io::Error> {
    match frame.split_first() {
        Some((b'+', who)) => Ok(Answer::Welcome(String::from_utf8_lossy(who).into())),
        Some((b'-', why)) => Ok(Answer::Refused(String::from_utf8_lossy(why).into())),
        _ => Err(io::Error::other("neither + nor -")),
    }
}

/// A one-connection acceptor: reads the hello and answers with `decide(hello)`; on a
/// welcome, collects the frames of the link until it ends, and how it ended.
fn acceptor(
    idle: Option<Duration>,
    decide: impl FnOnce(&[u8]) -> Verdict + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<(Vec<String>, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let stream = Arc::new(stream);
        let mut reader = FrameReader::new(&*stream, Framing::Line);
        let hello = reader.read_frame().unwrap().unwrap().to_vec();
        let timeouts = Timeouts {
            idle,
            ..Timeouts::uniform(T)
        };
        let Some(mut link) = accept(&stream, reader, &timeouts, decide(&hello)).unwrap() else {
            return (Vec::new(), "refused".into());
        };
        let mut got = Vec::new();
        let end = link.read_frames("test", |f| {
            if f == b"stop" {
                return ControlFlow::Break("stopped");
            }
            got.push(String::from_utf8_lossy(f).into_owned());
            ControlFlow::Continue(())
        });
        let end = match end {
            End::Closed => "closed".to_owned(),
            End::Stopped(why) => why.to_owned(),
            End::Lost(e) if e.is_timeout() => "timed out".to_owned(),
            End::Lost(e) => e.to_string(),
        };
        (got, end)
    });
    (addr, thread)
}

fn auth(secret: &[u8], identity: &str) -> Auth {
    Auth {
        secret: Secret::from_bytes(secret).unwrap(),
        cluster: b"test cluster".to_vec(),
        identity: identity.as_bytes().to_vec(),
    }
}

const SECRET: &[u8] = b"0123456789abcdef";

/// A one-connection acceptor with `auth`: reads the hello `hi <identity>`, runs the
/// handshake, then welcomes (`+acc`) and returns the first frame of the link; or how
/// the handshake failed.
fn auth_acceptor(auth: Option<Auth>) -> (SocketAddr, thread::JoinHandle<Result<String, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let stream = Arc::new(stream);
        let mut reader = FrameReader::new(&*stream, Framing::Line);
        let hello = reader.read_frame().unwrap().unwrap().to_vec();
        let claimed = hello.strip_prefix(b"hi ").unwrap_or(&hello).to_vec();
        let timeouts = Timeouts::uniform(T);
        authenticate(&stream, &mut reader, &timeouts, auth.as_ref(), &claimed)
            .map_err(|e| e.to_string())?;
        let verdict = Verdict::Welcome(b"+acc\n".to_vec());
        let mut link = accept(&stream, reader, &timeouts, verdict)
            .unwrap()
            .unwrap();
        let mut first = String::new();
        link.read_frames("test", |f| {
            first = String::from_utf8_lossy(f).into_owned();
            ControlFlow::Break(())
        });
        Ok(first)
    });
    (addr, thread)
}

/// A line-framed dial with default limits and the tests' timeouts.
fn dial_line(addr: SocketAddr, hello: &[u8]) -> Result<(Link, String), LinkError> {
    dial(
        addr,
        Framing::Line,
        Limits::default(),
        hello,
        &Timeouts::uniform(T),
        parse,
    )
}

fn auth_dial(
    addr: SocketAddr,
    auth: Option<Auth>,
    hello: &[u8],
) -> Result<(Link, String), LinkError> {
    let dialer = Dialer::new(Framing::Line, Timeouts::uniform(T));
    dialer.dial_with_auth(auth.as_ref(), addr, hello, parse)
}

#[test]
fn a_shared_secret_opens_the_link_and_proves_both_identities() {
    let (addr, peer) = auth_acceptor(Some(auth(SECRET, "acc")));
    let (link, who) = auth_dial(addr, Some(auth(SECRET, "dia")), b"hi dia\n").unwrap();
    assert_eq!(who, "acc");
    assert_eq!(link.peer_identity(), Some(&b"acc"[..]));
    (&**link.stream()).write_all(b"after\n").unwrap();
    assert_eq!(peer.join().unwrap(), Ok("after".to_owned()));
}

#[test]
fn a_wrong_secret_fails_on_both_sides_before_the_service_answers() {
    // The dialer holds another secret: it refuses the acceptor's proof at once.
    let (addr, peer) = auth_acceptor(Some(auth(SECRET, "acc")));
    let other = b"0123456789abcdeX";
    let err = auth_dial(addr, Some(auth(other, "dia")), b"hi dia\n")
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Unauthenticated(_)), "{err}");
    // Which the acceptor sees as the dialer hanging up, never as a welcome.
    assert!(peer.join().unwrap().is_err());
}

#[test]
fn the_acceptor_refuses_a_proof_for_another_identity_and_a_dialer_without_the_secret() {
    // The dialer proves "dia" but its hello claims "alice".
    let (addr, peer) = auth_acceptor(Some(auth(SECRET, "acc")));
    let err = auth_dial(addr, Some(auth(SECRET, "dia")), b"hi alice\n")
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Unauthenticated(_)), "{err}");
    let why = peer.join().unwrap().unwrap_err();
    assert!(why.contains("wrong proof"), "{why}");

    // A dialer with no secret sends its hello and waits: refused, nothing welcomed.
    let (addr, peer) = auth_acceptor(Some(auth(SECRET, "acc")));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"hi dia\n{forged}\n").unwrap();
    let why = peer.join().unwrap().unwrap_err();
    assert!(why.contains("no handshake"), "{why}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

#[test]
fn a_dialer_with_a_secret_refuses_an_acceptor_without_one() {
    let (addr, peer) = auth_acceptor(None);
    let err = auth_dial(addr, Some(auth(SECRET, "dia")), b"hi dia\n")
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Unauthenticated(_)), "{err}");
    // The acceptor read our nonce as the link's first frame; the link then closed.
    let first = peer.join().unwrap().unwrap();
    assert!(first.starts_with("auth1 "), "{first}");
}

#[test]
fn a_replayed_answer_does_not_pass_on_a_new_connection() {
    // Record an honest acceptor's answer, then play it back as a fake acceptor.
    let (addr, peer) = auth_acceptor(Some(auth(SECRET, "acc")));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let challenge = auth::Message::Challenge(Nonce::fresh().unwrap()).format();
    s.write_all(&[&b"hi x\n"[..], &challenge, b"\n"].concat())
        .unwrap();
    let mut reader = FrameReader::new(&s, Framing::Line);
    let recorded = reader.read_frame().unwrap().unwrap().to_vec();
    drop(s);
    let _ = peer.join().unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(&[&recorded[..], b"\n+acc\n"].concat()).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let err = auth_dial(fake_addr, Some(auth(SECRET, "dia")), b"hi dia\n")
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Unauthenticated(_)), "{err}");
    let sent = fake.join().unwrap();
    assert!(
        !sent.windows(6).any(|w| w == b"auth3 "),
        "no proof given to a fake"
    );
}

#[test]
fn a_welcomed_link_carries_frames_until_the_outbox_is_dropped() {
    let (addr, peer) = acceptor(Some(T), |_| Verdict::Welcome(b"+bob\n".to_vec()));
    let (link, who) = dial_line(addr, b"hi\n").unwrap();
    assert_eq!(who, "bob");
    let (outbox, writer) = link.outbox(OutboxConfig::new("test", 8));
    let writer = thread::spawn(move || writer.run());
    outbox.send(Arc::from(&b"one\n"[..])).unwrap();
    outbox.send(Arc::from(&b"two\n"[..])).unwrap();
    drop(outbox);
    writer.join().unwrap();
    let (got, end) = peer.join().unwrap();
    assert_eq!(got, ["one", "two"]);
    assert_eq!(end, "closed");
}

#[test]
fn a_refused_hello_is_an_error_with_the_reason() {
    let (addr, peer) = acceptor(None, |hello| {
        assert_eq!(hello, b"hi");
        Verdict::Refuse(b"-not_a_member\n".to_vec())
    });
    let err = dial_line(addr, b"hi\n").err().unwrap();
    assert!(
        matches!(&err, LinkError::Refused(r) if r == "not_a_member"),
        "{err}"
    );
    assert_eq!(peer.join().unwrap().1, "refused");
}

/// Whoever answers at a peer's address writes the reason: a refusal of 1 MiB (a frame
/// within the limit) is told, and logged, as a short quoted preview, its newlines escaped.
#[test]
fn a_refusal_reason_from_the_far_end_is_shown_cut_and_escaped() {
    let long = LinkError::Refused(format!("forged\nline {}", "x".repeat(1 << 20)));
    let shown = long.to_string();
    assert!(shown.len() < 300, "{} bytes", shown.len());
    assert!(shown.starts_with("refused: \"forged\\nline xxx"), "{shown}");
    assert!(shown.ends_with("… (cut)"), "{shown}");
    assert!(!shown.contains('\n'), "{shown}");
    let short = LinkError::Refused("not_a_member".into());
    assert_eq!(short.to_string(), "refused: \"not_a_member\"");
}

#[test]
fn a_silent_refusal_and_a_bad_answer_are_told_apart() {
    let (addr, peer) = acceptor(None, |_| Verdict::Refuse(Vec::new()));
    let err = dial_line(addr, b"hi\n");
    assert!(matches!(err, Err(LinkError::Closed)));
    peer.join().unwrap();
    let (addr, peer) = acceptor(None, |_| Verdict::Refuse(b"?\n".to_vec()));
    let err = dial_line(addr, b"hi\n");
    assert!(matches!(err, Err(LinkError::Protocol(_))));
    peer.join().unwrap();
}

#[test]
fn a_silent_peer_ends_the_link_at_the_idle_timeout_and_over_limit_frames_are_skipped() {
    let idle = Duration::from_millis(200);
    let (addr, peer) = acceptor(Some(idle), |_| Verdict::Welcome(b"+bob\n".to_vec()));
    let (link, _) = dial_line(addr, b"hi\n").unwrap();
    // The acceptor's reader takes lines of up to 1 MiB by default.
    let mut long = vec![b'x'; (1 << 20) + 10];
    long.push(b'\n');
    (&**link.stream()).write_all(&long).unwrap();
    (&**link.stream()).write_all(b"after\n").unwrap();
    // Then silence, the link held open: the acceptor gives up after `idle`.
    let (got, end) = peer.join().unwrap();
    assert_eq!(got, ["after"]);
    assert_eq!(end, "timed out");
    drop(link);
}

#[test]
fn an_unreachable_peer_and_a_bad_address_fail_the_dial() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = dial_line(addr, b"hi\n");
    assert!(matches!(err, Err(LinkError::Io(_))));
    assert!(resolve("not an address").is_err());
    assert_eq!(resolve("127.0.0.1:9").unwrap().len(), 1);
}

#[test]
fn the_handler_can_stop_the_reader_loop() {
    let (addr, peer) = acceptor(Some(T), |_| Verdict::Welcome(b"+bob\n".to_vec()));
    let (link, _) = dial_line(addr, b"hi\n").unwrap();
    (&**link.stream()).write_all(b"a\nstop\nb\n").unwrap();
    let (got, end) = peer.join().unwrap();
    assert_eq!((got, end.as_str()), (vec!["a".to_owned()], "stopped"));
}

#[test]
fn a_group_shutdown_cuts_a_dial_stuck_in_its_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (heard, hello) = crossbeam_channel::bounded(1);
    // Reads the hello, then never answers (holding the socket open until the end).
    let silent = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let mut reader = FrameReader::new(&stream, Framing::Line);
        let _ = heard.send(reader.read_frame().unwrap().map(<[u8]>::to_vec));
        let _ = reader.read_frame();
    });
    let group = Group::new("test");
    let dialer = Dialer {
        group: Some(group.clone()),
        ..Dialer::new(Framing::Line, Timeouts::uniform(Duration::from_secs(30)))
    };
    let dialing = thread::spawn(move || dialer.dial(addr, b"hi\n", parse).map(|(_, p)| p));
    // The hello was written: the socket is registered (before the handshake began).
    assert_eq!(hello.recv_timeout(T).unwrap(), Some(b"hi".to_vec()));
    let started = std::time::Instant::now();
    group.shutdown();
    let err = dialing.join().unwrap().unwrap_err();
    assert!(
        started.elapsed() < T,
        "cut by the shutdown, not the 30 s timeout"
    );
    assert!(matches!(err, LinkError::Closed | LinkError::Io(_)), "{err}");
    silent.join().unwrap();
}

#[test]
fn frames_are_read_in_batches_with_one_call_after_each_read() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(8);
    let acceptor = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let stream = Arc::new(stream);
        let mut reader = FrameReader::new(SharedStream(Arc::clone(&stream)), Framing::Line);
        reader.read_frame().unwrap();
        let verdict = Verdict::Welcome(b"+bob\n".to_vec());
        let mut link = accept(&stream, reader, &Timeouts::uniform(T), verdict)
            .unwrap()
            .unwrap();
        let frames = tx.clone();
        let end = link.read_batches(
            "test",
            |f| {
                let _ = frames.send(Some(String::from_utf8_lossy(f).into_owned()));
                ControlFlow::<()>::Continue(())
            },
            || {
                let _ = tx.send(None);
            },
        );
        matches!(end, End::Closed)
    });
    // The frames up to the next end of a read.
    let batch = || -> Vec<String> { std::iter::from_fn(|| rx.recv_timeout(T).unwrap()).collect() };
    let (link, _) = dial_line(addr, b"hi\n").unwrap();
    (&**link.stream()).write_all(b"a\nb\nc\n").unwrap();
    // One write of three frames: read at once (a small loopback write arrives whole).
    assert_eq!(batch(), ["a", "b", "c"]);
    (&**link.stream()).write_all(b"d\n").unwrap();
    assert_eq!(batch(), ["d"]);
    link.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(acceptor.join().unwrap(), "a clean end");
}

/// A link charged to a budget ([`Link::charged_outbox`]) is charged for its reader's buffer
/// too: a far end that sends a line that never ends makes the reader hold it, and past
/// the budget the link is lost, its bytes given back.
#[test]
fn a_charged_link_charges_its_reader_and_is_lost_past_the_budget() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (finished, done) = std::sync::mpsc::channel::<()>();
    let far = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        stream.set_write_timeout(Some(T)).unwrap();
        let mut hello = [0u8; 3];
        stream.read_exact(&mut hello).unwrap();
        stream.write_all(b"+bob\nfirst\n").unwrap();
        // 512 KiB of a line with no end (the reader takes lines of up to 1 MiB); the
        // write may fail once the link is closed.
        let _ = stream.write_all(&vec![b'x'; 512 << 10]);
        let _ = done.recv_timeout(T);
    });
    let budget = Budget::new("test", 256 << 10);
    let (mut link, who) = dial_line(addr, b"hi\n").unwrap();
    assert_eq!(who, "bob");
    let config = OutboxConfig::new("test: link", 8);
    let (outbox, writer) = link.charged_outbox(config, Some(&budget));
    assert!(budget.held() > 0, "the reader's buffer is charged");
    let mut got = Vec::new();
    let end = link.read_frames("test", |f| {
        got.push(f.to_vec());
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(got, [b"first".to_vec()]);
    match end {
        End::Lost(FrameError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::OutOfMemory),
        other => panic!("the link ended otherwise: {other:?}"),
    }
    assert_eq!(budget.refusals(), 1);
    assert!(budget.peak() <= 256 << 10, "peak {}", budget.peak());
    drop((link, outbox, writer));
    assert_eq!(budget.held(), 0);
    let _ = finished.send(());
    far.join().unwrap();
}
