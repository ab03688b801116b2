//! Remote channels end to end: local use without ports, channels that go out and come
//! home, channels inside messages, the listener's exact bytes, failures as values, the
//! registry through a real store server, and ping-pong between processes and languages.

mod common;

use common::{
    connect, eventually, run_checked, run_python, run_with_input, ChildServer, LineClient,
    IO_TIMEOUT,
};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::chan::{self, Chan, ChanError, Host, Node, NodeConfig, Value};
use switchboard::framing::Framing;
use switchboard::store::client::StoreClient;
use switchboard::term;

const STORE: &str = env!("CARGO_BIN_EXE_store-server");
const PINGPONG: &str = env!("CARGO_BIN_EXE_chan-pingpong");

fn node() -> Arc<Node> {
    common::quiet_logs();
    Node::new(NodeConfig::default())
}

fn atom(name: &str) -> Value {
    Value::atom(name)
}

fn int(n: i64) -> Value {
    Value::int(n)
}

fn localhost() -> Host {
    Host::Ip(Ipv4Addr::LOCALHOST.into())
}

fn recv(chan: &Chan) -> Value {
    chan.recv_timeout(IO_TIMEOUT).expect("a message")
}

/// `{remote_chan,{127,0,0,1},PORT}`
fn remote_chan_text(port: u16) -> String {
    format!("{{remote_chan,{{127,0,0,1}},{port}}}")
}

fn start_store() -> ChildServer {
    ChildServer::start(STORE, &["--listen", "127.0.0.1:0"])
}

/// Waits until `name` is registered: a process may log its port before its entry lands.
/// A store as the registry, and a `chan-pingpong pong NAME` registered in it.
fn registered_pong(name: &str) -> (ChildServer, ChildServer) {
    let store = start_store();
    let registry = store.addr.to_string();
    let pong = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", name]);
    wait_registered(store.addr, name);
    (store, pong)
}

fn wait_registered(store: SocketAddr, name: &str) {
    eventually(&format!("{name} registered"), || {
        StoreClient::connect(store, Framing::Line)
            .map(|mut c| c.lookup(name.as_bytes()).ok().flatten().is_some())
            .unwrap_or(false)
    });
}

#[test]
fn local_use_opens_no_port() {
    let node = node();
    let requests = node.chan();
    let reply = node.chan();
    let msg = Value::tuple(vec![atom("req"), int(1), Value::from(&reply)]);
    requests.send(msg.clone()).unwrap();
    let got = recv(&requests);
    assert_eq!(got, msg);
    let Some(("req", [_, Value::Chan(back)])) = got.tagged() else {
        panic!("{got:?}");
    };
    assert!(back.is_local());
    back.send(Value::list(vec![Value::from(&requests)]))
        .unwrap();
    assert_eq!(recv(&reply), Value::list(vec![Value::from(&requests)]));
    assert!(matches!(
        reply.recv_timeout(Duration::from_millis(1)),
        Err(ChanError::Timeout)
    ));
    assert_eq!(node.exported(), 0);
    assert_eq!(node.port_of(&requests), None);
    assert_eq!(node.port_of(&reply), None);
}

#[test]
fn a_channel_goes_out_and_comes_home() {
    let home = node();
    let chan = home.chan();
    let term = home.export(&Value::from(&chan)).unwrap();
    let port = home.port_of(&chan).expect("exported once it left");
    assert_eq!(term.to_string(), remote_chan_text(port));
    assert_eq!(home.exported(), 1);
    assert_eq!(
        home.export(&Value::from(&chan)).unwrap(),
        term,
        "one port per channel"
    );

    for spelling in [
        remote_chan_text(port),
        format!("{{remote_chan,localhost,{port}}}"),
    ] {
        let back = home.import(term::parse(&spelling).unwrap());
        let back = back.as_chan().expect("a channel");
        assert!(back.is_local(), "{spelling}");
        assert_eq!(back, &chan);
        back.send(atom("through_memory")).unwrap();
        assert_eq!(recv(&chan), atom("through_memory"));
    }
    assert_eq!(home.exported(), 1);

    let away = node();
    let there = away.import(term.clone());
    let there = there.as_chan().unwrap();
    assert!(!there.is_local());
    assert_eq!(there.remote_addr(), Some((&localhost(), port)));
    there.send(atom("over_the_wire")).unwrap();
    assert_eq!(recv(&chan), atom("over_the_wire"));
    assert_eq!(away.exported(), 0);

    // Another address, or a port that is not ours, stays remote.
    for other in [
        format!("{{remote_chan,{{127,0,0,2}},{port}}}"),
        format!("{{remote_chan,'example.org',{port}}}"),
        remote_chan_text(if port == 1 { 2 } else { port - 1 }),
    ] {
        let value = home.import(term::parse(&other).unwrap());
        assert!(!value.as_chan().unwrap().is_local(), "{other}");
    }
}

