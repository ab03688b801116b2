//! The thread-per-connection server: concurrency, limits, failures and shutdown, over real
//! sockets on port 0.

mod common;

use common::{connect, echo, eventually, quiet_logs, start_echo, trickled_until_cut, LineClient};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use switchboard::framing::{encode_frame, FrameReader, FrameWriter, Framing, Limits};
use switchboard::server::{Connection, HandlerError, Server, ServerConfig};

#[test]
fn holds_a_thousand_connections_and_joins_every_thread_on_shutdown() {
    let server = start_echo(ServerConfig::named("thousand"));
    let addr = server.local_addr();
    let mut clients: Vec<LineClient> = (0..1000).map(|_| LineClient::connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("hello {i}\n")), format!("hello {i}"));
    }
    assert_eq!(server.handle().stats().live, 1000);

    let report = server.stop();
    assert_eq!(report.joined, 1000, "{report:?}");
    assert_eq!(report.abandoned, 0);
    assert_eq!(report.stats.live, 0);
    assert_eq!(report.stats.accepted, 1000);
    for c in &mut clients {
        c.expect_closed();
    }
    // The port is free again.
    TcpListener::bind(addr).expect("rebind the port after shutdown");
}

#[test]
fn connections_past_the_cap_get_one_error_line_and_are_counted() {
    let mut config = ServerConfig::named("capped");
    config.max_connections = 2;
    let server = start_echo(config);
    let addr = server.local_addr();
    let mut a = LineClient::connect(addr);
    let mut b = LineClient::connect(addr);
    assert_eq!(a.ask("a\n"), "a");
    assert_eq!(b.ask("b\n"), "b");

    let mut refused = LineClient::connect(addr);
    assert_eq!(refused.line().unwrap(), b"{error,too_many_connections}");
    refused.expect_closed();
    assert_eq!(server.handle().stats().refused, 1);

    // A slot freed is a slot reusable.
    drop(a);
    eventually("a slot to free up", || server.handle().stats().live == 1);
    let mut c = LineClient::connect(addr);
    assert_eq!(c.ask("c\n"), "c");
    assert_eq!(b.ask("still here\n"), "still here");
}

#[test]
fn an_idle_connection_is_closed_after_the_timeout() {
    let mut config = ServerConfig::named("idle");
    config.idle_timeout = Some(Duration::from_millis(200));
    let server = start_echo(config);
    let mut busy = LineClient::connect(server.local_addr());
    let mut idle = LineClient::connect(server.local_addr());
    let began = Instant::now();
    // Talking keeps a connection alive past the timeout.
    for _ in 0..6 {
        assert_eq!(busy.ask("ping\n"), "ping");
        std::thread::sleep(Duration::from_millis(80));
    }
    idle.expect_closed();
    assert!(began.elapsed() >= Duration::from_millis(200));
    assert_eq!(busy.ask("ping\n"), "ping");
}

#[test]
fn a_handler_reading_through_the_connection_sees_the_idle_timeout_as_a_clean_end() {
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_millis(100)),
        ..ServerConfig::default()
    };
    let server = Server::bind("127.0.0.1:0", config, move |conn| {
        let mut reader = conn.reader(Framing::Line, Limits::default());
        let mut lines = 0;
        let end = loop {
            match reader.read_frame() {
                Ok(Some(_)) => lines += 1,
                other => break other.map(|_| lines).map_err(|e| e.to_string()),
            }
        };
        seen_tx.send(end).unwrap();
        Ok(())
    })
    .unwrap()
    .spawn()
    .unwrap();
    let mut idle = LineClient::connect(server.local_addr());
    idle.send(b"one\ntwo\n");
    // Ok(None) after the two lines, not an EAGAIN error.
    let end = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(end, Ok(2));
    idle.expect_closed();
    server.stop();
}

