//! What goes out on each replication link, decided under the lock: queued answers
//! (acknowledgements, NEEDs, fetch answers), records or a snapshot as primary, and
//! heartbeats. The sockets are [`super::outbound`]'s.

use super::outbound::{Outgoing, FEED_AHEAD};
use super::timing::{BATCH, HEARTBEAT_EVERY, LINK_DEAD, LINK_TIMEOUT};
use super::view::{Feed, Inner};
use super::Replica;
use crate::framing::{encode_frame, Framing};
use crate::log_info;
use crate::messenger::log::{encode_snapshot, Pos};
use crate::messenger::replica_protocol::{ReplicaMsg, Role, Standing, SNAPSHOT_CHUNK};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

/// How often a link whose writer is behind checks whether it has caught up.
const WRITER_POLL: Duration = Duration::from_millis(5);

/// What a link writer has told its peer on the current connection.
#[derive(Debug, Default)]
pub(super) struct Told {
    /// The mark and standing of the last heartbeat: a change is told at once.
    said: Option<(u64, Standing)>,
    /// When the last heartbeat went.
    beat: Option<Instant>,
    /// When the first heartbeat went on this connection.
    since: Option<Instant>,
    /// Since when the peer has not been heard from (on its own link), while this one was up.
    quiet: Option<Instant>,
}

impl Told {
    /// Why this link is dead though writes still succeed, if it is: the peer, alive, has
    /// taken in nothing from it ([`LINK_DEAD`] after it came up, its heartbeats still echo
    /// no heartbeat of ours), or the peer has been silent longer than its own end of the
    /// link waits ([`LINK_TIMEOUT`]). A network cut can leave such a link behind (the far
    /// end timed it out, its FIN was lost); a new dial finds the path again once it heals.
    fn dead(&mut self, inner: &Inner, j: usize, now: Instant) -> Option<&'static str> {
        let up = inner.up(j, now);
        if up {
            self.quiet = None;
        } else {
            self.quiet.get_or_insert(now);
        }
        let old = |t: Option<Instant>, d| t.is_some_and(|t| now.duration_since(t) > d);
        let unechoed = inner.peers[j].status.is_some_and(|s| s.echo == 0);
        if up && unechoed && old(self.since, LINK_DEAD) {
            Some("the server hears nothing on it")
        } else if old(self.quiet, LINK_TIMEOUT) && old(self.since, LINK_TIMEOUT) {
            Some("the server has been silent longer than its end waits")
        } else {
            None
        }
    }
}

impl Outgoing for Replica {
    type Cursor = Told;

    fn stopping(&self) -> bool {
        self.lock().stopping
    }

    fn linked(&self, j: usize) {
        let mut inner = self.lock();
        inner.peers[j].refused = false;
        inner.peers[j].dead = false;
        inner.peers[j].linked = true;
        // What was queued on an earlier link may not have arrived: answer afresh.
        inner.peers[j].fetched_snapshot = None;
        if inner.role == Role::Primary {
            self.init_feed(&mut inner, j);
        }
        // A backup's last acknowledgement may have gone down with the old link.
        if let (Some((epoch, seq)), false) = (inner.last_ack, inner.role == Role::Primary) {
            let ack = ReplicaMsg::Ack { epoch, seq }.encode();
            inner.peers[j].control.insert(0, ack);
        }
    }

    fn refused(&self, j: usize, dead: bool) {
        let mut inner = self.lock();
        inner.peers[j].refused = true;
        inner.peers[j].dead = dead;
    }

    fn unlinked(&self, j: usize) {
        let mut inner = self.lock();
        inner.peers[j].feed = Feed::Unknown;
        inner.peers[j].linked = false;
        // Relays to its clients cannot go: it closes them (its link from here is gone).
        inner.clients.drop_remote(j);
        self.check_forwarded(&mut inner);
    }