#[test]
fn channels_inside_a_tuple_inside_a_list_travel_and_come_home() {
    let a = node();
    let b = node();
    let x = a.chan();
    let y = a.chan();
    let inbox = b.chan();
    let inbox_at_a = a.import(b.export(&Value::from(&inbox)).unwrap());
    let inbox_at_a = inbox_at_a.as_chan().unwrap();

    let msg = Value::list(vec![
        Value::tuple(vec![atom("reply"), Value::from(&x)]),
        int(7),
        Value::tuple(vec![Value::from(&y), Value::list(vec![Value::from(&x)])]),
    ]);
    let (px, py) = {
        let text = a.export(&msg).unwrap().to_string();
        let (px, py) = (a.port_of(&x).unwrap(), a.port_of(&y).unwrap());
        let (rx, ry) = (remote_chan_text(px), remote_chan_text(py));
        assert_eq!(text, format!("[{{reply,{rx}}},7,{{{ry},[{rx}]}}]"));
        (px, py)
    };
    inbox_at_a.send(msg.clone()).unwrap();

    let arrived = recv(&inbox);
    let items = arrived.as_list().unwrap();
    let x_at_b = items[0].as_tuple().unwrap()[1].as_chan().unwrap();
    let y_at_b = items[2].as_tuple().unwrap()[0].as_chan().unwrap();
    assert_eq!(x_at_b.remote_addr(), Some((&localhost(), px)));
    assert_eq!(y_at_b.remote_addr(), Some((&localhost(), py)));
    assert_eq!(
        items[2].as_tuple().unwrap()[1].as_list().unwrap()[0].as_chan(),
        Some(x_at_b)
    );

    // Sent back to a, every channel in it is a's own again.
    x_at_b.send(arrived.clone()).unwrap();
    let home = recv(&x);
    assert_eq!(home, msg);
    let x_home = home.as_list().unwrap()[0].as_tuple().unwrap()[1]
        .as_chan()
        .unwrap();
    assert!(x_home.is_local());
    assert_eq!(a.exported(), 2);
    assert_eq!(b.exported(), 1);
}

#[test]
fn request_and_reply_with_a_reply_channel() {
    let server = node();
    let client = node();
    let service = server.chan();
    let service_at_client = client.import(server.export(&Value::from(&service)).unwrap());
    let service_at_client = service_at_client.as_chan().unwrap().clone();
    let worker = std::thread::spawn(move || {
        for _ in 0..3 {
            let req = recv(&service);
            let Some(("double", [Value::Int(n), Value::Chan(reply)])) = req.tagged() else {
                panic!("{req:?}");
            };
            assert!(!reply.is_local());
            reply
                .send(Value::tuple(vec![atom("result"), int(n * 2)]))
                .unwrap();
        }
    });
    for n in [1, 21, -4] {
        let reply = client.chan();
        let req = Value::tuple(vec![atom("double"), int(n), Value::from(&reply)]);
        service_at_client.send(req).unwrap();
        assert_eq!(recv(&reply), Value::tuple(vec![atom("result"), int(n * 2)]));
    }
    worker.join().unwrap();
}

#[test]
fn a_remote_write_is_one_course_line_then_close() {
    let node = node();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = node.remote(localhost(), port);
    let reply = node.chan();
    let msg = Value::tuple(vec![
        atom("hello"),
        Value::list(vec![int(1), int(-2)]),
        Value::str("x y"),
        Value::from(&reply),
    ]);
    let writer = std::thread::spawn(move || target.send(msg));
    // Polled, so a writer that fails before it connects fails the test instead of leaving
    // it blocked in accept.
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    eventually("the writer to connect", || {
        // Checked in this order: once connected, the writer waits for our close.
        accepted = listener.accept().ok();
        assert!(
            accepted.is_some() || !writer.is_finished(),
            "the write ended without connecting"
        );
        accepted.is_some()
    });
    let (mut stream, _) = accepted.unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).unwrap();
    drop(stream); // a course listener closes once the writer has
    writer.join().unwrap().unwrap();
    let rport = node.port_of(&reply).unwrap();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        format!(
            "{{remote_msg,{{hello,[1,-2],\"x y\",{}}}}}\n",
            remote_chan_text(rport)
        )
    );
}

