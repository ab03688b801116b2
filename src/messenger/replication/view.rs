//! What one replica knows, behind its one lock: its role and epoch, the records it keeps
//! in memory, what it knows of every other server of the cluster, and its client
//! registry. Queries only; what changes it is in `roles`, `records` and `inbound`.

use super::timing::{DOWN_AFTER, FOLLOW_FRESH, WINDOW};
use crate::messenger::clients::Clients;
use crate::messenger::log::{Pos, Record};
use crate::messenger::replica_protocol::{Role, Standing, Status, BATCH_BYTES};
use crate::messenger::requests::Serving;
use crate::messenger::state::State;
use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

/// A record's bytes on the wire beyond its change: seq, epoch, length and CRC.
const RECORD_OVERHEAD: usize = 8 + 8 + 4 + 4;

/// What the primary streams to one peer next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feed {
    /// Its position is not known yet (no heartbeat since the link came up).
    Unknown,
    /// Records from this sequence number on.
    From(u64),
    /// A whole snapshot: its log does not continue ours.
    Snapshot,
}

/// A snapshot arriving in chunks on one inbound link.
pub(super) struct Assembly {
    /// The sender's epoch, the snapshot's position and length, and whether it answers a
    /// FETCH: every chunk must say the same.
    pub(super) epoch: u64,
    pub(super) pos: Pos,
    pub(super) total: u64,
    pub(super) fetched: bool,
    /// The chunks so far, in order.
    pub(super) bytes: Vec<u8>,
}

/// What this server knows of one other server of the cluster (a peer).
pub(super) struct Remote {
    /// When a frame last arrived on its inbound link; `None`: down. Read it through
    /// [`Remote::last_heard`].
    pub(super) heard: Option<Instant>,
    /// Its inbound link's reader is syncing (an fsync, which a busy disk can make last
    /// longer than [`DOWN_AFTER`]): records it took from it as backup or candidate, an
    /// epoch record appended on taking over there, a change it forwarded. The reader reads
    /// nothing meanwhile, so the silence says nothing of the peer.
    pub(super) syncing: bool,
    /// The last dial failed.
    pub(super) refused: bool,
    /// The last dial was refused outright (nothing listens at its address: the process is
    /// gone, and commits nothing). A cut network drops packets instead, and a dial then
    /// times out: this stays false. See the takeover rule in `roles.rs`.
    pub(super) dead: bool,
    /// Known down since start: its link closed or it went silent.
    pub(super) was_down: bool,
    /// Its last heartbeat.
    pub(super) status: Option<Status>,
    /// Generation of its current inbound link: frames from an older link (and its end)
    /// are ignored.
    pub(super) inbound: u64,
    /// The current inbound link, to close it after a stall.
    pub(super) link: Option<Arc<TcpStream>>,
    /// The mark of its last heartbeat taken in, echoed back to it (0: none since its link
    /// came up or this server stalled).
    pub(super) echo: u64,
    // As candidate:
    /// The position last asked about (FETCH), and when.
    pub(super) asked: Option<(Pos, Instant)>,
    /// The position it last answered it holds nothing beyond.
    pub(super) confirmed: Option<Pos>,
    // As primary:
    pub(super) feed: Feed,
    pub(super) acked: u64,
    /// Commits wait for its acknowledgements.
    pub(super) member: bool,
    /// The mark (`Inner::version`) from which heartbeats tell it that it is excluded. Until
    /// it echoes one, while it is up, it may still believe it holds every committed change,
    /// so commits wait for it all the same (see `recompute_commit`).
    pub(super) excluded: u64,
    /// The record it was excluded for not acknowledging in time (0: none). It is taken in
    /// again only once it acknowledges that record: by the rule for a peer catching up
    /// alone (it holds what is committed), it would be a member again at once, and commits
    /// would wait once more for the acknowledgement it does not send (see
    /// `recompute_commit`).
    pub(super) overdue: u64,
    /// Encoded messages for the link thread to send.
    pub(super) control: Vec<Vec<u8>>,
    /// The snapshot last queued for it in answer to a FETCH: the asker's last record
    /// then, this server's, and when. For a while on the same link, the same question
    /// gets no second copy (see the FETCH answer in `inbound.rs`).
    pub(super) fetched_snapshot: Option<(Pos, Pos, Instant)>,
    /// Bytes of FORWARDs among `control`.
    pub(super) forwarding: usize,
    /// Frames and bytes this server's link to it held unwritten when its link thread last
    /// looked (see [`Replica::forward`](super::Replica)): what forwarding must not pile
    /// onto.
    pub(super) behind: (usize, usize),
    /// A snapshot coming in chunks on its current inbound link.
    pub(super) assembly: Option<Assembly>,
    /// This server's link to it is up (it can forward there).
    pub(super) linked: bool,
}

