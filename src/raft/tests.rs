//! Scripted scenarios, one rule each: a small cluster whose disk is instant and whose
//! network delivers exactly what the test lets through.

use super::replica::Bug;
use super::*;
use std::collections::{BTreeSet, VecDeque};

struct Cluster {
    rs: Vec<RaftCore>,
    wire: VecDeque<Message>,
    /// Replicas cut off from everyone (both ways).
    isolated: BTreeSet<ReplicaId>,
    applied: Vec<Vec<Entry>>,
    reads: Vec<ReadState>,
    /// Messages handed to the wire, by kind name, for counting rounds.
    sent: Vec<Message>,
    /// A replica whose InstallSnapshot chunks are lost (one slow to install them).
    swallow_snapshots_to: Option<ReplicaId>,
}

impl Cluster {
    fn new(n: u64, seed: u64, tune: impl Fn(&mut Config)) -> Cluster {
        let ids: Vec<ReplicaId> = (1..=n).collect();
        let rs = ids
            .iter()
            .map(|&id| {
                let mut cfg = Config::new(id, &ids, seed);
                tune(&mut cfg);
                RaftCore::new(cfg).unwrap()
            })
            .collect();
        Cluster {
            rs,
            wire: VecDeque::new(),
            isolated: BTreeSet::new(),
            applied: vec![Vec::new(); n as usize],
            reads: Vec::new(),
            sent: Vec::new(),
            swallow_snapshots_to: None,
        }
    }

    fn r(&mut self, id: ReplicaId) -> &mut RaftCore {
        &mut self.rs[(id - 1) as usize]
    }

    /// Carries out a Ready with an instant disk.
    fn carry(&mut self, id: ReplicaId, mut out: Ready) {
        let ack = out
            .entries
            .last()
            .map(|e| (e.index, e.term))
            .or(out.snapshot.as_ref().map(|s| (s.index, s.term)));
        if let Some((index, term)) = ack {
            self.r(id).persisted(index, term, &mut out);
        }
        self.applied[(id - 1) as usize].append(&mut out.committed);
        self.reads.append(&mut out.reads);
        self.sent.extend(out.messages.iter().cloned());
        self.wire.extend(out.messages);
    }

    fn deliver(&mut self) {
        if !self.deliver_upto(100_000) {
            let tail: Vec<_> = self.sent.iter().rev().take(12).collect();
            panic!("the wire never went quiet: {tail:#?}");
        }
    }

    /// Delivers until the wire is empty (true) or `limit` messages went (false).
    fn deliver_upto(&mut self, limit: usize) -> bool {
        for _ in 0..limit {
            let Some(m) = self.wire.pop_front() else {
                return true;
            };
            if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                continue;
            }
            if self.swallow_snapshots_to == Some(m.to) && matches!(m.body, Body::Snapshot(_)) {
                continue;
            }
            let mut out = Ready::default();
            self.r(m.to).receive(m.clone(), &mut out);
            self.carry(m.to, out);
        }
        self.wire.is_empty()
    }

    fn tick(&mut self, ticks: u32) {
        for _ in 0..ticks {
            for id in 1..=self.rs.len() as u64 {
                let mut out = Ready::default();
                self.r(id).tick(&mut out);
                self.carry(id, out);
            }
            self.deliver();
        }
    }

    fn leader(&self) -> Option<ReplicaId> {
        self.rs
            .iter()
            .find(|r| r.role() == Role::Leader)
            .map(|r| r.id())
    }

    /// Ticks until `id` leads (by campaigning first), and everyone has applied its no-op.
    fn elect(&mut self, id: ReplicaId) {
        let mut out = Ready::default();
        self.r(id).campaign(false, false, &mut out);
        self.carry(id, out);
        self.deliver();
        assert_eq!(self.r(id).role(), Role::Leader);
        self.tick(2);
    }

    fn propose(&mut self, id: ReplicaId, data: &[u8]) -> Result<(u64, u64), RaftError> {
        let mut out = Ready::default();
        let at = self.r(id).propose(data.to_vec(), &mut out);
        self.carry(id, out);
        self.deliver();
        at
    }
}

