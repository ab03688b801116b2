//! Inbound replication links: the HELLO check and the WELCOME, then every message a peer
//! sends, decided under the lock, with one flush and one acknowledgement per read.

use super::feed::encode_peer;
use super::records::Incoming;
use super::timing::{
    BATCH, CONNECT_TIMEOUT, DOWN_AFTER, HELLO_WAIT, LINK_TIMEOUT, NEED_RETRY, SNAPSHOT_REASK, TICK,
};
use super::view::{Assembly, Feed, Inner};
use super::Replica;
use crate::framing::{FrameError, FrameReader, Framing, Limits};
use crate::link::{self, End, Timeouts, Verdict};
use crate::log_info;
use crate::messenger::log::Pos;
use crate::messenger::replica_protocol::{
    ReplicaMsg, Role, Standing, Status, MAX_EPOCH, MAX_PEER_FRAME, SNAPSHOT_CHUNK,
};
use crate::server::{Connection, HandlerError};
use std::cell::Cell;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Instant;

/// An inbound link's timeouts: this side writes only its WELCOME, and a peer silent for
/// [`LINK_TIMEOUT`] (five heartbeats' worth of time, and more) has gone.
const TIMEOUTS: Timeouts = Timeouts {
    connect: CONNECT_TIMEOUT,
    handshake: LINK_TIMEOUT,
    write: LINK_TIMEOUT,
    idle: Some(LINK_TIMEOUT),
};

