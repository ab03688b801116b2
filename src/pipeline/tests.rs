use super::*;
use crate::server::{RunningServer, Server, ServerConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicBool;

const TIMEOUT: Duration = Duration::from_secs(10);

fn echo(_conn: u64, payload: Vec<u8>) -> Reply {
    Reply::One(payload)
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// A connected pair: (the server's end, shared as a connection's is; the client's end).
fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = client(listener.local_addr().unwrap());
    (Arc::new(listener.accept().unwrap().0), peer)
}

fn serve(pipeline: &Pipeline) -> RunningServer {
    let inlet = pipeline.inlet();
    Server::bind(
        "127.0.0.1:0",
        ServerConfig::named("pipe"),
        move |c: Connection| inlet.serve(&c),
    )
    .unwrap()
    .spawn()
    .unwrap()
}

fn config(workers: usize, senders: usize) -> PipelineConfig {
    let mut config = PipelineConfig::new("pipe", Framing::Line);
    config.workers = workers;
    config.senders = senders;
    config
}

use crate::testing::eventually;

#[test]
fn replies_keep_request_order_with_several_workers() {
    // Uneven work per frame, so the workers finish out of step with each other.
    let pipeline = Pipeline::start(config(4, 3), |_, mut p: Vec<u8>| {
        for _ in 0..p.len() % 7 * 50 {
            thread::yield_now();
        }
        p.insert(0, b'>');
        Reply::One(p)
    })
    .unwrap();
    let server = serve(&pipeline);
    let addr = server.local_addr();
    let clients: Vec<_> = (0..6)
        .map(|c| {
            thread::spawn(move || {
                let mut s = client(addr);
                let requests: String = (0..300).map(|i| format!("{c}-{i}\n")).collect();
                // All pipelined in one write, before any reply is read.
                s.write_all(requests.as_bytes()).unwrap();
                let expected: String = (0..300).map(|i| format!(">{c}-{i}\n")).collect();
                let mut got = vec![0u8; expected.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(String::from_utf8(got).unwrap(), expected);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    server.stop();
    assert_eq!(pipeline.shutdown(), 7);
}

#[test]
fn a_client_that_never_reads_is_dropped_alone() {
    let mut config = config(2, 2);
    config.framing = Framing::U32;
    let pipeline = Pipeline::start(config, echo).unwrap();
    let server = serve(&pipeline);
    let addr = server.local_addr();
    let mut prober = client(addr);
    let mut round_trip = || {
        prober.write_all(b"\0\0\0\x05probe").unwrap();
        let mut got = [0u8; 9];
        prober.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x05probe");
    };
    round_trip();
    let mut flood = client(addr);
    let flood_control = flood.try_clone().unwrap();
    let flooder = thread::spawn(move || {
        let mut frame = vec![0, 0, 16, 0];
        frame.resize(4 + 4096, b'f');
        while flood.write_all(&frame).is_ok() {}
        // What it finally reads ends in end of stream (or a reset), not a timeout.
        io::copy(&mut flood, &mut io::sink())
    });
    while pipeline.stats().dropped == 0 {
        round_trip();
    }
    // The server has let go; stop a write the flooder's kernel may still be holding.
    let _ = flood_control.shutdown(Shutdown::Write);
    match flooder.join().unwrap() {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    round_trip();
    eventually("the flooder's route to go", || pipeline.stats().routes == 1);
    server.stop();
    assert_eq!(pipeline.stats().routes, 0);
    assert_eq!(pipeline.stats().dropped, 1);
    assert_eq!(pipeline.shutdown(), 4);
}

#[test]
fn flooders_that_never_read_are_dropped_and_hold_little_while_a_client_keeps_its_replies() {
    let mut config = config(2, 2);
    config.framing = Framing::U32;
    let pipeline = Pipeline::start(config, echo).unwrap();
    let budget = crate::budget::Budget::new("pipe", 64 << 20);
    let inlet = pipeline.inlet();
    let server_config = ServerConfig {
        client_memory: Some(budget.clone()),
        ..ServerConfig::named("pipe")
    };
    let server = Server::bind("127.0.0.1:0", server_config, move |c: Connection| {
        inlet.serve(&c)
    })
    .unwrap()
    .spawn()
    .unwrap();
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    // Four flooders, each on both lanes over its reconnections: 64 KiB frames as fast as
    // they go, never a byte read; each reconnects when dropped, three times.
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut frame = (64u32 << 10).to_be_bytes().to_vec();
                frame.resize(4 + (64 << 10), b'f');
                for _ in 0..3 {
                    let Ok(mut flood) = TcpStream::connect(addr) else {
                        return; // the server has stopped
                    };
                    flood.set_write_timeout(Some(TIMEOUT)).unwrap();
                    while !stop.load(Ordering::SeqCst) && flood.write_all(&frame).is_ok() {}
                }
            })
        })
        .collect();
    // The measured client: every reply arrives, in order, while they flood.
    let mut prober = client(addr);
    for i in 0..2000u32 {
        let mut frame = 4u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&i.to_be_bytes());
        prober.write_all(&frame).unwrap();
        let mut got = [0u8; 8];
        prober.read_exact(&mut got).unwrap();
        assert_eq!(got[..], frame[..]);
    }
    eventually("every flooder connection to be dropped", || {
        pipeline.stats().dropped >= 4
    });
    stop.store(true, Ordering::SeqCst);
    drop(prober);
    server.stop();
    for flooder in flooders {
        flooder.join().unwrap();
    }
    // What a flooder has in flight is bounded: 256 KiB of requests, and its read buffer.
    assert!(
        budget.peak() <= 4 * (1 << 20),
        "flooders held {} bytes at once",
        budget.peak()
    );
    assert_eq!(pipeline.shutdown(), 4);
}

/// What a fresh TCP connection's receive buffer holds (`tcp_rmem`'s default), a floor
/// for what its socket buffers hold before the sender's write has to wait.
fn receive_buffer_default() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(128 << 10)
}

#[test]
fn a_client_that_pauses_reading_loses_nothing_its_socket_buffers_hold() {
    const FRAME: usize = 1 << 10;
    // A quarter of the receive buffer: the advertised window is about half of it.
    let burst = receive_buffer_default() / 4 / (FRAME + 4);
    let mut config = config(2, 2);
    config.framing = Framing::U32;
    // Shorter than the round trips below take: the pause outlasts the write timeout,
    // and only a full send buffer, not a pause, gets a connection dropped.
    config.write_timeout = Duration::from_millis(1);
    let pipeline = Pipeline::start(config, echo).unwrap();
    let server = serve(&pipeline);
    let mut paused = client(server.local_addr());
    let mut frame = (FRAME as u32).to_be_bytes().to_vec();
    frame.resize(4 + FRAME, b'p');
    for _ in 0..burst {
        paused.write_all(&frame).unwrap();
    }
    let mut other = client(server.local_addr());
    for i in 0..100u8 {
        other.write_all(&[0, 0, 0, 1, i]).unwrap();
        let mut got = [0u8; 5];
        other.read_exact(&mut got).unwrap();
        assert_eq!(got, [0, 0, 0, 1, i]);
    }
    // Nothing was lost while it paused.
    let mut reply = vec![0u8; frame.len()];
    for _ in 0..burst {
        paused.read_exact(&mut reply).unwrap();
        assert_eq!(reply, frame);
    }
    assert_eq!(pipeline.stats().dropped, 0);
    server.stop();
    assert_eq!(pipeline.shutdown(), 4);
}

#[test]
fn a_reply_that_cannot_be_framed_drops_only_its_connection() {
    // A line reply cannot hold a newline.
    let pipeline = Pipeline::start(config(1, 1), |_, p: Vec<u8>| {
        if p == b"split" {
            Reply::One(b"sp\nlit".to_vec())
        } else {
            Reply::One(p)
        }
    })
    .unwrap();
    victim_is_dropped_alone(pipeline, b"split\n");
}

#[test]
fn a_closed_connection_leaves_no_route_and_no_thread() {
    let pipeline = Pipeline::start(config(3, 1), echo).unwrap();
    let inlet = pipeline.inlet();
    let (stream, peer) = socket_pair();
    let feed = inlet.open(7, Arc::clone(&stream)).unwrap();
    for word in ["a", "b", "c"] {
        feed.submit(word.as_bytes().to_vec()).unwrap();
    }
    let mut got = [0u8; 6];
    (&peer).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"a\nb\nc\n");
    assert_eq!(pipeline.stats().routes, 1);
    // Dropping the feed waits for the sender to handle the close: the route is gone, and
    // nothing else holds the socket any more.
    drop(feed);
    assert_eq!(pipeline.stats().routes, 0);
    assert_eq!(Arc::strong_count(&stream), 1);
    drop(inlet);
    assert_eq!(pipeline.shutdown(), 4);
}