#[test]
fn bad_configs_are_refused() {
    let bad = |cfg: Config| matches!(RaftCore::new(cfg), Err(RaftError::BadConfig(_)));
    assert!(bad(Config::new(1, &[1, 2], 0)));
    assert!(bad(Config::new(1, &[1, 2, 2], 0)));
    assert!(bad(Config::new(4, &[1, 2, 3], 0)));
    let mut cfg = Config::new(1, &[1, 2, 3], 0);
    cfg.heartbeat_ticks = cfg.election_ticks;
    assert!(bad(cfg));
}

#[test]
fn a_rejoining_replica_does_not_depose_a_healthy_leader() {
    let mut c = Cluster::new(3, 1, |_| {});
    c.elect(1);
    let term = c.r(1).term();
    c.isolated.insert(3);
    c.tick(100);
    // Pre-vote (§9.6): cut off, replica 3 campaigned and lost, without raising its term.
    assert_eq!(c.r(3).term(), term);
    c.isolated.clear();
    c.tick(30);
    assert_eq!(c.leader(), Some(1));
    assert_eq!(c.r(1).term(), term);
    assert_eq!(c.r(3).leader(), Some(1));
}

#[test]
fn without_pre_vote_a_rejoining_replica_raises_the_term() {
    // The control for the test above: the harness can see a disruption when there is one.
    let mut c = Cluster::new(3, 1, |cfg| {
        cfg.pre_vote = false;
        cfg.check_quorum = false;
    });
    c.elect(1);
    let term = c.r(1).term();
    c.isolated.insert(3);
    c.tick(100);
    c.isolated.clear();
    c.tick(30);
    assert!(c.r(1).term() > term);
}

#[test]
fn a_leader_cut_off_from_the_majority_steps_down_and_the_rest_elect() {
    let mut c = Cluster::new(5, 2, |_| {});
    c.elect(1);
    c.isolated.insert(1);
    // Check-quorum (thesis §6.2): within two election timeouts it notices.
    c.tick(2 * 10);
    assert_eq!(c.r(1).role(), Role::Follower);
    assert_eq!(
        c.propose(1, b"x"),
        Err(RaftError::NotLeader { leader: None })
    );
    c.tick(40);
    let l = c.leader().expect("the majority elects a leader");
    assert_ne!(l, 1);
    c.isolated.clear();
    c.tick(5);
    assert_eq!(c.r(1).leader(), Some(l));
}

