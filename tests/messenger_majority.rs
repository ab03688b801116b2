//! `messenger-server --quorum majority` as real processes: the same clients (Rust and
//! Python) against three servers on Raft; `kill -9` of the leader under send load loses
//! no acknowledged send; a full split with the leader in the minority (fault proxies on
//! every peer link) acknowledges nothing on the minority side while the majority goes on,
//! and after the heal nothing acknowledged is lost and no number names two messages; a
//! leader frozen with SIGSTOP wakes acknowledging nothing it did not commit; every
//! server restarting from its data directory keeps accounts and undelivered messages;
//! clients flooding the followers cost their own connections, never a Raft link.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/messenger_load.rs"]
mod messenger_load;

use cluster::{Cluster, Proxies};
use common::{eventually, run_python, IO_TIMEOUT};
use messenger_load::{flood, launch, served_after_flood, Acked, Load, Raw};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};
use switchboard::framing::{encode_frame, Framing};
use switchboard::messenger::bench::claimant_of_newest_epoch;
use switchboard::messenger::protocol::{Delivery, MessageId};
use switchboard::messenger::Client;
use switchboard::proxy::FaultProxy;

const SERVER: &str = env!("CARGO_BIN_EXE_messenger-server");
const N: usize = 3;

/// Three majority-mode servers; with `proxied`, server `i` dials server `j` through a
/// proxy of its own (`--dial`), so a split is real sockets that stop passing bytes.
trait Majority {
    fn start(name: &str, proxied: bool) -> Cluster {
        Cluster::start_with(name, proxied, &[])
    }

    fn start_with(name: &str, proxied: bool, extra: &[&str]) -> Cluster {
        let extra = [&["--quorum", "majority"], extra].concat();
        let launch = launch(SERVER, "messenger-majority", &extra);
        Cluster::launch(N, name, Proxies::links_if(proxied), launch)
    }

    fn client(&self) -> Client;

    /// The server that leads (its log says it claimed the newest epoch of any log and
    /// has not stepped down since: followers answer too, by forwarding, and so does a
    /// former leader that has not noticed yet) and answers a search (a cut-off leader
    /// holds the answer, as it cannot commit).
    fn serving(&self) -> Option<usize>;

    fn leader(&self) -> usize;
}

impl Majority for Cluster {
    fn client(&self) -> Client {
        Client::new(self.addrs.clone())
    }

    fn serving(&self) -> Option<usize> {
        let logs: Vec<String> = (0..N).map(|i| self.log(i)).collect();
        let i = claimant_of_newest_epoch(&logs, |i| self.servers[i].is_some())?;
        Raw::try_connect(self.addrs[i], Duration::from_millis(500))
            .and_then(|mut r| r.try_ask(b"\x03probe"))
            .is_some_and(|reply| reply.first() == Some(&0x22))
            .then_some(i)
    }

    fn leader(&self) -> usize {
        let mut found = None;
        eventually("a server to serve", || {
            found = self.serving();
            found.is_some()
        });
        found.unwrap()
    }
}

/// Every acknowledged send delivered exactly once, no number naming two messages, no
/// message delivered twice; returns the numbers seen.
fn exactly_once(acked: &[Acked], delivered: &[Delivery], logs: &str) -> Vec<MessageId> {
    let mut by_number: HashMap<MessageId, &str> = HashMap::new();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for d in delivered {
        let text = by_number.entry(d.id).or_insert(&d.text);
        assert_eq!(*text, d.text, "number {} names two messages\n{logs}", d.id);
        *copies.entry(d.text.as_str()).or_default() += 1;
    }
    for (text, n) in &copies {
        assert_eq!(*n, 1, "{text} delivered {n} times\n{logs}");
    }
    for a in acked {
        assert!(
            copies.contains_key(a.text.as_str()),
            "{} (acknowledged by {:?}) was never delivered\n{logs}",
            a.text,
            a.by
        );
    }
    by_number.into_keys().collect()
}