#[test]
fn the_listener_speaks_exact_bytes_and_survives_bad_lines() {
    let node = node();
    let chan = node.chan();
    chan.to_term().unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&chan).unwrap()));
    let mut c = LineClient::connect(addr);
    assert_eq!(c.ask("{remote_msg,\n"), "{error,bad_term}");
    assert_eq!(c.ask("hello\n"), "{error,unknown_request}");
    assert_eq!(c.ask("{remote_msg,a,b}\n"), "{error,unknown_request}");
    assert_eq!(c.ask("{remote_msg,<0.42.0>}\n"), "{error,unsupported}");
    let deep = format!("{{remote_msg,{}{}}}\n", "[".repeat(80), "]".repeat(80));
    assert_eq!(c.ask(&deep), "{error,too_deep}");
    let long = format!("{{remote_msg,\"{}\"}}\n", "x".repeat(1 << 20));
    assert_eq!(c.ask(&long), "{error,too_long}");
    // A 0.92 MiB list of integers is within the line limit but would parse to 16 times
    // that: refused by its count of terms before it is built.
    let zeros = format!("{{remote_msg,[{}0]}}\n", "0,".repeat(480_000));
    assert_eq!(c.ask(&zeros), "{error,too_big}");
    c.send(b"{remote_msg,{ok,\"still serving\"}}\r\n");
    assert_eq!(
        c.ask("remote_read\n"),
        "{remote_msg,{ok,\"still serving\"}}"
    );
    assert_eq!(c.ask("{remote_read,0}\n"), "timeout");
    c.send(b"{remote_msg,1}\n{remote_msg,2}\n{remote_read,5000}\n");
    assert_eq!(c.line().unwrap(), b"{remote_msg,1}");
    assert_eq!(recv(&chan), int(2));
    // The longest wait the protocol can say is no deadline, not a panic.
    c.send(format!("{{remote_read,{}}}\n", i64::MAX).as_bytes());
    chan.send(atom("eventually")).unwrap();
    assert_eq!(c.line().unwrap(), b"{remote_msg,eventually}");

    // A one-shot writer, as the course's: connect, send, close.
    let mut w = connect(addr);
    std::io::Write::write_all(&mut w, b"{remote_msg,[104,105]}\n").unwrap();
    drop(w);
    assert_eq!(recv(&chan), Value::list(vec![int(104), int(105)]));
    // A line cut off by a close is not applied.
    let mut w = connect(addr);
    std::io::Write::write_all(&mut w, b"{remote_msg,cut").unwrap();
    drop(w);
    c.send(b"{remote_msg,after}\n");
    assert_eq!(recv(&chan), atom("after"));
}

