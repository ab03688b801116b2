//! The driver with real disks and threads, on an in-memory network that can cut links.

use super::driver::{Driver, DriverConfig, Outcome, RaftHandle, StateMachine, Transport};
use super::message::ReplicaId;
use super::types::{Config, Role};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A state machine that keeps the commands it applied.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl StateMachine for Recorder {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let mut v = self.0.lock().unwrap();
        v.push(command.to_vec());
        format!("applied {index}").into_bytes()
    }
    fn snapshot(&mut self) -> Vec<u8> {
        let v = self.0.lock().unwrap();
        let mut out = Vec::new();
        for c in v.iter() {
            out.extend_from_slice(&(c.len() as u32).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }
    fn restore(&mut self, mut data: &[u8]) -> io::Result<()> {
        let mut v = self.0.lock().unwrap();
        v.clear();
        while data.len() >= 4 {
            let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let c = data
                .get(4..4 + n)
                .ok_or_else(|| io::Error::other("short"))?;
            v.push(c.to_vec());
            data = &data[4 + n..];
        }
        Ok(())
    }
}

type Net = Arc<Mutex<(HashMap<ReplicaId, RaftHandle>, BTreeSet<ReplicaId>)>>;

struct MemTransport {
    from: ReplicaId,
    net: Net,
}

impl Transport for MemTransport {
    fn send(&mut self, to: ReplicaId, message: Vec<u8>) {
        let net = self.net.lock().unwrap();
        if net.1.contains(&self.from) || net.1.contains(&to) {
            return;
        }
        if let Some(h) = net.0.get(&to) {
            h.deliver(super::message::decode(&message).expect("own message"));
        }
    }
}

struct Cluster {
    dir: PathBuf,
    net: Net,
    drivers: HashMap<ReplicaId, (Driver, Recorder)>,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-raft-driver-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = Cluster {
            dir,
            net: Arc::default(),
            drivers: HashMap::new(),
        };
        for id in 1..=3 {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: ReplicaId) {
        let mut raft = Config::new(id, &[1, 2, 3], 99 + id);
        raft.max_batch = 16;
        let cfg = DriverConfig {
            raft,
            tick: Duration::from_millis(3),
            compact_every: 40,
        };
        let sm = Recorder::default();
        let transport = MemTransport {
            from: id,
            net: Arc::clone(&self.net),
        };
        let d = Driver::start(cfg, &self.dir.join(id.to_string()), sm.clone(), transport)
            .expect("driver starts");
        self.net.lock().unwrap().0.insert(id, d.handle().clone());
        self.drivers.insert(id, (d, sm));
    }

    fn kill(&mut self, id: ReplicaId) {
        self.net.lock().unwrap().0.remove(&id);
        if let Some((d, _)) = self.drivers.remove(&id) {
            d.stop();
        }
    }

    fn leader(&self) -> ReplicaId {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cut = self.net.lock().unwrap().1.clone();
            for (&id, (d, _)) in &self.drivers {
                if d.handle().status().role == Role::Leader && !cut.contains(&id) {
                    return id;
                }
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Proposes `command` until it is applied, retrying on the current leader.
    fn write(&self, command: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = self.leader();
            let rx = self.drivers[&l]
                .0
                .handle()
                .propose(command.as_bytes().to_vec());
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(Outcome::Done(r)) => {
                    assert!(r.starts_with(b"applied "));
                    return;
                }
                Ok(Outcome::NotLeader(_) | Outcome::Lost) | Err(_) => {}
                Ok(other) => panic!("{command}: {other:?}"),
            }
            assert!(Instant::now() < deadline, "{command} never applied");
        }
    }

    fn converged(&self, want: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs: Vec<Vec<Vec<u8>>> = self
                .drivers
                .values()
                .map(|(_, sm)| sm.0.lock().unwrap().clone())
                .collect();
            if logs.iter().all(|l| l.len() == want && *l == logs[0]) {
                return logs[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "not converged: {:?}",
                logs.iter().map(Vec::len).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in [1, 2, 3] {
            self.kill(id);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn writes_survive_a_leader_crash_and_a_restart_from_disk_with_snapshots() {
    let mut c = Cluster::new("crash");
    for i in 0..30 {
        c.write(&format!("a{i}"));
    }
    let l = c.leader();
    let rx = c.drivers[&l].0.handle().read();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(Outcome::Done(vec![]))
    );
    c.kill(l);
    for i in 0..60 {
        c.write(&format!("b{i}"));
    }
    // The old leader comes back from its disk, behind a snapshot (compaction every 40).
    c.start(l);
    let log = c.converged(90);
    assert_eq!(log[0], b"a0");
    assert_eq!(log[89], b"b59");
    let s = c.drivers[&c.leader()].0.handle().status();
    assert!(s.snapshot > 0 && s.commit >= 90, "{s:?}");
}

#[test]
fn a_cut_off_leader_steps_down_and_its_reads_fail_while_the_majority_goes_on() {
    let mut c = Cluster::new("cut");
    c.write("before");
    let old = c.leader();
    c.net.lock().unwrap().1.insert(old);
    let read = c.drivers[&old].0.handle().read();
    // Check-quorum: within an election timeout or two it no longer leads.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.drivers[&old].0.handle().status().role == Role::Leader {
        assert!(Instant::now() < deadline, "the cut-off leader kept leading");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(read.recv_timeout(Duration::from_secs(5)), Ok(Outcome::Lost));
    c.write("during");
    let new = c.leader();
    assert_ne!(new, old);
    c.net.lock().unwrap().1.clear();
    c.write("after");
    c.converged(3);
    // A planned stop hands leadership over.
    let l = c.leader();
    assert!(c.drivers[&l]
        .0
        .handle()
        .transfer_leadership(Duration::from_secs(5)));
    c.kill(l);
    c.write("after transfer");
}
