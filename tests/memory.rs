//! Issue 16's memory attacks, replayed against real server processes: many connections
//! holding partial maximal frames under a small `--max-client-memory`, and a client that
//! floods the echo pipeline without reading next to one that reads.

mod common;

use common::{connect, ChildServer, LineClient, IO_TIMEOUT};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;
use switchboard::bench::process_rss_kib;
use switchboard::framing::{encode_frame, Framing};
use switchboard::store::client::StoreClient;

const STORE: &str = env!("CARGO_BIN_EXE_store-server");

/// Sends `bytes` of a frame's payload in pieces, giving up quietly once the server closes
/// the connection (it was evicted).
fn send_part(stream: &mut TcpStream, mut bytes: usize) {
    let chunk = vec![b'x'; 256 << 10];
    while bytes > 0 {
        let n = bytes.min(chunk.len());
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        bytes -= n;
    }
}

fn rss_mib(server: &ChildServer) -> f64 {
    process_rss_kib(server.child.id()).expect("the server's RSS") as f64 / 1024.0
}

/// A field of a store `stats` reply.
fn stat(stats: &str, name: &str) -> u64 {
    let at = stats.find(&format!("{{{name},")).expect(name) + name.len() + 2;
    stats[at..].split('}').next().unwrap().parse().unwrap()
}

/// Runs `attack` (each connection sends its part), then waits until the server has taken
/// in what it will (`client_memory` in `stats`, asked through `ask`, unchanged for half a
/// second, or 10 s): returns the most RSS seen meanwhile, in MiB.
fn most_rss_during(
    server: &ChildServer,
    attack: impl FnOnce() + Send,
    mut ask_stats: impl FnMut() -> String,
) -> f64 {
    let mut most = rss_mib(server);
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            attack();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            most = most.max(rss_mib(server));
            thread::sleep(Duration::from_millis(20));
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (u64::MAX, 0);
    while same < 5 && std::time::Instant::now() < deadline {
        most = most.max(rss_mib(server));
        let held = stat(&ask_stats(), "client_memory");
        same = if held == last { same + 1 } else { 0 };
        last = held;
        thread::sleep(Duration::from_millis(100));
    }
    most.max(rss_mib(server))
}

#[test]
fn partial_maximal_frames_stay_within_the_client_memory_budget() {
    const BUDGET_MIB: usize = 16;
    let budget = format!("{BUDGET_MIB}m");
    let server = ChildServer::start(
        STORE,
        &[
            "--listen",
            "127.0.0.1:0",
            "--framing",
            "u32",
            "--max-client-memory",
            &budget,
        ],
    );
    let before = rss_mib(&server);
    // 24 connections each announce a 16 MiB frame and send 6 MiB of it: 144 MiB the
    // server would hold without a budget.
    let mut attackers = Vec::new();
    for _ in 0..24 {
        let mut s = connect(server.addr);
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&((16u32 << 20) - 1).to_be_bytes()).unwrap();
        attackers.push(s);
    }
    let mut client = connect(server.addr);
    let send = |client: &mut TcpStream, req: &[u8]| {
        let mut frame = (req.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(req);
        client.write_all(&frame).unwrap();
    };
    let ask = |client: &mut TcpStream, req: &[u8]| -> Vec<u8> {
        send(client, req);
        let mut len = [0u8; 4];
        client.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        client.read_exact(&mut reply).unwrap();
        reply
    };
    let mut watcher = connect(server.addr);
    let most = most_rss_during(
        &server,
        || {
            thread::scope(|scope| {
                for s in &mut attackers {
                    scope.spawn(move || send_part(s, 6 << 20));
                }
            })
        },
        || String::from_utf8(ask(&mut watcher, b"stats")).unwrap(),
    );
    // The store still answers, in its framing.
    send(&mut client, b"store,k,still here");
    assert_eq!(ask(&mut client, b"lookup,k"), b"{just,still here}");
    let stats = String::from_utf8(ask(&mut client, b"stats")).unwrap();
    let field = |name: &str| stat(&stats, name);
    let peak = field("client_memory_peak") as f64 / (1 << 20) as f64;
    assert_eq!(field("client_memory_limit"), (BUDGET_MIB as u64) << 20);
    eprintln!("RSS before {before:.1} MiB, at most {most:.1} MiB; budget peak {peak:.1} MiB");
    // Issue 16 asks for the budget plus 64 MiB. Partial frames past 64 KiB live in
    // buffers mapped apart and unmapped when given back (see `framing::reader`), so what
    // evicted connections held does not stay in per-thread malloc arenas (it did: 65-105
    // MiB here). The margin: the process before the attack (~3 MiB), one growth step past
    // the budget, thread stacks and the replies' buffers.
    assert!(
        most < (BUDGET_MIB + 16) as f64,
        "RSS reached {most:.1} MiB, over the {BUDGET_MIB} MiB budget plus 16 MiB"
    );
    // Charges are refused or holders evicted a little past the budget, by one growth step.
    assert!(
        peak <= (BUDGET_MIB * 2) as f64,
        "{peak:.1} MiB charged at the peak"
    );
    assert!(
        server.log_text().contains("client memory budget"),
        "no connection was closed for the budget"
    );
    drop(attackers);
}

