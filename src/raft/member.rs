//! One member of a Raft cluster as a server runs it: the driver ([`super::driver`]) over
//! a data directory and the framework's authenticated peer links ([`super::links`]), wired
//! the same way for every replicated service (the store's `--raft`, the messenger's
//! `--quorum majority`). Peers dial each other on the service's own listen port; the
//! service hands a connection whose first frame starts with [`super::links::HELLO`] to
//! [`super::links::serve_peer`] with [`Member::peer_config`] and [`Member::raft`].

use super::driver::{Driver, DriverConfig, RaftHandle, StateMachine};
use super::links::{LinkTransport, PeerConfig, PeerLinks};
use super::message::ReplicaId;
use super::types::Config;
use crate::framing::Framing;
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How a member is set up.
#[derive(Debug, Clone)]
pub struct MemberOptions {
    /// This server's index in `dial` (0-based; its Raft id is one more).
    pub index: usize,
    /// Where this server dials each member, by index (its own entry is not dialled). 3 or
    /// 5 of them.
    pub dial: Vec<String>,
    /// The service's name: in the hello, and bound into the handshake's proofs.
    pub cluster: String,
    /// The framing of the hello and the answer (the service's clients').
    pub framing: Framing,
    /// The cluster secret for the peer links.
    pub secret: Option<crate::auth::Secret>,
    /// Where the Raft log, hard state and snapshot live.
    pub data_dir: PathBuf,
    /// One tick of Raft's clock (elections after 10–19 ticks).
    pub tick: Duration,
    /// Take a snapshot after this many entries (0: never).
    pub compact_every: u64,
}

/// A running member: its driver and its links.
pub struct Member {
    raft: RaftHandle,
    driver: Mutex<Option<Driver>>,
    links: PeerLinks,
    peer_cfg: PeerConfig,
}

impl Member {
    /// Starts dialling the peers, opens the data directory, restores `sm` from its
    /// snapshot and starts the driver.
    ///
    /// # Errors
    /// When there are not 3 or 5 members or `index` is not one of them, the data
    /// directory is damaged or unreadable, or a thread cannot be started.
    pub fn start<S: StateMachine>(options: &MemberOptions, sm: S) -> io::Result<Member> {
        let n = options.dial.len();
        if !(n == 3 || n == 5) || options.index >= n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Raft cluster needs 3 or 5 addresses, and this server an index into them",
            ));
        }
        let ids: Vec<ReplicaId> = (1..=n as u64).collect();
        let id = options.index as u64 + 1;
        let peer_cfg = PeerConfig {
            id,
            addrs: ids
                .iter()
                .copied()
                .zip(options.dial.iter().cloned())
                .collect(),
            cluster: options.cluster.clone(),
            framing: options.framing,
            secret: options.secret.clone(),
            timeouts: crate::link::Timeouts {
                connect: Duration::from_secs(1),
                handshake: Duration::from_secs(2),
                write: Duration::from_secs(2),
                idle: Some(Duration::from_secs(2)),
            },
        };
        let links = PeerLinks::start(&peer_cfg).map_err(io::Error::other)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let cfg = DriverConfig {
            raft: Config::new(id, &ids, seed),
            tick: options.tick,
            compact_every: options.compact_every,
        };
        let driver = Driver::start(cfg, &options.data_dir, sm, links.transport())
            .inspect_err(|_| links.close(Duration::from_secs(1)))?;
        Ok(Member {
            raft: driver.handle().clone(),
            driver: Mutex::new(Some(driver)),
            links,
            peer_cfg,
        })
    }

    /// The driver's handle.
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// Posts the service's own frames on the outgoing links
    /// ([`LinkTransport::post`]).
    pub fn links(&self) -> LinkTransport {
        self.links.transport()
    }

    /// Who this member is on its links, for [`super::links::serve_peer`].
    pub fn peer_config(&self) -> &PeerConfig {
        &self.peer_cfg
    }

    /// Stops the driver and closes the peer links; call after the server has stopped.
    pub fn close(&self) {
        if let Some(d) = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            d.stop();
        }
        self.links.close(Duration::from_secs(2));
    }
}
