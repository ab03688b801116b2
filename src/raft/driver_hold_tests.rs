//! One real driver (its threads, a real disk) against a leader the test plays by hand:
//! what waits for a save or a restore, and what goes at once. The disk's saves and the
//! state machine's restore each pass a gate the test holds closed or opens, so every
//! assertion is about order (what left before what), never about time.

use super::disk::RaftStorage;
use super::driver::{Disk, Driver, DriverConfig, StateMachine, Status, Transport};
use super::message::{decode, Body, Entry, Message, ReplicaId, Snapshot, SnapshotChunk};
use super::replica::ack;
use super::types::{Config, HardState};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a test waits for something that must happen before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A lock whose holder's panic (a failed assertion) does not fail the next holder.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads pass it while it is open and wait while it is closed.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Threads waiting at it now.
    waiting: usize,
}

impl Gate {
    fn close(&self) {
        lock(&self.0 .0).closed = true;
    }

    fn open(&self) {
        lock(&self.0 .0).closed = false;
        self.0 .1.notify_all();
    }

    fn pass(&self) {
        let (state, cv) = &*self.0;
        let mut g = lock(state);
        g.waiting += 1;
        cv.notify_all();
        while g.closed {
            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.waiting -= 1;
    }

    /// Returns once a thread waits at the gate.
    fn await_waiter(&self) {
        let (state, cv) = &*self.0;
        let deadline = Instant::now() + PATIENCE;
        let mut g = lock(state);
        while g.waiting == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "nothing reached the gate");
            g = cv
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The real storage, each save held at the gate first: while it is closed, nothing
/// queued is on disk and the driver has not heard of it.
struct HeldDisk {
    inner: RaftStorage,
    gate: Gate,
}

impl Disk for HeldDisk {
    fn save(
        &mut self,
        hard_state: Option<HardState>,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
    ) -> io::Result<Option<(u64, u64)>> {
        self.gate.pass();
        self.inner.save_parts(hard_state, snapshot, entries)
    }
    fn save_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.gate.pass();
        self.inner.save_snapshot(snap)
    }
    fn save_prepared_snapshot(&mut self, snap: &Snapshot, prepared: &Path) -> io::Result<()> {
        self.gate.pass();
        self.inner.save_prepared_snapshot(snap, prepared)
    }
    fn dir(&self) -> PathBuf {
        self.inner.dir().to_owned()
    }
    fn syncs(&self) -> u64 {
        self.inner.syncs()
    }
}

/// Commands applied, as a list; its restore waits at a gate.
#[derive(Clone, Default)]
struct Machine {
    state: Arc<Mutex<MachineState>>,
    gate: Gate,
}

#[derive(Default)]
struct MachineState {
    commands: Vec<Vec<u8>>,
    /// What was done, in order: "restore", "apply N", or "apply N during a restore".
    ops: Vec<String>,
    restoring: bool,
}

impl StateMachine for Machine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let mut s = lock(&self.state);
        let op = if s.restoring {
            format!("apply {index} during a restore")
        } else {
            format!("apply {index}")
        };
        s.ops.push(op);
        s.commands.push(command.to_vec());
        Vec::new()
    }
    fn snapshot(&mut self) -> Vec<u8> {
        lock(&self.state).commands.join(&b","[..])
    }
    fn restore(&mut self, data: &[u8]) -> io::Result<()> {
        lock(&self.state).restoring = true;
        self.gate.pass();
        let mut s = lock(&self.state);
        s.commands = data.split(|&b| b == b',').map(<[u8]>::to_vec).collect();
        s.ops.push("restore".into());
        s.restoring = false;
        Ok(())
    }
}

impl Machine {
    fn ops(&self) -> Vec<String> {
        lock(&self.state).ops.clone()
    }
    fn commands(&self) -> Vec<Vec<u8>> {
        lock(&self.state).commands.clone()
    }
}

struct ChannelTransport(Sender<Message>);

impl Transport for ChannelTransport {
    fn send(&mut self, _to: ReplicaId, message: Vec<u8>) {
        let _ = self.0.send(decode(&message).expect("own message"));
    }
}

/// Replica 2 of {1, 2, 3}, driven by the test as leader 1 (and candidate 3). Its clock
/// never ticks within a test, so it never campaigns on its own.
struct Script {
    driver: Option<Driver>,
    sent: Receiver<Message>,
    disk: Gate,
    sm: Machine,
    dir: PathBuf,
}

impl Script {
    fn start(name: &str) -> Script {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-raft-hold-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Script::start_in(dir, Machine::default())
    }

    fn start_in(dir: PathBuf, sm: Machine) -> Script {
        let disk = Gate::default();
        let (tx, sent) = unbounded();
        let driver = start_driver(&dir, disk.clone(), sm.clone(), ChannelTransport(tx));
        Script {
            driver: Some(driver),
            sent,
            disk,
            sm,
            dir,
        }
    }