#[test]
fn a_channel_holds_at_most_its_byte_budget_of_parsed_messages() {
    const BUDGET: usize = 256 << 10;
    const SENT: usize = 40;
    let node = Node::new(NodeConfig {
        capacity_bytes: BUDGET,
        ..NodeConfig::default()
    });
    let chan = node.chan();
    chan.to_term().unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&chan).unwrap()));
    // Each line is 4 KB of text and about 64 KB parsed: 40 of them would hold 2.5 MiB.
    let line = |i: usize| format!("{{remote_msg,{{{i},[{}0]}}}}\n", "0,".repeat(2_000));
    let mut w = connect(addr);
    let writer = std::thread::spawn(move || {
        for i in 0..SENT {
            std::io::Write::write_all(&mut w, line(i).as_bytes()).unwrap();
        }
        w
    });
    // Wait until the listener stops taking messages in: the budget is full.
    let rx = chan.receiver().unwrap();
    let (mut last, mut since) = (usize::MAX, Instant::now());
    let deadline = Instant::now() + IO_TIMEOUT;
    while since.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "the queue never settled");
        let queued = rx.len();
        assert!(queued < SENT, "all {SENT} messages queued: no byte budget");
        if queued != last {
            (last, since) = (queued, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(last > 0);
    let held = chan.queued_bytes();
    assert!(held <= BUDGET, "{held} bytes held, budget {BUDGET}");
    // Reading makes room; every message arrives, in order, and the budget empties.
    for i in 0..SENT {
        let msg = recv(&chan);
        assert_eq!(msg.tagged().map(|(_, _)| ()), None);
        let first = match &msg {
            Value::Tuple(items) => items[0].clone(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(first, int(i as i64));
    }
    drop(writer.join().unwrap());
    assert_eq!(chan.queued_bytes(), 0);
}

/// Writers to a full channel wait, each holding a connection; at most all but a sixteenth
/// of the listener's connections may, so a remote reader can always come and make room.
#[test]
fn writers_waiting_on_a_full_channel_leave_room_for_a_reader() {
    common::quiet_logs();
    let node = Node::new(NodeConfig {
        capacity: 1,
        max_connections: 16,
        ..NodeConfig::default()
    });
    let chan = node.chan();
    chan.to_term().unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&chan).unwrap()));
    // A one-shot writer fills the queue.
    let mut first = connect(addr);
    std::io::Write::write_all(&mut first, b"{remote_msg,0}\n").unwrap();
    drop(first);
    eventually("the first message queued", || {
        chan.receiver().is_some_and(|rx| rx.len() == 1)
    });
    // Whether a writer got an answer within a moment: it waits when it got none.
    let answer = |w: &mut TcpStream| {
        w.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        match w.read(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    };
    // 16 connections, one of them kept for readers: 15 writers may wait.
    let mut waiting = Vec::new();
    for i in 1..=15 {
        let mut w = connect(addr);
        std::io::Write::write_all(&mut w, format!("{{remote_msg,{i}}}\n").as_bytes()).unwrap();
        assert_eq!(answer(&mut w), None, "writer {i} was not left waiting");
        waiting.push(w);
    }
    let mut crowded = connect(addr);
    std::io::Write::write_all(&mut crowded, b"{remote_msg,refused}\n").unwrap();
    assert_eq!(
        answer(&mut crowded).as_deref(),
        Some("{error,too_many_writers}\n")
    );
    drop(crowded);
    // The reserved connection (once the server has seen the refused writer's close): a
    // reader, who drains the channel in the writers' order.
    let mut reader = None;
    eventually("a reader let in", || {
        let mut c = LineClient::connect(addr);
        match c.ask("{remote_read,5000}\n").as_str() {
            "{error,too_many_connections}" => false,
            first => {
                assert_eq!(first, "{remote_msg,0}");
                reader = Some(c);
                true
            }
        }
    });
    let mut reader = reader.unwrap();
    for i in 1..=15 {
        assert_eq!(
            reader.ask("{remote_read,5000}\n"),
            format!("{{remote_msg,{i}}}")
        );
    }
    drop(waiting);
}

#[test]
fn readers_waiting_on_an_empty_channel_leave_room_for_a_writer() {
    common::quiet_logs();
    let node = Node::new(NodeConfig {
        max_connections: 16,
        ..NodeConfig::default()
    });
    let chan = node.chan();
    chan.to_term().unwrap();
    let port = node.port_of(&chan).unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // As many readers as there are connections, each waiting for a message that never
    // comes: they read nothing from their sockets, so no idle timeout ends them.
    let mut readers: Vec<(TcpStream, Vec<u8>)> = (0..16)
        .map(|_| {
            let mut r = connect(addr);
            std::io::Write::write_all(&mut r, b"remote_read\n").unwrap();
            r.set_nonblocking(true).unwrap();
            (r, Vec::new())
        })
        .collect();
    // What each reader has been answered so far, without waiting.
    let poll = |readers: &mut Vec<(TcpStream, Vec<u8>)>| {
        for (r, got) in readers.iter_mut() {
            let mut buf = [0u8; 256];
            if let Ok(n) = r.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
    };
    // One connection is kept for writers: 15 readers wait, the 16th is refused.
    eventually("a reader refused", || {
        poll(&mut readers);
        readers.iter().any(|(_, got)| !got.is_empty())
    });
    let (refused, waiting): (Vec<_>, Vec<_>) =
        readers.into_iter().partition(|(_, got)| !got.is_empty());
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].1, b"{error,too_many_readers}\n");
    drop(refused);
    // A writer gets in once the refused reader's close is seen, and its message goes to
    // one of the waiting readers.
    let peer = Node::new(NodeConfig::default());
    let remote = peer.remote(localhost(), port);
    eventually("a writer let in", || match remote.send(atom("through")) {
        Ok(()) => true,
        Err(ChanError::BadReply { reply, .. }) if reply == "{error,too_many_connections}" => false,
        Err(e) => panic!("{e}"),
    });
    let mut waiting = waiting;
    eventually("a reader answered", || {
        poll(&mut waiting);
        waiting.iter().any(|(_, got)| !got.is_empty())
    });
    let answered: Vec<&[u8]> = waiting
        .iter()
        .map(|(_, got)| got.as_slice())
        .filter(|got| !got.is_empty())
        .collect();
    assert_eq!(answered, [b"{remote_msg,through}\n".as_slice()]);
}

