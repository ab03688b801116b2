//! The replicated messenger, end to end: every rule's status code in exact bytes, offline
//! delivery order, wildcard search, persistence across `kill -9`, failover under load with
//! exactly-once delivery, a killed server catching up and leading again, the Python client
//! and the interactive client against the Rust servers.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/messenger_load.rs"]
mod messenger_load;

use cluster::{Cluster, Proxies};
use common::{connect, eventually, run_python, IO_TIMEOUT};
use messenger_load::{flood, launch, served_after_flood, Acked, Load, Raw};
use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use switchboard::framing::{encode_frame, FrameError, Framing};
use switchboard::messenger::protocol::Delivery;
use switchboard::messenger::{Client, ClientError};
use switchboard::proxy::FaultProxy;
use switchboard::server::RESERVE_OPENING_TIMEOUT;

const SERVER: &str = env!("CARGO_BIN_EXE_messenger-server");
const CLIENT: &str = env!("CARGO_BIN_EXE_messenger-client");

/// What these tests start and ask of a [`Cluster`] of messenger servers.
trait Messenger {
    fn start(n: usize, name: &str) -> Cluster {
        Cluster::start_with(n, name, &[])
    }

    fn start_with(n: usize, name: &str, extra: &[&str]) -> Cluster {
        Cluster::launch(n, name, Proxies::None, launch(SERVER, "messenger", extra))
    }

    /// `n` servers that dial each other through a [`FaultProxy`] per ordered pair
    /// (`--dial`), with a proxy in front of each for clients ([`Messenger::front_client`]).
    fn start_proxied(n: usize, name: &str) -> Cluster {
        let launch = launch(SERVER, "messenger", &[]);
        Cluster::launch(n, name, Proxies::LinksAndFront, launch)
    }

    /// A client that reaches each server through the front proxies.
    fn front_client(&self) -> Client;

    fn client(&self) -> Client;

    /// A raw connection to the primary (found by asking each server).
    fn raw(&self) -> Raw;
}

impl Messenger for Cluster {
    fn front_client(&self) -> Client {
        Client::new(self.front.iter().map(FaultProxy::local_addr).collect())
    }

    fn client(&self) -> Client {
        Client::new(self.addrs.clone())
    }