#[test]
fn replies_queued_before_the_close_are_still_written() {
    let pipeline = Pipeline::start(config(1, 1), echo).unwrap();
    let (stream, peer) = socket_pair();
    let feed = pipeline.inlet().open(1, stream).unwrap();
    for i in 0..100 {
        feed.submit(format!("{i}").into_bytes()).unwrap();
    }
    drop(feed);
    let mut all = String::new();
    (&peer).read_to_string(&mut all).unwrap();
    let expected: String = (0..100).map(|i| format!("{i}\n")).collect();
    assert_eq!(all, expected);
    assert_eq!(pipeline.shutdown(), 2);
}

#[test]
fn shutdown_does_not_wait_for_a_connection_still_feeding() {
    let pipeline = Pipeline::start(config(3, 2), echo).unwrap();
    let inlet = pipeline.inlet();
    // A connection whose thread outlives the server's shutdown deadline.
    let (stream, peer) = socket_pair();
    let feed = inlet.open(1, stream).unwrap();
    feed.submit(b"still here".to_vec()).unwrap();
    let mut got = [0u8; 11];
    (&peer).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here\n");
    // Every stage ends and is joined although the feed and an inlet are alive.
    assert_eq!(pipeline.shutdown(), 5);
    assert!(matches!(
        feed.submit(b"late".to_vec()),
        Err(PipelineError::Stopped)
    ));
    let (stream, _peer) = socket_pair();
    assert!(matches!(inlet.open(2, stream), Err(PipelineError::Stopped)));
    // And the abandoned connection can still end: dropping its feed returns.
    drop(feed);
}