#[test]
fn a_read_of_many_refused_lines_is_answered_as_it_goes_not_held_whole() {
    common::quiet_logs();
    let budget = switchboard::budget::Budget::new("chan-test", 1 << 30);
    let node = Node::new(NodeConfig {
        capacity: 1,
        client_memory: Some(budget.clone()),
        ..NodeConfig::default()
    });
    let chan = node.chan();
    chan.send(atom("fills the queue")).unwrap();
    chan.to_term().unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&chan).unwrap()));
    let client = connect(addr);
    // The replies are read as they come, to the end.
    let mut replies = client.try_clone().unwrap();
    let reading = std::thread::spawn(move || {
        let mut all = Vec::new();
        replies.read_to_end(&mut all).map(|_| all)
    });
    let mut w = client.try_clone().unwrap();
    // A long partial line makes the listener's read buffer a megabyte...
    std::io::Write::write_all(&mut w, &[b'z'; 600_000]).unwrap();
    eventually("the read buffer grown", || budget.held() >= 1 << 20);
    let buffer = budget.held();
    // ...then a message that waits for the full queue, a partial line that keeps the
    // buffer, and while the listener waits, hundreds of kilobytes of empty lines: its
    // next read takes as many of them as its buffer holds, and each draws
    // `{error,bad_term}\n`.
    std::io::Write::write_all(&mut w, b"\n{remote_msg,queued}\nw").unwrap();
    let flood = std::thread::spawn(move || {
        let mut lines = vec![b'\n'; 300_000];
        lines.push(b'w');
        std::io::Write::write_all(&mut w, &lines).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // The kernel queues what the listener does not read yet (no timing is asserted: a
    // smaller first read only makes the test weaker).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(recv(&chan), atom("fills the queue"));
    assert_eq!(recv(&chan), atom("queued"));
    flood.join().unwrap();
    let all = reading
        .join()
        .unwrap()
        .expect("every reply, then the close");
    let bad_terms = all
        .split(|&b| b == b'\n')
        .filter(|line| *line == b"{error,bad_term}")
        .count();
    // The long line (its atom too long) and each of the 299,999 empty lines.
    assert_eq!(bad_terms, 300_000, "{} bytes of replies", all.len());
    // What the connection held at most: its read buffer, and replies of at most 64 KiB
    // before they were written (their buffer grows to twice that), not a read's worth of
    // them (over 1 MiB).
    let replies_held = budget.peak() - buffer;
    assert!(
        replies_held <= 192 << 10,
        "{replies_held} bytes held beyond the read buffer"
    );
}

#[test]
fn a_reply_channel_that_never_reads_stalls_no_other_pinger() {
    let node = node();
    let chan = node.chan();
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    let served = chan.clone();
    let ponger = std::thread::spawn(move || chan::pingpong::pong(&served, &stop));
    // A black hole: connections complete in the kernel, nothing is ever read or closed,
    // so each pong to it waits for the node's 10 s I/O timeout.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_chan = node.remote(localhost(), hole.local_addr().unwrap().port());
    for n in 0..3 {
        let ping = Value::tuple(vec![atom("ping"), int(n), Value::from(&hole_chan)]);
        chan.send(ping).unwrap();
    }
    // An honest ping behind them is answered long before any of their timeouts.
    let reply = node.chan();
    let ping = Value::tuple(vec![atom("ping"), int(7), Value::from(&reply)]);
    chan.send(ping).unwrap();
    let pong = reply
        .recv_timeout(Duration::from_secs(5))
        .expect("answered at once");
    assert_eq!(pong, Value::tuple(vec![atom("pong"), int(7)]));
    stop_tx.send(()).unwrap();
    let report = ponger.join().unwrap();
    assert_eq!((report.answered, report.failed), (1, 3), "{report}");
    drop(hole);
}

#[test]
fn idle_connections_to_a_listener_are_closed_and_free_its_slots() {
    let node = Node::new(NodeConfig {
        max_connections: 4,
        idle_timeout: Some(Duration::from_millis(300)),
        ..NodeConfig::default()
    });
    let chan = node.chan();
    chan.to_term().unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&chan).unwrap()));
    let idle: Vec<TcpStream> = (0..4).map(|_| connect(addr)).collect();
    // Each idle connection is closed by the listener: it reads the end of the stream.
    for mut c in idle {
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).expect("closed, not timed out on our side");
        assert_eq!(n, 0, "an idle connection is closed without a word");
    }
    // The slots are free again: a writer gets through.
    let mut w = connect(addr);
    std::io::Write::write_all(&mut w, b"{remote_msg,through}\n").unwrap();
    drop(w);
    assert_eq!(recv(&chan), atom("through"));
}

#[test]
fn remote_reads_bring_messages_and_channels_home() {
    let a = node();
    let b = node();
    let queue = a.chan();
    let at_b = b.import(queue.to_term().unwrap());
    let at_b = at_b.as_chan().unwrap();
    assert!(matches!(
        at_b.recv_timeout(Duration::from_millis(30)),
        Err(ChanError::Timeout)
    ));
    let mine = b.chan();
    let theirs = a.chan();
    at_b.send(Value::tuple(vec![Value::from(&mine), Value::from(&theirs)]))
        .unwrap();
    let read = at_b.recv_timeout(IO_TIMEOUT).unwrap();
    let [m, t] = read.as_tuple().unwrap() else {
        panic!("{read:?}");
    };
    assert!(m.as_chan().unwrap().is_local(), "b's own channel came home");
    assert_eq!(m.as_chan(), Some(&mine));
    assert_eq!(
        t.as_chan().unwrap().remote_addr().unwrap().1,
        a.port_of(&theirs).unwrap()
    );

    // A read that waits for its message.
    let reader = {
        let at_b = at_b.clone();
        std::thread::spawn(move || at_b.recv())
    };
    queue.send(atom("later")).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), atom("later"));
}

