//! # switchboard
//!
//! A synchronous, std-only, thread-per-connection TCP server framework, and on it the
//! servers of a distributed-systems course, wire compatible with the course's Python and
//! Erlang programs. Blocking `std::net` sockets, one OS thread per connection, bounded
//! `crossbeam-channel` queues between stages; no async runtime.
//!
//! ## Module map
//! - [`auth`]: proof that a server-to-server link's far end knows the cluster secret.
//! - [`framing`]: bytes ↔ frames: `line`, `ascii10`, `u16`, `u32`, with limits.
//! - [`server`]: the thread-per-connection server, connection cap, idle timeout, shutdown.
//! - [`durable`]: crash-safe files: CRC-32, fsync, atomic replace, torn tail vs damage, repair.
//! - [`store`]: the classic key-value store (`store,K,V` / `lookup,K`), persistence, client, bench.
//! - [`lincheck`]: a linearizability checker for recorded key-value histories (tests).
//! - [`log`]: one-line-per-event logging to stderr.
//! - [`cli`]: command-line value parsers the binaries share (`--idle-timeout 0.5`).
//! - [`term`]: Erlang term text (`{just,[104,105]}`), parsed and printed, with limits.
//! - [`handoff`]: a bounded crossbeam queue whose consumer sleeps instead of spinning.
//! - [`bench`](mod@bench): CPU and RSS sampling, free ports and a seeded `Rng` for benchmarks and tests.
//! - [`proxy`]: a fault-injecting TCP proxy (cut, heal, one-way cut, slow) for partition tests.
//! - [`pipeline`]: reader → transform → sender stages over bounded queues, per-connection order.
//! - [`echo`]: the echo service (threaded and pipeline modes, `upper` transform) and its bench.
//! - [`chat`]: the chat server ("Chatty"), its federation of relaying servers, client and bench.
//! - [`chan`]: channels that cross the network and come home (the course's RemoteChan), registry.
//! - [`messenger`]: accounts, offline delivery, three replicas surviving two crashes; client, bench.
//! - [`peer`]: serverless chat: peers agree on the room through a leader, route messages by BFS.
//!
//! Layers read top to bottom: bytes → frames → typed requests and replies (a `protocol`
//! module per service, pure functions) → state (a small cloneable handle) → the server
//! that wires them. Binaries in `src/bin/` only parse arguments and call into the library.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod chan;
pub mod chat;
pub mod cli;
pub mod durable;
pub mod echo;
pub mod framing;
pub mod group;
pub mod handoff;
pub mod lincheck;
pub mod link;
pub mod log;
pub mod messenger;
pub mod outbox;
pub mod peer;
pub mod pipeline;
pub mod proxy;
pub mod server;
pub mod store;
pub mod term;
