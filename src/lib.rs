//! # switchboard
//!
//! A synchronous, std-only, thread-per-connection TCP server framework, and on it the
//! servers of a distributed-systems course, wire compatible with the course's Python and
//! Erlang programs. Blocking `std::net` sockets, one OS thread per connection, bounded
//! `crossbeam-channel` queues between stages; no async runtime.
//!
//! ## Module map
//! - [`framing`]: bytes ↔ frames: `line`, `ascii10`, `u16`, `u32`, with limits.
//! - [`server`]: the thread-per-connection server, connection cap, idle timeout, shutdown.
//! - [`store`]: the classic key-value store (`store,K,V` / `lookup,K`), persistence, client, bench.
//! - [`log`]: one-line-per-event logging to stderr.
//! - [`term`]: Erlang term text (`{just,[104,105]}`), parsed and printed, with limits.
//! - [`handoff`]: a bounded crossbeam queue whose consumer sleeps instead of spinning.
//! - [`proxy`]: a fault-injecting TCP proxy (cut, heal, one-way cut, slow) for partition tests.
//! - [`pipeline`]: reader → transform → sender stages over bounded queues, per-connection order.
//! - [`echo`]: the echo service (threaded and pipeline modes, `upper` transform) and its bench.
//! - [`chat`]: the chat server ("Chatty"), its federation of relaying servers, client and bench.
//! - [`chan`]: channels that cross the network and come home (the course's RemoteChan), registry.
//! - [`messenger`]: accounts, offline delivery, three replicas surviving two crashes; client, bench.
//! - [`peer`]: serverless chat: peers agree on the room through a leader, route messages by BFS.
//! - [`raft`]: Raft consensus as a sans-IO core (elections, replication, reads, snapshots).
//!
//! Layers read top to bottom: bytes → frames → typed requests and replies (a `protocol`
//! module per service, pure functions) → state (a small cloneable handle) → the server
//! that wires them. Binaries in `src/bin/` only parse arguments and call into the library.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chan;
pub mod chat;
pub mod echo;
pub mod framing;
pub mod handoff;
pub mod log;
pub mod messenger;
pub mod peer;
pub mod pipeline;
pub mod proxy;
pub mod raft;
pub mod server;
pub mod store;
pub mod term;