#[test]
fn the_transform_sees_the_connection_and_answers_none_one_several_or_fail() {
    let pipeline = Pipeline::start(config(2, 2), |id, p: Vec<u8>| match &p[..] {
        b"who" => Reply::One(format!("conn {id}").into_bytes()),
        b"none" => Reply::Nothing,
        b"three" => Reply::Many(vec![p.clone(), p.clone(), p]),
        b"fail" => Reply::Fail("asked to fail".into()),
        _ => Reply::One(p),
    })
    .unwrap();
    let inlet = pipeline.inlet();
    let (stream, peer) = socket_pair();
    let feed = inlet.open(42, stream).unwrap();
    for word in ["none", "who", "three", "none", "fail", "after"] {
        feed.submit(word.as_bytes().to_vec()).unwrap();
    }
    // Replies before the failure arrive in order; then the connection is cut.
    let mut all = String::new();
    let ended = (&peer).read_to_string(&mut all);
    assert!(ended.is_ok() || ended.unwrap_err().kind() == io::ErrorKind::ConnectionReset);
    assert_eq!(all, "conn 42\nthree\nthree\nthree\n");
    drop(feed);
    assert_eq!(pipeline.stats().dropped, 1);
    drop(inlet);
    assert_eq!(pipeline.shutdown(), 4);
}

#[test]
fn a_panicking_transform_drops_only_its_connection() {
    let pipeline = Pipeline::start(config(1, 1), |_, p: Vec<u8>| {
        assert!(p != b"boom", "the transform refuses boom");
        Reply::One(p)
    })
    .unwrap();
    victim_is_dropped_alone(pipeline, b"boom\n");
}

/// Sends `trigger` on one connection and checks that only that connection is dropped:
/// it is closed with nothing written, and another client's round trip still works.
fn victim_is_dropped_alone(pipeline: Pipeline, trigger: &[u8]) {
    let server = serve(&pipeline);
    let mut victim = client(server.local_addr());
    let mut bystander = client(server.local_addr());
    victim.write_all(trigger).unwrap();
    let mut rest = Vec::new();
    let closed = victim.read_to_end(&mut rest);
    assert!(closed.is_ok() || closed.unwrap_err().kind() == io::ErrorKind::ConnectionReset);
    assert!(rest.is_empty());
    bystander.write_all(b"fine\n").unwrap();
    let mut got = [0u8; 5];
    bystander.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"fine\n");
    assert_eq!(pipeline.stats().dropped, 1);
    server.stop();
    assert_eq!(pipeline.shutdown(), 2);
}
