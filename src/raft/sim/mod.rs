//! A deterministic simulator for the Raft core: replicas on a network that loses,
//! duplicates, delays and reorders messages, is partitioned (both ways and one way),
//! and crashes replicas, which restart from what they had acknowledged as persisted.
//! After every tick it checks Raft's safety properties (§5.2, §5.3, §5.4 and Figure 3),
//! and at the end that a healed cluster elects a leader and commits within a bound.
//!
//! Default run: `cargo test --lib raft` (2,500 seeds of 200 ticks of chaos, then healing). Long run:
//! `cargo test --release --lib raft::sim::tests::many_long_seeds -- --ignored`.

use super::message::{decode, encode, Body, Message, ReplicaId, Snapshot};
use super::replica::{Bug, RaftCore};
use super::rng::Rng;
use super::types::{Config, HardState, Ready, Role, Stored};
use std::collections::{btree_map, BTreeMap, BTreeSet, VecDeque};

mod checks;
#[cfg(test)]
mod tests;

use checks::check_sm;

/// What a run does.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) replicas: u64,
    /// Ticks of chaos before the network heals.
    pub(crate) chaos_ticks: u64,
    /// Ticks a healed cluster has to elect a leader and commit a fresh proposal.
    pub(crate) heal_bound: u64,
    pub(crate) bug: Bug,
    /// Break the persist-before-send rule in the harness (to show the check catches it).
    pub(crate) send_before_persist: bool,
    /// Run without pre-vote and check-quorum (the protocol of the paper's Figure 2).
    pub(crate) classic: bool,
}

impl Plan {
    pub(crate) fn short() -> Plan {
        Plan {
            replicas: 3,
            chaos_ticks: 200,
            heal_bound: 120,
            bug: Bug::None,
            send_before_persist: false,
            classic: false,
        }
    }
}

/// A ready waiting for its fsync: its messages go only once it is on disk.
#[derive(Debug)]
struct Pending {
    hard: Option<HardState>,
    snapshot: Option<Snapshot>,
    entries: Vec<super::message::Entry>,
    messages: Vec<Message>,
}

/// One server: the replica (None while crashed), its disk, its state machine.
struct Server {
    replica: Option<RaftCore>,
    disk: Stored,
    queue: VecDeque<Pending>,
    /// The state machine: the index applied and a hash chain over the applied entries.
    sm: (u64, u64),
    /// The log is checked against the global entry map up to here.
    checked: u64,
    restarts: u64,
}

/// One line of the trace a failure prints.
// The fields are read only through Debug, in a failure's report.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
enum Event {
    Tick(ReplicaId),
    Deliver(ReplicaId, ReplicaId, u64, &'static str),
    Role(ReplicaId, Role, u64),
    Crash(ReplicaId),
    Restart(ReplicaId),
    Cut(ReplicaId, ReplicaId),
    Heal,
    Propose(ReplicaId, u64),
    Compact(ReplicaId, u64),
    Transfer(ReplicaId, ReplicaId),
    Persist(ReplicaId),
}

/// What happened over a run: proof that the faults and paths under test were reached.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) leader_terms: u64,
    pub(crate) committed: u64,
    pub(crate) crashes: u64,
    pub(crate) snapshots_installed: u64,
    pub(crate) reads_confirmed: u64,
    pub(crate) transfers: u64,
    pub(crate) rejections: u64,
    pub(crate) leaders_stepped_down: u64,
    pub(crate) heal_ticks_max: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.leader_terms += o.leader_terms;
        self.committed += o.committed;
        self.crashes += o.crashes;
        self.snapshots_installed += o.snapshots_installed;
        self.reads_confirmed += o.reads_confirmed;
        self.transfers += o.transfers;
        self.rejections += o.rejections;
        self.leaders_stepped_down += o.leaders_stepped_down;
        self.heal_ticks_max = self.heal_ticks_max.max(o.heal_ticks_max);
    }
}