#[test]
fn clients_register_send_and_receive_and_followers_forward_to_the_leader() {
    let cluster = Cluster::start("basic", false);
    let mut ann = cluster.client();
    ann.register("ann").unwrap();
    ann.register("bob").unwrap();
    let leader = cluster.leader();
    // A follower forwards to the leader and relays its answer.
    let follower = (leader + 1) % N;
    let mut raw = Raw::try_connect(cluster.addrs[follower], IO_TIMEOUT).unwrap();
    assert_eq!(raw.try_ask(b"\x03*"), Some(b"\x22\x00\x02ann|bob".to_vec()));
    let mut bob = cluster.client();
    assert_eq!(bob.login("bob").unwrap(), 0);
    ann.login("ann").unwrap();
    ann.send("bob", "hi bob").unwrap();
    let got = bob.deliveries().recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!((got.from.as_str(), got.text.as_str()), ("ann", "hi bob"));
    assert_eq!(bob.search("*").unwrap(), ["ann", "bob"]);
}

/// `--max-accounts` and `--max-waiting` in majority mode: the leader refuses a register
/// past the first with `5a` before proposing anything, and the next leader, holding the
/// same accounts, does too; it refuses a send past the second.
#[test]
fn a_register_past_max_accounts_is_refused_by_every_leader() {
    let mut cluster = Cluster::start_with(
        "maxaccounts",
        false,
        &["--max-accounts", "2", "--max-waiting", "1"],
    );
    let full = Err(switchboard::messenger::ClientError::Refused(
        switchboard::messenger::protocol::Violation::Full,
    ));
    let mut c = cluster.client();
    c.register("ann").unwrap();
    c.register("bob").unwrap();
    assert_eq!(c.register("cat"), full);
    let leader = cluster.leader();
    cluster.kill9(leader);
    assert_eq!(c.register("cat"), full);
    assert_ne!(c.server(), Some(leader));
    assert_eq!(c.search("*").unwrap(), ["ann", "bob"]);
    c.login("ann").unwrap();
    c.delete().unwrap();
    c.register("cat").unwrap();
    assert_eq!(c.search("*").unwrap(), ["bob", "cat"]);
    c.login("cat").unwrap();
    c.send("bob", "waits").unwrap();
    assert_eq!(c.send("bob", "no room"), full);
}

#[test]
fn kill_9_of_the_leader_under_send_load_loses_no_acknowledged_send() {
    let mut cluster = Cluster::start("kill", false);
    let load = Load::start(4, |_| cluster.client(), |_| cluster.client());
    load.more(100);
    let leader = cluster.leader();
    cluster.kill9(leader);
    let killed = Instant::now();
    load.more(100);
    let next = cluster.leader();
    assert_ne!(next, leader);
    let (acked, delivered) = load.finish();
    exactly_once(&acked, &delivered, &cluster.logs());
    // Acknowledged after the kill (by the next leader, or a follower forwarding to it).
    assert!(
        acked.iter().any(|a| a.at > killed && a.by != Some(leader)),
        "{}",
        cluster.logs()
    );
}

#[test]
fn a_split_with_the_leader_in_the_minority_acknowledges_nothing_there_and_loses_nothing() {
    let cluster = Cluster::start("split", true);
    cluster.client().register("lone").unwrap();
    let load = Load::start(3, |_| cluster.client(), |_| cluster.client());
    load.more(50);
    let old = cluster.leader();
    // A client of the old leader, logged in before the cut.
    let mut alone = Raw::try_connect(cluster.addrs[old], Duration::from_millis(1500)).unwrap();
    assert_eq!(alone.try_ask(b"\x02lone"), Some(vec![0x21, 0, 0]));
    cluster.isolate(old, true);
    // The cut-off leader acknowledges nothing: its answer never comes (it steps down
    // within an election timeout and closes its clients).
    assert_eq!(alone.try_ask(b"\x04lone|r0|424242|from the minority"), None);
    // The majority elects a leader of its own and goes on.
    let mut new = None;
    eventually("the majority to elect", || {
        new = cluster.serving().filter(|&i| i != old);
        new.is_some()
    });
    load.more(50);
    let during = load.acks();
    thread::sleep(Duration::from_millis(300));
    cluster.isolate(old, false);
    load.more(50);
    let (acked, delivered) = load.finish();
    let logs = cluster.logs();
    exactly_once(&acked, &delivered, &logs);
    assert!(
        !delivered.iter().any(|d| d.text == "from the minority"),
        "{logs}"
    );
    assert!(acked.len() > during, "{logs}");
    assert!(
        logs.contains(&format!("messenger-{old}: stepping down")),
        "{logs}"
    );
}