#[test]
fn reads_wait_for_the_first_commit_of_the_term_and_share_a_round() {
    let mut c = Cluster::new(3, 3, |_| {});
    let mut out = Ready::default();
    c.r(1).campaign(false, false, &mut out);
    c.carry(1, out);
    // Deliver only the votes: replica 1 leads, but its no-op is not committed yet.
    for _ in 0..4 {
        let m = c.wire.pop_front().unwrap();
        let to = m.to;
        let mut out = Ready::default();
        c.r(to).receive(m, &mut out);
        c.carry(to, out);
    }
    assert_eq!(c.r(1).role(), Role::Leader);
    let mut out = Ready::default();
    c.r(1).read_index(7, &mut out).unwrap();
    assert!(out.reads.is_empty());
    assert!(!out
        .messages
        .iter()
        .any(|m| matches!(m.body, Body::Heartbeat { round: 1.., .. })));
    c.carry(1, out);
    c.deliver();
    // §6.4: answered once the no-op committed and a majority confirmed the leadership.
    assert_eq!(c.reads, vec![ReadState { ctx: 7, index: 1 }]);

    // Three reads asked while no round is out: the first starts a round, the next two
    // wait for the next one together; two rounds, not three.
    c.sent.clear();
    c.reads.clear();
    for ctx in [10, 11, 12] {
        let mut out = Ready::default();
        c.r(1).read_index(ctx, &mut out).unwrap();
        c.carry(1, out);
    }
    c.deliver();
    let rounds: BTreeSet<u64> = c
        .sent
        .iter()
        .filter_map(|m| match m.body {
            Body::Heartbeat { round, .. } if round > 0 => Some(round),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    let ctxs: Vec<u64> = c.reads.iter().map(|r| r.ctx).collect();
    assert_eq!(ctxs, vec![10, 11, 12]);
    assert_eq!(
        c.r(2).read_index(1, &mut Ready::default()),
        Err(RaftError::NotLeader { leader: Some(1) })
    );
}

#[test]
fn a_read_rides_on_acknowledgements_of_appends_sent_after_it_only() {
    let mut c = Cluster::new(3, 3, |_| {});
    c.elect(1);
    // Entry 2 goes out; the followers take it, and their acknowledgements wait on the wire.
    let mut out = Ready::default();
    let (two, _) = c.r(1).propose(b"a".to_vec(), &mut out).unwrap();
    c.carry(1, out);
    let mut held = VecDeque::new();
    while let Some(m) = c.wire.pop_front() {
        if m.to == 1 {
            held.push_back(m);
        } else {
            let to = m.to;
            let mut out = Ready::default();
            c.r(to).receive(m, &mut out);
            c.carry(to, out);
        }
    }
    held.extend(c.wire.drain(..));
    // The read is asked now; its round's heartbeats are lost, so only Appends can
    // confirm it.
    let mut out = Ready::default();
    c.r(1).read_index(9, &mut out).unwrap();
    out.messages
        .retain(|m| !matches!(m.body, Body::Heartbeat { .. }));
    c.sent.clear();
    c.carry(1, out);
    // Acknowledgements of an Append sent before the read commit entry 2, and prove
    // nothing about the leadership since the read: no confirmation.
    c.wire = held;
    c.deliver();
    assert_eq!(c.r(1).commit_index(), two);
    assert!(c.reads.is_empty(), "{:?}", c.reads);
    // An entry appended after the read: a majority's acknowledgement of it confirms the
    // read, at the commit index it was asked at (1: entry 2 was not committed then).
    c.propose(1, b"b").unwrap();
    assert_eq!(c.reads, vec![ReadState { ctx: 9, index: 1 }]);
    assert!(
        !c.sent
            .iter()
            .any(|m| matches!(m.body, Body::HeartbeatResp { .. })),
        "no heartbeat was answered"
    );
}

#[test]
fn a_deposed_leader_fails_its_pending_reads() {
    let mut c = Cluster::new(3, 4, |_| {});
    c.elect(1);
    c.isolated.insert(1);
    let mut out = Ready::default();
    c.r(1).read_index(5, &mut out).unwrap();
    c.carry(1, out);
    let mut failed = Vec::new();
    for _ in 0..30 {
        let mut out = Ready::default();
        c.r(1).tick(&mut out);
        failed.append(&mut out.failed_reads);
        assert!(out.reads.is_empty());
    }
    assert_eq!(failed, vec![5]);
}

#[test]
fn leadership_transfer_hands_over_without_an_election_timeout() {
    let mut c = Cluster::new(3, 5, |_| {});
    c.elect(1);
    c.propose(1, b"a").unwrap();
    let term = c.r(1).term();
    let mut out = Ready::default();
    c.r(1).transfer_leadership(3, &mut out).unwrap();
    c.carry(1, out);
    assert_eq!(c.propose(1, b"b"), Err(RaftError::Transferring));
    c.deliver();
    // No tick has passed: the TimeoutNow forced the election (thesis §3.10).
    assert_eq!(c.leader(), Some(3));
    assert_eq!(c.r(3).term(), term + 1);
    c.propose(3, b"c").unwrap();
    c.tick(1);
    assert!(c
        .applied
        .iter()
        .all(|a| a.last().map(|e| &e.data[..]) == Some(b"c")));
}

#[test]
fn a_follower_behind_the_first_index_gets_the_snapshot() {
    // Two-byte chunks: the five-byte blob goes as three InstallSnapshot messages.
    let mut c = Cluster::new(3, 6, |cfg| cfg.max_chunk = 2);
    c.elect(1);
    c.isolated.insert(3);
    for i in 0..20u8 {
        c.propose(1, &[i]).unwrap();
    }
    let applied = c.r(1).applied_index();
    let snap = c.r(1).compact(applied, b"state".to_vec()).unwrap();
    assert_eq!(c.r(1).first_index(), applied + 1);
    assert!(c.r(1).compact(applied + 1, vec![]).is_err());
    c.isolated.clear();
    c.sent.clear();
    // The leader streamed entries to 3 that were lost; after half an election timeout of
    // heartbeats answered without progress it probes, finds the gap, sends the snapshot.
    c.tick(2);
    assert_eq!(c.r(3).snapshot().index, 0);
    c.tick(4);
    assert_eq!(c.r(3).snapshot(), &snap);
    let chunks: Vec<(u64, usize)> = c
        .sent
        .iter()
        .filter_map(|m| match &m.body {
            Body::Snapshot(s) => Some((s.offset, s.data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, [(0, 2), (2, 2), (4, 1)]);
    c.propose(1, b"after").unwrap();
    c.tick(1);
    assert_eq!(
        c.applied[2].last().map(|e| &e.data[..]),
        Some(&b"after"[..])
    );
}

/// A follower that does not answer the snapshot (it answers only once it has saved and
/// restored it, which for a large state takes longer than an election timeout) is not sent
/// the whole snapshot again every election timeout: the wait doubles with each send, up
/// to eight election timeouts, and starts again once it answers.
#[test]
fn an_unanswered_snapshot_is_sent_again_ever_less_often() {
    let mut c = Cluster::new(3, 6, |cfg| cfg.max_chunk = 2);
    let election = u64::from(c.r(1).cfg.election_ticks);
    c.elect(1);
    c.isolated.insert(3);
    for i in 0..20u8 {
        c.propose(1, &[i]).unwrap();
    }
    let applied = c.r(1).applied_index();
    c.r(1).compact(applied, b"state".to_vec()).unwrap();
    c.isolated.clear();
    c.swallow_snapshots_to = Some(3);
    c.sent.clear();
    c.tick(16 * election as u32);
    let sends = c
        .sent
        .iter()
        .filter(|m| matches!(&m.body, Body::Snapshot(s) if s.offset == 0))
        .count();
    // At a fixed election timeout it went 15 or 16 times; waiting 1, 2, 4, 8 and 8
    // timeouts after each send, 5 or 6.
    assert!(
        (4..=6).contains(&sends),
        "sent {sends} times in 16 election timeouts"
    );
    assert_eq!(c.r(1).role(), Role::Leader);
    c.swallow_snapshots_to = None;
    c.tick(8 * election as u32 + 2);
    assert_eq!(
        c.r(3).snapshot().index,
        applied,
        "installed once let through"
    );
}

/// Hands follower 3 one InstallSnapshot chunk from `from` in `term`; returns what it
/// installed and whether it answered.
fn chunk_to(r: &mut RaftCore, from: ReplicaId, term: u64, blob: &[u8], at: usize) -> Ready {
    let end = blob.len().min(at + 4);
    let mut out = Ready::default();
    let chunk = SnapshotChunk {
        index: 10,
        term: 2,
        offset: at as u64,
        total: blob.len() as u64,
        data: blob[at..end].to_vec(),
    };
    let body = Body::Snapshot(chunk);
    r.receive(
        Message {
            from,
            to: 3,
            term,
            body,
        },
        &mut out,
    );
    out
}

/// A member's message with a term past [`MAX_TERM`] (forged, or corrupt on a link with no
/// secret) is ignored: taken, the replica's next term would wrap and it could never be
/// elected again.
#[test]
fn a_term_past_the_bound_is_ignored() {
    use super::replica::MAX_TERM;
    let mut r = RaftCore::new(Config::new(3, &[1, 2, 3], 1)).unwrap();
    for term in [u64::MAX, MAX_TERM + 1] {
        for body in [
            Body::VoteResp { granted: false },
            Body::Heartbeat {
                commit: u64::MAX,
                round: 0,
            },
        ] {
            let mut out = Ready::default();
            r.receive(
                Message {
                    from: 1,
                    to: 3,
                    term,
                    body,
                },
                &mut out,
            );
            assert_eq!(r.term(), 0, "took term {term}");
            assert!(out.hard_state.is_none() && out.messages.is_empty());
        }
    }
    // At the bound itself it is still a term.
    let mut out = Ready::default();
    let body = Body::VoteResp { granted: false };
    r.receive(
        Message {
            from: 1,
            to: 3,
            term: MAX_TERM,
            body,
        },
        &mut out,
    );
    assert_eq!(r.term(), MAX_TERM);
}

fn answered(out: &Ready) -> bool {
    out.messages
        .iter()
        .any(|m| matches!(m.body, Body::AppendResp { index: 10, .. }))
}

/// InstallSnapshot in 4-byte chunks: a reordered, a duplicated and a lost chunk install
/// nothing (and get no answer) until the leader sends the whole snapshot again; then
/// the chunks fill in from where they stopped, and the snapshot is installed whole.
#[test]
fn a_chunked_snapshot_survives_loss_duplication_and_reordering() {
    let blob = b"0123456789abcdef";
    let mut r = RaftCore::new(Config::new(3, &[1, 2, 3], 1)).unwrap();
    for at in [0, 8, 4, 4] {
        // 8 before 4 (reordered: dropped), 4 twice (duplicated), 12 lost.
        let out = chunk_to(&mut r, 1, 2, blob, at);
        assert!(out.snapshot.is_none() && !answered(&out), "chunk at {at}");
    }
    assert_eq!(r.snapshot().index, 0);
    // The leader's resend: 0 and 4 are duplicates now, 8 and 12 complete it.
    let mut last = Ready::default();
    for at in [0, 4, 8, 12] {
        last = chunk_to(&mut r, 1, 2, blob, at);
    }
    let snap = last
        .snapshot
        .as_ref()
        .expect("installed with the last chunk");
    assert_eq!((snap.index, snap.term, &snap.data[..]), (10, 2, &blob[..]));
    assert!(answered(&last));
    assert_eq!((r.commit_index(), r.snapshot().index), (10, 10));
}

/// A leader change in the middle of a transfer: the new leader's blob for the same
/// snapshot index differs byte for byte (another replica's encoding), so its chunks
/// never continue the old leader's; a late chunk of the old leader is refused by term.
#[test]
fn a_chunked_snapshot_never_mixes_two_leaders_chunks() {
    let (old, new) = (b"AAAABBBBCCCCDDDD", b"wwwwxxxxyyyyzzzz");
    let mut r = RaftCore::new(Config::new(3, &[1, 2, 3], 1)).unwrap();
    for at in [0, 4] {
        chunk_to(&mut r, 1, 2, old, at);
    }
    // Replica 2 leads in term 3; its chunks 8 and 12 must not complete 1's 0 and 4.
    for at in [8, 12] {
        let out = chunk_to(&mut r, 2, 3, new, at);
        assert!(out.snapshot.is_none() && !answered(&out), "chunk at {at}");
    }
    // The old leader's last chunks arrive late, from a stale term.
    for at in [8, 12] {
        let out = chunk_to(&mut r, 1, 2, old, at);
        assert!(
            out.snapshot.is_none() && !answered(&out),
            "stale chunk at {at}"
        );
    }
    let mut last = Ready::default();
    for at in [0, 4, 8, 12] {
        last = chunk_to(&mut r, 2, 3, new, at);
    }
    let snap = last.snapshot.expect("the new leader's snapshot, whole");
    assert_eq!(&snap.data[..], &new[..]);
    assert_eq!(r.snapshot().data, new.to_vec());
}

#[test]
fn a_diverged_follower_is_repaired_by_term_not_entry_by_entry() {
    let mut c = Cluster::new(3, 7, |cfg| cfg.max_batch = 1000);
    c.elect(1);
    // RaftCore 1 leads alone and piles up 50 entries nobody else has.
    c.isolated.extend([2, 3]);
    for i in 0..50u8 {
        let _ = c.propose(1, &[i]);
    }
    c.isolated = BTreeSet::from([1]);
    c.tick(40);
    let l = c.leader().unwrap();
    c.propose(l, b"new").unwrap();
    c.isolated.clear();
    c.sent.clear();
    c.tick(3);
    let rejections = c
        .sent
        .iter()
        .filter(|m| m.to == l && matches!(m.body, Body::AppendResp { reject: true, .. }));
    assert!(
        rejections.count() <= 2,
        "back-off by term takes at most a couple of probes"
    );
    assert_eq!(c.r(1).last_index(), c.r(l).last_index());
    assert_eq!(c.applied[0].last().map(|e| &e.data[..]), Some(&b"new"[..]));
}

fn stored(term: u64, terms: &[u64]) -> Stored {
    let entries = terms
        .iter()
        .enumerate()
        .map(|(i, &t)| Entry {
            index: i as u64 + 1,
            term: t,
            data: vec![t as u8],
        })
        .collect();
    Stored {
        hard_state: HardState {
            term,
            vote: None,
            commit: 1,
        },
        snapshot: Snapshot::default(),
        entries,
    }
}

/// Figure 8 of the paper, scripted. S1 leads term 4 and brings index 2 (of term 2) to a
/// majority, but not its own term-4 entry. Counting replicas of index 2 must not commit
/// it (§5.4.2): S5 (last entry of term 3) can still be elected and overwrite it. With the
/// rule disabled, S1 applies index 2 and S5 later applies a different index 2.
#[test]
fn figure_8_only_current_term_entries_commit_by_counting() {
    for bug in [Bug::None, Bug::CommitAnyTerm] {
        let ids = [1, 2, 3, 4, 5];
        let logs: [&[u64]; 5] = [&[1, 2], &[1, 2], &[1], &[1], &[1, 3]];
        let mut c = Cluster::new(5, 8, |_| {});
        for (at, log) in logs.iter().enumerate() {
            let mut cfg = Config::new(ids[at], &ids, 8);
            cfg.max_batch = 1;
            c.rs[at] = RaftCore::restart(cfg, stored(3, log)).unwrap();
            c.rs[at].bug = bug;
        }
        c.isolated.insert(5);
        let mut out = Ready::default();
        c.r(1).campaign(false, false, &mut out);
        c.carry(1, out);
        // Nothing of term 4 gets through: S1's no-op stays on S1.
        for _ in 0..3 {
            while let Some(mut m) = c.wire.pop_front() {
                if c.isolated.contains(&m.to) || c.isolated.contains(&m.from) {
                    continue;
                }
                if let Body::Append { entries, .. } = &mut m.body {
                    entries.retain(|e| e.term != 4);
                }
                let mut out = Ready::default();
                c.r(m.to).receive(m.clone(), &mut out);
                c.carry(m.to, out);
            }
            let mut out = Ready::default();
            c.r(1).tick(&mut out);
            c.carry(1, out);
        }
        assert_eq!(c.r(1).role(), Role::Leader);
        assert_eq!(
            (2..=4)
                .map(|id| c.rs[id - 1].term_at(2))
                .collect::<Vec<_>>(),
            [Some(2); 3]
        );
        let s1_applied_2 = c.applied[0].iter().any(|e| e.index == 2);
        assert_eq!(s1_applied_2, bug == Bug::CommitAnyTerm, "{bug:?}");

        // S1 is cut off; S5 campaigns (forced past the others' lease) and wins, since its
        // last entry (term 3) is more up to date than theirs (term 2).
        c.isolated = BTreeSet::from([1]);
        c.wire.clear();
        for _ in 0..2 {
            let mut out = Ready::default();
            c.r(5).campaign(false, true, &mut out);
            c.carry(5, out);
            c.deliver_upto(1000);
        }
        assert_eq!(c.r(5).role(), Role::Leader);
        assert_eq!(c.r(5).term_at(2), Some(3));
        if bug == Bug::None {
            c.tick(3);
            let s5_index_2 = c.applied[4].iter().find(|e| e.index == 2).map(|e| e.term);
            assert_eq!(s5_index_2, Some(3));
            assert!((2..=4).all(|id| c.r(id).term_at(2) == Some(3)));
        } else {
            // Under the bug, S1 applied (2, term 2) and the leader of term 5 lacks it:
            // Leader Completeness is broken, and S5 would commit its own index 2.
            let s1_index_2 = c.applied[0].iter().find(|e| e.index == 2).map(|e| e.term);
            assert_eq!(s1_index_2, Some(2));
        }
    }
}