impl Remote {
    pub(super) fn new() -> Remote {
        Remote {
            heard: None,
            syncing: false,
            refused: false,
            dead: false,
            was_down: false,
            status: None,
            inbound: 0,
            link: None,
            echo: 0,
            asked: None,
            confirmed: None,
            feed: Feed::Unknown,
            acked: 0,
            member: false,
            excluded: 0,
            overdue: 0,
            control: Vec::new(),
            fetched_snapshot: None,
            forwarding: 0,
            behind: (0, 0),
            assembly: None,
            linked: false,
        }
    }
}

impl Remote {
    /// When it was last heard from, as far as silence goes: now while its link's reader
    /// is syncing (see [`Remote::syncing`]); `None`: down.
    pub(super) fn last_heard(&self, now: Instant) -> Option<Instant> {
        self.heard.map(|t| if self.syncing { now } else { t })
    }
}

/// A record kept in memory.
pub(super) struct Entry {
    pub(super) pos: Pos,
    pub(super) at: Instant,
    pub(super) change: Vec<u8>,
}

/// Everything behind the replica's one lock.
pub(super) struct Inner {
    pub(super) role: Role,
    /// The highest epoch accepted from a primary (or started as one).
    pub(super) epoch: u64,
    /// The highest epoch heard of.
    pub(super) max_epoch: u64,
    /// As primary: the sequence number of this term's first record.
    pub(super) takeover: u64,
    pub(super) primary_since: Instant,
    pub(super) state: State,
    pub(super) last: Pos,
    /// Records `base.seq + 1 ..= last.seq`, contiguous.
    pub(super) window: VecDeque<Entry>,
    pub(super) base: Pos,
    /// Records up to here are durable on this server.
    pub(super) durable: u64,
    /// Records up to here are to be made durable by the flusher thread (see
    /// [`Replica::run_flusher`](super::Replica::run_flusher)).
    pub(super) flush_wanted: u64,
    /// As primary: records up to here are durable on this server and every member.
    pub(super) committed: u64,
    /// This server holds every committed change.
    pub(super) in_sync: bool,
    pub(super) peers: Vec<Remote>,
    /// Client connections and sessions (the primary's; a backup redirects and closes).
    pub(super) clients: Clients,
    /// As backup: the last NEED sent.
    pub(super) need: Option<(Pos, Instant)>,
    /// As backup: the last acknowledgement, repeated on a new link.
    pub(super) last_ack: Option<(u64, u64)>,
    /// The position of the highest record this server has acknowledged to a primary: no
    /// snapshot that goes back before it is taken (it would drop what a primary may have
    /// committed on the strength of that acknowledgement).
    pub(super) acked: Pos,
    /// Bumped whenever what heartbeats say changes, so links send one at once; sent as
    /// their `mark`. Starts at the wall clock in nanoseconds, so a restarted server's marks
    /// are above its previous life's and a peer's stale echo never passes for a new one.
    pub(super) version: u64,
    /// Start, or the end of the last stall: peers not heard from since may be up.
    pub(super) started: Instant,
    /// When the ticker last ran; a primary whose ticker is late advances no commit.
    pub(super) last_tick: Instant,
    pub(super) stopping: bool,
    /// A takeover found no epoch within [`MAX_EPOCH`](crate::messenger::replica_protocol::MAX_EPOCH)
    /// (logged once).
    pub(super) epochs_exhausted: bool,
    /// As backup: client connections whose requests go to a primary, and which one.
    pub(super) forwarded: HashMap<u64, usize>,
    /// As backup: forwarded connections the primary closed, and which primary. Frames of
    /// theirs still buffered are dropped here (forwarded again, the primary would take
    /// them for a new connection's), and the primary is told CLOSED when they end.
    pub(super) forward_closed: HashMap<u64, usize>,
}

impl Inner {
    pub(super) fn epoch_at(&self, seq: u64) -> Option<u64> {
        if seq == self.base.seq {
            return Some(self.base.epoch);
        }
        self.entry(seq).map(|e| e.pos.epoch)
    }

    pub(super) fn entry(&self, seq: u64) -> Option<&Entry> {
        if seq <= self.base.seq || seq > self.last.seq {
            return None;
        }
        self.window.get((seq - self.base.seq - 1) as usize)
    }