    fn raw(&self) -> Raw {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            for &addr in &self.addrs {
                let mut r = Raw::connect(addr);
                if r.ask(b"\x03probe")[0] == 0x22 {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "no primary");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

const OK: &[u8] = b"\x20";

#[test]
fn an_idle_client_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    let idle = Duration::from_millis(400);
    let cluster = Cluster::start_with(1, "idle", &["--idle-timeout", "0.4"]);
    let mut quiet = cluster.raw();
    let quiet_since = Instant::now();
    let mut busy = cluster.raw();
    // Busy for three timeouts, a request every tenth of one: always answered.
    while quiet_since.elapsed() < 3 * idle {
        assert_eq!(busy.ask(b"\x03nobody"), b"\x22\x00\x00");
        thread::sleep(idle / 10);
    }
    // The quiet one was closed by the server in the meantime (its read then sees the end
    // at once), not before its timeout.
    assert!(quiet.ended_by_server());
    assert!(quiet_since.elapsed() >= idle);
    assert!(!cluster.log(0).contains("ended:"), "{}", cluster.log(0));
}

#[test]
fn a_connection_over_the_limit_is_told_unavailable_and_closed() {
    let cluster = Cluster::start_with(1, "maxconn", &["--max-connections", "2"]);
    let first = cluster.raw();
    // Connections that found the server not yet primary may still count for a moment.
    let mut second = None;
    eventually("a second connection served", || {
        let mut r = Raw::connect(cluster.addrs[0]);
        r.send(b"\x03nobody");
        let served = matches!(r.reader.read_frame(), Ok(Some(b"\x22\x00\x00")));
        second = served.then_some(r);
        served
    });
    // Two are live: the third is refused, in the messenger's own framing.
    let mut third = connect(cluster.addrs[0]);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut third, &mut got).unwrap();
    assert_eq!(got, b"\x00\x00\x00\x01\x41");
    eventually("the refusal logged", || {
        cluster.log(0).contains("refused connection")
    });
    drop((first, second));
}

#[test]
fn every_rule_is_answered_with_its_own_code_and_changes_nothing() {
    let cluster = Cluster::start(1, "rules");
    let mut a = cluster.raw();
    // Malformed requests: 50 bad request, 51 bad name, 52 bad text, 53 bad pattern.
    assert_eq!(a.ask(b""), b"\x50");
    assert_eq!(a.ask(b"\x09"), b"\x50");
    assert_eq!(a.ask(b"\x01"), b"\x51");
    assert_eq!(a.ask(&[&b"\x01"[..], &[b'a'; 51]].concat()), b"\x51");
    assert_eq!(a.ask(b"\x01bad name"), b"\x51");
    assert_eq!(a.ask(b"\x03a?"), b"\x53");
    assert_eq!(a.ask(b"\x04a|b|notanumber|hi"), b"\x50");
    // Register: ok, then 54 name taken; a resend with the same nonce is ok.
    assert_eq!(a.ask(b"\x01alice"), OK);
    assert_eq!(a.ask(&[&b"\x01"[..], &[b'b'; 50]].concat()), OK);
    assert_eq!(a.ask(b"\x01alice"), b"\x54");
    assert_eq!(a.ask(b"\x01bob|77"), OK);
    assert_eq!(a.ask(b"\x01bob|77"), OK);
    assert_eq!(a.ask(b"\x01bob|78"), b"\x54");
    // Logged out: 56 for send, logout, delete; 55 for an unknown login.
    assert_eq!(a.ask(b"\x04alice|bob|1|hi"), b"\x56");
    assert_eq!(a.ask(b"\x05alice"), b"\x56");
    assert_eq!(a.ask(b"\x06alice"), b"\x56");
    assert_eq!(a.ask(b"\x02carol"), b"\x55");
    // Login: 21 with the count; then 57 already logged in for register and login.
    assert_eq!(a.ask(b"\x02alice"), b"\x21\x00\x00");
    assert_eq!(a.ask(b"\x01carol"), b"\x57");
    assert_eq!(a.ask(b"\x02bob"), b"\x57");
    // 58: the account is logged in on another connection.
    let mut b = cluster.raw();
    assert_eq!(b.ask(b"\x02alice"), b"\x58");
    // Send: 59 wrong sender, 55 no such recipient, 52 bad text (too long, not printable).
    assert_eq!(a.ask(b"\x04bob|alice|1|hi"), b"\x59");
    assert_eq!(a.ask(b"\x04alice|carol|1|hi"), b"\x55");
    assert_eq!(a.ask(b"\x04alice|bob|1|"), b"\x52");
    assert_eq!(
        a.ask(&[&b"\x04alice|bob|1|"[..], &[b'x'; 263]].concat()),
        b"\x52"
    );
    assert_eq!(a.ask(b"\x04alice|bob|1|tab\there"), b"\x52");
    assert_eq!(
        a.ask(&[&b"\x04alice|bob|1|"[..], &[b'~'; 262]].concat()),
        OK
    );
    // Logout and delete name the logged-in user: 59 otherwise.
    assert_eq!(a.ask(b"\x05bob"), b"\x59");
    assert_eq!(a.ask(b"\x06bob"), b"\x59");
    // Nothing changed: bob has exactly the one message, and alice still exists.
    assert_eq!(b.ask(b"\x02bob"), b"\x21\x00\x01");
    let handover = b.recv();
    let tilde = [b'~'; 262];
    assert!(
        handover.starts_with(b"\x30") && handover.ends_with(&[&b"|alice|"[..], &tilde].concat())
    );
    let sorted = [&b"\x22\x00\x03alice|"[..], &[b'b'; 50], b"|bob"].concat();
    assert_eq!(b.ask(b"\x03*"), sorted);
    // Logout, then delete (the account and its pending messages), then quit.
    assert_eq!(a.ask(b"\x05alice"), OK);
    assert_eq!(a.ask(b"\x05alice"), b"\x56");
    assert_eq!(b.ask(b"\x06bob"), OK);
    assert_eq!(b.ask(b"\x02bob"), b"\x55");
    assert_eq!(b.ask(b"\x03bob"), b"\x22\x00\x00");
    assert_eq!(a.ask(b"\x02alice"), b"\x21\x00\x00");
    assert_eq!(a.ask(b"\x07"), OK);
    assert!(a.closed(), "quit closes the connection");
    // Quit logged alice out: she can log in again elsewhere.
    assert_eq!(b.ask(b"\x02alice"), b"\x21\x00\x00");
    // A frame longer than any request is a bad request, and the connection goes on.
    assert_eq!(b.ask(&vec![0x04; 5000]), b"\x50");
    assert_eq!(b.ask(b"\x03alice"), b"\x22\x00\x01alice");
}

#[test]
fn offline_messages_are_handed_over_in_send_order_with_the_count_first() {
    let cluster = Cluster::start(1, "offline");
    let mut a = cluster.raw();
    assert_eq!(a.ask(b"\x01ann"), OK);
    assert_eq!(a.ask(b"\x01bob"), OK);
    assert_eq!(a.ask(b"\x02ann"), b"\x21\x00\x00");
    for (id, text) in [(1, "first"), (2, "second | with bars |"), (3, "third")] {
        assert_eq!(a.ask(format!("\x04ann|bob|{id}|{text}").as_bytes()), OK);
    }
    // A resend of id 2 is acknowledged and not kept twice.
    assert_eq!(a.ask(b"\x04ann|bob|2|second | with bars |"), OK);
    let mut b = cluster.raw();
    assert_eq!(b.ask(b"\x02bob"), b"\x21\x00\x03");
    let texts: Vec<Vec<u8>> = (0..3).map(|_| b.recv()).collect();
    let mut ids = Vec::new();
    for (frame, want) in texts.iter().zip(["first", "second | with bars |", "third"]) {
        let body = std::str::from_utf8(&frame[1..]).unwrap();
        let (id, rest) = body.split_once('|').unwrap();
        assert_eq!(frame[0], 0x30);
        assert_eq!(rest, format!("ann|{want}"));
        // EPOCH.SEQ: the epoch of the primary that stored it, and its change's number.
        let (epoch, seq) = id.split_once('.').unwrap();
        ids.push((epoch.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap()));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Logged in: the next message arrives at once.
    assert_eq!(a.ask(b"\x04ann|bob|4|live"), OK);
    let live = b.recv();
    assert!(live.starts_with(b"\x30") && live.ends_with(b"|ann|live"));
    // Unconfirmed messages are handed over again at the next login; confirmed ones are not.
    assert_eq!(b.ask(b"\x05bob"), OK);
    assert_eq!(b.ask(b"\x02bob"), b"\x21\x00\x04");
    (0..4).for_each(|_| drop(b.recv()));
    b.send(format!("\x08{}.{}", ids[2].0, ids[2].1).as_bytes());
    assert_eq!(b.ask(b"\x05bob"), OK);
    assert_eq!(b.ask(b"\x02bob"), b"\x21\x00\x01");
    assert!(b.recv().ends_with(b"|ann|live"));
}

#[test]
fn search_matches_wildcards_against_every_account() {
    let cluster = Cluster::start(1, "search");
    let mut c = cluster.client();
    for name in ["alice", "alfred", "albert", "bob", "carla", "Al"] {
        c.register(name).unwrap();
    }
    let found = |c: &mut Client, p: &str| c.search(p).unwrap().join(" ");
    assert_eq!(found(&mut c, "al*"), "albert alfred alice");
    assert_eq!(found(&mut c, "*l*"), "Al albert alfred alice carla");
    assert_eq!(found(&mut c, "a*e*"), "albert alfred alice");
    assert_eq!(found(&mut c, "*"), "Al albert alfred alice bob carla");
    assert_eq!(found(&mut c, "bob"), "bob");
    assert_eq!(found(&mut c, "*b"), "bob");
    assert_eq!(found(&mut c, "b"), "");
    assert_eq!(
        c.search("a-b"),
        Err(ClientError::Refused(
            switchboard::messenger::protocol::Violation::BadPattern
        ))
    );
}

/// `--max-accounts`: a register past it is answered `5a` (no room) and changes nothing;
/// it is decided by the primary, before anything is replicated, and every server holds
/// the same accounts, so after the primary is killed the next one refuses the same
/// register and a delete makes room on it.
#[test]
fn a_register_past_max_accounts_is_refused_and_changes_nothing_before_and_after_a_failover() {
    let mut cluster = Cluster::start_with(3, "maxaccounts", &["--max-accounts", "2"]);
    let mut raw = cluster.raw();
    assert_eq!(raw.ask(b"\x01ann"), OK);
    assert_eq!(raw.ask(b"\x01bob|5"), OK);
    assert_eq!(raw.ask(b"\x01cat"), b"\x5a");
    // At the limit, a resend of a register that made it is still ok, a taken name 54.
    assert_eq!(raw.ask(b"\x01bob|5"), OK);
    assert_eq!(raw.ask(b"\x01ann"), b"\x54");
    assert_eq!(raw.ask(b"\x03*"), b"\x22\x00\x02ann|bob");
    drop(raw);
    let primary = the_primary(&cluster);
    cluster.kill9(primary);
    let full = Err(ClientError::Refused(
        switchboard::messenger::protocol::Violation::Full,
    ));
    let mut c = cluster.client();
    assert_eq!(c.register("cat"), full);
    assert_ne!(c.server(), Some(primary));
    assert_eq!(c.search("*").unwrap(), ["ann", "bob"]);
    c.login("bob").unwrap();
    c.delete().unwrap();
    c.register("cat").unwrap();
    assert_eq!(c.register("dan"), full);
    assert_eq!(c.search("*").unwrap(), ["ann", "cat"]);
}

/// `--max-waiting`: a send while that many messages wait (over all accounts) is answered
/// `5a` (no room) and changes nothing; the count is part of the replicated state, so the
/// next primary refuses the same send after a failover, and a confirmed delivery makes
/// room.
#[test]
fn a_send_past_max_waiting_is_refused_before_and_after_a_failover() {
    let mut cluster = Cluster::start_with(2, "maxwaiting", &["--max-waiting", "2"]);
    let full = Err(ClientError::Refused(
        switchboard::messenger::protocol::Violation::Full,
    ));
    let mut ann = cluster.client();
    for name in ["ann", "bob", "cat"] {
        ann.register(name).unwrap();
    }
    ann.login("ann").unwrap();
    ann.send("bob", "one").unwrap();
    ann.send("cat", "two").unwrap();
    assert_eq!(ann.send("bob", "three"), full);
    let primary = the_primary(&cluster);
    cluster.kill9(primary);
    drop(ann);
    let mut ann = cluster.client();
    ann.login("ann").unwrap();
    assert_eq!(ann.send("cat", "three"), full);
    assert_ne!(ann.server(), Some(primary));
    // bob logs in: his message is delivered and confirmed, which makes room for one.
    let mut bob = cluster.client();
    assert_eq!(bob.login("bob").unwrap(), 1);
    let got = bob.deliveries().recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(got.text, "one");
    eventually("the confirm to make room", || {
        ann.send("cat", "three").is_ok()
    });
    assert_eq!(ann.send("cat", "four"), full);
}

/// Connections holding every slot of a server cannot keep a peer's link out: connections
/// that never send anything take every slot of server 0, the room kept past
/// `--max-connections` for peer links too, and more are refused; server 1, killed and
/// restarted meanwhile, dials server 0 again and gets in once the silent ones in that room
/// are closed at its opening timeout (5 s), while those within the limit hold on.
#[test]
fn a_restarted_peer_links_again_past_a_connection_limit_that_clients_fill() {
    let mut cluster = Cluster::start_with(2, "reserve", &["--max-connections", "4"]);
    let ups = |cluster: &Cluster| cluster.log(0).matches("server 1 is up").count();
    eventually("the servers to link", || ups(&cluster) == 1);
    cluster.kill9(1);
    // Its link gone, so that the held connections take every ordinary slot.
    eventually("server 0 to find server 1 down", || {
        cluster.log(0).contains("server 1 is down")
    });
    let held: Vec<_> = (0..20).map(|_| connect(cluster.addrs[0])).collect();
    eventually("server 0 to refuse past the limit and the room", || {
        cluster.log(0).contains("connection limit reached")
    });
    cluster.spawn(1);
    let deadline = Instant::now() + RESERVE_OPENING_TIMEOUT + IO_TIMEOUT;
    while ups(&cluster) < 2 {
        assert!(
            Instant::now() < deadline,
            "no link again\n{}",
            cluster.logs()
        );
        thread::sleep(Duration::from_millis(10));
    }
    // The four within the limit are still open; the others were refused or shut down.
    let open = held
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let read = std::io::Read::read(&mut &**s, &mut [0u8; 16]);
            matches!(read, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
        })
        .count();
    assert_eq!(open, 4, "{}", cluster.log(0));
}

#[test]
fn a_server_restarts_from_its_data_dir_after_kill_9() {
    let mut cluster = Cluster::start(1, "restart");
    let mut c = cluster.client();
    c.register("ann").unwrap();
    c.register("bob").unwrap();
    c.login("ann").unwrap();
    for i in 0..20 {
        c.send("bob", &format!("kept {i}")).unwrap();
    }
    drop(c);
    cluster.kill9(0);
    cluster.spawn(0);
    assert!(
        cluster.log(0).contains("records replayed"),
        "{}",
        cluster.log(0)
    );
    let mut b = cluster.client();
    assert_eq!(b.login("bob").unwrap(), 20);
    let got: Vec<String> = b.deliveries().try_iter().map(|d| d.text).collect();
    let want: Vec<String> = (0..20).map(|i| format!("kept {i}")).collect();
    assert_eq!(got, want);
}

/// Everything `name` receives on a client of `cluster` (see [`messenger_load::receive`]).
fn receive(
    cluster: &Cluster,
    name: &str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Delivery>> {
    messenger_load::receive(cluster.client(), name, stop)
}

#[test]
fn acknowledged_sends_survive_killing_the_primary_and_then_the_next_one() {
    let mut cluster = Cluster::start(3, "failover");
    const SENDERS: usize = 4;
    let mut setup = cluster.client();
    for i in 0..SENDERS {
        setup.register(&format!("s{i}")).unwrap();
        setup.register(&format!("r{i}")).unwrap();
    }
    assert_eq!(setup.server(), Some(0));
    // r0 and r1 are logged in throughout; r2 and r3 collect at the end.
    let stop_receivers = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = (0..2)
        .map(|i| receive(&cluster, &format!("r{i}"), Arc::clone(&stop_receivers)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            let (mut c, stop, acked) = (cluster.client(), Arc::clone(&stop), Arc::clone(&acked));
            c.login(&format!("s{i}")).unwrap();
            thread::spawn(move || {
                let mut unacked = Vec::new();
                for k in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let text = format!("s{i} message {k}");
                    match c.send(&format!("r{i}"), &text) {
                        Ok(()) => acked.lock().unwrap().push(text),
                        Err(e) => unacked.push((text, e)),
                    }
                }
                unacked
            })
        })
        .collect();
    let acks = || acked.lock().unwrap().len();
    let wait_for_more = |n: usize| {
        let target = acks() + n;
        eventually(&format!("{target} acknowledged sends"), || acks() >= target);
    };
    wait_for_more(100);
    cluster.kill9(0);
    wait_for_more(100);
    eventually("server 1 to lead", || {
        cluster.log(1).contains("primary for epoch")
    });
    cluster.kill9(1);
    wait_for_more(100);
    assert!(
        cluster.log(2).contains("primary for epoch"),
        "{}",
        cluster.log(2)
    );
    // A killed server restarts from its data dir, catches up, and leads again.
    cluster.spawn(0);
    wait_for_more(50);
    eventually("server 0 to lead again", || {
        cluster.log(0).contains("caught up to") && cluster.log(0).contains("primary for epoch")
    });
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        let unacked = s.join().unwrap();
        assert!(unacked.len() <= SENDERS, "sends failed: {unacked:?}");
    }
    let mut probe = cluster.client();
    probe.search("*").unwrap();
    assert_eq!(probe.server(), Some(0), "{}", cluster.log(0));
    stop_receivers.store(true, Ordering::SeqCst);
    let mut delivered: Vec<Delivery> = receivers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    for i in 2..SENDERS {
        let mut c = cluster.client();
        c.login(&format!("r{i}")).unwrap();
        delivered.extend(c.deliveries().try_iter());
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for d in &delivered {
        *count.entry(d.text.as_str()).or_default() += 1;
    }
    let acked = acked.lock().unwrap();
    for text in acked.iter() {
        assert_eq!(
            count.get(text.as_str()),
            Some(&1),
            "{text} delivered {:?} times",
            count.get(text.as_str())
        );
    }
    assert!(
        count.values().all(|&n| n == 1),
        "a message was delivered twice"
    );
    assert!(acked.len() >= 350, "{}", acked.len());
}

#[test]
fn a_server_that_was_away_catches_up_by_records_or_snapshot_and_can_carry_on_alone() {
    let mut cluster = Cluster::start_with(3, "catchup", &["--compact-after", "20"]);
    let mut ann = cluster.client();
    ann.register("ann").unwrap();
    ann.register("bob").unwrap();
    ann.login("ann").unwrap();
    let mut sent = Vec::new();
    let mut send = |ann: &mut Client, n: usize| {
        for _ in 0..n {
            let text = format!("message {}", sent.len());
            ann.send("bob", &text).unwrap();
            sent.push(text);
        }
    };
    send(&mut ann, 10);
    cluster.kill9(2);
    send(&mut ann, 30);
    // The primary restarts: server 1 leads meanwhile, then steps down for server 0, which
    // first fetches what it missed from it.
    cluster.kill9(0);
    send(&mut ann, 5);
    assert_eq!(ann.server(), Some(1));
    cluster.spawn(0);
    eventually("server 0 to lead again", || {
        cluster.log(0).contains("caught up to") && cluster.log(0).contains("primary for epoch")
    });
    send(&mut ann, 10);
    assert_eq!(ann.server(), Some(0));
    // Server 2 was away longer than server 0's log goes back (it compacts every 20
    // records): it is sent a snapshot, then records, and is told when it holds everything.
    cluster.spawn(2);
    eventually("server 2 to hold every committed change", || {
        cluster.log(2).contains("holds every committed change")
    });
    assert!(
        cluster.log(0).contains("sending server 2 a snapshot"),
        "{}",
        cluster.log(0)
    );
    assert!(
        cluster.log(2).contains("installed a snapshot"),
        "{}",
        cluster.log(2)
    );
    send(&mut ann, 5);
    // Servers 0 and 1 fail: server 2 has every acknowledged message and carries on alone.
    cluster.kill9(0);
    cluster.kill9(1);
    let mut bob = cluster.client();
    assert_eq!(bob.login("bob").unwrap() as usize, sent.len());
    assert_eq!(bob.server(), Some(2));
    let got: Vec<String> = bob.deliveries().try_iter().map(|d| d.text).collect();
    assert_eq!(got, sent);
}

#[test]
fn a_frozen_primary_steps_down_when_it_wakes_and_acknowledges_nothing_meanwhile() {
    let cluster = Cluster::start(3, "frozen");
    let mut setup = cluster.client();
    for name in ["ann", "bob", "cat"] {
        setup.register(name).unwrap();
    }
    let mut ann = Raw::connect(cluster.addrs[0]);
    assert_eq!(ann.ask(b"\x02ann"), b"\x21\x00\x00");
    let mut cat = cluster.client();
    cat.login("cat").unwrap();
    cat.send("bob", "before").unwrap();
    assert_eq!(cat.server(), Some(0));
    cluster.signal(0, "-STOP");
    // Queued in the frozen server's socket; it will read it when it wakes.
    ann.send(b"\x04ann|bob|1|while frozen");
    // The others notice the silence and take over; cat's client times out and fails over.
    cat.send("bob", "during").unwrap();
    assert_eq!(cat.server(), Some(1));
    cluster.signal(0, "-CONT");
    // Woken, server 0 finds its ticker late: it steps down instead of trusting its stale
    // view, so the request it finds waiting is never acknowledged.
    let reply = ann.reader.read_frame().map(|f| f.map(<[u8]>::to_vec));
    assert!(
        !matches!(&reply, Ok(Some(r)) if r.as_slice() == OK),
        "a stale primary acknowledged a send: {reply:?}"
    );
    eventually("server 0 to lead again", || {
        let log = cluster.log(0);
        log.contains("stalled") && log.matches("primary for epoch").count() >= 2
    });
    cat.send("bob", "after").unwrap();
    let logs = || {
        (0..3)
            .map(|i| cluster.log(i))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Normally server 0 answers. Under heavy load server 0 can lose its link right after
    // taking over (seen once in ~6 loaded runs); server 1 then leads a newer epoch and
    // answers the resent send (same id, stored once). A server that is not primary never
    // answers Ok, so server 1 is accepted only if its log shows it took over again.
    match cat.server() {
        Some(0) => {}
        Some(1) => assert!(
            cluster.log(1).matches("primary for epoch").count() >= 2,
            "server 1 answered without leading again\n{}",
            logs()
        ),
        other => panic!("\"after\" answered by {other:?}\n{}", logs()),
    }
    let mut bob = cluster.client();
    bob.login("bob").unwrap();
    let texts: Vec<String> = bob.deliveries().try_iter().map(|d| d.text).collect();
    assert_eq!(texts, ["before", "during", "after"], "{}", logs());
}

#[test]
fn a_resent_send_is_acknowledged_and_delivered_once() {
    let cluster = Cluster::start(3, "resend");
    let mut c = cluster.client();
    c.register("ann").unwrap();
    c.register("bob").unwrap();
    c.login("ann").unwrap();
    c.send_with_id("bob", "once", 42).unwrap();
    c.send_with_id("bob", "once", 42).unwrap();
    c.send_with_id("bob", "twice", 43).unwrap();
    let mut b = cluster.client();
    assert_eq!(b.login("bob").unwrap(), 2);
    let texts: Vec<String> = b.deliveries().try_iter().map(|d| d.text).collect();
    assert_eq!(texts, ["once", "twice"]);
}

/// A confirm lost in a failover: the connection dies after the client received a message
/// but before its confirm reached the primary, so at the silent re-login the message is
/// handed over again. The client must not pass it on twice, and must confirm it again, or
/// it stays queued (and a new client process logging in as the user gets it again).
/// Against a fake primary that plays both connections, as if the first confirm was lost.
#[test]
fn a_message_handed_over_again_is_confirmed_again_and_passed_on_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (answered, logins) = mpsc::channel();
    let fake = thread::spawn(move || {
        let deadline = Instant::now() + IO_TIMEOUT;
        // What followed each handover: the confirm, or None if nothing came in time.
        let mut confirms = Vec::new();
        for _ in 0..2 {
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut raw = Raw::over(stream);
            let login = raw.recv();
            assert!(
                login.starts_with(b"\x02ann|"),
                "a login with the session token (silent, the second time): {login:?}"
            );
            raw.send(b"\x21\x00\x01");
            raw.send(b"\x303.7|bob|hi");
            answered.send(()).unwrap();
            confirms.push(raw.reader.read_frame().ok().flatten().map(<[u8]>::to_vec));
            // Dropped: the connection closes, and the client logs in again.
        }
        confirms
    });
    let mut client = Client::new(vec![addr]);
    client.timeout = IO_TIMEOUT;
    assert_eq!(client.login("ann"), Ok(1));
    logins.recv_timeout(IO_TIMEOUT).unwrap();
    // Only `keep_up` logs in again, so once the fake has answered, the login it answered
    // has returned, and what it handed over has been read.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        client.keep_up().unwrap();
        if logins.recv_timeout(Duration::from_millis(20)).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the client did not log in again");
    }
    let texts: Vec<String> = client.deliveries().try_iter().map(|d| d.text).collect();
    assert_eq!(texts, ["hi"], "passed on exactly once");
    let confirms = fake.join().unwrap();
    assert_eq!(
        confirms[0].as_deref(),
        Some(&b"\x083.7"[..]),
        "first handover"
    );
    assert_eq!(
        confirms[1].as_deref(),
        Some(&b"\x083.7"[..]),
        "the message handed over again is confirmed again"
    );
}