#[test]
fn failures_are_values() {
    let node = node();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let chan = node.remote(localhost(), dead);
    let err = chan.send(atom("anyone")).unwrap_err();
    assert!(matches!(err, ChanError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{dead}")),
        "{err}"
    );
    assert!(std::error::Error::source(&err).is_some());
    assert!(matches!(
        chan.recv_timeout(Duration::from_millis(10)),
        Err(ChanError::Unreachable { .. })
    ));
    let named = node.remote(Host::Name("no-such-host.invalid".into()), 4000);
    assert!(matches!(
        named.send(int(1)),
        Err(ChanError::Unreachable { .. })
    ));

    // Not a channel listener: the answer to a read is reported as it came.
    let store = start_store();
    let not_chan = node.remote(localhost(), store.addr.port());
    match not_chan.recv_timeout(Duration::from_millis(10)) {
        Err(ChanError::BadReply { reply, .. }) => assert_eq!(reply, "{error,unknown_verb}"),
        other => panic!("{other:?}"),
    }

    // A shut-down node's ports are closed, and it exports nothing more.
    let local = node.chan();
    local.to_term().unwrap();
    let other = self::node();
    let at_other = other.remote(localhost(), node.port_of(&local).unwrap());
    at_other.send(int(1)).unwrap();
    node.shutdown();
    // Refused, as a rule; but other tests open and close listeners by the hundred, and
    // one of them may have been given the freed port and reset this connection.
    let after = at_other.send(int(2));
    assert!(
        matches!(
            after,
            Err(ChanError::Unreachable { .. } | ChanError::Io { .. })
        ),
        "{after:?}"
    );
    assert_eq!(node.port_of(&local), None);
    assert!(matches!(node.chan().to_term(), Err(ChanError::NodeDown)));
    assert_eq!(node.exported(), 0);
}

#[test]
fn a_channel_whose_queue_holds_its_own_name_still_closes_its_port() {
    let node = node();
    let chan = node.chan();
    let other = node.chan();
    chan.to_term().unwrap();
    let port = node.port_of(&chan).unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let other_addr = {
        other.to_term().unwrap();
        SocketAddr::from((Ipv4Addr::LOCALHOST, node.port_of(&other).unwrap()))
    };
    // Anyone may write a channel's own name into it, and its name into another channel.
    let name = format!("{{remote_msg,{}}}\n", remote_chan_text(port));
    for to in [addr, other_addr] {
        let mut w = connect(to);
        std::io::Write::write_all(&mut w, name.as_bytes()).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        w.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"", "queued");
    }
    assert_eq!(chan.receiver().unwrap().len(), 1);
    // Taken out while the channel lives, the name is the channel itself.
    let named = recv(&other);
    assert!(named.as_chan().unwrap().same_queue(&chan), "{named:?}");
    drop(named);
    // Its own queue's copy of its name does not keep it alive.
    drop(chan);
    assert_eq!(node.port_of(&other).map(|_| node.exported()), Some(1));
    eventually("the port to close", || {
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_err()
    });
}

#[test]
fn dropping_the_last_handle_closes_the_port() {
    let node = node();
    let chan = node.chan();
    let copy = chan.clone();
    chan.to_term().unwrap();
    let port = node.port_of(&chan).unwrap();
    drop(chan);
    assert_eq!(node.port_of(&copy), Some(port), "a handle is left");
    drop(copy);
    assert_eq!(node.exported(), 0);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    eventually("the port to close", || {
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_err()
    });
}

#[test]
fn ten_thousand_messages_in_order_over_one_remote_channel() {
    const N: i64 = 10_000;
    let home = node();
    let away = node();
    let chan = home.chan();
    let remote = away.import(chan.to_term().unwrap());
    let remote = remote.as_chan().unwrap().clone();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            remote.send(int(i))?;
        }
        Ok::<(), ChanError>(())
    });
    for i in 0..N {
        assert_eq!(recv(&chan), int(i));
    }
    writer.join().unwrap().unwrap();
    eprintln!("{N} remote writes in order in {:?}", started.elapsed());
}

#[test]
fn registry_round_trip_through_a_real_store_server() {
    let store = start_store();
    let a = node();
    let b = node();
    let chan = a.chan();
    chan::register(store.addr, "echo", &chan).unwrap();
    let port = a.port_of(&chan).expect("registered, so exported");
    let mut raw = LineClient::connect(store.addr);
    assert_eq!(
        raw.ask("lookup,echo\n"),
        format!("{{just,{}}}", remote_chan_text(port))
    );

    let found = chan::lookup(&b, store.addr, "echo").unwrap();
    assert_eq!(found.remote_addr(), Some((&localhost(), port)));
    found.send(atom("via_registry")).unwrap();
    assert_eq!(recv(&chan), atom("via_registry"));
    let at_home = chan::lookup(&a, store.addr, "echo").unwrap();
    assert!(at_home.is_local());
    assert_eq!(at_home, chan);

    // A remote channel registers as it is; a course client's entry is understood.
    chan::register(store.addr, "again", &found).unwrap();
    assert_eq!(raw.ask("lookup,again\n"), raw.ask("lookup,echo\n"));
    raw.send(format!("store,course,{{remote_chan,localhost,{port}}}\n").as_bytes());
    raw.ask("lookup,course\n"); // applied before another connection asks
    assert_eq!(chan::lookup(&a, store.addr, "course").unwrap(), chan);

    assert_eq!(
        raw.ask("store,plain,{just,data}\nlookup,plain\n"),
        "{just,{just,data}}"
    );
    assert!(matches!(
        chan::lookup(&b, store.addr, "plain"),
        Err(ChanError::NotAChan { value, .. }) if value == "{just,data}"
    ));
    assert!(matches!(
        chan::lookup(&b, store.addr, "missing"),
        Err(ChanError::NotRegistered(name)) if name == "missing"
    ));
    for bad in ["", "a,b", "a\nb"] {
        assert!(matches!(
            chan::register(store.addr, bad, &chan),
            Err(ChanError::BadName(_))
        ));
    }
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(matches!(
        chan::lookup(&b, dead, "echo"),
        Err(ChanError::Registry(_))
    ));
    assert!(matches!(
        chan::register(dead, "x", &chan),
        Err(ChanError::Registry(_))
    ));
}

