//! What can go wrong with a channel: every failure is one of these values, never a panic.

use crate::log::{Preview, PREVIEW};
use crate::store::client::ClientError;
use std::fmt;
use std::io;

/// A channel operation that failed.
#[derive(Debug)]
pub enum ChanError {
    /// The remote channel's port could not be reached (refused, unroutable, timed out).
    Unreachable {
        /// `HOST:PORT` of the channel.
        addr: String,
        /// Why the connection failed.
        source: io::Error,
    },
    /// The connection to a remote channel failed after it was made.
    Io {
        /// `HOST:PORT` of the channel.
        addr: String,
        /// The failed read or write.
        source: io::Error,
    },
    /// A remote read got something other than a message or `timeout`: an `{error,Reason}`
    /// line, a malformed line, or a close before the answer.
    BadReply {
        /// `HOST:PORT` of the channel.
        addr: String,
        /// What came back (`connection closed` when nothing did).
        reply: String,
    },
    /// No message arrived within the time given to `recv_timeout`.
    Timeout,
    /// A port listener for a local channel could not be opened.
    Listen(io::Error),
    /// The node this channel belongs to has been shut down.
    NodeDown,
    /// The registry (store server) could not be reached or answered out of protocol.
    Registry(ClientError),
    /// No channel is registered under this name.
    NotRegistered(String),
    /// The name is registered, but its value is not a `{remote_chan,Host,Port}`.
    NotAChan {
        /// The name looked up.
        name: String,
        /// The value stored under it.
        value: String,
    },
    /// A name the store protocol cannot carry (empty, or with a `,` or a line break).
    BadName(String),
    /// The name is registered to a channel whose port still accepts connections: taking
    /// it over would steal it from a live process.
    NameTaken {
        /// The name.
        name: String,
        /// `HOST:PORT` of the channel that answers.
        addr: String,
    },
}

impl fmt::Display for ChanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChanError::Unreachable { addr, source } => {
                write!(f, "remote channel {addr} unreachable: {source}")
            }
            ChanError::Io { addr, source } => write!(f, "remote channel {addr}: {source}"),
            ChanError::BadReply { addr, reply } => {
                write!(
                    f,
                    "remote channel {addr} answered {}",
                    Preview(reply, PREVIEW)
                )
            }
            ChanError::Timeout => f.write_str("no message within the timeout"),
            ChanError::Listen(e) => write!(f, "cannot open a port for a channel: {e}"),
            ChanError::NodeDown => f.write_str("the channel's node has shut down"),
            ChanError::Registry(e) => write!(f, "registry: {e}"),
            ChanError::NotRegistered(name) => write!(f, "no channel registered as {name:?}"),
            ChanError::NotAChan { name, value } => {
                write!(
                    f,
                    "{name:?} is registered as {}, not a channel",
                    Preview(value, PREVIEW)
                )
            }
            ChanError::BadName(name) => write!(f, "{name:?} cannot be a registry name"),
            ChanError::NameTaken { name, addr } => write!(
                f,
                "{name:?} is registered to a channel at {addr} that still answers; \
                 stop that process or pick another name"
            ),
        }
    }
}

impl std::error::Error for ChanError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChanError::Unreachable { source, .. } | ChanError::Io { source, .. } => Some(source),
            ChanError::Listen(e) => Some(e),
            ChanError::Registry(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ClientError> for ChanError {
    fn from(e: ClientError) -> Self {
        ChanError::Registry(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote channel's reply and a registry's value are anyone's to write, up to a
    /// frame's limit: an error shows a short quoted preview of them.
    #[test]
    fn what_a_peer_or_the_registry_holds_is_shown_cut() {
        let huge = "v".repeat(1 << 20);
        let errors = [
            ChanError::BadReply {
                addr: "127.0.0.1:1".into(),
                reply: huge.clone(),
            },
            ChanError::NotAChan {
                name: "pp".into(),
                value: huge,
            },
        ];
        for e in errors {
            let shown = e.to_string();
            assert!(shown.len() < 400, "{} bytes", shown.len());
            assert!(shown.contains("… (cut)"), "{shown}");
        }
        let short = ChanError::NotAChan {
            name: "pp".into(),
            value: "hello".into(),
        };
        assert_eq!(
            short.to_string(),
            "\"pp\" is registered as \"hello\", not a channel"
        );
    }
}