#[test]
fn partial_lines_from_many_connections_stay_within_the_budget() {
    let server = ChildServer::start(
        STORE,
        &["--listen", "127.0.0.1:0", "--max-client-memory", "16m"],
    );
    // 128 connections each send most of a 1 MiB line, with no newline yet: 125 MiB unbounded.
    let mut attackers: Vec<TcpStream> = (0..128).map(|_| connect(server.addr)).collect();
    let mut watcher = LineClient::connect(server.addr);
    let rss = most_rss_during(
        &server,
        || {
            thread::scope(|scope| {
                for s in &mut attackers {
                    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    scope.spawn(move || send_part(s, 1000 << 10));
                }
            })
        },
        || watcher.ask("stats\n"),
    );
    let mut client = LineClient::connect(server.addr);
    client.send(b"store,k,v\n");
    assert_eq!(client.ask("lookup,k\n"), "{just,v}");
    let stats = client.ask("stats\n");
    eprintln!("RSS {rss:.1} MiB; {stats}");
    assert!(rss < 16.0 + 64.0, "RSS {rss:.1} MiB");
    assert!(stats.contains("{client_memory_limit,16777216}"), "{stats}");
    drop(attackers);
}

/// 96 connections each ask for a 1000 KiB value 400 times and never read: once the socket
/// buffers are full, each connection's thread blocks writing with a reply buffer of ~1 MiB.
/// Each buffer is charged to the budget before it is allocated, so few exist at once (96
/// MiB when they were charged only once built).
fn lookups_of_large_values_never_read(framing: Framing) {
    const BUDGET_MIB: usize = 8;
    let budget = format!("{BUDGET_MIB}m");
    let server = ChildServer::start(
        STORE,
        &[
            "--listen",
            "127.0.0.1:0",
            "--max-client-memory",
            &budget,
            "--framing",
            &framing.to_string(),
        ],
    );
    let store_client = || StoreClient::connect_timeout(server.addr, framing, IO_TIMEOUT).unwrap();
    let mut client = store_client();
    client.store(b"big", &[b'v'; 1000 << 10]).unwrap();
    assert_eq!(client.lookup(b"small").unwrap(), None);
    let mut lookups = Vec::new();
    for _ in 0..400 {
        encode_frame(framing, b"lookup,big", &mut lookups).unwrap();
    }
    let mut attackers: Vec<TcpStream> = Vec::new();
    let rss = most_rss_during(
        &server,
        || {
            for _ in 0..96 {
                let mut s = connect(server.addr);
                if s.write_all(&lookups).is_ok() {
                    attackers.push(s);
                }
            }
        },
        || client.stats().unwrap(),
    );
    let mut other = store_client();
    other.store(b"k", b"v").unwrap();
    assert_eq!(other.lookup(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    let stats = other.stats().unwrap();
    let held = stat(&stats, "client_memory") as f64 / (1 << 20) as f64;
    eprintln!("{framing}: RSS at most {rss:.1} MiB; {held:.1} MiB charged after; {stats}");
    assert!(
        held <= BUDGET_MIB as f64,
        "{held:.1} MiB charged, over the {BUDGET_MIB} MiB budget"
    );
    // Peaks of 12-14 MiB measured: the budget, the stored value, 96 threads' stacks and
    // read buffers, and what the allocator keeps of buffers given back (29-47 MiB, and
    // once 84, when each reply was charged only once built).
    assert!(
        rss < (BUDGET_MIB + 24) as f64,
        "RSS reached {rss:.1} MiB, over the {BUDGET_MIB} MiB budget plus 24 MiB"
    );
    assert!(
        server.log_text().contains("client memory budget"),
        "no connection was closed for the budget"
    );
    drop(attackers);
}

#[test]
fn lookups_of_large_values_never_read_stay_within_the_budget() {
    // The line framing's lookups take the store's fast path.
    lookups_of_large_values_never_read(Framing::Line);
}

#[test]
fn framed_lookups_of_large_values_never_read_stay_within_the_budget() {
    // A size-prefixed framing's lookups take the general path.
    lookups_of_large_values_never_read(Framing::U32);
}

#[test]
fn a_pipeline_flooder_of_maximal_frames_stays_within_the_budget() {
    const ECHO: &str = env!("CARGO_BIN_EXE_echo-server");
    let server = ChildServer::start(
        ECHO,
        &[
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "pipeline",
            "--framing",
            "u32",
            "--transform",
            "upper",
            "--max-client-memory",
            "32m",
        ],
    );
    // A client sends 16 MiB frames as fast as it can and never reads a reply, and
    // reconnects when dropped (the attack took the pipeline to 404-493 MiB).
    let mut frame = ((16u32 << 20) - 8).to_be_bytes().to_vec();
    frame.resize(4 + (16 << 20) - 8, b'a');
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut most = 0.0f64;
    thread::scope(|scope| {
        {
            let (frame, stop) = (&frame, &stop);
            scope.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect(server.addr) else {
                        return;
                    };
                    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst)
                        && s.write_all(frame).is_ok()
                    {}
                }
            });
        }
        for _ in 0..60 {
            most = most.max(rss_mib(&server));
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    // A reading client is still answered.
    let mut client = connect(server.addr);
    client.write_all(b"\0\0\0\x02hi").unwrap();
    let mut reply = [0u8; 6];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"\0\0\0\x02HI");
    eprintln!("echo pipeline RSS at most {most:.1} MiB under 16 MiB frames never read");
    assert!(most < 32.0 + 64.0, "RSS reached {most:.1} MiB");
}

