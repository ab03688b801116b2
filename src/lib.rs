//! # switchboard
//!
//! A synchronous, std-only, thread-per-connection TCP server framework, and on it the
//! servers of a distributed-systems course, wire compatible with the course's Python and
//! Erlang programs. Blocking `std::net` sockets, one OS thread per connection, bounded
//! `crossbeam-channel` queues between stages; no async runtime.
//!
//! ## Module map
//!
//! The framework, for any server:
//! - [`server`]: the thread-per-connection server: connection cap, idle timeout, framed
//!   refusal, Ctrl-C, shutdown by a deadline.
//! - [`framing`]: bytes ↔ frames: `line`, `ascii10`, `u16`, `u32`, with limits.
//! - [`request`]: the request loop (request → reply, or a per-connection session) and the
//!   read step it is made of.
//! - [`order`]: arrival order across connections, opt-in.
//! - [`budget`]: one server-wide budget for client memory (`--max-client-memory`).
//! - [`pipeline`]: reader → transform → sender stages over bounded queues, per-connection order.
//! - [`handoff`]: a bounded crossbeam queue whose consumer sleeps instead of spinning.
//! - [`group`]: named tracked threads and their sockets, shut down and joined by a deadline.
//! - [`outbox`]: a bounded queue of shared frames drained by one batching writer thread.
//! - [`link`]: server-to-server links: dial or accept, hello and answer, outbox, reader loop.
//! - [`auth`]: proof that a link's far end knows the cluster secret (nonces, keyed tags).
//! - [`raft`]: Raft consensus as a sans-IO core (elections, replication, reads, snapshots).
//! - [`durable`]: crash-safe files: CRC-32, fsync, atomic replace, torn tail vs damage, repair.
//! - [`log`]: one-line-per-event logging to stderr.
//! - [`cli`]: command-line value parsers the binaries share (`--idle-timeout 0.5`).
//! - [`term`]: Erlang term text (`{just,[104,105]}`), parsed and printed, with limits.
//!
//! For tests and benchmarks:
//! - [`bench`](mod@bench): CPU and RSS sampling, free ports and a seeded `Rng`.
//! - [`proxy`]: a fault-injecting TCP proxy (cut, heal, one-way cut, slow) for partition tests.
//! - [`lincheck`]: a linearizability checker for recorded key-value histories.
//!
//! The services built on it:
//! - [`store`]: the classic key-value store (`store,K,V` / `lookup,K`), persistence, client, bench.
//! - [`echo`]: the echo service (threaded and pipeline modes, `upper` transform) and its bench.
//! - [`chat`]: the chat server ("Chatty"), its federation of relaying servers, client and bench.
//! - [`chan`]: channels that cross the network and come home (the course's RemoteChan), registry.
//! - [`messenger`]: accounts, offline delivery, three replicas surviving two crashes; client, bench.
//! - [`peer`]: serverless chat: peers agree on the room through a leader, route messages by BFS.
//!
//! Layers read top to bottom: bytes → frames → typed requests and replies (a `protocol`
//! module per service, pure functions) → state (a small cloneable handle) → the server
//! that wires them. Binaries in `src/bin/` only parse arguments and call into the library.
//!
//! ## Write your own server
//!
//! A line server (a counter) with a connection cap and an idle timeout, that runs until
//! Ctrl-C or SIGTERM. [`request::RequestLoop`] answers each line; a line over the limit
//! gets `{error,too_long}`, a refused client `{error,too_many_connections}`:
//!
//! ```
//! use switchboard::framing::Framing;
//! use switchboard::request::RequestLoop;
//! use switchboard::server::{Server, ServerConfig};
//! use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let count = Arc::new(AtomicU64::new(0));
//! let config = ServerConfig {
//!     max_connections: 1000,
//!     idle_timeout: Some(Duration::from_secs(30)),
//!     ..ServerConfig::named("counter")
//! };
//! let requests = RequestLoop::new(Framing::Line);
//! let server = Server::bind("127.0.0.1:0", config, move |conn| {
//!     requests.serve(&conn, |request| match request {
//!         b"incr" => Some((count.fetch_add(1, SeqCst) + 1).to_string().into_bytes()),
//!         b"get" => Some(count.load(SeqCst).to_string().into_bytes()),
//!         _ => Some(b"{error,unknown_request}".to_vec()),
//!     })
//! })?;
//! # let addr = server.local_addr();
//! # let client = std::thread::spawn(move || -> std::io::Result<()> {
//! #     use std::io::{Read, Write};
//! #     let mut c = std::net::TcpStream::connect(addr)?;
//! #     c.set_read_timeout(Some(Duration::from_secs(10)))?;
//! #     c.write_all(b"incr\nincr\nget\nhello\n")?;
//! #     let mut reply = [0u8; 30];
//! #     c.read_exact(&mut reply)?;
//! #     assert_eq!(&reply, b"1\n2\n2\n{error,unknown_request}\n");
//! #     // The server has answered, so it is running and its signal handler is in place.
//! #     let me = std::process::id().to_string();
//! #     std::process::Command::new("kill").args(["-INT", &me]).status()?;
//! #     Ok(())
//! # });
//! let report = server.run_until_signal().expect("a Ctrl-C handler");
//! # client.join().unwrap()?;
//! # assert_eq!(report.stats.accepted, 1);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! A `u32`-framed server whose requests go through a [`pipeline`] (readers → transform
//! workers → senders), with the server and the pipeline wired and stopped together:
//!
//! ```
//! use switchboard::framing::{FrameReader, FrameWriter, Framing};
//! use switchboard::pipeline::{Pipeline, PipelineConfig, Reply};
//! use switchboard::server::ServerConfig;
//! use std::net::{TcpListener, TcpStream};
//!
//! let config = PipelineConfig::new("shout", Framing::U32);
//! let pipeline = Pipeline::start(config, |_conn, frame| Reply::One(frame.to_ascii_uppercase()))?;
//! let server = pipeline.into_server(TcpListener::bind("127.0.0.1:0")?, ServerConfig::default())?;
//! let (addr, handle) = (server.local_addr(), server.handle());
//! let running = std::thread::spawn(move || server.run());
//!
//! // A framed client: one frame per write, replies read frame by frame.
//! let stream = TcpStream::connect(addr)?;
//! stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
//! let mut writer = FrameWriter::new(&stream, Framing::U32);
//! let mut reader = FrameReader::new(&stream, Framing::U32);
//! for word in ["hello", "straße"] {
//!     writer.write_frame(word.as_bytes())?;
//!     let reply = reader.read_frame()?.expect("a reply");
//!     assert_eq!(reply, word.to_ascii_uppercase().as_bytes());
//! }
//! handle.shutdown();
//! assert_eq!(running.join().unwrap().pipeline_joined, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A service with state per connection implements [`request::Session`] (the store does);
//! one that needs arrival order across connections adds [`order::Arrivals`]; a handler with
//! a loop of its own reads with [`request::read_step`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod budget;
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
pub mod order;
pub mod outbox;
pub mod peer;
pub mod pipeline;
pub mod proxy;
pub mod raft;
pub mod request;
pub mod server;
pub mod store;
pub mod term;
#[cfg(test)]
mod testing;