#[test]
fn a_size_prefixed_server_refuses_in_its_own_framing_by_default() {
    let config = ServerConfig {
        framing: Framing::U32,
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = start_echo(config);
    let mut first = LineClient::connect(server.local_addr());
    assert_eq!(first.ask("held\n"), "held");
    let mut refused = connect(server.local_addr());
    let mut got = Vec::new();
    refused.read_to_end(&mut got).unwrap();
    let mut expected = Vec::new();
    encode_frame(Framing::U32, b"{error,too_many_connections}", &mut expected).unwrap();
    assert_eq!(got, expected);
    assert_eq!(server.stop().stats.refused, 1);
}

#[test]
fn a_failing_or_panicking_handler_ends_its_own_connection_only() {
    let server = start_echo(ServerConfig::named("faulty"));
    let addr = server.local_addr();
    let mut bystander = LineClient::connect(addr);
    assert_eq!(bystander.ask("before\n"), "before");

    let mut panicker = LineClient::connect(addr);
    panicker.send(b"panic\n");
    panicker.expect_closed();
    let mut failer = LineClient::connect(addr);
    failer.send(b"fail\n");
    failer.expect_closed();

    assert_eq!(bystander.ask("after\n"), "after");
    let mut newcomer = LineClient::connect(addr);
    assert_eq!(newcomer.ask("new\n"), "new");
    // Live: the bystander and the newcomer; the failed connections' bookkeeping is gone.
    eventually("the failed connections' bookkeeping to go", || {
        server.handle().stats().live == 2
    });
}

#[test]
fn shutdown_is_not_held_up_by_clients_that_never_read_or_stall_mid_frame() {
    let server = start_echo(ServerConfig::named("stuck"));
    let addr = server.local_addr();
    // One client floods without reading: its server thread ends up blocked in write.
    let mut flooder = connect(addr);
    let line = vec![b'x'; 64 << 10];
    let flood = std::thread::spawn(move || {
        flooder
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut req = line.clone();
        req.push(b'\n');
        while flooder.write_all(&req).is_ok() {}
    });
    // Another sends half a line and waits: its server thread is blocked in read.
    let mut half = connect(addr);
    half.write_all(b"no newline yet").unwrap();
    eventually("both connections to be live", || {
        server.handle().stats().live == 2
    });
    std::thread::sleep(Duration::from_millis(200));

    let began = Instant::now();
    let report = server.stop();
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!((report.joined, report.abandoned), (2, 0));
    flood.join().unwrap();
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
}

#[test]
fn shutdown_through_a_clone_of_the_handle_stops_run() {
    common::quiet_logs();
    let server = Server::bind("127.0.0.1:0", ServerConfig::named("handle"), echo).unwrap();
    let handle = server.handle();
    let addr = server.local_addr();
    let runner = std::thread::spawn(move || server.run());
    let mut c = LineClient::connect(addr);
    assert_eq!(c.ask("x\n"), "x");
    handle.shutdown();
    handle.shutdown();
    let report = runner.join().unwrap();
    assert_eq!(report.joined, 1);
    c.expect_closed();
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn a_read_timeout_the_handler_sets_itself_comes_back_as_its_error() {
    // No idle timeout: the handler bounds its own read, and must see it expire once,
    // not retried as if it were another thread's spurious EAGAIN.
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = Server::bind(
        "127.0.0.1:0",
        ServerConfig::named("own-timeout"),
        move |conn| {
            conn.stream
                .set_read_timeout(Some(Duration::from_millis(20)))?;
            let started = Instant::now();
            let result = (&conn).read(&mut [0u8; 16]).map_err(|e| e.kind());
            let _ = tx.lock().unwrap().send((result, started.elapsed()));
            Ok(())
        },
    )
    .unwrap()
    .spawn()
    .unwrap();
    let _client = connect(server.local_addr());
    let (result, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the read returned");
    assert_eq!(
        result,
        Err(std::io::ErrorKind::WouldBlock),
        "after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    server.stop();
}

/// Another thread making `conn`'s socket non-blocking over and over, as arrival order's
/// peeks do: each instant holds it `hold` (a peek, when zero), `gap` apart, until
/// [`Toggler::stop`], which says how many instants there were.
struct Toggler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Toggler {
    fn start(conn: &switchboard::server::Connection, hold: Duration, gap: Duration) -> Toggler {
        use std::sync::atomic::Ordering;
        let toggler = conn.nonblocking();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut instants = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                let _ = toggler.run(|s| {
                    std::thread::sleep(hold);
                    s.peek(&mut [0u8; 1])
                });
                instants += 1;
                std::thread::sleep(gap);
            }
            instants
        });
        Toggler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn reads_through_the_connection_ride_out_another_threads_nonblocking_instants() {
    // Another thread makes the socket non-blocking for an instant, over and over (as
    // arrival order's peeks do). A read through the connection that starts in such an
    // instant fails at once with EAGAIN; the connection retries it, so the handler sees
    // only bytes. The client sends one byte at a time, so that many reads start.
    use std::sync::{mpsc, Mutex};
    const BYTES: &[u8] = b"toggled";
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let server = Server::bind("127.0.0.1:0", ServerConfig::named("toggled"), move |conn| {
        let toggling = Toggler::start(&conn, Duration::ZERO, Duration::ZERO);
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        let result = loop {
            match (&conn).read(&mut byte) {
                Ok(0) => break Ok(()),
                Ok(_) => got.push(byte[0]),
                Err(e) => break Err(e.kind()),
            }
            if got.len() == BYTES.len() {
                break Ok(());
            }
        };
        let instants = toggling.stop();
        let _ = tx.lock().unwrap().send((result, got, instants));
        Ok(())
    })
    .unwrap()
    .spawn()
    .unwrap();
    let mut client = connect(server.local_addr());
    for &b in BYTES {
        std::thread::sleep(Duration::from_millis(10));
        client.write_all(&[b]).unwrap();
    }
    let (result, got, instants) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the handler finished");
    assert_eq!(result, Ok(()), "after {got:?}");
    assert_eq!(got, BYTES);
    assert!(instants > 0);
    server.stop();
}

#[test]
fn a_connection_thread_that_cannot_start_costs_that_connection_only() {
    // A stack no machine can map: every connection thread fails to start, as when the OS
    // is out of threads. The accept thread dropped the connection (its registration
    // included) under its group's lock and deadlocked there: nothing was accepted after
    // the first connection, and the stop waited forever.
    let mut config = ServerConfig::named("no-threads");
    config.stack_size = 1 << 46;
    let server = start_echo(config);
    let addr = server.local_addr();
    let (done, finished) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        for _ in 0..2 {
            LineClient::connect(addr).expect_closed();
        }
        let report = server.stop();
        done.send(report).unwrap();
    });
    let report = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the accept thread deadlocked");
    client.join().unwrap();
    assert_eq!(report.stats.refused, 2, "{report:?}");
    assert_eq!(report.stats.live, 0, "{report:?}");
}

#[test]
fn a_hello_trickled_a_byte_at_a_time_is_cut_at_the_opening_timeout() {
    quiet_logs();
    let config = ServerConfig {
        opening_timeout: Some(Duration::from_secs(1)),
        ..ServerConfig::named("opening")
    };
    // Each read of the hello waits at most a second: a byte every 50 ms never trips it.
    let server = Server::bind("127.0.0.1:0", config, |conn| {
        conn.stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut reader = FrameReader::new(&*conn.stream, Framing::Line);
        if reader.read_frame()? != Some(&b"hello"[..]) {
            return Ok(());
        }
        conn.opened();
        echo_the_rest(&conn, &mut reader, None)
    })
    .unwrap()
    .spawn()
    .unwrap();
    let addr = server.local_addr();
    let mut opened = LineClient::connect(addr);
    opened.send(b"hello\n");
    // The trickle would take 5 s; the server must cut it long before.
    let cut = trickled_until_cut(addr, b"", 100, Duration::from_millis(50));
    assert!(cut, "a hello trickled for 5 s was never cut");
    // The connection that opened in time outlives the deadline.
    assert_eq!(opened.ask("ping\n"), "ping");
    let report = server.stop();
    assert_eq!(report.abandoned, 0);
}

/// `reserved_connections`: past `max_connections`, connections go into the reserve; the
/// handler serves those it is for (here, a connection whose first line is `peer`) and
/// refuses the rest, the reserve is capped too, and one that does not open in time is
/// shut down: idle clients holding every ordinary slot cannot keep a peer out, nor can
/// anyone hold the reserve without proving themselves.
#[test]
fn the_reserve_takes_peers_past_the_cap_and_refuses_or_closes_everyone_else() {
    quiet_logs();
    let config = ServerConfig {
        max_connections: 2,
        reserved_connections: 2,
        ..ServerConfig::named("reserve")
    };
    let server = Server::bind("127.0.0.1:0", config, |conn| {
        let mut reader = FrameReader::new(&*conn.stream, Framing::Line);
        let Some(first) = reader.read_frame()?.map(<[u8]>::to_vec) else {
            return Ok(());
        };
        if conn.in_reserve() && first != b"peer" {
            conn.refuse();
            return Ok(());
        }
        conn.opened();
        let status: &[u8] = if conn.in_reserve() {
            b"reserve"
        } else {
            b"ordinary"
        };
        echo_the_rest(&conn, &mut reader, Some(status))
    })
    .unwrap()
    .spawn()
    .unwrap();
    let addr = server.local_addr();
    // Two clients hold every ordinary slot (a client's first line is anything).
    let mut a = LineClient::connect(addr);
    let mut b = LineClient::connect(addr);
    assert_eq!(a.ask("hi\n"), "ordinary");
    assert_eq!(b.ask("hi\n"), "ordinary");
    // A third client lands in the reserve, and is refused as at the cap.
    let mut c = LineClient::connect(addr);
    c.send(b"hi\n");
    assert_eq!(c.line().unwrap(), b"{error,too_many_connections}");
    c.expect_closed();
    eventually("the refused one to go", || {
        server.handle().stats().live == 2
    });
    // A peer is served in the reserve.
    let mut peer = LineClient::connect(addr);
    assert_eq!(peer.ask("peer\n"), "reserve");
    assert_eq!(peer.ask("ping\n"), "ping");
    // One that says nothing holds the last reserve slot for a while: past the cap and
    // the reserve, a newcomer is refused at once.
    let mut silent = LineClient::connect(addr);
    let silent_since = Instant::now();
    eventually("the silent one to be served", || {
        server.handle().stats().live == 4
    });
    let mut over = LineClient::connect(addr);
    assert_eq!(over.line().unwrap(), b"{error,too_many_connections}");
    over.expect_closed();
    // ... until the reserve's opening timeout shuts it down.
    silent.expect_closed();
    let held = silent_since.elapsed();
    let timeout = switchboard::server::RESERVE_OPENING_TIMEOUT;
    assert!(
        held >= timeout - Duration::from_millis(100) && held < timeout + Duration::from_secs(5),
        "the silent connection held the reserve for {held:?}"
    );
    // The peer, which opened, outlives the deadline; so do the clients.
    assert_eq!(peer.ask("still\n"), "still");
    assert_eq!(a.ask("x\n"), "x");
    let stats = server.handle().stats();
    // a, b, the peer and the silent one; the refused client is counted as refused only.
    assert_eq!((stats.accepted, stats.refused), (4, 2));
    let report = server.stop();
    assert_eq!(report.abandoned, 0);
}

/// The reserve's deadline is its own: with a longer opening timeout, a silent connection
/// in the reserve is shut down at [`RESERVE_OPENING_TIMEOUT`] while a silent ordinary one
/// stays; with a shorter one, the reserve's follows it.
#[test]
fn a_silent_connection_in_the_reserve_is_cut_at_the_shorter_of_the_two_deadlines() {
    use switchboard::server::RESERVE_OPENING_TIMEOUT;
    quiet_logs();
    for (opening, expected) in [
        (Duration::from_secs(30), RESERVE_OPENING_TIMEOUT),
        (Duration::from_secs(1), Duration::from_secs(1)),
    ] {
        let config = ServerConfig {
            max_connections: 1,
            reserved_connections: 1,
            opening_timeout: Some(opening),
            ..ServerConfig::named("reserve-deadline")
        };
        let server = start_echo(config);
        let addr = server.local_addr();
        let mut ordinary = LineClient::connect(addr);
        eventually("the ordinary one to be served", || {
            server.handle().stats().live == 1
        });
        let since = Instant::now();
        let mut reserve = LineClient::connect(addr);
        reserve.expect_closed();
        let held = since.elapsed();
        assert!(
            held >= expected - Duration::from_millis(100)
                && held < expected + Duration::from_secs(3),
            "opening timeout {opening:?}: the reserve's silent connection lasted {held:?}"
        );
        if opening > RESERVE_OPENING_TIMEOUT {
            // Still within its own, longer deadline.
            assert_eq!(ordinary.ask("late\n"), "late");
        }
        drop(ordinary);
    }
}

/// `reserve_from`: past `max_connections`, the reserve takes connections from those
/// addresses only; from anywhere else, a newcomer is refused at once, as at the limit.
#[test]
fn the_reserve_refuses_newcomers_from_other_addresses() {
    quiet_logs();
    let config = ServerConfig {
        max_connections: 1,
        reserved_connections: 2,
        reserve_from: vec!["127.0.0.2".parse().unwrap()],
        ..ServerConfig::named("reserve-from")
    };
    let server = start_echo(config);
    let addr = server.local_addr();
    let mut a = LineClient::connect(addr);
    assert_eq!(a.ask("a\n"), "a");
    // From 127.0.0.1, which the reserve does not take.
    let mut other = LineClient::connect(addr);
    assert_eq!(other.line().unwrap(), b"{error,too_many_connections}");
    other.expect_closed();
    assert_eq!(server.handle().stats().refused, 1);
    assert_eq!(a.ask("still\n"), "still");
}

#[test]
fn the_idle_timeout_ends_a_connection_whose_socket_another_thread_keeps_peeking_at() {
    // Newcomers peek at parked connections every few milliseconds (arrival order). Each
    // peek makes the socket non-blocking for an instant; a real timeout that followed one
    // used to be taken for a spurious EAGAIN and waited out again, for ever.
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::named("peeked")
    };
    let server = Server::bind("127.0.0.1:0", config, move |conn| {
        let toggling = Toggler::start(&conn, Duration::ZERO, Duration::from_millis(5));
        let read = (&conn).read(&mut [0u8; 1]);
        toggling.stop();
        assert_eq!(read.unwrap(), 0, "the idle timeout is a clean end");
        Ok(())
    })
    .unwrap()
    .spawn()
    .unwrap();
    let mut silent = LineClient::connect(server.local_addr());
    silent.expect_closed();
    server.stop();
}