#[test]
fn a_frozen_leader_wakes_to_a_new_epoch_and_acknowledges_nothing_it_did_not_commit() {
    let cluster = Cluster::start("frozen", false);
    cluster.client().register("lone").unwrap();
    let load = Load::start(3, |_| cluster.client(), |_| cluster.client());
    load.more(50);
    let old = cluster.leader();
    // A client of the old leader that waits for its answer longer than the freeze lasts.
    let mut alone = Raw::try_connect(cluster.addrs[old], Duration::from_secs(5)).unwrap();
    assert_eq!(alone.try_ask(b"\x02lone"), Some(vec![0x21, 0, 0]));
    cluster.signal(old, "-STOP");
    let mut frame = Vec::new();
    encode_frame(Framing::U32, b"\x04lone|r0|434343|while frozen", &mut frame).unwrap();
    alone.stream.write_all(&frame).unwrap();
    // Its clients give up on it after their reply timeout and find the new leader.
    let mut new = None;
    eventually("the others to elect", || {
        new = cluster.serving().filter(|&i| i != old);
        new.is_some()
    });
    load.more(50);
    cluster.signal(old, "-CONT");
    // Woken, it decides the send on its stale view, but never acknowledges it.
    let answer = alone.reader.read_frame().ok().flatten().map(|f| f.to_vec());
    assert_eq!(answer, None);
    load.more(50);
    let (acked, delivered) = load.finish();
    let logs = cluster.logs();
    exactly_once(&acked, &delivered, &logs);
    assert!(
        !delivered.iter().any(|d| d.text == "while frozen"),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("messenger-{old}: stepping down")),
        "{logs}"
    );
}

#[test]
fn every_server_restarts_from_its_data_dir_with_accounts_and_undelivered_messages() {
    // Snapshots every 4 entries: each server restarts from a snapshot and a log after it.
    let mut cluster = Cluster::start_with("restart", false, &["--compact-after", "4"]);
    let mut ann = cluster.client();
    ann.register("ann").unwrap();
    ann.register("bob").unwrap();
    ann.login("ann").unwrap();
    for i in 0..5 {
        ann.send("bob", &format!("kept {i}")).unwrap();
    }
    drop(ann);
    for i in 0..N {
        cluster.kill9(i);
    }
    for i in 0..N {
        cluster.spawn(i);
    }
    let mut bob = cluster.client();
    assert_eq!(bob.login("bob").unwrap(), 5);
    let got: Vec<String> = bob.deliveries().try_iter().map(|d| d.text).collect();
    let want: Vec<String> = (0..5).map(|i| format!("kept {i}")).collect();
    assert_eq!(got, want);
    assert_eq!(bob.search("*").unwrap(), ["ann", "bob"]);
    let logs = cluster.logs();
    assert!(logs.contains("snapshot at"), "{logs}");
}

#[test]
fn the_python_client_works_against_a_majority_cluster_and_fails_over() {
    let mut cluster = Cluster::start("python", false);
    let servers: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    let servers = servers.join(",");
    let py = |args: &[&str]| {
        let mut all = vec!["--servers", servers.as_str()];
        all.extend_from_slice(args);
        run_python("messenger_client.py", &all)
    };
    py(&["register", "ann"]);
    py(&["register", "bob"]);
    py(&["send", "ann", "bob", "hello | world"]);
    let leader = cluster.leader();
    cluster.kill9(leader);
    py(&["send", "ann", "bob", "after the leader died"]);
    let inbox = py(&["inbox", "bob"]);
    assert_eq!(inbox, "ann: hello | world\nann: after the leader died\n");
    assert_eq!(py(&["inbox", "bob"]), "");
    assert_eq!(py(&["search", "*"]), "ann\nbob\n");
}