impl Replica {
    /// Serves an inbound peer link whose HELLO `first` (the connection's reader) has read.
    /// With a cluster secret, the dialer's claim is proven first ([`link::authenticate`]),
    /// before anything here hears of it. The dialer then sends nothing until it has our
    /// WELCOME, so nothing may be buffered past the HELLO (and the handshake), and the
    /// link's reader (with the peer frame limit) starts afresh.
    pub(in crate::messenger) fn serve_peer(
        &self,
        conn: &Connection,
        hello: &[u8],
        mut first: FrameReader<&TcpStream>,
    ) -> Result<(), HandlerError> {
        let claimed = match ReplicaMsg::decode(hello) {
            Ok(ReplicaMsg::Hello { from, cluster })
                if cluster == self.cluster && from < self.addrs.len() && from != self.id =>
            {
                Some(from)
            }
            _ => None,
        };
        if let Some(from) = claimed {
            let claim = from.to_string();
            let proven = link::authenticate(
                &conn.stream,
                &mut first,
                &TIMEOUTS,
                self.auth.as_ref(),
                claim.as_bytes(),
            );
            if proven.is_err() {
                // Logged with the address, and closed, by `authenticate`.
                return Ok(());
            }
            // A proven member: it may hold a reserve slot (`ServerConfig::reserved_connections`).
            conn.opened();
        }
        let from = claimed.filter(|_| first.buffered_len() == 0);
        drop(first);
        // A live link from the same server is not replaced on a mere HELLO: only once it is
        // proven dead (silent for DOWN_AFTER, or closed), which a real server's old link is
        // within the wait.
        let replaceable = from.is_none_or(|f| self.await_old_link(f));
        let verdict = match from {
            Some(_) if replaceable => {
                let mut welcome = Vec::new();
                encode_peer(&ReplicaMsg::Welcome.encode(), &mut welcome);
                Verdict::Welcome(welcome)
            }
            // Closed without a word, as the protocol has always done.
            _ => Verdict::Refuse(Vec::new()),
        };
        let limits = Limits {
            max_frame: MAX_PEER_FRAME,
            ..Limits::default()
        };
        // Not charged to the client memory budget, unlike a client's reader: a member's
        // frame (a snapshot chunk, up to MAX_PEER_FRAME) must be read whatever clients
        // hold, or a budget smaller than one frame (the least allowed is 1 MiB) would stop
        // a lagging server ever catching up. A link per member, each at most one frame.
        let reader = FrameReader::with_limits(&*conn.stream, Framing::U32, limits);
        let accepted = link::accept(&conn.stream, reader, &TIMEOUTS, verdict)?;
        let (Some(from), Some(mut link)) = (from.filter(|_| replaceable), accepted) else {
            self.log_refusal(from, conn.peer);
            return Ok(());
        };
        // In the replica's group too, so its stop ends the link like its other threads.
        if link.register(&self.group).is_err() {
            return Ok(());
        }
        let generation = {
            let mut inner = self.lock();
            let p = &mut inner.peers[from];
            p.inbound += 1;
            p.heard = Some(Instant::now());
            // Alive again: a refused dial from before says nothing of it now.
            p.dead = false;
            p.assembly = None;
            // Its heartbeats on this link are echoed afresh: until one is, ours say 0, and
            // it knows that its link here delivers nothing yet.
            p.echo = 0;
            if let Some(old) = p.link.replace(Arc::clone(link.stream())) {
                let _ = old.shutdown(Shutdown::Both);
            }
            p.inbound
        };
        // One read, every frame it completed, then one flush and one acknowledgement for
        // all the records among them: a backup that falls behind catches up in fewer,
        // larger fsyncs.
        let ack = Cell::new(None);
        let refused = Cell::new(false);
        let name = format!("messenger-{}: the link from server {from}", self.id);
        let end = link.read_batches(
            &name,
            |frame| match ReplicaMsg::decode(frame) {
                Ok(msg) if msg.highest_epoch() > MAX_EPOCH => {
                    // Never taken in: past the limit, epoch arithmetic could wrap. Logged
                    // once per link.
                    if !refused.replace(true) {
                        log_info!(
                            "messenger-{}: refused server {from}'s messages naming epoch {} \
                             (above the limit {MAX_EPOCH})",
                            self.id,
                            msg.highest_epoch()
                        );
                    }
                    ControlFlow::Continue(())
                }
                Ok(msg) => match self.misplaced(from, &msg) {
                    // A member that speaks for another is buggy or not what it proved to
                    // be: its link ends, and nothing it sent on it is taken.
                    Some(why) => {
                        log_info!(
                            "messenger-{}: closed the link from server {from}: {why}",
                            self.id
                        );
                        ControlFlow::Break(why.into())
                    }
                    None => {
                        let mut a = ack.get();
                        self.on_peer(from, generation, msg, &mut a);
                        ack.set(a);
                        ControlFlow::Continue(())
                    }
                },
                Err(e) => ControlFlow::Break(HandlerError::from(e)),
            },
            || {
                if let Some((epoch, seq)) = ack.take() {
                    self.acknowledge(from, epoch, seq);
                }
            },
        );
        let result = match end {
            End::Closed => Ok(()),
            // A silent or reset link: the peer is down, not misbehaving.
            End::Lost(FrameError::Io(_)) => Ok(()),
            End::Lost(e) => Err(e.into()),
            End::Stopped(e) => Err(e),
        };
        let mut inner = self.lock();
        if inner.peers[from].inbound == generation {
            inner.peers[from].link = None;
            self.peer_down(&mut inner, from, "link closed");
        }
        self.reconcile(inner);
        result
    }