/// Whether server `id`'s log says it leads now: it took over, and has not stepped down
/// since.
fn leads(cluster: &Cluster, id: usize) -> bool {
    let log = cluster.log(id);
    match (log.rfind("primary for epoch"), log.rfind("stepping down")) {
        (Some(up), down) => down.is_none_or(|d| d < up),
        (None, _) => false,
    }
}

/// The server that leads, once exactly one does.
fn the_primary(cluster: &Cluster) -> usize {
    let mut found = None;
    eventually("one primary", || {
        let leaders: Vec<usize> = (0..cluster.addrs.len())
            .filter(|&id| cluster.servers[id].is_some() && leads(cluster, id))
            .collect();
        found = (leaders.len() == 1).then(|| leaders[0]);
        found.is_some()
    });
    found.unwrap()
}

/// A backup serves its clients through the primary: it forwards their requests on its
/// link and relays the answers, sessions and pushed messages included. A confirm is
/// forwarded too and never answered (the clients expect no reply to it).
#[test]
fn a_backup_forwards_its_clients_requests_to_the_primary_and_relays_the_answers() {
    let cluster = Cluster::start(3, "forward");
    let primary = the_primary(&cluster);
    let backup = (primary + 1) % 3;
    // A backup answers 41 until it knows the primary; then it forwards.
    let mut b = Raw::connect(cluster.addrs[backup]);
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match b.ask(b"\x01ann").as_slice() {
            OK => break,
            b"\x41" => b = Raw::connect(cluster.addrs[backup]),
            other => panic!("server {backup} answered {other:02x?}"),
        }
        assert!(Instant::now() < deadline, "server {backup} never forwarded");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.ask(b"\x01bob"), OK);
    assert_eq!(b.ask(b"\x02ann"), b"\x21\x00\x00");
    // The session is the primary's: ann is in use there.
    let mut p = Raw::connect(cluster.addrs[primary]);
    assert_eq!(p.ask(b"\x02ann"), b"\x58");
    assert_eq!(p.ask(b"\x02bob"), b"\x21\x00\x00");
    // A message to ann, sent on the primary, is pushed to her through the backup.
    assert_eq!(p.ask(b"\x04bob|ann|1|through the backup"), OK);
    let pushed = b.recv();
    assert!(pushed.starts_with(b"\x30") && pushed.ends_with(b"|bob|through the backup"));
    // No answer to a confirm, and the connection stays open...
    let number = std::str::from_utf8(&pushed[1..])
        .unwrap()
        .split('|')
        .next()
        .unwrap()
        .to_owned();
    b.send(format!("\x08{number}").as_bytes());
    b.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    match b.reader.read_frame() {
        Err(FrameError::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(e) => panic!("server {backup}: {e}"),
        Ok(Some(frame)) => panic!("server {backup} answered a confirm with {frame:02x?}"),
        Ok(None) => panic!("server {backup} closed the connection on a confirm"),
    }
    b.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // ...so the next request's answer is its own; the confirm took effect.
    assert_eq!(b.ask(b"\x05ann"), OK);
    assert_eq!(b.ask(b"\x02ann"), b"\x21\x00\x00");
    // Quit: answered, then closed, and ann's session ends on the primary too.
    assert_eq!(b.ask(b"\x07"), OK);
    assert!(b.closed(), "a quit closes the connection");
    let mut again = Raw::connect(cluster.addrs[primary]);
    eventually("ann's session to end on the primary", || {
        let reply = again.ask(b"\x02ann");
        if reply == b"\x58" {
            return false;
        }
        assert_eq!(reply, b"\x21\x00\x00");
        true
    });
    assert!(
        cluster.log(primary).matches("primary for epoch").count() == 1,
        "{}",
        cluster.log(primary)
    );
}