    fn deliver(&self, from: ReplicaId, term: u64, body: Body) {
        let m = Message {
            from,
            to: 2,
            term,
            body,
        };
        self.driver.as_ref().expect("running").handle().deliver(m);
    }

    fn heartbeat(&self, commit: u64, round: u64) {
        self.deliver(1, 1, Body::Heartbeat { commit, round });
    }

    fn status(&self) -> Status {
        self.driver.as_ref().expect("running").handle().status()
    }

    /// Waits until the driver's status satisfies `ok` (it is refreshed after each round,
    /// after that round's messages went out).
    fn await_status(&self, what: &str, ok: impl Fn(&Status) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !ok(&self.status()) {
            assert!(
                Instant::now() < deadline,
                "never {what}: {:?}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The messages sent before the first one `is` matches (which is taken too).
    fn until(&self, what: &str, is: impl Fn(&Body) -> bool) -> Vec<Body> {
        let mut before = Vec::new();
        loop {
            match self.sent.recv_timeout(PATIENCE) {
                Ok(m) if is(&m.body) => return before,
                Ok(m) => before.push(m.body),
                Err(_) => panic!("no {what} within {PATIENCE:?}; sent before: {before:?}"),
            }
        }
    }

    /// Nothing has been sent (and not taken by the test) so far.
    fn nothing_sent(&self, while_: &str) {
        let sent: Vec<Body> = self.sent.try_iter().map(|m| m.body).collect();
        assert!(sent.is_empty(), "sent while {while_}: {sent:?}");
    }

    /// Leader 1 of term 1 is heard, and term 1 is saved.
    fn follow_leader_1(&self) {
        self.heartbeat(0, 1);
        self.until("answer to the first heartbeat", |b| {
            *b == Body::HeartbeatResp { round: 1 }
        });
    }

    /// Leader 1 sends the snapshot at 5 (commands a..e) in two chunks.
    fn send_snapshot(&self) {
        let blob = b"a,b,c,d,e".to_vec();
        for (offset, part) in [(0, &blob[..4]), (4, &blob[4..])] {
            let chunk = SnapshotChunk {
                index: 5,
                term: 1,
                offset,
                total: blob.len() as u64,
                data: part.to_vec(),
            };
            self.deliver(1, 1, Body::Snapshot(chunk));
        }
    }

    fn append(&self, prev_index: u64, commit: u64, commands: &[&str]) {
        let entries = (prev_index + 1..)
            .zip(commands)
            .map(|(index, c)| Entry {
                index,
                term: 1,
                data: c.as_bytes().to_vec(),
            })
            .collect();
        let prev_term = u64::from(prev_index > 0);
        self.deliver(
            1,
            1,
            Body::Append {
                prev_index,
                prev_term,
                commit,
                entries,
            },
        );
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // Opened first, so a failed test's driver stops rather than hangs.
        self.disk.open();
        self.sm.gate.open();
        if let Some(d) = self.driver.take() {
            d.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_driver(dir: &Path, gate: Gate, sm: Machine, transport: ChannelTransport) -> Driver {
    let cfg = DriverConfig {
        raft: Config::new(2, &[1, 2, 3], 7),
        tick: Duration::from_secs(3600),
        compact_every: 0,
    };
    let (inner, stored) = RaftStorage::open(dir).expect("storage opens");
    let disk = HeldDisk { inner, gate };
    Driver::start_on(cfg, disk, stored, sm, transport).expect("driver starts")
}

fn is_ack(b: &Body) -> bool {
    matches!(b, Body::AppendResp { .. })
}

#[test]
fn an_append_is_acknowledged_only_once_saved_while_heartbeats_are_answered_at_once() {
    let s = Script::start("append");
    s.follow_leader_1();
    s.disk.close();
    s.append(0, 0, &["a", "b", "c"]);
    s.heartbeat(0, 2);
    // The Append was handled before the heartbeat (in its round or an earlier one), so
    // an acknowledgement sent at once would come first.
    let before = s.until("heartbeat answer while the save waits", |b| {
        *b == Body::HeartbeatResp { round: 2 }
    });
    assert!(
        !before.iter().any(is_ack),
        "acknowledged unsaved: {before:?}"
    );
    s.disk.await_waiter();
    s.disk.open();
    let before = s.until("acknowledgement after the save", |b| *b == ack(3));
    assert!(before.is_empty(), "{before:?}");
}

#[test]
fn a_vote_and_everything_after_it_wait_for_the_vote_to_be_saved() {
    let s = Script::start("vote");
    s.disk.close();
    let vote = Body::Vote {
        last_index: 0,
        last_term: 0,
        force: false,
    };
    s.deliver(3, 1, vote);
    s.await_status("in term 1", |st| st.term == 1);
    // The new leader's heartbeat: its answer promises nothing of its own, but leaves
    // only after the term and vote it was made in are saved.
    s.deliver(
        3,
        1,
        Body::Heartbeat {
            commit: 0,
            round: 9,
        },
    );
    s.await_status("following 3", |st| st.leader == Some(3));
    s.nothing_sent("the vote is unsaved");
    s.disk.await_waiter();
    s.disk.open();
    let before = s.until("vote", |b| *b == Body::VoteResp { granted: true });
    assert!(before.is_empty(), "{before:?}");
    s.until("heartbeat answer", |b| {
        *b == Body::HeartbeatResp { round: 9 }
    });
}

#[test]
fn a_snapshot_and_everything_after_it_wait_for_the_snapshot_to_be_saved() {
    let s = Script::start("snapshot");
    s.follow_leader_1();
    s.disk.close();
    s.send_snapshot();
    s.heartbeat(5, 3);
    s.append(5, 6, &["f"]);
    // Handled in order: once the entry after the snapshot is in the log, the snapshot
    // and the heartbeat were handled too.
    s.await_status("holding entry 6", |st| {
        st.snapshot == 5 && st.last_index == 6
    });
    s.nothing_sent("the snapshot is unsaved");
    s.disk.await_waiter();
    s.disk.open();
    let before = s.until("snapshot acknowledged", |b| *b == ack(5));
    assert!(before.is_empty(), "{before:?}");
    s.until("entry 6 acknowledged", |b| *b == ack(6));
    s.await_status("applied 6", |st| st.applied == 6);
    assert_eq!(s.sm.ops(), ["restore", "apply 6"]);
}

#[test]
fn a_restore_runs_beside_the_driver_which_answers_heartbeats_and_votes_meanwhile() {
    let s = Script::start("restore");
    s.follow_leader_1();
    s.sm.gate.close();
    s.send_snapshot();
    s.append(5, 7, &["f", "g"]);
    s.heartbeat(7, 2);
    let before = s.until("heartbeat answer during the restore", |b| {
        *b == Body::HeartbeatResp { round: 2 }
    });
    assert!(
        !before.iter().any(is_ack),
        "acknowledged unrestored: {before:?}"
    );
    // A transfer's vote request from 3 (forced past the lease): granted while the
    // restore still runs, the log being up to date.
    let vote = Body::Vote {
        last_index: 7,
        last_term: 1,
        force: true,
    };
    s.deliver(3, 2, vote);
    let before = s.until("vote during the restore", |b| {
        *b == Body::VoteResp { granted: true }
    });
    assert!(
        !before.iter().any(is_ack),
        "acknowledged unrestored: {before:?}"
    );
    s.sm.gate.await_waiter();
    assert!(s.sm.ops().is_empty(), "{:?}", s.sm.ops());
    let st = s.status();
    assert!(st.commit == 7 && st.applied == 0, "{st:?}");
    s.sm.gate.open();
    s.until("snapshot acknowledged after the restore", |b| *b == ack(5));
    s.until("entries acknowledged after the restore", |b| *b == ack(7));
    s.await_status("applied 7", |st| st.applied == 7);
    assert_eq!(s.sm.ops(), ["restore", "apply 6", "apply 7"]);
    let want: Vec<Vec<u8>> = ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(s.sm.commands(), want);
}

#[test]
fn a_crash_after_the_snapshot_is_saved_but_before_it_is_restored_restarts_from_it() {
    let s = Script::start("restart");
    s.follow_leader_1();
    s.sm.gate.close();
    s.send_snapshot();
    s.heartbeat(5, 2);
    // The heartbeat's answer waited for the snapshot's save: it is on disk now.
    let before = s.until("heartbeat answer", |b| {
        *b == Body::HeartbeatResp { round: 2 }
    });
    assert!(
        !before.iter().any(is_ack),
        "acknowledged unrestored: {before:?}"
    );
    s.sm.gate.await_waiter();
    // What a crash at this moment leaves: the data directory as it is.
    let copy = s.dir.with_extension("copy");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(&s.dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    let r = Script::start_in(copy, Machine::default());
    // Restored at start, before the driver runs.
    assert_eq!(r.sm.ops(), ["restore"]);
    assert_eq!(r.status().applied, 5);
    r.append(5, 6, &["f"]);
    let before = r.until("entry 6 acknowledged", |b| *b == ack(6));
    assert!(before.is_empty(), "{before:?}");
    r.await_status("applied 6", |st| st.applied == 6);
    assert_eq!(r.sm.commands().len(), 6);
    assert_eq!(r.sm.ops(), ["restore", "apply 6"]);
}
