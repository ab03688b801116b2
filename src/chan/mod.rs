//! Remote channels (the course's RemoteChan): channels that cross the network, travel
//! inside messages, and come home. Wire compatible with the course's channel library.
//!
//! # The life of a channel
//!
//! 1. [`Node::chan`] makes a **local** channel: a bounded in-memory queue of [`Value`]s.
//!    Written and read in-process ([`Chan::send`], [`Chan::recv`]) it never opens a port,
//!    even when channels travel inside its messages.
//! 2. The first time it **leaves the process**, serialized inside a message written to a
//!    remote channel or registered by name, its node opens a port listener for it (a
//!    framework [`Server`](crate::server::Server) on the advertised address, port 0) and
//!    records it in the channel database: channel ↔ port. It is written
//!    `{remote_chan,{127,0,0,1},40123}`.
//! 3. A node that parses `{remote_chan,Host,Port}` ([`Node::import`]) gets a **remote**
//!    channel, unless Host is its own advertised address (or `localhost` for 127.0.0.1)
//!    and Port is in its database: then it gets the local channel itself, so a channel
//!    that went out and came home is read and written through memory again.
//! 4. Writing to a remote channel connects, sends one `{remote_msg,Msg}` line, and
//!    closes, as the course's writers do; the listener writes Msg into the queue. (The
//!    close is a half-close followed by waiting for the listener's: a returned
//!    [`Chan::send`] is a delivered message, and one sender's messages stay in order.)
//! 5. When the last handle to an exported channel is dropped, its listener is stopped and
//!    the port released; [`Node::shutdown`] (or dropping the node) stops them all. A
//!    message written from the network holds the channels of this node it names only by
//!    port while it waits in a queue ([`Delivery::into_value`] brings them home), so a
//!    queue that holds its own channel's name does not keep it open. (A handle queued by
//!    a local `send` is a handle: a channel sent into its own queue in-process stays.)
//!
//! # On the wire
//!
//! One term per line ([`term`](crate::term) text), on a channel's port:
//!
//! ```text
//! {remote_msg,Msg}\n        write Msg into the channel; no reply (the course's format)
//! remote_read\n             answered {remote_msg,Msg}\n with the next message, when there is one
//! {remote_read,Ms}\n        answered {remote_msg,Msg}\n, or timeout\n after Ms milliseconds
//! anything else             answered {error,Reason}\n, logged; the connection goes on
//! ```
//!
//! A connection may carry any number of lines. Messages from connections that arrive one
//! after the other are written in that order, even while the queue is full. Names are
//! kept in the store server ([`registry`]): `store,Name,{remote_chan,Host,Port}` and
//! `lookup,Name`.
//!
//! ```
//! use switchboard::chan::{Node, NodeConfig, Value};
//!
//! let node = Node::new(NodeConfig::default());
//! let requests = node.chan();
//! let reply = node.chan();
//! requests.send(Value::tuple(vec![Value::atom("ping"), Value::from(&reply)]))?;
//! let msg = requests.recv()?;
//! if let Some(("ping", [Value::Chan(back)])) = msg.tagged() {
//!     back.send(Value::atom("pong"))?;
//! }
//! assert_eq!(reply.recv()?, Value::atom("pong"));
//! assert_eq!(node.exported(), 0); // used only locally: no port
//!
//! let term = node.export(&Value::from(&reply))?; // it leaves: now it has a port
//! assert_eq!(term.to_string(), format!("{{remote_chan,{{127,0,0,1}},{}}}", node.port_of(&reply).unwrap()));
//! assert_eq!(node.import(term), Value::from(&reply)); // and comes home
//! # Ok::<(), switchboard::chan::ChanError>(())
//! ```
//!
//! # Modules
//! - [`value`]: [`Value`] (a term that may hold channels) and [`Host`].
//! - [`protocol`]: the listener's lines, parsed and written; pure.
//! - [`registry`]: register and look up names in the store server.
//! - [`pingpong`]: the `chan-pingpong` demo's two loops.
//! - `channel`, `node`, `listener`: [`Chan`], [`Node`] and its database, the port listener.

mod channel;
mod error;
mod listener;
mod node;
pub mod pingpong;
pub mod protocol;
pub mod registry;
pub mod value;

pub(crate) use channel::LocalChan;
pub use channel::{Chan, Delivery};
pub use error::ChanError;
pub use node::{Node, NodeConfig};
pub use registry::{lookup, register};
pub use value::{Host, Value};