#[test]
fn the_python_client_works_against_the_rust_cluster_and_fails_over() {
    let mut cluster = Cluster::start(3, "python");
    let servers = cluster.peers();
    let py = |args: &[&str]| {
        let mut all = vec!["--servers", servers.as_str()];
        all.extend_from_slice(args);
        run_python("messenger_client.py", &all)
    };
    py(&["register", "ann"]);
    py(&["register", "bob"]);
    py(&["send", "ann", "bob", "hello | world"]);
    py(&["send", "ann", "bob", "second"]);
    cluster.kill9(0);
    py(&["send", "ann", "bob", "after the primary died"]);
    let inbox = py(&["inbox", "bob"]);
    assert_eq!(
        inbox,
        "ann: hello | world\nann: second\nann: after the primary died\n"
    );
    assert_eq!(py(&["inbox", "bob"]), "");
    // The Rust client sees what the Python client registered.
    let mut c = cluster.client();
    assert_eq!(c.search("*").unwrap(), ["ann", "bob"]);
    let out = common::python(
        "messenger_client.py",
        &["--servers", &servers, "send", "ann", "nobody", "x"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("55"),
        "{out:?}"
    );
    // A hung primary (its kernel still accepts connections): the client, not logged in,
    // gives up on it after its reply timeout and finds the next one. (Server 0 again, with
    // both others up: with 0 dead and 1 hung, server 2 alone would not take over, as it
    // cannot tell a hung server from one cut off and still committing.)
    cluster.spawn(0);
    eventually("server 0 to lead again", || leads(&cluster, 0));
    cluster.signal(0, "-STOP");
    assert_eq!(py(&["search", "*"]), "ann\nbob\n");
}

#[test]
fn the_interactive_client_prints_incoming_messages_and_answers_commands() {
    let cluster = Cluster::start(1, "interactive");
    let mut other = cluster.client();
    other.register("bob").unwrap();
    other.login("bob").unwrap();
    let mut child = std::process::Command::new(CLIENT)
        .args(["--servers", &cluster.peers()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout: Arc<Mutex<String>> = Arc::default();
    let reader = {
        let (mut out, seen) = (child.stdout.take().unwrap(), Arc::clone(&stdout));
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut out, &mut buf) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    stdin
        .write_all(b"register ann\nlogin ann\nsearch *\nsend bob hi bob\nsend nobody x\n")
        .unwrap();
    let got = other.deliveries().recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!((got.from.as_str(), got.text.as_str()), ("ann", "hi bob"));
    other.send("ann", "hi ann").unwrap();
    eventually("the message to be printed", || {
        stdout.lock().unwrap().contains("bob: hi ann")
    });
    stdin.write_all(b"logout\nquit\n").unwrap();
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();
    let text = stdout.lock().unwrap().clone();
    for want in [
        "registered ann",
        "logged in as ann; 0 waiting message(s)",
        "ann bob",
        "sent",
        "error: refused: no such user (55)",
        "bob: hi ann",
        "logged out",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text}");
    }
}

#[test]
fn the_interactive_client_says_at_once_which_servers_refuse() {
    let down: Vec<String> = (0..2)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        })
        .collect();
    let mut cmd = std::process::Command::new(CLIENT);
    cmd.args(["--servers", &down.join(",")]);
    let run = common::run_with_input(cmd, b"login ann\n");
    assert!(run.status.success(), "{}", run.stderr);
    let first = run.stdout.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!(
            "servers: {} refused; {} refused; none is running, so commands will fail until one starts",
            down[0], down[1]
        )
    );
    let want = format!(
        "error: no server accepts connections (tried {}, {})",
        down[0], down[1]
    );
    assert!(run.stdout.contains(&want), "{}", run.stdout);
    // One second of refusals, then the end of input exits without trying again.
    assert!(run.took < Duration::from_secs(3), "{:?}", run.took);
}

