//! The replicated messenger (`messenger-server`, `messenger-client`): accounts, messages kept
//! for users who are away, and a cluster of servers (usually three; any number works)
//! in which what a client was told is accepted survives the loss of all servers but one.
//!
//! - [`protocol`]: the client wire format and the name, text and pattern rules, pure.
//! - [`state`]: the replicated state machine: requests to decisions, changes to state.
//! - [`log`]: the data directory: snapshot and change log with CRCs, torn tail vs damage.
//! - [`repair`]: `--check` and `--repair` of a data directory a start refuses.
//! - [`replica_protocol`]: server-to-server messages (replication links), pure.
//! - `clients` (private): the client registry: outboxes, answers held until their change
//!   commits, and who is logged in where.
//! - `requests` (private): a client request decided against the state and the sessions,
//!   pure.
//! - [`replication`]: one server, a [`Replica`]: roles, replication links, catch-up, commit.
//! - [`server`]: client connections, sockets only: requests in, committed answers out;
//!   redirects from a server that is not the primary.
//! - [`client`]: the failover client behind `messenger-client`, the bench and the tests.
//! - [`bench`](mod@bench): throughput and failover measurements behind `messenger-bench`.
//! - [`majority`]: `--quorum majority`, the same service on the framework's Raft module
//!   (a majority acknowledges each change: any partition is safe, one of three may fail).
//!   Everything below is the default, `--quorum primary`.
//!
//! # The rules
//!
//! **Servers and ports.** `--peers A0,A1,A2` lists every server's address by id; server `i`
//! listens on `Ai` for clients *and* peers: a connection whose first frame is a peer HELLO
//! is a replication link (see [`replica_protocol`]), anything else a client. Each server
//! dials every other one (at its `--peers` address, or where `--dial` says) and writes only
//! on the link it dialed, so every message between two servers goes one way on one TCP
//! connection, in order. A lost link is dialled again with [`crate::link::Backoff`]
//! (jittered, at most 1 s apart) for as long as the server runs; a link that still takes
//! writes but delivers nothing (its peer, heard on its own link, echoes none of its
//! heartbeats for 1 s, or the peer has been silent longer than its end waits) is dropped
//! and dialled again, so links come back by themselves when a cut network heals.
//!
//! **Who may speak.** With `--secret-file` only members get a link at all. Even then a HELLO
//! for a server whose link is alive does not replace it: it waits until that link has been
//! silent for 500 ms or has closed (at most 700 ms), else it is refused. Records,
//! snapshots and a primary's heartbeat are taken only from the primary of their epoch
//! (server `e mod n` leads epoch `e`; anything else closes the link, logged), a primary's
//! snapshot only at a record of its own epoch, and no snapshot that goes back, in log
//! order, before the last record this server acknowledged. Epochs are checked arithmetic
//! with a ceiling ([`replica_protocol::MAX_EPOCH`]). Peer frames are at most a snapshot
//! chunk (1 MiB) and its header; a longer one is skipped as it arrives, never buffered.
//!
//! **Failure detection.** Every link carries a heartbeat at least every 100 ms
//! ([`replication::HEARTBEAT_EVERY`]). A server considers a peer *down* when its inbound link
//! closes (a killed process's sockets are closed by its kernel at once) or after 500 ms
//! without a frame from it ([`replication::DOWN_AFTER`]); *up* while frames keep coming. A
//! peer not heard from since start counts as possibly up for the first 500 ms, unless
//! dialing it was refused or its link closed. Silence counts only while the link is read:
//! while the thread that reads a peer's link syncs (an fsync that a busy disk can stretch
//! past 500 ms: a backup's of the records it took from the primary, a candidate's of a FETCH
//! answer or of the epoch record that takes over, a primary's of a change a backup
//! forwarded), that peer counts as heard, and its silence counts from the end of the sync.
//! This is the timing assumption the cluster rests on: a live server's heartbeats arrive
//! within 500 ms. It holds for crashed and killed processes on a working network; a
//! network partition, where both sides live but cannot talk, breaks it (tolerating
//! partitions needs a majority quorum, which cannot survive two of three failures): see
//! *Partitions* below for what a split costs and how the cluster heals.
//!
//! **Stalls.** A process that was itself stopped or starved (its 20 ms ticker more than
//! 300 ms late, [`replication::STALL`]; the ticker leaves its fsyncs to a flusher thread,
//! so a slow fsync is not a stall) cannot trust that view: the others may have seen it
//! silent for 500 ms and moved on. It commits nothing until the ticker has run; the ticker
//! then makes a primary step down, forgets what it knew of every peer and closes their
//! links (what waits unread in them was sent during the stall: stale too), and, as at
//! start, takes over only once it has heard from every peer on the links they dial again,
//! or 500 ms have passed. 300 ms of stall plus at most 100 ms since its last heartbeat
//! stays under the others' 500 ms, so a primary that did not notice a stall was not
//! replaced during it. Until the ticker has run, a stalled server changes no role either
//! (else, acting on its stale view, it could lead a new epoch for a moment, and that
//! epoch's record would outrank the real primary's log). A stall of 400 ms or more could
//! have looked like death to the others, who may have committed without it: it also
//! stops counting itself in sync (see *In sync*). The ticker takes the lock requests are
//! decided under, so a request that held it 300 ms would make a primary step down: a
//! search, which goes through every account under it, matches each name in linear time
//! ([`protocol::Glob`]), and the primary refuses accounts past `--max-accounts`
//! ([`state::Limits`]), which bounds the accounts it goes through (35 ms at the default
//! 100,000 on a shared 2-core machine, the costliest pattern).
//!
//! **Epochs.** Each term of a primary has an epoch number, unique to its server (server `i`
//! of `n` only uses epochs `e` with `e mod n = i`), larger than any it has heard of, and
//! recorded with every change it writes. A server accepts changes from a primary only if
//! that primary's epoch is at least the highest it has accepted; an older one is answered
//! with REJECT, and a primary that hears of a higher epoch steps down.
//!
//! **Who is primary.** Server `i` acts as primary only while every lower-numbered server
//! is down in its view; it steps down the moment it hears from one (or of a higher epoch),
//! closing its client connections, so clients fail over to the lower server. A server that
//! is not primary becomes *candidate* when all of these hold:
//!
//! 1. every lower-numbered server is down;
//! 2. no live peer says it is primary, or follows one (heartbeats name the primary their
//!    sender heard within the last 250 ms: a server cut from a live primary, by a single
//!    cut link, learns from the others that it leads, and does not depose it through them);
//! 3. some live server (itself included) holds every committed change, as its primary last
//!    told it (see *in sync* below) — or every server of the cluster is up;
//! 4. it has heard from every peer, or 500 ms have passed since it started (or stalled);
//! 5. it hears a majority of the servers (itself included), or every server it does not
//!    hear refused its last dial (nothing listens there: the process is gone). A server cut
//!    off alone from a primary that goes on with the others is silent, not refused: it does
//!    not take over, for its newer epoch's log would outrank, at the heal, everything they
//!    committed meanwhile.
//!
//! A candidate asks every live peer (FETCH) for what it holds beyond the candidate's last
//! record: the records that follow it, or the peer's whole state as a snapshot if the peer
//! is ahead (epoch first, then sequence number) but does not have that record, or nothing.
//! It takes what comes, asks again about its new last record, and once every live peer has
//! answered "nothing newer" about its current last record (a heartbeat's position may be
//! 100 ms old; an answer is not) it becomes primary: it picks its epoch, appends an epoch
//! record, and makes every live peer a *member*. It now holds the greatest live log.
//!
//! **Commit.** The primary assigns each change the next sequence number, applies it,
//! buffers it for its log and streams it (REPLICATE) to every peer it can reach. A backup
//! takes records only if they follow its last record (same sequence number and epoch; else
//! it answers NEED with its position, and the primary resends from there, or sends a
//! snapshot when the two logs disagree), writes them to its log (fsynced by default), and
//! acknowledges. A change is *committed* when it is durable on the primary and acknowledged
//! by every member. Nothing a client is told — a reply, a delivered message, a login's
//! hand-over, a search result — leaves the primary before every change made so far is
//! committed. A member is dropped (no longer waited for) when its link closes, when it goes
//! silent for 500 ms, or when it has not acknowledged a record 1 s after it was appended
//! ([`replication::ACK_TIMEOUT`]). A live peer that is not a member is caught up by the same
//! stream and becomes a member again once it has acknowledged everything committed (and,
//! if it was excluded for a missing acknowledgement, that record). A live
//! peer excluded while alive may not know it yet (busy with older frames, its in-sync
//! flag still set): commits go on without it only once it has echoed a heartbeat that
//! says it is excluded (each heartbeat carries a mark, and echoes the mark of the last one
//! the sender took in), or once it is down.
//!
//! **In sync.** The primary tells each peer in its heartbeats whether it is a member that
//! holds every committed change (it has acknowledged the epoch record) or is excluded. A
//! server that restarts, or stalls for 400 ms or more, is not in sync until a primary says
//! so; a primary is in sync. A server that hears of an epoch newer than any it has
//! accepted from anyone but that epoch's primary (a REJECT, another server's heartbeat) is
//! not in sync either until that epoch's primary says so: a primary deposed while cut off must
//! not take over again on its own before it has heard from the servers that moved on. Rule
//! 3 uses this: a server that was away while changes were committed without it can never
//! take over alone and lose them. Because of it, a brand-new cluster's first primary needs
//! every server up once; afterwards any single in-sync survivor of crashes carries on
//! (rule 5: the others' ports refuse its dials).
//!
//! **Why an acknowledged change survives.** It is on the primary and on every member. A
//! server that is not a member either is down (and comes back not in sync: restarted, or
//! stalled long enough to be thought dead) or has echoed that it is excluded (and is not
//! in sync). After the primary fails, a candidate needs a live in-sync server, which holds
//! the change, and ends with the greatest log among the live servers, which contains it
//! (logs of one epoch are prefixes of its primary's, and a later epoch's primary started
//! from the greatest log of its time). So the change is lost only if every server that
//! held it is lost: with three servers, only if all three are.
//!
//! **Restart and hand-back.** A restarted server loads its snapshot and log, then follows
//! the rules: if a primary is up it becomes its backup and is caught up by sequence
//! number; if the restarted server is lower-numbered than the primary, the primary steps
//! down as soon as it hears from it, the restarted server (now the lowest live server, no
//! primary live, the old primary in sync) fetches what it lacks and takes over in a new
//! epoch. Clients see their connections close and fail over to it.
//!
//! **Sessions** (who is logged in on which connection) belong to the primary's connections
//! and are not replicated; after a failover clients log in again by themselves. A login
//! carries the client's session token: a login with the token of the account's current
//! session takes it over (its connection is closed), so a client that lost its way to the
//! primary without the connection closing logs in again elsewhere.
//! **Forwarding:** a backup that hears the primary and has a link to it serves its own
//! clients through it: it forwards each request on its link, the primary decides it for a
//! *remote* connection of its registry (sessions, held answers and pushed messages as for
//! its own), and relays the answers back once committed. When the primary changes or a
//! link between them goes, the backup closes those connections and the clients fail over.
//! A backup that cannot forward redirects (`40`) or answers `41`.
//! **Exactly once:** a message is kept until its recipient confirms it (the client does so
//! as it receives messages), is numbered `EPOCH.SEQ` by its change's position (unique
//! forever: epochs belong to one primary, which gives each sequence number once), and
//! reaches the recipient in number order within one history, so a client that drops
//! numbers at or below the highest it has seen *of the same epoch* receives each message
//! once across failovers, and after a network split never takes a new message of the
//! winning side for one of the losing side's (whose sequence numbers it may reuse); a send
//! resent with the same id is acknowledged without being stored again (each sender's last
//! 1,024 ids are part of the state).
//!
//! **Partitions.** Silence cannot tell a cut network from a frozen or dead server, and two
//! servers that hear each other take over from a silent primary (that is how a SIGSTOP is
//! survived): a full split of the primary from the other two has a primary on each side,
//! the old one (acknowledging alone once it stops waiting for the others, 500 ms into the
//! cut) and a new one in a higher epoch. A server cut off alone does not take over (rule
//! 5): the primary and the third server go on, and it catches up at the heal. When the network
//! returns, the links are dialled again (within the backoff's 1 s at worst, at once if a
//! dial is pending), the old primary hears of the higher epoch and steps down, and the
//! lowest server takes over again from the greatest log, which is the new epoch's: what the
//! old primary acknowledged alone, between the cut and hearing of the newer epoch, is lost
//! (recipients connected to it may have received some of it). A single cut link with a
//! third server hearing both changes nothing (rule 2), and clients cut from the primary are
//! served through a backup (forwarding).

pub mod bench;
pub mod client;
mod clients;
pub mod log;
pub mod majority;
pub mod protocol;
pub mod repair;
pub mod replica_protocol;
pub mod replication;
mod requests;
pub mod server;
pub mod state;

pub use client::{Client, ClientError};
pub use replication::{Options, Replica};