    fn next_frames(
        &self,
        j: usize,
        told: &mut Told,
        queued: &dyn Fn() -> (usize, usize),
        out: &mut Vec<u8>,
    ) -> bool {
        let mut inner = self.lock();
        loop {
            if inner.stopping {
                return false;
            }
            let behind = queued();
            let p = &mut inner.peers[j];
            p.forwarding = 0;
            p.behind = behind;
            for msg in std::mem::take(&mut p.control) {
                encode_peer(&msg, out);
            }
            self.relay_to(&mut inner, j, out);
            // Records wait while the writer is behind; heartbeats and answers do not.
            let room = behind.0 < FEED_AHEAD;
            if room {
                self.feed(&mut inner, j, out);
            }
            let now = Instant::now();
            if let Some(why) = told.dead(&inner, j, now) {
                log_info!(
                    "messenger-{}: dropping the link to server {j}: {why}; dialing again",
                    self.id
                );
                return false;
            }
            let standing = inner.standing(j);
            let due = told
                .beat
                .is_none_or(|t| now.duration_since(t) >= HEARTBEAT_EVERY)
                || told.said != Some((inner.version, standing));
            if due {
                let status = inner.status_for(self.id, j);
                encode_peer(&ReplicaMsg::Heartbeat(status).encode(), out);
                told.beat = Some(now);
                told.since.get_or_insert(now);
                told.said = Some((inner.version, standing));
            }
            if !out.is_empty() {
                return true;
            }
            let since = told.beat.map_or(Duration::ZERO, |t| now.duration_since(t));
            let mut wait = HEARTBEAT_EVERY.saturating_sub(since);
            if !room {
                // The writer signals nothing as it drains: look again shortly, only while
                // it is behind.
                wait = wait.min(WRITER_POLL);
            }
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn pause(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut inner = self.lock();
        while !inner.stopping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Replica {
    /// As primary, appends the next records (or a snapshot's chunks) for peer `j` to `out`.
    fn feed(&self, inner: &mut Inner, j: usize, out: &mut Vec<u8>) {
        if inner.role != Role::Primary {
            return;
        }
        let msgs = match inner.peers[j].feed {
            Feed::Unknown => return,
            Feed::From(next) if next > inner.last.seq => return,
            Feed::From(next) => match inner.epoch_at(next - 1) {
                Some(prev_epoch) => {
                    let records = inner.records_after(next - 1, BATCH);
                    inner.peers[j].feed = Feed::From(next + records.len() as u64);
                    vec![ReplicaMsg::Replicate {
                        epoch: inner.epoch,
                        prev: Pos {
                            epoch: prev_epoch,
                            seq: next - 1,
                        },
                        records,
                        fetched: false,
                    }]
                }
                None => self.snapshot_for(inner, j, false),
            },
            Feed::Snapshot => self.snapshot_for(inner, j, false),
        };
        for msg in msgs {
            encode_peer(&msg.encode(), out);
        }
    }

    /// This server's whole state for peer `j`, as SNAPSHOT chunks of at most
    /// [`SNAPSHOT_CHUNK`] bytes each (the answer to a FETCH if `fetched`).
    pub(super) fn snapshot_for(
        &self,
        inner: &mut Inner,
        j: usize,
        fetched: bool,
    ) -> Vec<ReplicaMsg> {
        log_info!(
            "messenger-{}: sending server {j} a snapshot at {}",
            self.id,
            inner.last
        );
        if !fetched {
            inner.peers[j].feed = Feed::From(inner.last.seq + 1);
        }
        let bytes = encode_snapshot(inner.last, &inner.state);
        let total = bytes.len() as u64;
        bytes
            .chunks(SNAPSHOT_CHUNK)
            .scan(0u64, |offset, chunk| {
                let at = *offset;
                *offset += chunk.len() as u64;
                Some(ReplicaMsg::Snapshot {
                    epoch: inner.epoch,
                    pos: inner.last,
                    total,
                    offset: at,
                    bytes: chunk.to_vec(),
                    fetched,
                })
            })
            .collect()
    }
}

pub(super) fn encode_peer(payload: &[u8], out: &mut Vec<u8>) {
    // Replication frames are far below the u32 header's 4 GiB.
    encode_frame(Framing::U32, payload, out).expect("a peer frame fits a u32 header");
}