#[test]
fn help_and_bad_arguments() {
    for bin in [SERVER, CLIENT, env!("CARGO_BIN_EXE_messenger-bench")] {
        let out = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin}");
        assert!(!out.stdout.is_empty());
    }
    let out = std::process::Command::new(SERVER)
        .args([
            "--id",
            "3",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
            "--data-dir",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--id 3 is out of range: --peers names 3 servers, ids 0 to 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(SERVER)
        .args(["--id", "0", "--peers", "nonsense", "--data-dir", "/tmp/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonsense"));
}

/// A cluster secret file (mode 0600) for test `name`, removed when dropped.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new(name: &str) -> SecretFile {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!(
            "switchboard-messenger-secret-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, b"a messenger cluster secret, 0123456789").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        SecretFile(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sends `text` from `from` to `to` (each logged in by a fresh client), and checks that it
/// is acknowledged by server `by` and handed to `to`.
fn send_and_deliver(cluster: &Cluster, from: &str, to: &str, text: &str, by: usize) {
    let mut c = cluster.client();
    c.login(from).unwrap();
    c.send(to, text).unwrap();
    assert_eq!(c.server(), Some(by), "{}", cluster.log(by));
    let mut r = cluster.client();
    r.login(to).unwrap();
    // An earlier message whose confirmation a dropped client never sent may come again.
    let got: Vec<String> = r.deliveries().try_iter().map(|d| d.text).collect();
    assert!(got.iter().any(|t| t == text), "{got:?}");
}

#[test]
fn with_a_secret_the_cluster_replicates_and_fails_over() {
    let secret = SecretFile::new("works");
    let mut cluster = Cluster::start_with(3, "secret-works", &["--secret-file", secret.arg()]);
    let mut setup = cluster.client();
    setup.register("ann").unwrap();
    setup.register("bob").unwrap();
    assert_eq!(setup.server(), Some(0));
    send_and_deliver(&cluster, "ann", "bob", "with a secret", 0);
    // Both backups are linked (their heartbeats came through the handshake).
    eventually("the backups to hear from server 0", || {
        cluster.log(1).contains("server 0 is up") && cluster.log(2).contains("server 0 is up")
    });
    for id in 0..3 {
        let log = cluster.log(id);
        assert!(!log.contains("no --secret-file"), "{log}");
        assert!(!log.contains("not authenticated"), "{log}");
        assert!(!log.contains("link: refused"), "{log}");
    }
    cluster.kill9(0);
    eventually("server 1 to lead", || {
        cluster.log(1).contains("primary for epoch")
    });
    send_and_deliver(&cluster, "bob", "ann", "after the failover", 1);
    // What server 0 acknowledged was replicated: bob's earlier message is still delivered
    // once (it was handed over already), and the accounts are there.
    let mut c = cluster.client();
    assert_eq!(c.search("*").unwrap(), ["ann", "bob"]);
}

/// HELLO from `from` of `cluster`'s `--peers`, as a replication dialer sends it.
fn forged_hello(cluster: &Cluster, from: usize) -> Vec<u8> {
    switchboard::messenger::replica_protocol::ReplicaMsg::Hello {
        from,
        cluster: cluster.peers(),
    }
    .encode()
}

/// A stranger without the secret: HELLO claiming `from`, then `then` (the frame an
/// attacker would send next). The server must close without a WELCOME.
fn forge(cluster: &Cluster, to: usize, from: usize, then: &[u8]) {
    let mut raw = Raw::connect(cluster.addrs[to]);
    raw.send(&forged_hello(cluster, from));
    raw.send(then);
    match raw.reader.read_frame() {
        Ok(None) => {}
        Err(e) => assert!(!e.is_timeout(), "server {to} kept a forged link open"),
        Ok(Some(f)) => panic!("server {to} answered a forged HELLO with {f:?}"),
    }
}

#[test]
fn forged_hellos_without_the_secret_are_refused_and_change_nothing() {
    let secret = SecretFile::new("forged");
    let mut cluster = Cluster::start_with(3, "secret-forged", &["--secret-file", secret.arg()]);
    let mut setup = cluster.client();
    setup.register("ann").unwrap();
    setup.register("bob").unwrap();
    assert_eq!(setup.server(), Some(0));
    send_and_deliver(&cluster, "ann", "bob", "before", 0);
    let heartbeat = {
        use switchboard::messenger::replica_protocol::{ReplicaMsg, Role, Standing, Status};
        ReplicaMsg::Heartbeat(Status {
            role: Role::Primary,
            epoch: u64::MAX - 5,
            last: Default::default(),
            in_sync: true,
            you: Standing::Excluded,
            mark: 1,
            echo: 0,
            primary: Some(0),
        })
        .encode()
    };
    // A HELLO then the next frame a dialer without the secret would send; and a HELLO
    // then a handshake challenge whose proof never comes right.
    let challenge = b"auth1 000102030405060708090a0b0c0d0e0f";
    for (to, from) in [(1, 0), (0, 1), (0, 2), (2, 0)] {
        forge(&cluster, to, from, &heartbeat);
        let mut raw = Raw::connect(cluster.addrs[to]);
        raw.send(&forged_hello(&cluster, from));
        raw.send(challenge);
        let answer = raw.recv();
        assert!(answer.starts_with(b"auth2 "), "{answer:?}");
        raw.send(b"auth3 0001020304050607");
        assert!(raw.ended_by_server(), "server {to} kept a forged link open");
    }
    for to in 0..3 {
        // Logged before the close; the log reaches the test through a pipe.
        eventually(&format!("server {to} to log the refusals"), || {
            cluster.log(to).matches("link: refused").count() >= if to == 0 { 4 } else { 2 }
        });
    }
    // Nothing changed: server 0 still leads its first epoch, nobody else took over, and
    // sends are acknowledged and delivered.
    assert!(leads(&cluster, 0));
    for id in 1..3 {
        assert!(
            !cluster.log(id).contains("primary for epoch"),
            "{}",
            cluster.log(id)
        );
    }
    assert_eq!(cluster.log(0).matches("primary for epoch").count(), 1);
    send_and_deliver(&cluster, "ann", "bob", "after", 0);
    // The real backups' links were never replaced: when the primary dies, one takes over.
    cluster.kill9(0);
    eventually("server 1 to lead", || {
        cluster.log(1).contains("primary for epoch")
    });
    send_and_deliver(&cluster, "bob", "ann", "after the failover", 1);
    let mut c = cluster.client();
    assert_eq!(c.search("*").unwrap(), ["ann", "bob"]);
}

#[test]
fn without_a_secret_a_cluster_off_loopback_refuses_to_start_and_on_loopback_warns() {
    let out = std::process::Command::new(SERVER)
        .args([
            "--id",
            "0",
            "--peers",
            "127.0.0.1:1,192.0.2.1:2",
            "--data-dir",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("192.0.2.1:2 is not a loopback address") && err.contains("--secret-file"),
        "{err}"
    );
    let cluster = Cluster::start(1, "secret-warning");
    let log = cluster.log(0);
    assert_eq!(log.matches("no --secret-file").count(), 1, "{log}");
}

// Partitions (issue 22): real processes whose replication links (and clients) pass through
// fault proxies that stop forwarding without closing anything, as a cut network does.

/// Checks issue 22's rules on what was acknowledged and delivered: no message number
/// names two messages, nothing is delivered twice, and every acknowledged send is
/// delivered unless `excused` (acknowledged by a primary that lost a split, in its
/// window). A message of `abandoned` (the epoch of the primary that lost a split) may
/// also have reached its recipient from the winning side: a send whose acknowledgement
/// the cut held back, resent there (the documented split window). Returns how many
/// acknowledged sends were lost (all excused).
fn check_deliveries(
    acked: &[Acked],
    delivered: &[Delivery],
    excused: impl Fn(&Acked) -> bool,
    abandoned: Option<u64>,
    logs: &str,
) -> usize {
    let mut by_number: HashMap<_, &str> = HashMap::new();
    let mut copies: HashMap<&str, Vec<u64>> = HashMap::new();
    for d in delivered {
        let text = by_number.entry(d.id).or_insert(&d.text);
        assert_eq!(*text, d.text, "number {} names two messages\n{logs}", d.id);
        copies.entry(d.text.as_str()).or_default().push(d.id.epoch);
    }
    for (text, epochs) in &copies {
        let split = epochs.len() == 2
            && abandoned.is_some_and(|e| epochs.contains(&e) && epochs.iter().any(|&x| x > e));
        assert!(
            epochs.len() == 1 || split,
            "{text} delivered {} times (epochs {epochs:?})\n{logs}",
            epochs.len()
        );
    }
    let count = copies;
    let mut lost = 0;
    for a in acked {
        if !count.contains_key(a.text.as_str()) {
            assert!(
                excused(a),
                "{} (acknowledged by {:?}) was never delivered\n{logs}",
                a.text,
                a.by
            );
            lost += 1;
        }
    }
    lost
}

/// The servers that lead, sampled every 10 ms for `d` (calling `each` with the time since
/// the start at every sample): the time from the start until the sample after which the
/// leaders never changed again, and who they are at the end.
fn settle(
    cluster: &Cluster,
    d: Duration,
    mut each: impl FnMut(Duration),
) -> (Duration, Vec<usize>) {
    let start = Instant::now();
    let mut samples: Vec<(Duration, Vec<usize>)> = Vec::new();
    while start.elapsed() < d {
        let at = start.elapsed();
        let leaders = (0..cluster.addrs.len())
            .filter(|&id| leads(cluster, id))
            .collect();
        samples.push((at, leaders));
        each(at);
        thread::sleep(Duration::from_millis(10));
    }
    let last = samples.last().unwrap().1.clone();
    let stable_from = samples
        .iter()
        .rposition(|(_, l)| *l != last)
        .map_or(Duration::ZERO, |i| samples[i + 1].0);
    (stable_from, last)
}

/// Row 1 of issue 22: the primary cut off from both backups for a few seconds while
/// clients reach every server (half of them, those on the far side, lose server 0 with
/// it). Two primaries during the cut; at the heal one again, and nothing lost but what
/// server 0 acknowledged alone between the cut and its stepping down.
#[test]
fn partition_of_the_primary_loses_only_what_it_acknowledged_alone_and_heals() {
    let cluster = Cluster::start_proxied(3, "partition-split");
    assert_eq!(the_primary(&cluster), 0);
    // Even senders and odd receivers dial the servers directly; the others come in through
    // the front proxies, and server 0's is cut with its links.
    let way_in = |direct: bool| {
        if direct {
            cluster.client()
        } else {
            cluster.front_client()
        }
    };
    let load = Load::start(4, |i| way_in(i % 2 == 0), |i| way_in(i % 2 == 1));
    load.more(100);
    let log = cluster.log(0);
    let at = log.rfind("primary for epoch ").unwrap() + "primary for epoch ".len();
    let abandoned: u64 = log[at..].split(' ').next().unwrap().parse().unwrap();
    let cut = Instant::now();
    cluster.cut_link(0, 1, true);
    cluster.cut_link(0, 2, true);
    cluster.front[0].cut();
    eventually("server 1 to lead too", || leads(&cluster, 1));
    load.more(50);
    thread::sleep(Duration::from_millis(1500));
    let before_heal = load.acks();
    let heal = Instant::now();
    cluster.cut_link(0, 1, false);
    cluster.cut_link(0, 2, false);
    cluster.front[0].heal();
    // Server 0 steps down once it hears of the newer epoch; the first sample that shows
    // it bounds when (acknowledgements it gave until then may be lost).
    let mut stepped_down = None;
    let (one_primary, leaders) = settle(&cluster, Duration::from_secs(4), |_| {
        if stepped_down.is_none() {
            let log = cluster.log(0);
            // A loaded machine may stall server 0 after the heal; it then steps down
            // for that before it hears of the newer epoch, which ends its window too.
            let down = log.rfind("stepping down").is_some_and(|d| {
                log[d..].contains("newer than mine")
                    || log[d..].contains("leads epoch")
                    || log[d..].contains("this server stalled")
            });
            stepped_down = down.then(Instant::now);
        }
    });
    assert!(
        stepped_down.is_some(),
        "server 0 never stepped down\n{}",
        cluster.logs()
    );
    assert_eq!(leaders.len(), 1, "{}", cluster.logs());
    // A generous bound (the figure is measured and reported; a loaded machine stalls
    // processes for a second at times).
    assert!(
        one_primary < Duration::from_secs(4),
        "{one_primary:?}\n{}",
        cluster.logs()
    );
    load.more(50);
    let (acked, delivered) = load.finish();
    let window = |a: &Acked| a.by == Some(0) && a.at > cut && a.at <= stepped_down.unwrap();
    let lost = check_deliveries(&acked, &delivered, window, Some(abandoned), &cluster.logs());
    let alone = acked.iter().filter(|a| window(a)).count();
    let after_heal = acked.iter().filter(|a| window(a) && a.at > heal).count();
    eprintln!(
        "partition: {} acknowledged ({before_heal} before the heal), {alone} by server 0 alone \
         during the cut and before it stepped down ({after_heal} of them after the heal), all \
         gone from the cluster's state; {} of those never reached their recipient (the others \
         were pushed live to recipients still connected to server 0); one primary {one_primary:?} \
         after the heal (server 0 stepped down after {:?})",
        acked.len(),
        lost,
        stepped_down.unwrap() - heal
    );
}

/// Row 2 of issue 22: only the link between servers 0 and 1 is cut, server 2 reaches
/// both. Server 1 must not take over (server 2 still follows server 0): at most three
/// changes of primary, nothing acknowledged lost.
#[test]
fn partition_of_one_link_does_not_flap_and_loses_nothing() {
    let cluster = Cluster::start_proxied(3, "partition-link");
    assert_eq!(the_primary(&cluster), 0);
    let load = Load::start(3, |_| cluster.client(), |_| cluster.client());
    load.more(100);
    let takeovers = || -> usize {
        (0..3)
            .map(|i| cluster.log(i).matches("primary for epoch").count())
            .sum()
    };
    let before = takeovers();
    cluster.cut_link(0, 1, true);
    thread::sleep(Duration::from_millis(2500));
    load.more(50);
    cluster.cut_link(0, 1, false);
    thread::sleep(Duration::from_millis(1000));
    load.more(50);
    let changes = takeovers() - before;
    let (acked, delivered) = load.finish();
    check_deliveries(&acked, &delivered, |_| false, None, &cluster.logs());
    assert!(
        changes <= 3 || stalled(&cluster),
        "{changes} changes of primary\n{}",
        cluster.logs()
    );
    eprintln!(
        "one cut link: {} acknowledged, {changes} changes of primary",
        acked.len()
    );
}

/// A backup cut off alone (server 2 from 0 and 1), clients on 0 and 1: it must not take
/// over. Alone in a newer epoch, its log would outrank, at the heal, everything 0 and 1
/// committed during the cut, and all of it would be lost. Nothing acknowledged is lost,
/// and server 2 never leads.
#[test]
fn partition_of_a_backup_alone_changes_no_primary_and_loses_nothing() {
    let cluster = Cluster::start_proxied(3, "partition-alone");
    assert_eq!(the_primary(&cluster), 0);
    let load = Load::start(3, |_| cluster.client(), |_| cluster.client());
    load.more(100);
    cluster.cut_link(2, 0, true);
    cluster.cut_link(2, 1, true);
    thread::sleep(Duration::from_millis(2500));
    load.more(50);
    cluster.cut_link(2, 0, false);
    cluster.cut_link(2, 1, false);
    thread::sleep(Duration::from_millis(1000));
    load.more(50);
    let (acked, delivered) = load.finish();
    check_deliveries(&acked, &delivered, |_| false, None, &cluster.logs());
    assert!(
        !cluster.log(2).contains("primary for epoch") || stalled(&cluster),
        "server 2 took over alone\n{}",
        cluster.logs()
    );
}

/// Row 3 of issue 22: clients cannot reach the primary, the servers still hear each
/// other: a backup forwards their requests, and sends go on being acknowledged.
#[test]
fn partition_of_the_clients_from_the_primary_is_served_through_a_backup() {
    let cluster = Cluster::start_proxied(3, "partition-clients");
    assert_eq!(the_primary(&cluster), 0);
    let load = Load::start(3, |_| cluster.front_client(), |_| cluster.front_client());
    load.more(100);
    cluster.front[0].cut();
    let cut = Instant::now();
    // Each client gives up on server 0 after its reply timeout, then is served by a backup.
    load.more(100);
    let during = load
        .acked
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.at > cut)
        .filter(|a| a.by.is_some_and(|b| b != 0))
        .count();
    cluster.front[0].heal();
    load.more(20);
    let (acked, delivered) = load.finish();
    check_deliveries(&acked, &delivered, |_| false, None, &cluster.logs());
    // A reply already past the proxy when it was cut is recorded just after `cut`: at most
    // one per client (three) may still name server 0.
    assert!(during >= 97, "{during}");
    if !stalled(&cluster) {
        assert!(leads(&cluster, 0), "{}", cluster.logs());
        assert_eq!(
            cluster.log(0).matches("primary for epoch").count(),
            1,
            "{}",
            cluster.logs()
        );
    }
}

// Issue 15's attacks on the replication port, replayed by a test client that speaks the
// peer protocol, and a seeded random-byte fuzz of it.

/// A replication link forged by the test: HELLO as server `from` to server `to`; `Some`
/// once the server answers WELCOME (it closes, unanswered, if it refuses).
fn forged_link(cluster: &Cluster, to: usize, from: usize) -> Option<Raw> {
    let mut raw = Raw::connect(cluster.addrs[to]);
    raw.send(&forged_hello(cluster, from));
    match raw.reader.read_frame() {
        Ok(Some(b"w")) => Some(raw),
        Ok(Some(other)) => panic!("server {to} answered a HELLO with {other:02x?}"),
        Ok(None) => None,
        Err(e) => {
            assert!(!e.is_timeout(), "server {to} left a HELLO unanswered");
            None
        }
    }
}

/// What every test below checks after its attack: nobody exited, server 0 still leads its
/// first epoch and nobody else took over, the accounts are all there, and a send goes
/// through to its recipient.
fn unharmed(cluster: &mut Cluster, accounts: &[&str]) {
    for id in 0..3 {
        if let Some(server) = cluster.servers[id].as_mut() {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "server {id} exited\n{}",
                cluster.log(id)
            );
        }
    }
    // Unless the machine starved a server past the stall bound (its own rule then makes it
    // step down and re-learn its peers, whatever the attack did), the primary never changed.
    if !stalled(cluster) {
        assert!(leads(cluster, 0), "{}", cluster.logs());
        assert_eq!(
            cluster.log(0).matches("primary for epoch").count(),
            1,
            "{}",
            cluster.logs()
        );
    }
    let mut c = cluster.client();
    assert_eq!(c.search("*").unwrap(), accounts);
    send_and_deliver(cluster, "ann", "bob", "still here", 0);
}