#[test]
fn two_pingpong_processes_through_the_registry() {
    let store = start_store();
    let registry = store.addr.to_string();
    let help = run_checked({
        let mut cmd = std::process::Command::new(PINGPONG);
        cmd.arg("--help");
        cmd
    });
    assert!(
        help.contains("pong") && help.contains("--registry"),
        "{help}"
    );

    let mut pong = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "rusty"]);
    wait_registered(store.addr, "rusty");
    let out = run_checked({
        let mut cmd = std::process::Command::new(PINGPONG);
        cmd.args(["--registry", &registry, "ping", "rusty", "200"]);
        cmd
    });
    assert!(
        out.contains("200 passed, 0 failed; round trip p50 "),
        "{out}"
    );
    assert!(pong.terminate(), "pong exits cleanly on SIGTERM");
    // The report is pong's last stderr line: the thread that drains the pipe may still be
    // reading it when the exit status is already in.
    // (Its stderr is echoed as `[child] ...` in the test output.)
    eventually("pong's report of 200 answers", || {
        pong.log_text().contains(
            "chan-pingpong: pong rusty stopped; answered 200 ping(s); ignored 0 other \
             message(s); 0 pong(s) could not be delivered",
        )
    });
    // It took its name with it.
    let mut registry_client = StoreClient::connect(store.addr, Framing::Line).unwrap();
    assert_eq!(registry_client.lookup(b"rusty").unwrap(), None);

    let mut miss = std::process::Command::new(PINGPONG);
    miss.args([
        "--registry",
        &registry,
        "ping",
        "nobody",
        "1",
        "--wait",
        "0.3",
    ]);
    let miss = run_with_input(miss, b"");
    assert!(!miss.status.success());
    assert!(miss
        .stderr
        .contains("nobody is not registered yet; waiting up to 0.3 s"));
    assert!(miss.stderr.contains("no channel registered"));
}

/// A message that is no ping is logged by `pong` as a short preview: a term of a
/// megabyte whose `Debug` form runs to several (20,000 `{x,N}` tuples: about 600 KB of
/// log) costs the log a line of a few hundred bytes, and the pong neither the memory nor
/// the time to format the rest.
#[test]
fn pong_logs_a_large_stray_message_as_a_short_preview() {
    let (store, mut pong) = registered_pong("stray");
    let node = node();
    let target = chan::lookup(&node, store.addr, "stray").unwrap();
    let stray = Value::list(
        (0..20_000)
            .map(|i| Value::tuple(vec![Value::atom("x"), Value::int(i)]))
            .collect(),
    );
    target.send(stray).unwrap();
    eventually("pong to log the stray message", || {
        pong.log_text().contains("pong: ignoring")
    });
    let log = pong.log_text();
    let line = log.lines().find(|l| l.contains("pong: ignoring")).unwrap();
    assert!(
        line.len() < 400 && line.ends_with("… (cut)"),
        "a line of {} bytes: {}…",
        line.len(),
        line.chars().take(300).collect::<String>()
    );
    assert!(pong.terminate(), "pong exits cleanly on SIGTERM");
    eventually("pong's report", || {
        pong.log_text()
            .contains("answered 0 ping(s); ignored 1 other message(s)")
    });
}