/// A follower killed while the leader's log moves on past several snapshots catches up
/// from a snapshot (InstallSnapshot): restarted, it logs a restore after it listens (a
/// restore at start comes before), it then commits a send with the leader alone, and,
/// once the leader is gone and the third server restarts empty, it leads and serves every
/// account and message from the state the snapshot gave it.
#[test]
fn a_follower_down_past_a_compaction_catches_up_from_the_leaders_snapshot() {
    // Snapshots every 10 log entries (`--compact-after`).
    let mut cluster = Cluster::start_with("install", false, &["--compact-after", "10"]);
    let mut ann = cluster.client();
    ann.register("ann").unwrap();
    ann.register("bob").unwrap();
    ann.login("ann").unwrap();
    let leader = cluster.leader();
    let (behind, other) = ((leader + 1) % N, (leader + 2) % N);
    cluster.kill9(behind);
    let snapshots = |c: &Cluster| c.log(leader).matches(": snapshot at ").count();
    let before = snapshots(&cluster);
    const SENT: u16 = 60;
    for i in 0..SENT {
        ann.send("bob", &format!("while down {i}")).unwrap();
    }
    // Three snapshots built after the kill: the last one started past every entry the
    // follower could hold, and the leader's log now begins after it.
    eventually("the leader to compact its log three times", || {
        snapshots(&cluster) >= before + 3
    });
    cluster.spawn(behind);
    let installed = |c: &Cluster| {
        let log = c.log(behind);
        let listening = log.find("listening on").expect("it listens");
        log[listening..].contains("state restored from a snapshot")
    };
    eventually("the follower to install the leader's snapshot", || {
        installed(&cluster)
    });
    // With the third server down, a send commits only on the leader and the follower: the
    // follower holds every entry up to it.
    cluster.kill9(other);
    ann.send("bob", "after the install").unwrap();
    drop(ann);
    // The leader gone and the third server back empty, only the follower can lead (its
    // log is the more up to date): what it serves is its own state.
    cluster.kill9(leader);
    std::fs::remove_dir_all(cluster.root.join(format!("server{other}"))).unwrap();
    cluster.spawn(other);
    let mut bob = cluster.client();
    assert_eq!(bob.login("bob").unwrap(), SENT + 1, "{}", cluster.logs());
    let got: Vec<String> = bob.deliveries().try_iter().map(|d| d.text).collect();
    let mut want: Vec<String> = (0..SENT).map(|i| format!("while down {i}")).collect();
    want.push("after the install".into());
    assert_eq!(got, want);
    assert_eq!(bob.search("*").unwrap(), ["ann", "bob"]);
    let log = cluster.log(behind);
    assert!(log.contains("leading epoch"), "{log}");
}

/// A client for `cluster` whose way to every server goes through `ways` (fault proxies, one
/// per server), so a test can cut the clients from one server and not the others.
fn client_through(ways: &[FaultProxy]) -> Client {
    let mut c = Client::new(ways.iter().map(FaultProxy::local_addr).collect());
    // Long enough for a failover, short enough that a client never served fails soon.
    c.timeout = Duration::from_secs(8);
    c
}

/// The clients' way to the leader is cut (a fault proxy that stops passing bytes), the
/// leader's links to the other servers are not: the clients reach only the followers, and
/// the followers serve them through the leader: sessions, answers and pushed messages,
/// numbers never reused, and the leader stays the leader throughout. (Before forwarding,
/// a follower answered `40 LEADER` and the clients never got an answer.)
#[test]
fn clients_cut_from_the_leader_are_served_through_a_follower() {
    let cluster = Cluster::start("forward", false);
    let leader = cluster.leader();
    let downs = cluster.logs().matches("stepping down").count();
    let ways: Vec<FaultProxy> = (0..N)
        .map(|i| FaultProxy::start(cluster.addrs[i]).unwrap())
        .collect();
    ways[leader].cut();
    let mut ann = client_through(&ways);
    ann.register("ann").unwrap();
    ann.register("bob").unwrap();
    assert_ne!(ann.server(), Some(leader));
    let mut bob = client_through(&ways);
    assert_eq!(bob.login("bob").unwrap(), 0);
    ann.login("ann").unwrap();
    ann.send("bob", "through a follower").unwrap();
    let got = bob.deliveries().recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(got.text, "through a follower");
    assert_eq!(bob.search("*").unwrap(), ["ann", "bob"]);
    // The session lives on the leader: bob is in use there, whichever way one comes.
    let follower = (leader + 1) % N;
    let mut raw = Raw::try_connect(cluster.addrs[follower], IO_TIMEOUT).unwrap();
    assert_eq!(raw.try_ask(b"\x02bob"), Some(vec![0x58]));
    // Load through the followers only: every acknowledged send delivered exactly once.
    let load = Load::start(3, |_| client_through(&ways), |_| client_through(&ways));
    load.more(100);
    let (acked, delivered) = load.finish();
    let logs = cluster.logs();
    let numbers = exactly_once(&acked, &delivered, &logs);
    assert!(numbers.len() >= 100, "{logs}");
    assert!(acked.iter().all(|a| a.by != Some(leader)), "{logs}");
    // Nobody lost or changed the lead meanwhile.
    assert_eq!(cluster.serving(), Some(leader), "{logs}");
    assert_eq!(logs.matches("stepping down").count(), downs, "{logs}");
}