/// Under a cap on address space (`ulimit -v`, as a system that does not overcommit
/// behaves), a read buffer's reservation (34 MiB of address space, of which only what is
/// held becomes memory) is refused for most of 30 connections holding 70 KiB of a frame.
/// Refused, it used to abort the whole process (an allocation failure); the buffer now
/// grows as it fills instead, and the server goes on.
#[test]
fn a_refused_reservation_never_takes_the_process_down() {
    let echo = env!("CARGO_BIN_EXE_echo-server");
    let script = format!("ulimit -v 400000 && exec {echo} --listen 127.0.0.1:0 --framing u32");
    let mut server = ChildServer::start("sh", &["-c", &script]);
    let mut held = Vec::new();
    for _ in 0..30 {
        let mut s = connect(server.addr);
        let mut part = Vec::new();
        encode_frame(Framing::U32, &vec![b'x'; 1 << 20], &mut part).unwrap();
        s.write_all(&part[..70 << 10]).unwrap();
        held.push(s);
    }
    // Time for every connection's thread to read its part (and reserve).
    thread::sleep(Duration::from_millis(500));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died: {}",
        server.log_text()
    );
    let mut c = connect(server.addr);
    let mut hi = Vec::new();
    encode_frame(Framing::U32, b"hi", &mut hi).unwrap();
    c.write_all(&hi).unwrap();
    let mut back = vec![0u8; hi.len()];
    c.read_exact(&mut back).expect("the echo server answers");
    assert_eq!(back, hi);
    drop(held);
    assert!(server.terminate(), "{}", server.log_text());
}
