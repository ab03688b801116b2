//! Forwarding in majority mode: a follower serves its clients through the leader, so a
//! client that reaches a follower but not the leader is served all the same, as a backup
//! serves its clients in primary mode (`replication::forward`).
//!
//! The follower passes each request of such a connection (`F`) to the Raft leader it
//! knows, on its Raft link to it ([`crate::raft::links::LinkTransport::post`], the
//! authenticated links of the cluster), and binds the connection to that leader. The
//! leader decides it as for a connection of its own, a *remote* one in its client
//! registry (sessions and pushed messages included), and sends the answers, once
//! committed and applied, back on its own link to the follower (`R`), which writes them
//! to the client. Nothing is lost unseen: both directions number their frames per
//! connection, and a gap (a link that failed and was redialled between two frames)
//! closes the connection, as does a link ending, the follower learning of another
//! leader, or the leader stepping down (it relays a close for each remote connection).
//! The client then fails over as from any closed connection: it logs in again and
//! resends what was unanswered, and its ids make a resend say ok without a second copy.
//!
//! ```text
//! body (after the links' service byte 'S', one per frame, integers big-endian):
//!   'F' conn:u64 seq:u64 request      follower → leader: request number seq (1, 2, …) of
//!                                     the follower's connection conn (a client payload)
//!   'R' conn:u64 seq:u64 close:u8 bytes
//!                                     leader → follower: its reply frames number seq (1,
//!                                     2, …) for that connection, whole u32 client frames;
//!                                     close 1: close the connection after them. seq 0: the
//!                                     leader does not know the connection; close it.
//!   'X' conn:u64                      follower → leader: the connection ended (or the
//!                                     follower gave up on it); forget it and its session
//! ```

use crate::messenger::state::{Corrupt, Cursor};

/// A relay's bytes are cut into frames of at most this many (a search answer can be
/// long; a Raft link's frame limit is a few MiB).
pub const RELAY_CHUNK: usize = 256 << 10;

/// One forwarding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardMsg {
    /// Request `seq` of the follower's connection `conn`.
    Forward {
        /// The connection's id on the follower.
        conn: u64,
        /// 1 for its first request, then one more each.
        seq: u64,
        /// The client's payload.
        request: Vec<u8>,
    },
    /// Reply frames for the follower's connection `conn`.
    Relay {
        /// The connection's id on the follower.
        conn: u64,
        /// 1 for the first relay of the connection, then one more each; 0: unknown to
        /// the leader.
        seq: u64,
        /// Close the connection after `bytes`.
        close: bool,
        /// Whole `u32` reply frames.
        bytes: Vec<u8>,
    },
    /// The follower's connection `conn` ended.
    Closed {
        /// The connection's id on the follower.
        conn: u64,
    },
}

impl ForwardMsg {
    /// The message's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ForwardMsg::Forward { conn, seq, request } => {
                out.push(b'F');
                out.extend_from_slice(&conn.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(request);
            }
            ForwardMsg::Relay {
                conn,
                seq,
                close,
                bytes,
            } => {
                out.push(b'R');
                out.extend_from_slice(&conn.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(u8::from(*close));
                out.extend_from_slice(bytes);
            }
            ForwardMsg::Closed { conn } => {
                out.push(b'X');
                out.extend_from_slice(&conn.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a message; all of `bytes` must be used.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a forwarding message.
    pub fn decode(bytes: &[u8]) -> Result<ForwardMsg, Corrupt> {
        let mut c = Cursor::new(bytes);
        match c.u8()? {
            b'F' => {
                let (conn, seq) = (c.u64()?, c.u64()?);
                let request = c.rest().to_vec();
                Ok(ForwardMsg::Forward { conn, seq, request })
            }
            b'R' => {
                let (conn, seq) = (c.u64()?, c.u64()?);
                let close = match c.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(Corrupt("a relay's close flag is 0 or 1")),
                };
                let bytes = c.rest().to_vec();
                Ok(ForwardMsg::Relay {
                    conn,
                    seq,
                    close,
                    bytes,
                })
            }
            b'X' => {
                let conn = c.u64()?;
                c.end()?;
                Ok(ForwardMsg::Closed { conn })
            }
            _ => Err(Corrupt("unknown forwarding message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_the_documented_bytes_and_round_trip() {
        let forward = ForwardMsg::Forward {
            conn: 7,
            seq: 1,
            request: b"\x03*".to_vec(),
        };
        let mut want = vec![b'F'];
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"\x03*");
        assert_eq!(forward.encode(), want);
        let relay = ForwardMsg::Relay {
            conn: 7,
            seq: 2,
            close: true,
            bytes: b"\0\0\0\x01\x20".to_vec(),
        };
        let mut want = vec![b'R'];
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&2u64.to_be_bytes());
        want.push(1);
        want.extend_from_slice(b"\0\0\0\x01\x20");
        assert_eq!(relay.encode(), want);
        let closed = ForwardMsg::Closed { conn: 9 };
        assert_eq!(
            closed.encode(),
            [b"X".as_slice(), &9u64.to_be_bytes()].concat()
        );
        for m in [forward, relay, closed] {
            assert_eq!(ForwardMsg::decode(&m.encode()).unwrap(), m);
        }
        // Short, unknown, a bad flag, trailing bytes after a close: errors, not panics.
        assert!(ForwardMsg::decode(b"").is_err());
        assert!(ForwardMsg::decode(b"F\0\0").is_err());
        assert!(ForwardMsg::decode(b"Q").is_err());
        let mut bad = ForwardMsg::Relay {
            conn: 1,
            seq: 1,
            close: false,
            bytes: Vec::new(),
        }
        .encode();
        bad[17] = 2;
        assert!(ForwardMsg::decode(&bad).is_err());
        let mut long = ForwardMsg::Closed { conn: 1 }.encode();
        long.push(0);
        assert!(ForwardMsg::decode(&long).is_err());
    }
}