#[test]
fn writes_through_the_connection_ride_out_another_threads_nonblocking_instants() {
    // Another thread keeps the socket non-blocking most of the time (long instants), while
    // the request loop writes 1 MiB replies to a client that reads slowly: writes start
    // with the send buffer full, in an instant, and fail at once with EAGAIN. The loop
    // retries them, so the client gets every byte.
    use switchboard::request::RequestLoop;
    const REPLY: usize = 1 << 20;
    const REQUESTS: usize = 24;
    let server = Server::bind("127.0.0.1:0", ServerConfig::named("toggled"), move |conn| {
        let toggling = Toggler::start(&conn, Duration::from_millis(2), Duration::ZERO);
        let served = RequestLoop::new(Framing::Line).serve(&conn, |_| Some(vec![b'x'; REPLY]));
        toggling.stop();
        served
    })
    .unwrap()
    .spawn()
    .unwrap();
    let mut client = connect(server.local_addr());
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..REQUESTS {
        client.write_all(b"a\n").unwrap();
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    loop {
        std::thread::sleep(Duration::from_micros(500));
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("after {got} bytes: {e}"),
        }
    }
    assert_eq!(got, REQUESTS * (REPLY + 1));
    server.stop();
}

/// Writes `first` (if any), then echoes every line `reader` reads on `conn` until it ends.
fn echo_the_rest(
    conn: &Connection,
    reader: &mut FrameReader<&std::net::TcpStream>,
    first: Option<&[u8]>,
) -> Result<(), HandlerError> {
    let mut writer = FrameWriter::new(&*conn.stream, Framing::Line);
    if let Some(first) = first {
        writer.write_frame(first)?;
    }
    while let Some(line) = reader.read_frame()? {
        writer.write_frame(line)?;
    }
    Ok(())
}