/// Whether a server logged that it was stalled (starved past 300 ms by a loaded machine):
/// the timing the failure detector rests on was broken (a link silent that long counts as
/// dead), and changes of primary follow.
fn stalled(cluster: &Cluster) -> bool {
    (0..cluster.addrs.len()).any(|i| cluster.log(i).contains("stalled for"))
}

/// The resident set of server `id`, in KiB.
fn rss_of(cluster: &Cluster, id: usize) -> u64 {
    let pid = cluster.servers[id].as_ref().unwrap().child.id();
    switchboard::bench::process_rss_kib(pid).unwrap()
}

/// Issue 15, messenger: a HELLO as a live server replaces nothing (it waits, then is
/// refused), so the forged empty snapshot behind it is never read; and a link that does get
/// in (as a server that is down) can neither wipe the state with a snapshot, nor speak for
/// an epoch it does not lead, nor make a server buffer a huge frame.
#[test]
fn forged_hello_and_snapshot_frames_change_nothing() {
    use switchboard::messenger::log::Pos;
    use switchboard::messenger::replica_protocol::{ReplicaMsg, Role, Standing, Status};
    let mut cluster = Cluster::start(3, "attack-forged");
    let mut setup = cluster.client();
    let accounts: Vec<String> = (0..30).map(|i| format!("user{i:02}")).collect();
    for name in ["ann", "bob"]
        .iter()
        .copied()
        .chain(accounts.iter().map(String::as_str))
    {
        setup.register(name).unwrap();
    }
    let mut all: Vec<&str> = accounts.iter().map(String::as_str).collect();
    all.extend(["ann", "bob"]);
    all.sort_unstable();
    assert_eq!(the_primary(&cluster), 0);
    eventually("every link up", || {
        (1..3).all(|i| cluster.log(i).contains("server 0 is up"))
            && cluster.log(2).contains("server 1 is up")
    });
    // The attack of the issue: HELLO from=0 to servers 1 and 2, a heartbeat, an empty
    // snapshot at an epoch near 2^64. Server 0's link is alive: refused.
    let empty = {
        let mut bytes = Vec::new();
        let state = switchboard::messenger::state::State::new();
        bytes.extend(switchboard::messenger::log::encode_snapshot(
            Pos::default(),
            &state,
        ));
        bytes
    };
    let snapshot = |epoch: u64, pos: Pos| {
        ReplicaMsg::Snapshot {
            epoch,
            pos,
            total: empty.len() as u64,
            offset: 0,
            bytes: empty.clone(),
            fetched: false,
        }
        .encode()
    };
    for to in [1, 2] {
        let started = Instant::now();
        // (A link silent for 500 ms is dead by the rules: on a starved machine server 0's
        // link may have been, and the server says so.)
        let refused = forged_link(&cluster, to, 0).is_none();
        let excused = || {
            thread::sleep(Duration::from_millis(200));
            stalled(&cluster) || cluster.log(to).contains("server 0 is down")
        };
        assert!(refused || excused(), "server {to} let a live id in");
        assert!(started.elapsed() >= Duration::from_millis(500) || !refused);
    }
    // Forged HELLOs from=1 and from=2 to the primary: refused too.
    for from in [1, 2] {
        let refused = forged_link(&cluster, 0, from).is_none();
        thread::sleep(Duration::from_millis(if refused { 0 } else { 200 }));
        let silent = cluster.log(0).contains(&format!("server {from} is down"));
        assert!(
            refused || silent || stalled(&cluster),
            "server 0 let {from} in"
        );
    }
    for id in 0..3 {
        eventually("the refusals logged", || {
            let log = cluster.log(id);
            log.contains("refused a second link") || log.contains("is down") || stalled(&cluster)
        });
    }
    // Server 2 dies: its id is free, and a forger takes it. Each frame below is refused,
    // and closes the link when it speaks for an epoch the sender does not lead.
    cluster.kill9(2);
    eventually("server 2 down", || {
        cluster.log(1).contains("server 2 is down")
    });
    let huge = u64::MAX - 5;
    let mut attempts: Vec<(&str, Vec<u8>)> = vec![
        (
            "snapshot at an epoch past the limit",
            snapshot(huge - huge % 3 + 2, Pos::default()),
        ),
        (
            "snapshot from an epoch it does not lead",
            snapshot(4, Pos::default()),
        ),
        (
            "a snapshot not at its sender's epoch",
            snapshot(5, Pos { epoch: 3, seq: 1 }),
        ),
    ];
    attempts.push((
        "a heartbeat as primary of server 0's epoch",
        ReplicaMsg::Heartbeat(Status {
            role: Role::Primary,
            epoch: 3,
            last: Pos {
                epoch: 3,
                seq: 1 << 40,
            },
            in_sync: true,
            you: Standing::Excluded,
            mark: u64::MAX,
            echo: 0,
            primary: Some(0),
        })
        .encode(),
    ));
    for (what, frame) in &attempts {
        for to in [0, 1] {
            let mut link = forged_link(&cluster, to, 2).unwrap_or_else(|| {
                panic!(
                    "server {to} refused a HELLO for a dead id\n{}",
                    cluster.logs()
                )
            });
            link.send(frame);
            // The forger's frames are taken or refused before the link closes; wait for the
            // server's verdict by closing our end and reading to its.
            link.stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert!(link.closed(), "{what}");
        }
    }
    // A frame far over the limit (a 600 MiB header, then 32 MiB of it) is skipped as it
    // arrives, never buffered.
    let before = rss_of(&cluster, 1);
    let mut link = forged_link(&cluster, 1, 2).unwrap();
    link.stream
        .write_all(&(600u32 << 20).to_be_bytes())
        .unwrap();
    let chunk = vec![b's'; 1 << 20];
    for _ in 0..32 {
        if link.stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let grown = rss_of(&cluster, 1).saturating_sub(before);
    drop(link);
    eprintln!("big frame: server 1 grew {grown} KiB");
    assert!(
        rss_of(&cluster, 1) < 64 << 10,
        "{} KiB",
        rss_of(&cluster, 1)
    );
    cluster.spawn(2);
    eventually("server 2 back", || {
        cluster.log(2).contains("holds every committed change")
    });
    unharmed(&mut cluster, &all);
    let log = cluster.logs();
    for want in [
        "above the limit",
        "a snapshot for an epoch it does not lead",
        "a snapshot not at its sender's epoch",
        "primary of an epoch it does not lead",
    ] {
        assert!(log.contains(want), "{want:?} not logged\n{log}");
    }
}

/// Seeded random bytes at the replication port of every server of a cluster with a
/// secret, half of the connections after a plausible HELLO (as server 2, which is down, so
/// its id is free): nobody exits, nothing changes, every member stays under 64 MiB.
/// (Without a secret any local process may join as a member, by design: random frames
/// that decode, such as a REJECT naming a later epoch, then do what a member's would.)
fn fuzz_replication(duration: Duration, seed: u64) {
    let secret = SecretFile::new(&format!("fuzz-{seed}"));
    let mut cluster =
        Cluster::start_with(3, &format!("fuzz-{seed}"), &["--secret-file", secret.arg()]);
    let mut setup = cluster.client();
    for name in ["ann", "bob"] {
        setup.register(name).unwrap();
    }
    assert_eq!(the_primary(&cluster), 0);
    cluster.kill9(2);
    eventually("server 2 down", || {
        cluster.log(0).contains("server 2 is down")
    });
    let mut rng = switchboard::bench::Rng::new(seed);
    let started = Instant::now();
    let (mut connections, mut peak) = (0, 0);
    while started.elapsed() < duration {
        let to = rng.below(2) as usize;
        let mut raw = Raw::connect(cluster.addrs[to]);
        if rng.below(2) == 0 {
            raw.send(&forged_hello(&cluster, 2));
        }
        let len = rng.below(4096) as usize;
        let _ = raw.stream.write_all(&rng.bytes(len));
        // Now and then a well-framed random frame, which gets past the framing.
        let len = rng.below(64) as usize;
        let payload = rng.bytes(len);
        let mut frame = Vec::new();
        encode_frame(Framing::U32, &payload, &mut frame).unwrap();
        let _ = raw.stream.write_all(&frame);
        connections += 1;
        if connections % 50 == 0 {
            peak = peak.max(rss_of(&cluster, 0)).max(rss_of(&cluster, 1));
        }
    }
    peak = peak.max(rss_of(&cluster, 0)).max(rss_of(&cluster, 1));
    eprintln!(
        "fuzz (seed {seed}): {connections} connections in {:?}, peak RSS {peak} KiB",
        started.elapsed()
    );
    assert!(peak < 64 << 10, "{peak} KiB");
    cluster.spawn(2);
    eventually("server 2 back", || {
        cluster.log(2).contains("holds every committed change")
    });
    unharmed(&mut cluster, &["ann", "bob"]);
}

#[test]
fn fuzz_of_the_replication_port_changes_nothing() {
    fuzz_replication(Duration::from_secs(3), 15);
}

/// The same for 60 s: `cargo test --test messenger fuzz -- --ignored --nocapture`.
#[test]
#[ignore]
fn fuzz_of_the_replication_port_for_a_minute_changes_nothing() {
    fuzz_replication(Duration::from_secs(60), 22);
}

/// Clients on both backups that send as fast as they can and never read cost their own
/// connections, not the replication links: a backup forwards requests onto its link to
/// the primary only while the link keeps up, so no link is closed for being behind, the
/// primary keeps its backups and stays the primary, and another client is served
/// meanwhile. Each flooder is cut off by the server, by whichever bound it meets first:
/// its backup's link behind (logged), or the primary's cap on answers waiting for commit.
/// (Before, a backup queued every request it read on its link, and the link closed once
/// 4,096 batches waited, taking the backup's acknowledgements with it: in 2 of 2 runs.)
#[test]
fn flooding_clients_on_the_backups_shed_their_own_connections_not_the_links() {
    let cluster = Cluster::start(3, "flood");
    let primary = the_primary(&cluster);
    let mut ann = cluster.client();
    for name in ["ann", "bob", "carol", "dan"] {
        ann.register(name).unwrap();
    }
    let flooders: Vec<_> = (0..3)
        .filter(|&i| i != primary)
        .zip(["bob", "dan"])
        .map(|(i, user)| {
            let addr = cluster.addrs[i];
            let send = move |n| format!("\x04{user}|carol|{n}|x").into_bytes();
            thread::spawn(move || flood(addr, format!("\x02{user}").as_bytes(), send))
        })
        .collect();
    for i in 0..5 {
        let all = ["ann", "bob", "carol", "dan"];
        assert_eq!(ann.search("*").unwrap(), all, "search {i}");
        thread::sleep(Duration::from_millis(200));
    }
    let cut: Vec<_> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    // The outbox's own words ("N frames behind; closing"), not a client shed for a link
    // that is behind ("the link to server N is behind; closing its client connection").
    let link_closed = |l: &str| {
        l.contains("the link to server")
            && (l.contains("frames behind; closing") || l.contains("bytes behind; closing"))
    };
    served_after_flood(&mut ann, &cut, || cluster.logs(), link_closed);
    let logs = cluster.logs();
    assert!(!logs.contains("dropping the link"), "{logs}");
    assert!(leads(&cluster, primary), "{logs}");
    assert_eq!(logs.matches("primary for epoch").count(), 1, "{logs}");
}