struct Sim {
    stats: Stats,
    seed: u64,
    rng: Rng,
    now: u64,
    ids: Vec<ReplicaId>,
    servers: BTreeMap<ReplicaId, Server>,
    /// Messages in flight: when they arrive, from, to, the bytes.
    wire: Vec<(u64, ReplicaId, ReplicaId, Vec<u8>)>,
    cut: BTreeSet<(ReplicaId, ReplicaId)>,
    loss: u64,
    plan: Plan,
    // What the checks remember over the whole run.
    leaders: BTreeMap<u64, ReplicaId>,
    /// (index, term) → (hash of the data, term of the entry before): log matching.
    entries: BTreeMap<(u64, u64), (u64, u64)>,
    /// index → (term, state machine hash after applying it, a term it was committed by):
    /// state machine safety and leader completeness. The entry was committed in a term
    /// no later than the third: the term of the first replica seen applying it.
    committed: BTreeMap<u64, (u64, u64, u64)>,
    /// Read tag → the highest commit anywhere when the read was asked.
    reads: BTreeMap<u64, u64>,
    next_ctx: u64,
    trace: VecDeque<(u64, Event)>,
}

type Check = Result<(), String>;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn kind(body: &Body) -> &'static str {
    match body {
        Body::PreVote { .. } => "PreVote",
        Body::PreVoteResp { .. } => "PreVoteResp",
        Body::Vote { .. } => "Vote",
        Body::VoteResp { .. } => "VoteResp",
        Body::Append { .. } => "Append",
        Body::AppendResp { .. } => "AppendResp",
        Body::Heartbeat { .. } => "Heartbeat",
        Body::HeartbeatResp { .. } => "HeartbeatResp",
        Body::Snapshot(_) => "Snapshot",
        Body::TimeoutNow => "TimeoutNow",
    }
}

impl Sim {
    fn new(seed: u64, plan: Plan) -> Sim {
        let ids: Vec<ReplicaId> = (1..=plan.replicas).collect();
        let mut sim = Sim {
            stats: Stats::default(),
            seed,
            rng: Rng::new(seed),
            now: 0,
            servers: BTreeMap::new(),
            wire: Vec::new(),
            cut: BTreeSet::new(),
            loss: 0,
            plan,
            leaders: BTreeMap::new(),
            entries: BTreeMap::new(),
            committed: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_ctx: 0,
            trace: VecDeque::new(),
            ids,
        };
        for id in sim.ids.clone() {
            let server = Server {
                replica: None,
                disk: Stored::default(),
                queue: VecDeque::new(),
                sm: (0, 0),
                checked: 0,
                restarts: 0,
            };
            sim.servers.insert(id, server);
            sim.start(id);
        }
        sim
    }

    fn config(&self, id: ReplicaId, restarts: u64) -> Config {
        let mut cfg = Config::new(id, &self.ids, self.seed ^ (restarts << 32));
        cfg.max_batch = 8;
        // Snapshots (16-byte blobs) go in four chunks, so the faults hit chunks too.
        cfg.max_chunk = 5;
        cfg.pre_vote = !self.plan.classic;
        cfg.check_quorum = !self.plan.classic;
        cfg
    }

    fn log(&mut self, e: Event) {
        if self.trace.len() == 60 {
            self.trace.pop_front();
        }
        self.trace.push_back((self.now, e));
    }

    fn fail(&self, why: String) -> String {
        let mut s = format!(
            "seed {} failed at tick {}: {why}\nreplicas:\n",
            self.seed, self.now
        );
        for (id, server) in &self.servers {
            let Some(r) = &server.replica else {
                s.push_str(&format!("  {id} down\n"));
                continue;
            };
            let matched: Vec<_> = self.ids.iter().map(|&p| r.match_index(p)).collect();
            s.push_str(&format!(
                "  {id} {:?} term {} commit {} applied {} log {}..={} queue {} match {matched:?}\n",
                r.role(),
                r.term(),
                r.commit_index(),
                r.applied_index(),
                r.first_index(),
                r.last_index(),
                server.queue.len(),
            ));
        }
        s.push_str("trace tail:\n");
        for (t, e) in &self.trace {
            s.push_str(&format!("  t={t} {e:?}\n"));
        }
        s
    }

    /// Starts (or restarts) `id` from its disk.
    fn start(&mut self, id: ReplicaId) {
        let restarts = self.servers[&id].restarts;
        let cfg = self.config(id, restarts);
        let s = self.servers.get_mut(&id).expect("known id");
        let mut r = RaftCore::restart(cfg, s.disk.clone()).expect("valid config");
        r.bug = self.plan.bug;
        s.sm = decode_sm(&s.disk.snapshot);
        s.checked = 0;
        s.replica = Some(r);
    }