/// A connection that sends a thousand bad lines costs pong's log its first three and one
/// line of count when it ends, not a thousand (each about 60 times the bytes of a bad
/// line of two); each bad line is still answered.
#[test]
fn a_flood_of_bad_lines_costs_the_log_a_few_lines() {
    let (store, pong) = registered_pong("flooded");
    let target = chan::lookup(&node(), store.addr, "flooded").unwrap();
    let (_, port) = target.remote_addr().unwrap();
    let mut c = LineClient::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    c.send(&b"x\n".repeat(1000));
    for _ in 0..1000 {
        let answer = c.line().expect("an answer to each bad line");
        assert!(
            answer.starts_with(b"{error,"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    drop(c);
    eventually("the count of the lines not logged", || {
        pong.log_text()
            .contains("997 more bad or refused request(s), not logged")
    });
    let bad_lines = pong.log_text().matches("not a request").count();
    assert_eq!(bad_lines, 3, "{}", pong.log_text());
}

#[test]
fn a_second_pong_refuses_a_name_that_answers_and_takes_one_that_does_not() {
    let store = start_store();
    let registry = store.addr.to_string();
    let first = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "pp"]);
    wait_registered(store.addr, "pp");
    let mut second = std::process::Command::new(PINGPONG);
    second.args(["--registry", &registry, "pong", "pp"]);
    let second = run_with_input(second, b"");
    assert!(!second.status.success());
    assert!(
        second
            .stderr
            .contains("\"pp\" is registered to a channel at 127.0.0.1:")
            && second.stderr.contains("that still answers"),
        "{}",
        second.stderr
    );
    assert!(second.took < std::time::Duration::from_secs(2));
    // The first one still owns the name.
    let out = run_checked({
        let mut cmd = std::process::Command::new(PINGPONG);
        cmd.args(["--registry", &registry, "ping", "pp", "3"]);
        cmd
    });
    assert!(out.contains("3 passed, 0 failed"), "{out}");
    // A name left behind by a process that is gone (kill -9 cannot unregister) is taken.
    let mut first = first;
    first.kill9();
    let _third = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "pp"]);
    let out = run_checked({
        let mut cmd = std::process::Command::new(PINGPONG);
        cmd.args(["--registry", &registry, "ping", "pp", "3"]);
        cmd
    });
    assert!(out.contains("3 passed, 0 failed"), "{out}");
}

/// `interop/chan.py pong` claims a name as `chan-pingpong pong` does: it refuses one
/// whose registered channel still answers (a live pong of either language), and takes one
/// left behind by a process that is gone.
#[test]
fn a_python_pong_refuses_a_name_that_answers_as_the_rust_one_does() {
    let store = start_store();
    let registry = store.addr.to_string();
    let first = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "pp"]);
    wait_registered(store.addr, "pp");
    let second = common::python("chan.py", &["--registry", &registry, "pong", "pp"]);
    let second = run_with_input(second, b"");
    assert!(!second.status.success());
    assert!(
        second
            .stderr
            .contains("'pp' is registered to a channel at 127.0.0.1:")
            && second.stderr.contains("that still answers"),
        "{}",
        second.stderr
    );
    // The first one still owns the name.
    let ping = |name: &str| {
        run_checked({
            let mut cmd = std::process::Command::new(PINGPONG);
            cmd.args(["--registry", &registry, "ping", name, "3"]);
            cmd
        })
    };
    assert!(ping("pp").contains("3 passed, 0 failed"));
    // A name left behind (kill -9 cannot unregister) is taken, and said so.
    let mut first = first;
    first.kill9();
    let third = ChildServer::start_python("chan.py", &["--registry", &registry, "pong", "pp"]);
    assert!(ping("pp").contains("3 passed, 0 failed"));
    assert!(
        third.log_text().contains("no longer answers; taking it"),
        "{}",
        third.log_text()
    );
}

#[test]
fn ping_waits_for_a_name_that_is_registered_late() {
    use std::io::BufRead;
    let store = start_store();
    let registry = store.addr.to_string();
    let mut ping = std::process::Command::new(PINGPONG)
        .args(["--registry", &registry, "ping", "late", "2", "--wait", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Pong starts only once ping has said it is waiting (ping gives up after 10 s, so
    // this read cannot hang the test).
    let mut stderr = std::io::BufReader::new(ping.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains("late is not registered yet; waiting up to 10 s"),
        "{line}"
    );
    let _pong = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "late"]);
    let out = ping.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 passed, 0 failed"));
}

#[test]
fn python_pings_a_rust_pong() {
    let store = start_store();
    let registry = store.addr.to_string();
    let _pong = ChildServer::start(PINGPONG, &["--registry", &registry, "pong", "rust-pong"]);
    wait_registered(store.addr, "rust-pong");
    let out = run_python(
        "chan.py",
        &["--registry", &registry, "ping", "rust-pong", "100"],
    );
    assert!(out.contains("100 passed, 0 failed"), "{out}");
}

#[test]
fn rust_pings_a_python_pong() {
    let store = start_store();
    let registry = store.addr.to_string();
    let pong = ChildServer::start_python("chan.py", &["--registry", &registry, "pong", "py-pong"]);
    let out = run_checked({
        let mut cmd = std::process::Command::new(PINGPONG);
        cmd.args(["--registry", &registry, "ping", "py-pong", "100"]);
        cmd
    });
    assert!(out.contains("100 passed, 0 failed"), "{out}");
    drop(pong);
}
