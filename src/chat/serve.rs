//! What `chat-server` does with its flags, as library functions the binary calls: the
//! secret rule over every address it listens on or dials, then bind, join, serve until
//! Ctrl-C or SIGTERM.

use super::{ChatConfig, ChatServer, LinkError};
use crate::auth::{cluster_secret, PolicyError, Secret};
use crate::server::on_termination;
use std::fmt;
use std::io;
use std::net::ToSocketAddrs;
use std::path::Path;

/// Why a chat server could not start (or install its Ctrl-C handler).
#[derive(Debug)]
pub enum StartError {
    /// An address that does not resolve.
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// `--secret-file` is unusable, or missing where it is required.
    Secret(PolicyError),
    /// The listening address cannot be bound.
    Listen {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The server `--join` named cannot be reached or refused the link.
    Join {
        /// The address as given.
        addr: String,
        /// Why.
        source: LinkError,
    },
    /// The Ctrl-C / SIGTERM handler cannot be installed.
    Termination(ctrlc::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Resolve { addr, source } => write!(f, "cannot resolve {addr}: {source}"),
            StartError::Secret(e) => write!(f, "{e}"),
            StartError::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartError::Join { addr, source } => write!(f, "cannot join {addr}: {source}"),
            StartError::Termination(e) => write!(f, "cannot install the Ctrl-C handler: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Resolve { source, .. } | StartError::Listen { source, .. } => Some(source),
            StartError::Secret(e) => Some(e),
            StartError::Join { source, .. } => Some(source),
            StartError::Termination(e) => Some(e),
        }
    }
}

/// The start-up rule of `--secret-file` for a server that listens on, joins through and
/// advertises `addrs`: [`crate::auth::cluster_secret`] over every address they resolve to.
///
/// # Errors
/// An address that does not resolve, an unusable secret file, or no secret with an
/// address off loopback.
pub fn secret_policy<'a>(
    secret_file: Option<&Path>,
    addrs: impl IntoIterator<Item = &'a String>,
) -> Result<Option<Secret>, StartError> {
    let mut resolved = Vec::new();
    for addr in addrs {
        match addr.to_socket_addrs() {
            Ok(found) => resolved.extend(found),
            Err(source) => {
                let addr = addr.clone();
                return Err(StartError::Resolve { addr, source });
            }
        }
    }
    cluster_secret(secret_file, &resolved, "the federation").map_err(StartError::Secret)
}

/// `chat-server`: binds `listen`, joins the federation of the server at `join` (if any),
/// and serves until Ctrl-C or SIGTERM, which leave the federation first.
///
/// # Errors
/// When the address cannot be bound, the join fails, or the handler cannot be installed.
pub fn serve(listen: &str, join: Option<&str>, config: ChatConfig) -> Result<(), StartError> {
    let server = ChatServer::bind(listen, config).map_err(|source| StartError::Listen {
        addr: listen.to_owned(),
        source,
    })?;
    if let Some(peer) = join {
        server.join(peer).map_err(|source| StartError::Join {
            addr: peer.to_owned(),
            source,
        })?;
    }
    let handle = server.handle();
    on_termination(move || handle.shutdown()).map_err(StartError::Termination)?;
    server.run();
    Ok(())
}