    /// Runs the plan; the error names the seed and shows the trace tail.
    fn run(&mut self) -> Result<Stats, String> {
        while self.now < self.plan.chaos_ticks {
            self.chaos().map_err(|e| self.fail(e))?;
            self.step().map_err(|e| self.fail(e))?;
        }
        self.heal_all();
        let deadline = self.now + self.plan.heal_bound;
        let mut proposed: Option<(u64, u64)> = None;
        while self.now < deadline {
            self.step().map_err(|e| self.fail(e))?;
            if let Some((index, term)) = proposed {
                let done = self
                    .committed
                    .get(&index)
                    .is_some_and(|&(t, _, _)| t == term);
                if done {
                    self.stats.heal_ticks_max = self.plan.heal_bound - (deadline - self.now);
                    return Ok(self.stats);
                }
            }
            let Some(l) = self.leader() else { continue };
            // Propose once per leader term: a proposal lost with its leader is retried.
            let r = self.replica_mut(l);
            if proposed.is_none_or(|(_, term)| term < r.term()) {
                let mut out = Ready::default();
                if let Ok(at) = r.propose(b"final".to_vec(), &mut out) {
                    proposed = Some(at);
                }
                self.handle(l, out).map_err(|e| self.fail(e))?;
            }
        }
        Err(self.fail(format!(
            "liveness: healed for {} ticks, and no proposal committed (proposed: {proposed:?})",
            self.plan.heal_bound
        )))
    }

    fn replica_mut(&mut self, id: ReplicaId) -> &mut RaftCore {
        self.servers
            .get_mut(&id)
            .and_then(|s| s.replica.as_mut())
            .expect("live")
    }

    fn live(&self) -> Vec<ReplicaId> {
        self.ids
            .iter()
            .copied()
            .filter(|id| self.servers[id].replica.is_some())
            .collect()
    }

    /// The live leader of the highest term, if any.
    fn leader(&self) -> Option<ReplicaId> {
        self.servers
            .iter()
            .filter_map(|(&id, s)| s.replica.as_ref().map(|r| (id, r)))
            .filter(|(_, r)| r.role() == Role::Leader)
            .max_by_key(|(_, r)| r.term())
            .map(|(id, _)| id)
    }

    fn heal_all(&mut self) {
        self.cut.clear();
        self.loss = 0;
        self.log(Event::Heal);
        for id in self.ids.clone() {
            if self.servers[&id].replica.is_none() {
                self.log(Event::Restart(id));
                self.start(id);
            }
        }
    }