    /// Handles one message from peer `from`. Records taken from a primary are acknowledged
    /// by the caller, once per read: `ack` is set to the epoch and sequence number to
    /// acknowledge.
    fn on_peer(&self, from: usize, generation: u64, msg: ReplicaMsg, ack: &mut Option<(u64, u64)>) {
        let mut inner = self.lock();
        if inner.peers[from].inbound != generation {
            return;
        }
        inner.peers[from].heard = Some(Instant::now());
        match msg {
            ReplicaMsg::Heartbeat(status) => self.on_heartbeat(inner, from, status),
            ReplicaMsg::Replicate {
                epoch,
                prev,
                records,
                fetched,
            } => {
                let incoming = Incoming::Records(prev, records);
                if fetched {
                    self.on_fetched(inner, from, incoming);
                } else {
                    self.on_replicate(inner, from, epoch, incoming, ack);
                }
            }
            ReplicaMsg::Snapshot {
                epoch,
                pos,
                total,
                offset,
                bytes,
                fetched,
            } => {
                let chunk = Assembly {
                    epoch,
                    pos,
                    total,
                    fetched,
                    bytes,
                };
                let Some(whole) = self.assemble(&mut inner, from, offset, chunk) else {
                    return;
                };
                let incoming = Incoming::Snapshot(pos, whole);
                if fetched {
                    self.on_fetched(inner, from, incoming);
                } else {
                    self.on_replicate(inner, from, epoch, incoming, ack);
                }
            }
            ReplicaMsg::Ack { epoch, seq } => {
                if inner.role == Role::Primary && epoch == inner.epoch {
                    let p = &mut inner.peers[from];
                    p.acked = p.acked.max(seq);
                    self.recompute_commit(&mut inner);
                    self.changed.notify_all();
                }
            }
            ReplicaMsg::Need { last } => {
                if inner.role == Role::Primary {
                    inner.peers[from].feed = if inner.holds(last) {
                        Feed::From(last.seq + 1)
                    } else {
                        Feed::Snapshot
                    };
                    self.changed.notify_all();
                }
            }
            ReplicaMsg::Reject { epoch } => {
                inner.max_epoch = inner.max_epoch.max(epoch);
                self.superseded(&mut inner, epoch, from);
                self.reconcile_reading(inner, from);
            }
            ReplicaMsg::Fetch { last } => {
                // Records after the asker's last if this log has it; all of this log if it
                // is ahead but does not; else nothing (an empty answer: nothing newer).
                // One batch of records at most: the candidate asks again about its new
                // last record until the answer is empty.
                let answer = if inner.holds(last) {
                    vec![ReplicaMsg::Replicate {
                        epoch: inner.epoch,
                        prev: last,
                        records: inner.records_after(last.seq, BATCH),
                        fetched: true,
                    }]
                } else if inner.last > last {
                    // One copy per question for a while: a candidate asks again every
                    // second while the answer is still on its way (a large state on a
                    // slow link), and each answer queued another whole copy of the state.
                    // Not for good: an asker that refused the copy (it had stopped being a
                    // candidate meanwhile) and asks the same again must get one.
                    let now = Instant::now();
                    let again = inner.peers[from]
                        .fetched_snapshot
                        .is_some_and(|(l, at, when)| {
                            (l, at) == (last, inner.last)
                                && now.duration_since(when) < SNAPSHOT_REASK
                        });
                    if again {
                        return;
                    }
                    inner.peers[from].fetched_snapshot = Some((last, inner.last, now));
                    self.snapshot_for(&mut inner, from, true)
                } else {
                    vec![ReplicaMsg::Replicate {
                        epoch: inner.epoch,
                        prev: last,
                        records: Vec::new(),
                        fetched: true,
                    }]
                };
                let control = &mut inner.peers[from].control;
                control.extend(answer.iter().map(ReplicaMsg::encode));
                self.changed.notify_all();
            }
            ReplicaMsg::Hello { .. } | ReplicaMsg::Welcome => {}
            ReplicaMsg::Forward { .. } | ReplicaMsg::Relay { .. } | ReplicaMsg::Closed { .. } => {
                self.on_forwarding(inner, from, msg);
            }
        }
    }

