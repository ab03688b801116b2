//! The timing the rules rest on (see the [module documentation](super::super)), and the
//! sizes of what links carry.

use std::time::Duration;

/// Every link carries a heartbeat at least this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// A peer not heard from for this long is down (a closed link makes it down at once).
pub const DOWN_AFTER: Duration = Duration::from_millis(500);
/// A backup says it follows a primary (see [`Status::primary`]) only while it has heard
/// from it this recently: well inside [`DOWN_AFTER`], so that when a primary dies the
/// others stop saying so before anyone could count it down, and no failover waits for it.
///
/// [`Status::primary`]: crate::messenger::replica_protocol::Status::primary
pub const FOLLOW_FRESH: Duration = Duration::from_millis(250);
/// A member that has not acknowledged a record this long after it was appended is no
/// longer waited for.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often roles and failures are re-evaluated.
pub(super) const TICK: Duration = Duration::from_millis(20);
/// A tick this late means the whole process was stalled (stopped, swapped out): long
/// enough, with [`HEARTBEAT_EVERY`] before it, for the others to have seen [`DOWN_AFTER`]
/// of silence only if it is more than this.
pub const STALL: Duration = Duration::from_millis(300);
/// A candidate asks again if a FETCH goes unanswered this long.
pub(super) const FETCH_RETRY: Duration = Duration::from_millis(1000);
/// The same FETCH answered with a snapshot gets no second copy for this long (the first
/// may still be on its way), and one after it (the asker may have refused the first).
pub(super) const SNAPSHOT_REASK: Duration = Duration::from_millis(5000);
/// A backup repeats a NEED for the same position at most this often.
pub(super) const NEED_RETRY: Duration = Duration::from_millis(200);
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a second HELLO for a server whose link is alive waits for that link to be
/// proven dead (silent for [`DOWN_AFTER`], or closed) before it is refused: a real
/// server's old link is silent by then, and the dialer's handshake timeout is longer.
pub(super) const HELLO_WAIT: Duration =
    Duration::from_millis(DOWN_AFTER.as_millis() as u64 + 2 * HEARTBEAT_EVERY.as_millis() as u64);
/// Writes on a link, and silences on an inbound link, longer than this end it.
pub(super) const LINK_TIMEOUT: Duration = Duration::from_secs(2);
/// An outbound link this old whose live peer's heartbeats still echo nothing sent on it
/// delivers nothing: it is dropped and dialled again.
pub(super) const LINK_DEAD: Duration = Duration::from_secs(1);
/// Records kept in memory to catch a peer up; one further behind gets a snapshot.
pub(super) const WINDOW: usize = 100_000;
/// Records per REPLICATE frame (and at most
/// [`BATCH_BYTES`](crate::messenger::replica_protocol::BATCH_BYTES) of them).
pub(super) const BATCH: usize = 4096;