    /// The nemesis and the clients: one random thing, now and then.
    fn chaos(&mut self) -> Check {
        let n = self.ids.len() as u64;
        let pick = |rng: &mut Rng| 1 + rng.below(n);
        match self.rng.below(100) {
            0..=2 => {
                // A random split, both ways.
                self.cut.clear();
                let side: Vec<bool> = (0..n).map(|_| self.rng.chance(50)).collect();
                for a in 1..=n {
                    for b in 1..=n {
                        if side[(a - 1) as usize] != side[(b - 1) as usize] {
                            self.cut.insert((a, b));
                        }
                    }
                }
                self.log(Event::Cut(0, 0));
            }
            3 => {
                // The leader alone in a minority.
                if let Some(l) = self.leader() {
                    self.cut.clear();
                    for p in self.ids.clone() {
                        if p != l {
                            self.cut.insert((l, p));
                            self.cut.insert((p, l));
                        }
                    }
                    self.log(Event::Cut(l, 0));
                }
            }
            4 => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                self.cut.insert((a, b));
                self.log(Event::Cut(a, b));
            }
            5..=6 => {
                self.cut.clear();
                self.log(Event::Heal);
            }
            7 => self.loss = self.rng.below(30),
            8..=9 => {
                let id = pick(&mut self.rng);
                let s = self.servers.get_mut(&id).expect("known id");
                if s.replica.take().is_some() {
                    // Whatever was not fsynced is gone, and so are its messages.
                    s.queue.clear();
                    s.restarts += 1;
                    self.stats.crashes += 1;
                    self.log(Event::Crash(id));
                }
            }
            10..=12 => {
                let id = pick(&mut self.rng);
                if self.servers[&id].replica.is_none() {
                    self.log(Event::Restart(id));
                    self.start(id);
                }
            }
            13..=15 => {
                let id = pick(&mut self.rng);
                let s = self.servers.get_mut(&id).expect("known id");
                if let Some(r) = s.replica.as_mut() {
                    let index = r.applied_index();
                    // The simulated state machine is at `applied` already (handle applies
                    // every committed entry at once), so its blob is the snapshot.
                    if index > r.snapshot().index && s.sm.0 == index {
                        let data = encode_sm(s.sm);
                        if let Ok(snap) = r.compact(index, data) {
                            s.disk.entries.retain(|e| e.index > snap.index);
                            s.disk.snapshot = snap;
                            self.log(Event::Compact(id, index));
                        }
                    }
                }
            }
            16 => {
                if let Some(l) = self.leader() {
                    let to = pick(&mut self.rng);
                    let mut out = Ready::default();
                    if self
                        .replica_mut(l)
                        .transfer_leadership(to, &mut out)
                        .is_ok()
                    {
                        self.log(Event::Transfer(l, to));
                    }
                    self.handle(l, out)?;
                }
            }
            17..=60 => {
                if let Some(l) = self.leader() {
                    let mut out = Ready::default();
                    let data = self.rng.next().to_be_bytes().to_vec();
                    if let Ok((index, _)) = self.replica_mut(l).propose(data, &mut out) {
                        self.log(Event::Propose(l, index));
                    }
                    self.handle(l, out)?;
                }
            }
            61..=70 => {
                if let Some(l) = self.leader() {
                    self.next_ctx += 1;
                    let ctx = self.next_ctx;
                    let mut out = Ready::default();
                    if self.replica_mut(l).read_index(ctx, &mut out).is_ok() {
                        self.reads.insert(ctx, self.highest_commit());
                    }
                    self.handle(l, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn highest_commit(&self) -> u64 {
        let known = self.committed.keys().next_back().copied().unwrap_or(0);
        self.servers
            .values()
            .filter_map(|s| s.replica.as_ref().map(|r| r.commit_index()))
            .fold(known, u64::max)
    }

    /// One tick: every live replica ticks, due messages arrive, disks catch up.
    fn step(&mut self) -> Check {
        self.now += 1;
        for id in self.live() {
            self.log(Event::Tick(id));
            let mut out = Ready::default();
            self.replica_mut(id).tick(&mut out);
            self.handle(id, out)?;
        }
        // Deliveries may answer at once (delay 0); the bound stops a livelock test from
        // hanging instead of failing.
        for _ in 0..10_000 {
            let Some(at) = self.wire.iter().position(|w| w.0 <= self.now) else {
                break;
            };
            let (_, from, to, bytes) = self.wire.swap_remove(at);
            let msg = decode(&bytes).map_err(|e| format!("own message undecodable: {e}"))?;
            if self.servers[&to].replica.is_none() || self.cut.contains(&(from, to)) {
                continue;
            }
            self.log(Event::Deliver(from, to, msg.term, kind(&msg.body)));
            match msg.body {
                Body::TimeoutNow => self.stats.transfers += 1,
                Body::AppendResp { reject: true, .. } => self.stats.rejections += 1,
                _ => {}
            }
            let mut out = Ready::default();
            self.replica_mut(to).receive(msg, &mut out);
            self.handle(to, out)?;
        }
        for id in self.live() {
            // One fsync a tick covers the whole queue (group commit), but a slow disk now
            // and then misses a tick: the queue, and the messages behind it, wait.
            if self.rng.chance(80) {
                for _ in 0..self.servers[&id].queue.len() {
                    self.persist_one(id)?;
                }
            }
        }
        self.check_tick()
    }

    /// Carries out a Ready: applies what is committed (in memory, at once), and queues
    /// the rest behind the disk; a Ready's messages wait for every Ready before it.
    fn handle(&mut self, id: ReplicaId, out: Ready) -> Check {
        let Ready {
            hard_state,
            snapshot,
            entries,
            messages,
            committed,
            reads,
            failed_reads,
            role,
        } = out;
        if let Some((role, term)) = role {
            self.log(Event::Role(id, role, term));
            let was_leader = self.leaders.get(&term) == Some(&id);
            if role == Role::Follower && was_leader {
                self.stats.leaders_stepped_down += 1;
            }
        }
        let s = self.servers.get_mut(&id).expect("known id");
        if let Some(snap) = &snapshot {
            self.stats.snapshots_installed += 1;
            s.sm = decode_sm(snap);
            s.checked = 0;
            check_sm(&self.committed, snap.index, s.sm.1)?;
        }
        if let Some(first) = entries.first() {
            s.checked = s.checked.min(first.index - 1);
        }
        for e in &committed {
            let s = self.servers.get_mut(&id).expect("known id");
            if e.index != s.sm.0 + 1 {
                return Err(format!("{id} applies {} after {}", e.index, s.sm.0));
            }
            s.sm = (e.index, fnv(fnv(s.sm.1, &e.term.to_be_bytes()), &e.data));
            let hash = s.sm.1;
            check_sm(&self.committed, e.index, hash)?;
            let by = s.replica.as_ref().map_or(e.term, |r| r.term());
            if let btree_map::Entry::Vacant(v) = self.committed.entry(e.index) {
                v.insert((e.term, hash, by));
                self.stats.committed += 1;
                self.check_durable(e.index, e.term)?;
                self.check_leaders_have(e.index, e.term, by)?;
            }
        }
        for r in reads {
            self.stats.reads_confirmed += 1;
            let asked = self.reads.remove(&r.ctx).unwrap_or(0);
            if r.index < asked {
                return Err(format!(
                    "read {} confirmed at {} below commit {asked} seen when it was asked",
                    r.ctx, r.index
                ));
            }
        }
        for ctx in failed_reads {
            self.reads.remove(&ctx);
        }
        let s = self.servers.get_mut(&id).expect("known id");
        let mut pending = Pending {
            hard: hard_state,
            snapshot,
            entries,
            messages,
        };
        let nothing = pending.hard.is_none() && pending.snapshot.is_none();
        if nothing && pending.entries.is_empty() && s.queue.is_empty() {
            self.send(pending.messages);
        } else if self.plan.send_before_persist {
            let messages = std::mem::take(&mut pending.messages);
            s.queue.push_back(pending);
            self.send(messages);
        } else {
            s.queue.push_back(pending);
        }
        Ok(())
    }

    /// The front Ready reaches the disk; its messages go.
    fn persist_one(&mut self, id: ReplicaId) -> Check {
        self.log(Event::Persist(id));
        let s = self.servers.get_mut(&id).expect("known id");
        let Some(p) = s.queue.pop_front() else {
            return Ok(());
        };
        if let Some(h) = p.hard {
            s.disk.hard_state = h;
        }
        let mut ack = None;
        if let Some(snap) = p.snapshot {
            ack = Some((snap.index, snap.term));
            s.disk.entries.clear();
            s.disk.snapshot = snap;
        }
        for e in p.entries {
            ack = Some((e.index, e.term));
            s.disk.entries.retain(|d| d.index < e.index);
            s.disk.entries.push(e);
        }
        self.send(p.messages);
        if let Some((index, term)) = ack {
            let mut out = Ready::default();
            self.replica_mut(id).persisted(index, term, &mut out);
            self.handle(id, out)?;
        }
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            if self.rng.chance(self.loss) {
                continue;
            }
            let copies = if self.rng.chance(3) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now + self.rng.below(3);
                self.wire.push((at, m.from, m.to, encode(&m)));
            }
        }
    }
}

fn encode_sm((index, hash): (u64, u64)) -> Vec<u8> {
    let mut b = index.to_be_bytes().to_vec();
    b.extend_from_slice(&hash.to_be_bytes());
    b
}

fn decode_sm(snap: &Snapshot) -> (u64, u64) {
    let word = |at: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&snap.data[at..at + 8]);
        u64::from_be_bytes(a)
    };
    if snap.data.len() == 16 {
        (word(0), word(8))
    } else {
        (0, 0)
    }
}

/// Runs `seeds` under `plan`; the first failure's report, if any.
pub(crate) fn run_seeds(seeds: std::ops::Range<u64>, plan: &Plan) -> Result<Stats, String> {
    let mut total = Stats::default();
    for seed in seeds {
        total.add(Sim::new(seed, plan.clone()).run()?);
    }
    Ok(total)
}