    /// Waits (at most [`HELLO_WAIT`]) until server `from` has no live inbound link: none,
    /// or one silent for [`DOWN_AFTER`]. False if it still has one (or the replica stops).
    fn await_old_link(&self, from: usize) -> bool {
        let deadline = Instant::now() + HELLO_WAIT;
        let mut inner = self.lock();
        loop {
            let now = Instant::now();
            let p = &inner.peers[from];
            let live = p.link.is_some() && p.last_heard(now).is_some_and(|t| now - t < DOWN_AFTER);
            if inner.stopping {
                return false;
            }
            if !live {
                return true;
            }
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(TICK);
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn log_refusal(&self, from: Option<usize>, addr: SocketAddr) {
        match from {
            Some(from) => log_info!(
                "messenger-{}: refused a second link from server {from} ({addr}): its link \
                 is alive",
                self.id
            ),
            None => log_info!(
                "messenger-{}: refused a peer link from {addr}: not of this cluster (check \
                 --peers)",
                self.id
            ),
        }
    }

    /// Why `msg` cannot have come from server `from`, if it cannot: records, snapshots and
    /// a primary's heartbeat only come from the primary of their epoch (server `e mod n`
    /// of `n` leads epoch `e`); a primary's snapshot is at a record of its epoch, and a
    /// snapshot answering a FETCH holds no record of a later epoch than its sender's.
    fn misplaced(&self, from: usize, msg: &ReplicaMsg) -> Option<&'static str> {
        let n = self.addrs.len() as u64;
        let leads = |epoch: u64| epoch % n == from as u64;
        match msg {
            ReplicaMsg::Replicate {
                epoch,
                fetched: false,
                ..
            } if !leads(*epoch) => Some("replication for an epoch it does not lead"),
            ReplicaMsg::Snapshot {
                epoch,
                fetched: false,
                ..
            } if !leads(*epoch) => Some("a snapshot for an epoch it does not lead"),
            // A primary's snapshot is at its last record, which is of its own epoch.
            ReplicaMsg::Snapshot {
                epoch,
                pos,
                fetched: false,
                ..
            } if pos.epoch != *epoch => Some("a snapshot not at its sender's epoch"),
            ReplicaMsg::Snapshot { epoch, pos, .. } if pos.epoch > *epoch => {
                Some("a snapshot from an epoch later than its own")
            }
            ReplicaMsg::Heartbeat(s) if s.role == Role::Primary && !leads(s.epoch) => {
                Some("primary of an epoch it does not lead")
            }
            _ => None,
        }
    }

    /// Adds a snapshot chunk from server `from` (starting at `offset`); returns the whole
    /// snapshot with its last chunk. A chunk that does not continue the snapshot under way
    /// drops it (logged); a first chunk is refused, before anything is kept, if the
    /// snapshot could not be taken anyway (see [`Replica::snapshot_refusal`]).
    fn assemble(
        &self,
        inner: &mut Inner,
        from: usize,
        offset: u64,
        chunk: Assembly,
    ) -> Option<Vec<u8>> {
        let p = &mut inner.peers[from];
        if offset == 0 {
            p.assembly = None;
            if let Some(why) = self.snapshot_refusal(inner, chunk.pos, chunk.fetched) {
                log_info!(
                    "messenger-{}: refused server {from}'s snapshot at {}: {why}",
                    self.id,
                    chunk.pos
                );
                if !chunk.fetched && chunk.epoch < inner.epoch {
                    let reject = ReplicaMsg::Reject { epoch: inner.epoch }.encode();
                    inner.peers[from].control.push(reject);
                    self.changed.notify_all();
                }
                return None;
            }
            let mut bytes = Vec::with_capacity((chunk.total as usize).min(SNAPSHOT_CHUNK));
            bytes.extend_from_slice(&chunk.bytes);
            inner.peers[from].assembly = Some(Assembly { bytes, ..chunk });
        } else {
            let fits = p.assembly.as_ref().is_some_and(|a| {
                (a.epoch, a.pos, a.total, a.fetched)
                    == (chunk.epoch, chunk.pos, chunk.total, chunk.fetched)
                    && a.bytes.len() as u64 == offset
            });
            if !fits {
                if p.assembly.take().is_some() {
                    log_info!(
                        "messenger-{}: server {from}'s snapshot chunk at {offset} does not \
                         continue its snapshot; dropped",
                        self.id
                    );
                }
                return None;
            }
            if let Some(a) = p.assembly.as_mut() {
                a.bytes.extend_from_slice(&chunk.bytes);
            }
        }
        let p = &mut inner.peers[from];
        if p.assembly.as_ref()?.bytes.len() as u64 == chunk.total {
            return p.assembly.take().map(|a| a.bytes);
        }
        None
    }

    fn on_heartbeat(&self, mut inner: MutexGuard<'_, Inner>, from: usize, status: Status) {
        inner.max_epoch = inner.max_epoch.max(status.epoch);
        if status.role != Role::Primary {
            self.superseded(&mut inner, status.epoch, from);
        }
        // Echoed back: it tells a primary this server has taken in what the heartbeat said
        // (its standing, applied below). A stale primary's standing is ignored, so is its mark.
        if status.role != Role::Primary || status.epoch >= inner.epoch {
            inner.peers[from].echo = status.mark;
        }
        if status.role == Role::Primary && status.epoch >= inner.epoch {
            let in_sync = match status.you {
                Standing::Excluded => false,
                Standing::InSync => true,
                Standing::Member | Standing::NotPrimary => inner.in_sync,
            };
            if in_sync != inner.in_sync {
                inner.in_sync = in_sync;
                inner.version += 1;
                let now = if in_sync { "holds" } else { "may miss" };
                log_info!(
                    "messenger-{}: {now} every committed change (server {from} says)",
                    self.id
                );
            }
        }
        if inner.peers[from].status.is_none() {
            log_info!("messenger-{}: server {from} is up", self.id);
        }
        inner.peers[from].status = Some(status);
        if inner.role == Role::Primary && inner.peers[from].feed == Feed::Unknown {
            self.init_feed(&mut inner, from);
        }
        self.reconcile_reading(inner, from);
    }

    fn on_replicate(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        from: usize,
        epoch: u64,
        incoming: Incoming,
        ack: &mut Option<(u64, u64)>,
    ) {
        if epoch < inner.epoch {
            let reject = ReplicaMsg::Reject { epoch: inner.epoch }.encode();
            inner.peers[from].control.push(reject);
            self.changed.notify_all();
            return;
        }
        if inner.role == Role::Primary {
            self.step_down(&mut inner, &format!("server {from} leads epoch {epoch}"));
        }
        if inner.role == Role::Candidate {
            self.set_candidate(&mut inner, false);
        }
        if epoch > inner.epoch {
            // Not `superseded`: the new primary took over from the greatest live log, this
            // server's included, and commits wait for it as a member.
            inner.epoch = epoch;
            inner.version += 1;
        }
        inner.max_epoch = inner.max_epoch.max(epoch);
        let Ok(agreed) = self.take(&mut inner, incoming) else {
            let last = inner.last;
            let now = Instant::now();
            let repeat = inner
                .need
                .is_some_and(|(p, at)| p == last && now.duration_since(at) < NEED_RETRY);
            if !repeat {
                inner.need = Some((last, now));
                inner.peers[from]
                    .control
                    .push(ReplicaMsg::Need { last }.encode());
                self.changed.notify_all();
            }
            return;
        };
        *ack = Some((epoch, agreed));
    }

    /// Makes everything taken so far durable, then acknowledges up to `seq` to the primary.
    fn acknowledge(&self, primary: usize, epoch: u64, seq: u64) {
        // This thread reads the primary's link: were the primary not counted as heard
        // while it syncs, a slow disk would make a live primary look silent to this server
        // (and to the other backups, syncing the same records at once), which would then
        // take over.
        let mut inner = self.flush_reading(self.lock(), primary, seq);
        if inner.epoch == epoch {
            inner.last_ack = Some((epoch, seq));
            let at = Pos {
                epoch: inner.epoch_at(seq).unwrap_or(inner.last.epoch),
                seq,
            };
            inner.acked = inner.acked.max(at);
            let ack = ReplicaMsg::Ack { epoch, seq }.encode();
            inner.peers[primary].control.push(ack);
            self.changed.notify_all();
        }
    }

    /// As candidate, takes a FETCH answer: what the peer holds beyond this server's last
    /// record, if anything, after which it is known to hold nothing newer.
    fn on_fetched<'a>(&'a self, mut inner: MutexGuard<'a, Inner>, from: usize, incoming: Incoming) {
        if inner.role != Role::Candidate {
            return;
        }
        let taken = match incoming {
            Incoming::Records(prev, records) if records.is_empty() => {
                if prev == inner.last {
                    inner.peers[from].confirmed = Some(prev);
                }
                None
            }
            Incoming::Snapshot(pos, _) if pos <= inner.last => None,
            records => Some(self.take(&mut inner, records)),
        };
        match taken {
            None => {}
            Some(Ok(_)) => {
                log_info!(
                    "messenger-{}: caught up to {} from server {from}",
                    self.id,
                    inner.last
                );
                // Answers are one batch at most: ask again about the new last record, until
                // the answer is that there is nothing newer.
                inner.peers[from].asked = None;
                // Durable before anything is made of them (this server could take over
                // next). This thread reads `from`'s link: were `from` not counted as heard
                // while it syncs, a slow disk would make it look silent, and this server
                // give up on it or take over without it.
                let seq = inner.last.seq;
                inner = self.flush_reading(inner, from, seq);
            }
            Some(Err(())) => {
                log_info!(
                    "messenger-{}: server {from}'s answer did not fit; asking again",
                    self.id
                );
                inner.peers[from].asked = None;
            }
        }
        // Taking over here (the last answer awaited) appends the epoch record, synced on
        // this thread too.
        self.reconcile_reading(inner, from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messenger::log::encode_snapshot;
    use crate::messenger::state::Change;

    /// Server `id` of two.
    fn replica(id: usize, name: &str) -> (Arc<Replica>, std::path::PathBuf) {
        super::super::testing::replica(id, 2, name)
    }

    /// A backup's reader syncing what it took from the primary reads nothing: the primary
    /// stays up (and followed) however long the sync lasts, and its silence counts from the
    /// sync's end. Before, two backups syncing on a slow disk both found a live primary
    /// silent and one took over (a change of primary under load, no stall logged).
    #[test]
    fn a_primary_is_not_silent_while_its_records_are_synced_nor_just_after() {
        use super::super::timing::DOWN_AFTER;
        let (b, dir) = replica(1, "syncing");
        let long_ago = Instant::now().checked_sub(2 * DOWN_AFTER).unwrap();
        let primary = Status {
            role: Role::Primary,
            epoch: 2,
            last: Pos { epoch: 2, seq: 0 },
            in_sync: true,
            you: Standing::Member,
            mark: 1,
            echo: 0,
            primary: None,
        };
        let mut inner = b.lock();
        inner.epoch = 2;
        inner.peers[0].status = Some(primary);
        inner.peers[0].heard = Some(long_ago);
        let now = Instant::now();
        assert!(!inner.up(0, now) && !inner.maybe_up(0, now));
        inner.peers[0].syncing = true;
        assert!(inner.up(0, now) && inner.maybe_up(0, now));
        assert_eq!(inner.following(1, now), Some(0));
        inner.peers[0].syncing = false;
        drop(inner);
        b.acknowledge(0, 2, 0);
        let inner = b.lock();
        assert!(!inner.peers[0].syncing);
        assert!(inner.up(0, Instant::now()), "silent from before the sync");
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Peer `j`'s sync is over and the peer counts as heard from no earlier than `before`
    /// (the sync's start): its silence counts from the end of the sync.
    fn assert_heard_since_sync(inner: &Inner, j: usize, before: Instant, what: &str) {
        assert!(!inner.peers[j].syncing);
        assert!(
            inner.peers[j].heard.is_some_and(|t| t >= before),
            "silent from before the sync of {what}"
        );
    }

    /// A candidate's reader syncing what it took from a peer's FETCH answer, or the epoch
    /// record of the takeover that the peer's last answer completes, reads nothing from that
    /// peer: it counts as heard meanwhile, and its silence counts from the sync's end.
    /// Before, a sync on a slow disk made a live peer look silent to the candidate, which
    /// then gave up on it (or, as new primary, went on without it).
    #[test]
    fn a_candidates_peer_is_not_silent_while_its_answer_or_the_takeover_is_synced() {
        use crate::messenger::log::Record;
        use std::time::Duration;
        let (c, dir) = super::super::testing::replica(0, 3, "candidate");
        let backup = |last| Status {
            role: Role::Backup,
            epoch: 1,
            last,
            in_sync: true,
            you: Standing::NotPrimary,
            mark: 1,
            echo: 0,
            primary: None,
        };
        let first = Pos { epoch: 1, seq: 1 };
        // A moment ago, so that only a refresh makes it `before` or later.
        let a_moment_ago = || {
            Instant::now()
                .checked_sub(Duration::from_millis(1))
                .unwrap()
        };
        let mut inner = c.lock();
        let start = inner.last;
        // No ticker runs here: never late, so the rules are applied (see `evaluate`).
        inner.last_tick = Instant::now() + Duration::from_secs(3600);
        (inner.epoch, inner.max_epoch, inner.in_sync) = (1, 1, true);
        inner.role = Role::Candidate;
        inner.peers[1].status = Some(backup(first));
        inner.peers[1].heard = Some(a_moment_ago());
        // Server 2 stays up whatever the time; it already said it holds nothing newer
        // than `first` (see below).
        inner.peers[2].status = Some(backup(first));
        inner.peers[2].heard = Some(Instant::now() + Duration::from_secs(3600));
        let before = Instant::now();
        let change = Change::Register {
            name: "ann".into(),
            nonce: 1,
        };
        let records = vec![Record {
            pos: first,
            change: change.to_bytes(),
        }];
        c.on_fetched(inner, 1, Incoming::Records(start, records));
        let mut inner = c.lock();
        assert_eq!(
            (inner.last, inner.durable),
            (first, 1),
            "taken, and durable"
        );
        assert_eq!(inner.role, Role::Candidate);
        assert_heard_since_sync(&inner, 1, before, "its answer");
        // Its last answer: nothing newer. With server 2's, this server takes over, and
        // the epoch record is synced on the same thread.
        inner.peers[2].confirmed = Some(first);
        inner.peers[1].heard = Some(a_moment_ago());
        let before = Instant::now();
        c.on_fetched(inner, 1, Incoming::Records(first, Vec::new()));
        let inner = c.lock();
        assert_eq!(inner.role, Role::Primary);
        assert_eq!(
            (inner.last.seq, inner.durable),
            (2, 2),
            "the epoch record is durable"
        );
        assert_heard_since_sync(&inner, 1, before, "the takeover");
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A primary's reader syncing a change that a backup forwarded reads nothing from
    /// that backup: it counts as heard meanwhile, and its silence counts from the sync's
    /// end (before, a slow disk made it look silent and it was dropped from the members).
    #[test]
    fn a_backup_is_not_silent_while_its_forwarded_change_is_synced() {
        use crate::messenger::protocol::{encode_request, Request};
        use std::time::Duration;
        let (p, dir) = replica(0, "forwarding");
        let mut inner = p.lock();
        // No ticker runs here: never late, so the rules are applied (see `evaluate`).
        inner.last_tick = Instant::now() + Duration::from_secs(3600);
        inner.in_sync = true;
        inner.role = Role::Candidate;
        let last = inner.last;
        inner.peers[1].status = Some(Status {
            role: Role::Backup,
            epoch: 0,
            last,
            in_sync: true,
            you: Standing::NotPrimary,
            mark: 1,
            echo: 0,
            primary: None,
        });
        inner.peers[1].heard = Some(Instant::now() + Duration::from_secs(3600));
        inner.peers[1].confirmed = Some(last);
        p.reconcile(inner);
        let mut inner = p.lock();
        assert_eq!(inner.role, Role::Primary);
        // A moment ago, so that only a refresh makes it `before` or later.
        inner.peers[1].heard = Instant::now().checked_sub(Duration::from_millis(1));
        let before = Instant::now();
        let mut request = Vec::new();
        let register = Request::Register {
            name: "ann".into(),
            nonce: None,
        };
        encode_request(&register, &mut request);
        let forward = ReplicaMsg::Forward { conn: 5, request };
        p.on_forwarding(inner, 1, forward);
        let inner = p.lock();
        assert_eq!(inner.durable, inner.last.seq, "the change is durable");
        assert!(inner.last.seq >= 2, "the change was appended");
        assert_heard_since_sync(&inner, 1, before, "its change");
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A candidate asks again every second while a snapshot is on its way: the same
    /// question gets no second copy of the state on the same link, and a new link gets
    /// one afresh (the first may not have arrived).
    #[test]
    fn a_fetch_asked_again_gets_one_snapshot_per_link() {
        use super::super::outbound::Outgoing;
        let (a, dir) = replica(0, "fetch-again");
        {
            let mut inner = a.lock();
            let change = Change::Register {
                name: "ann".into(),
                nonce: 1,
            };
            let at = Pos { epoch: 2, seq: 1 };
            inner.state.apply(at.into(), &change);
            (inner.epoch, inner.last) = (2, at);
        }
        let fetch = |a: &Replica| {
            let generation = a.lock().peers[1].inbound;
            let last = Pos { epoch: 1, seq: 7 };
            a.on_peer(1, generation, ReplicaMsg::Fetch { last }, &mut None);
            a.lock().peers[1].control.len()
        };
        let once = fetch(&a);
        assert!(once >= 1, "a snapshot answers");
        assert_eq!(fetch(&a), once, "asked again: no second copy");
        a.linked(1);
        assert_eq!(fetch(&a), 2 * once, "on a new link: answered afresh");
        // Asked again long after (the asker refused the copy): answered again.
        if let Some((_, _, when)) = &mut a.lock().peers[1].fetched_snapshot {
            *when -= SNAPSHOT_REASK;
        }
        assert_eq!(fetch(&a), 3 * once, "asked again later: answered");
        drop(a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_travels_in_chunks_and_only_whole_and_in_order_is_taken() {
        let (a, dir_a) = replica(0, "a");
        let (b, dir_b) = replica(1, "b");
        let mut from = a.lock();
        for i in 0..40_000u64 {
            let name = format!("account{i:032}");
            let change = Change::Register { name, nonce: i };
            from.state.apply(
                Pos {
                    epoch: 2,
                    seq: i + 1,
                }
                .into(),
                &change,
            );
        }
        (from.epoch, from.last) = (
            2,
            Pos {
                epoch: 2,
                seq: 40_000,
            },
        );
        let whole = encode_snapshot(from.last, &from.state);
        let chunks = a.snapshot_for(&mut from, 1, false);
        assert!(
            chunks.len() >= 2,
            "{} bytes in {}",
            whole.len(),
            chunks.len()
        );
        let parts: Vec<(u64, Assembly)> = chunks
            .into_iter()
            .map(|m| match m {
                ReplicaMsg::Snapshot {
                    epoch,
                    pos,
                    total,
                    offset,
                    bytes,
                    fetched,
                } => {
                    assert!(bytes.len() <= SNAPSHOT_CHUNK);
                    assert!(m_len(&bytes) <= MAX_PEER_FRAME);
                    let chunk = Assembly {
                        epoch,
                        pos,
                        total,
                        fetched,
                        bytes,
                    };
                    (offset, chunk)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let copy = |c: &Assembly| Assembly {
            bytes: c.bytes.clone(),
            ..*c
        };
        let mut to = b.lock();
        // Out of order: the second chunk alone is dropped, and so is what follows it.
        assert_eq!(b.assemble(&mut to, 0, parts[1].0, copy(&parts[1].1)), None);
        assert!(to.peers[0].assembly.is_none());
        // In order: nothing until the last, then the whole file.
        let mut got = None;
        for (i, (offset, chunk)) in parts.iter().enumerate() {
            got = b.assemble(&mut to, 0, *offset, copy(chunk));
            assert_eq!(got.is_some(), i + 1 == parts.len());
        }
        assert_eq!(got.unwrap(), whole);
        // A first chunk of a snapshot behind what this server acknowledged is refused
        // before anything is kept.
        to.acked = Pos { epoch: 3, seq: 1 };
        assert_eq!(b.assemble(&mut to, 0, 0, copy(&parts[0].1)), None);
        assert!(to.peers[0].assembly.is_none());
        drop((from, to));
        for dir in [dir_a, dir_b] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// A SNAPSHOT frame's payload length for a chunk of `bytes`.
    fn m_len(bytes: &[u8]) -> usize {
        1 + 8 + 16 + 8 + 8 + bytes.len()
    }
}