/// A connection forwarded to a leader that dies is closed, not answered wrongly: the
/// client fails over and the next leader serves it; under send load through the
/// followers nothing acknowledged is lost and no number names two messages.
#[test]
fn killing_the_leader_closes_connections_forwarded_to_it_and_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start("forward-kill", false);
    cluster.client().register("lone").unwrap();
    let leader = cluster.leader();
    let ways: Vec<FaultProxy> = (0..N)
        .map(|i| FaultProxy::start(cluster.addrs[i]).unwrap())
        .collect();
    ways[leader].cut();
    let load = Load::start(3, |_| client_through(&ways), |_| client_through(&ways));
    load.more(50);
    let follower = (leader + 1) % N;
    let mut alone = Raw::try_connect(cluster.addrs[follower], Duration::from_secs(5)).unwrap();
    assert_eq!(alone.try_ask(b"\x02lone"), Some(vec![0x21, 0, 0]));
    cluster.kill9(leader);
    // Bound to a dead leader: closed (or told 41), never answered ok.
    let answer = alone.try_ask(b"\x04lone|r0|454545|to a dead leader");
    assert!(
        matches!(answer.as_deref(), None | Some([0x41])),
        "{answer:?}"
    );
    load.more(50);
    let next = cluster.leader();
    assert_ne!(next, leader);
    let (acked, delivered) = load.finish();
    let logs = cluster.logs();
    exactly_once(&acked, &delivered, &logs);
    assert!(
        !delivered.iter().any(|d| d.text == "to a dead leader"),
        "{logs}"
    );
}

/// Clients on both followers that send searches as fast as they can and never read cost
/// their own connections, not the cluster's links: forwarded requests queue on the Raft
/// links only while those have room, so no link is closed for being full, the leader keeps
/// its followers' acknowledgements and stays the leader, and another client is served
/// meanwhile. Each flooder is cut off by the server, by whichever bound it meets first:
/// its follower's link full (logged), or the leader's cap on answers waiting for commit.
/// (Before, a follower queued every request it read on its Raft link to the leader, and
/// the link closed once 4,096 waited.)
#[test]
fn flooding_clients_on_the_followers_shed_their_own_connections_not_the_raft_links() {
    let cluster = Cluster::start("flood", false);
    let mut ann = cluster.client();
    ann.register("ann").unwrap();
    let leader = cluster.leader();
    let downs = cluster.logs().matches("stepping down").count();
    let flooders: Vec<_> = (0..N)
        .filter(|&i| i != leader)
        .map(|i| {
            let addr = cluster.addrs[i];
            thread::spawn(move || flood(addr, b"\x03*", |_| b"\x03*".to_vec()))
        })
        .collect();
    // Served meanwhile, through whichever server the client reaches.
    for i in 0..5 {
        assert_eq!(ann.search("*").unwrap(), ["ann"], "search {i}");
        thread::sleep(Duration::from_millis(200));
    }
    let cut: Vec<_> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    let link_closed = |l: &str| l.contains("raft ") && l.contains("frames behind");
    served_after_flood(&mut ann, &cut, || cluster.logs(), link_closed);
    let logs = cluster.logs();
    assert_eq!(cluster.serving(), Some(leader), "{logs}");
    assert_eq!(logs.matches("stepping down").count(), downs, "{logs}");
}