    /// Whether this log has the record at `pos` (and so everything before it agrees).
    pub(super) fn holds(&self, pos: Pos) -> bool {
        self.epoch_at(pos.seq) == Some(pos.epoch)
    }

    /// Up to `max` records after `seq` (which must be at or after `base`), and no more
    /// than [`BATCH_BYTES`] of them as the wire carries them (at least one).
    pub(super) fn records_after(&self, seq: u64, max: usize) -> Vec<Record> {
        let from = (seq - self.base.seq) as usize;
        let mut bytes = 0;
        self.window
            .range(from.min(self.window.len())..)
            .take(max)
            .take_while(|e| {
                let first = bytes == 0;
                bytes += RECORD_OVERHEAD + e.change.len();
                first || bytes <= BATCH_BYTES
            })
            .map(|e| Record {
                pos: e.pos,
                change: e.change.clone(),
            })
            .collect()
    }

    pub(super) fn push(&mut self, pos: Pos, change: Vec<u8>) {
        self.window.push_back(Entry {
            pos,
            at: Instant::now(),
            change,
        });
        self.last = pos;
        while self.window.len() > WINDOW {
            if let Some(e) = self.window.pop_front() {
                self.base = e.pos;
            }
        }
    }

    pub(super) fn up(&self, j: usize, now: Instant) -> bool {
        let p = &self.peers[j];
        p.status.is_some()
            && p.last_heard(now)
                .is_some_and(|t| now.duration_since(t) < DOWN_AFTER)
    }

    /// Not known to be down: up, or not heard from yet during the first [`DOWN_AFTER`]
    /// after start, unless a dial was refused or a link from it closed.
    pub(super) fn maybe_up(&self, j: usize, now: Instant) -> bool {
        let p = &self.peers[j];
        match p.last_heard(now) {
            Some(t) => now.duration_since(t) < DOWN_AFTER,
            None => !p.refused && !p.was_down && now.duration_since(self.started) < DOWN_AFTER,
        }
    }

    /// The primary this server follows: itself, or the lowest peer heard from within
    /// [`FOLLOW_FRESH`] that says it is primary of an epoch not older than this server's.
    /// Heartbeats carry it, so that a server cut from the primary alone learns from the
    /// others that there is one (and does not take over: see `evaluate`).
    pub(super) fn following(&self, me: usize, now: Instant) -> Option<usize> {
        if self.role == Role::Primary {
            return Some(me);
        }
        (0..self.peers.len()).find(|&j| {
            let p = &self.peers[j];
            j != me
                && p.last_heard(now)
                    .is_some_and(|t| now.duration_since(t) < FOLLOW_FRESH)
                && p.status
                    .is_some_and(|s| s.role == Role::Primary && s.epoch >= self.epoch)
        })
    }

    /// The primary as far as this server knows: itself, or the lowest live peer that
    /// says it is one; failing those, one that a live peer follows (this server may be cut
    /// from it while clients are not).
    pub(super) fn known_primary(&self, me: usize) -> Option<usize> {
        if self.role == Role::Primary {
            return Some(me);
        }
        let now = Instant::now();
        let direct = (0..self.peers.len()).find(|&j| {
            j != me
                && self.up(j, now)
                && self.peers[j]
                    .status
                    .is_some_and(|s| s.role == Role::Primary)
        });
        direct.or_else(|| {
            (0..self.peers.len())
                .filter(|&j| j != me && self.up(j, now))
                .find_map(|j| self.peers[j].status.and_then(|s| s.primary))
                .filter(|&p| p != me && p < self.peers.len())
        })
    }

    /// What this server is to clients now: the primary, unless stopping; else a redirect
    /// to the primary it knows of, if any.
    pub(super) fn serving(&self, me: usize) -> Serving {
        if self.role == Role::Primary && !self.stopping {
            return Serving::Primary;
        }
        match self.known_primary(me) {
            Some(p) if p != me => Serving::Redirect(p),
            _ => Serving::Unavailable,
        }
    }

    pub(super) fn standing(&self, j: usize) -> Standing {
        let p = &self.peers[j];
        match self.role {
            Role::Primary if !p.member => Standing::Excluded,
            Role::Primary if p.acked >= self.takeover => Standing::InSync,
            Role::Primary => Standing::Member,
            _ => Standing::NotPrimary,
        }
    }

    pub(super) fn status_for(&self, me: usize, j: usize) -> Status {
        Status {
            role: self.role,
            epoch: self.epoch,
            last: self.last,
            in_sync: self.in_sync,
            you: self.standing(j),
            mark: self.version,
            echo: self.peers[j].echo,
            primary: self.following(me, Instant::now()),
        }
    }
}
