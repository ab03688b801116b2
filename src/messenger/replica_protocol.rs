//! Server-to-server messages, pure: what one replica of the cluster sends another on a
//! replication link. Links share the client port: a connection whose first frame is a
//! HELLO is a replication link, anything else is a client. Each server dials
//! every other one and only writes on the link it dialed (the acceptor's one frame is the
//! WELCOME), so every message from server A to server B travels on A's link to B, in order.
//! Frames are `u32` frames, as for clients; a peer frame is at most [`MAX_PEER_FRAME`]
//! bytes (a snapshot travels in chunks of at most [`SNAPSHOT_CHUNK`] bytes, records in
//! batches of at most [`BATCH_BYTES`]), which a link only accepts after the HELLO/WELCOME
//! handshake.
//!
//! ```text
//! 'h' from:u16 cluster         HELLO: the dialer's id and the whole --peers list, comma-joined
//!                               (a server refuses a link from a differently configured cluster)
//! 'w'                          WELCOME: the acceptor's only frame
//! 'b' role:u8 epoch:u64 seq:u64 lepoch:u64 insync:u8 you:u8 mark:u64 echo:u64 primary:u16
//!                               HEARTBEAT, every 100 ms and at once on any change: the sender's
//!                               role (0 backup, 1 candidate, 2 primary), highest epoch accepted,
//!                               last record (seq, lepoch), whether it holds every committed
//!                               change, and, from a primary, the receiver's standing
//!                               (0 n/a, 1 excluded, 2 member, 3 member holding everything);
//!                               `mark` numbers what the sender says (it grows with every change,
//!                               across restarts too), `echo` is the mark of the receiver's last
//!                               heartbeat the sender has taken in (0: none on this link);
//!                               `primary`: the primary the sender follows (itself if it is one),
//!                               heard from within the last 250 ms; 65535: none
//! 'r' epoch:u64 pseq:u64 pepoch:u64 count:u32 record*
//!                               REPLICATE: records following (pseq, pepoch), from the primary of
//!                               `epoch`; records are encoded as in the change log, CRC included
//! 'R' (as 'r')                  the answer to a FETCH: what follows the asker's last record
//!                               (no records: nothing newer here)
//! 's' epoch:u64 seq:u64 sepoch:u64 total:u64 offset:u64 chunk
//!                               SNAPSHOT, one chunk: bytes offset.. of the snapshot file at
//!                               (seq, sepoch), `total` bytes long, from the primary of `epoch`;
//!                               chunks follow each other in order, the first at offset 0;
//!                               replace everything once the last has come
//! 'S' (as 's')                  the answer to a FETCH from a peer that is ahead
//!                               but does not hold the asker's last record
//! 'a' epoch:u64 seq:u64         ACK: everything up to seq is durable here
//! 'n' seq:u64 epoch:u64         NEED: that replication did not follow my last record, this one
//! 'x' epoch:u64                 REJECT: I have accepted a higher epoch than yours
//! 'f' seq:u64 epoch:u64         FETCH: a candidate asks what the receiver holds
//!                               beyond its last record
//! 'q' conn:u64 request          FORWARD: a backup passes on a client request (the client
//!                               frame's payload) from its connection `conn`
//! 'p' conn:u64 close:u8 bytes   RELAY: the primary's answer for that connection: reply
//!                               frames (u32-framed, as the client reads them), maybe a part
//!                               of them; close 1: the connection is to close after them
//! 'c' conn:u64                  CLOSED: the backup's client connection `conn` has ended
//! ```
use super::log::{decode_record, encode_record, Pos, Record};
use super::state::{Corrupt, Cursor};

/// The first byte of a HELLO frame (no client operation uses it).
pub const HELLO: u8 = b'h';

/// A server's role, as heartbeats report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows the primary (or waits for one).
    Backup = 0,
    /// Catching up from the most up-to-date peer before taking over.
    Candidate = 1,
    /// Applies client requests.
    Primary = 2,
}

/// What a primary says about the receiver of its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The sender is not a primary.
    NotPrimary = 0,
    /// Commits do not wait for you: you may miss changes.
    Excluded = 1,
    /// Commits wait for you, but you may not hold every committed change yet.
    Member = 2,
    /// Commits wait for you and you hold every committed change.
    InSync = 3,
}

/// Largest snapshot chunk in one SNAPSHOT frame.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Most bytes of records (headers and CRCs included) in one REPLICATE frame: the primary
/// stops a batch before it would pass this (a record is far smaller: see
/// [`MAX_CHANGE`](super::state::MAX_CHANGE)).
pub const BATCH_BYTES: usize = 1 << 20;
/// Largest RELAY payload part.
pub const RELAY_CHUNK: usize = 1 << 20;
/// Largest peer frame a replica reads: the largest legal SNAPSHOT, REPLICATE or RELAY frame
/// (a chunk and its header); a longer one is skipped and logged.
pub const MAX_PEER_FRAME: usize = SNAPSHOT_CHUNK + 64;

/// A heartbeat's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The sender's role.
    pub role: Role,
    /// The highest epoch the sender has accepted (or started).
    pub epoch: u64,
    /// The sender's last record.
    pub last: Pos,
    /// Whether the sender holds every committed change.
    pub in_sync: bool,
    /// The receiver's standing with the sender.
    pub you: Standing,
    /// The sender's view number: a heartbeat with a higher mark says something newer.
    pub mark: u64,
    /// The mark of the receiver's last heartbeat the sender has taken in: a primary knows
    /// from it that a backup has learnt it was excluded (see `replication`).
    pub echo: u64,
    /// The primary the sender follows (itself, if primary), heard from recently.
    pub primary: Option<usize>,
}

/// `primary` on the wire when there is none.
const NO_PRIMARY: u16 = u16::MAX;

/// One peer-link message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaMsg {
    /// The dialer introduces itself.
    Hello {
        /// Its id.
        from: usize,
        /// Its `--peers` list.
        cluster: String,
    },
    /// The acceptor agrees.
    Welcome,
    /// Liveness and position.
    Heartbeat(Status),
    /// Records that follow `prev`.
    Replicate {
        /// The sender's epoch.
        epoch: u64,
        /// The record the first one follows.
        prev: Pos,
        /// In order.
        records: Vec<Record>,
        /// An answer to a FETCH rather than replication from a primary.
        fetched: bool,
    },
    /// One chunk of a snapshot file.
    Snapshot {
        /// The sender's epoch.
        epoch: u64,
        /// The snapshot's position (its last change).
        pos: Pos,
        /// The whole file's length.
        total: u64,
        /// Where this chunk starts in the file.
        offset: u64,
        /// The chunk.
        bytes: Vec<u8>,
        /// An answer to a FETCH.
        fetched: bool,
    },
    /// Durable up to `seq`.
    Ack {
        /// The epoch whose replication this acknowledges.
        epoch: u64,
        /// Last durable record.
        seq: u64,
    },
    /// Send what follows `last`.
    Need {
        /// The sender's last record.
        last: Pos,
    },
    /// A higher epoch has been accepted.
    Reject {
        /// That epoch.
        epoch: u64,
    },
    /// A candidate asks what follows `last`.
    Fetch {
        /// Its last record.
        last: Pos,
    },
    /// A backup passes on a client's request.
    Forward {
        /// The client connection's id on the backup.
        conn: u64,
        /// The request frame's payload.
        request: Vec<u8>,
    },
    /// The primary's reply frames for a forwarded connection.
    Relay {
        /// The client connection's id on the backup.
        conn: u64,
        /// Close the connection after these bytes.
        close: bool,
        /// Reply frames, u32-framed (a part of them, when they are long).
        bytes: Vec<u8>,
    },
    /// A forwarded client connection ended on the backup.
    Closed {
        /// Its id on the backup.
        conn: u64,
    },
}

/// The highest epoch any server may lead or accept: far below `u64::MAX`, so that epoch
/// arithmetic never wraps (an epoch past it is refused and logged, and a server whose next
/// epoch would pass it does not take over). Ids are u16 on the wire, so a next epoch is at
/// most 2^16 above the epoch it follows.
pub const MAX_EPOCH: u64 = u64::MAX - (1 << 17);

impl ReplicaMsg {
    /// The highest epoch the message names (its own, and those of the positions and
    /// records it carries; a snapshot's bytes are checked when taken): a peer's message
    /// with one above [`MAX_EPOCH`] is refused.
    pub fn highest_epoch(&self) -> u64 {
        match self {
            ReplicaMsg::Hello { .. }
            | ReplicaMsg::Welcome
            | ReplicaMsg::Forward { .. }
            | ReplicaMsg::Relay { .. }
            | ReplicaMsg::Closed { .. } => 0,
            ReplicaMsg::Heartbeat(s) => s.epoch.max(s.last.epoch),
            ReplicaMsg::Replicate {
                epoch,
                prev,
                records,
                ..
            } => records
                .iter()
                .map(|r| r.pos.epoch)
                .fold((*epoch).max(prev.epoch), u64::max),
            ReplicaMsg::Snapshot { epoch, pos, .. } => (*epoch).max(pos.epoch),
            ReplicaMsg::Ack { epoch, .. } | ReplicaMsg::Reject { epoch } => *epoch,
            ReplicaMsg::Need { last } | ReplicaMsg::Fetch { last } => last.epoch,
        }
    }
}

fn put_pos(out: &mut Vec<u8>, pos: Pos) {
    out.extend_from_slice(&pos.seq.to_be_bytes());
    out.extend_from_slice(&pos.epoch.to_be_bytes());
}

fn get_pos(c: &mut Cursor<'_>) -> Result<Pos, Corrupt> {
    let seq = c.u64()?;
    Ok(Pos {
        seq,
        epoch: c.u64()?,
    })
}

impl ReplicaMsg {
    /// The message's frame payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ReplicaMsg::Hello { from, cluster } => {
                out.push(HELLO);
                out.extend_from_slice(&(*from as u16).to_be_bytes());
                out.extend_from_slice(cluster.as_bytes());
            }
            ReplicaMsg::Welcome => out.push(b'w'),
            ReplicaMsg::Heartbeat(s) => {
                out.push(b'b');
                out.push(s.role as u8);
                out.extend_from_slice(&s.epoch.to_be_bytes());
                put_pos(&mut out, s.last);
                out.push(u8::from(s.in_sync));
                out.push(s.you as u8);
                out.extend_from_slice(&s.mark.to_be_bytes());
                out.extend_from_slice(&s.echo.to_be_bytes());
                let primary = s
                    .primary
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(NO_PRIMARY);
                out.extend_from_slice(&primary.to_be_bytes());
            }
            ReplicaMsg::Replicate {
                epoch,
                prev,
                records,
                fetched,
            } => {
                out.push(if *fetched { b'R' } else { b'r' });
                out.extend_from_slice(&epoch.to_be_bytes());
                put_pos(&mut out, *prev);
                out.extend_from_slice(&(records.len() as u32).to_be_bytes());
                for r in records {
                    encode_record(r.pos, &r.change, &mut out);
                }
            }
            ReplicaMsg::Snapshot {
                epoch,
                pos,
                total,
                offset,
                bytes,
                fetched,
            } => {
                out.push(if *fetched { b'S' } else { b's' });
                out.extend_from_slice(&epoch.to_be_bytes());
                put_pos(&mut out, *pos);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            ReplicaMsg::Ack { epoch, seq } => {
                out.push(b'a');
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
            }
            ReplicaMsg::Need { last } => {
                out.push(b'n');
                put_pos(&mut out, *last);
            }
            ReplicaMsg::Reject { epoch } => {
                out.push(b'x');
                out.extend_from_slice(&epoch.to_be_bytes());
            }
            ReplicaMsg::Fetch { last } => {
                out.push(b'f');
                put_pos(&mut out, *last);
            }
            ReplicaMsg::Forward { conn, request } => {
                out.push(b'q');
                out.extend_from_slice(&conn.to_be_bytes());
                out.extend_from_slice(request);
            }
            ReplicaMsg::Relay { conn, close, bytes } => {
                out.push(b'p');
                out.extend_from_slice(&conn.to_be_bytes());
                out.push(u8::from(*close));
                out.extend_from_slice(bytes);
            }
            ReplicaMsg::Closed { conn } => {
                out.push(b'c');
                out.extend_from_slice(&conn.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a frame payload.
    ///
    /// # Errors
    /// [`Corrupt`] when it is not a peer message.
    pub fn decode(payload: &[u8]) -> Result<ReplicaMsg, Corrupt> {
        let mut c = Cursor::new(payload);
        let msg = match c.u8()? {
            HELLO => {
                let from = c.u16()? as usize;
                let cluster = String::from_utf8(c.rest().to_vec())
                    .map_err(|_| Corrupt("cluster is not UTF-8"))?;
                ReplicaMsg::Hello { from, cluster }
            }
            b'w' => ReplicaMsg::Welcome,
            b'b' => {
                let role = match c.u8()? {
                    0 => Role::Backup,
                    1 => Role::Candidate,
                    2 => Role::Primary,
                    _ => return Err(Corrupt("unknown role")),
                };
                let epoch = c.u64()?;
                let last = get_pos(&mut c)?;
                let in_sync = c.u8()? != 0;
                let you = match c.u8()? {
                    0 => Standing::NotPrimary,
                    1 => Standing::Excluded,
                    2 => Standing::Member,
                    3 => Standing::InSync,
                    _ => return Err(Corrupt("unknown standing")),
                };
                let (mark, echo) = (c.u64()?, c.u64()?);
                let primary = match c.u16()? {
                    NO_PRIMARY => None,
                    p => Some(usize::from(p)),
                };
                ReplicaMsg::Heartbeat(Status {
                    role,
                    epoch,
                    last,
                    in_sync,
                    you,
                    mark,
                    echo,
                    primary,
                })
            }
            t @ (b'r' | b'R') => {
                let epoch = c.u64()?;
                let prev = get_pos(&mut c)?;
                let count = c.u32()? as usize;
                let mut rest = c.rest();
                let mut records = Vec::with_capacity(count.min(1 << 16));
                for _ in 0..count {
                    let (record, len) = decode_record(rest).ok_or(Corrupt("bad record"))?;
                    records.push(record);
                    rest = &rest[len..];
                }
                if !rest.is_empty() {
                    return Err(Corrupt("trailing bytes"));
                }
                return Ok(ReplicaMsg::Replicate {
                    epoch,
                    prev,
                    records,
                    fetched: t == b'R',
                });
            }
            t @ (b's' | b'S') => {
                let epoch = c.u64()?;
                let pos = get_pos(&mut c)?;
                let (total, offset) = (c.u64()?, c.u64()?);
                let bytes = c.rest().to_vec();
                let end = offset
                    .checked_add(bytes.len() as u64)
                    .ok_or(Corrupt("chunk past the end"))?;
                if end > total || (bytes.is_empty() && total > 0) {
                    return Err(Corrupt("chunk outside its snapshot"));
                }
                return Ok(ReplicaMsg::Snapshot {
                    epoch,
                    pos,
                    total,
                    offset,
                    bytes,
                    fetched: t == b'S',
                });
            }
            b'q' => {
                let conn = c.u64()?;
                return Ok(ReplicaMsg::Forward {
                    conn,
                    request: c.rest().to_vec(),
                });
            }
            b'p' => {
                let conn = c.u64()?;
                let close = match c.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(Corrupt("bad close flag")),
                };
                return Ok(ReplicaMsg::Relay {
                    conn,
                    close,
                    bytes: c.rest().to_vec(),
                });
            }
            b'c' => ReplicaMsg::Closed { conn: c.u64()? },
            b'a' => ReplicaMsg::Ack {
                epoch: c.u64()?,
                seq: c.u64()?,
            },
            b'n' => ReplicaMsg::Need {
                last: get_pos(&mut c)?,
            },
            b'x' => ReplicaMsg::Reject { epoch: c.u64()? },
            b'f' => ReplicaMsg::Fetch {
                last: get_pos(&mut c)?,
            },
            _ => return Err(Corrupt("unknown peer message")),
        };
        c.end()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_and_junk_is_refused() {
        let pos = Pos { epoch: 4, seq: 17 };
        let msgs = [
            ReplicaMsg::Hello {
                from: 2,
                cluster: "127.0.0.1:1,127.0.0.1:2".into(),
            },
            ReplicaMsg::Welcome,
            ReplicaMsg::Heartbeat(Status {
                role: Role::Primary,
                epoch: 7,
                last: pos,
                in_sync: true,
                you: Standing::InSync,
                mark: 1 << 60,
                echo: 12,
                primary: Some(2),
            }),
            ReplicaMsg::Replicate {
                epoch: 7,
                prev: pos,
                records: vec![
                    Record {
                        pos: Pos { epoch: 7, seq: 18 },
                        change: b"E".to_vec(),
                    },
                    Record {
                        pos: Pos { epoch: 7, seq: 19 },
                        change: b"D\x01a".to_vec(),
                    },
                ],
                fetched: false,
            },
            ReplicaMsg::Replicate {
                epoch: 1,
                prev: Pos::default(),
                records: vec![],
                fetched: true,
            },
            ReplicaMsg::Snapshot {
                epoch: 3,
                pos,
                total: 100,
                offset: 88,
                bytes: b"SWBMSNP2\n...".to_vec(),
                fetched: true,
            },
            ReplicaMsg::Forward {
                conn: 7,
                request: b"\x02ann".to_vec(),
            },
            ReplicaMsg::Relay {
                conn: 7,
                close: true,
                bytes: b"\0\0\0\x01\x20".to_vec(),
            },
            ReplicaMsg::Closed { conn: 7 },
            ReplicaMsg::Ack { epoch: 7, seq: 19 },
            ReplicaMsg::Need { last: pos },
            ReplicaMsg::Reject { epoch: 9 },
            ReplicaMsg::Fetch { last: pos },
        ];
        for m in msgs {
            assert_eq!(ReplicaMsg::decode(&m.encode()).unwrap(), m);
        }
        assert_eq!(ReplicaMsg::Welcome.encode(), b"w");
        assert_eq!(
            ReplicaMsg::Ack { epoch: 1, seq: 2 }.encode(),
            b"a\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02"
        );
        for junk in [
            &b""[..],
            b"z",
            b"w!",
            b"b\x09",
            b"a\0\0",
            b"r\0\0\0\0\0\0\0\x01",
            b"p\0\0\0\0\0\0\0\x01\x02",
        ] {
            assert!(ReplicaMsg::decode(junk).is_err(), "{junk:?}");
        }
        // A heartbeat without its mark and echo (the fields the exclusion rule needs).
        let short = [&b"b\x00"[..], &[0; 24], b"\x00\x00"].concat();
        assert!(ReplicaMsg::decode(&short).is_err());
        // A chunk that does not fit its snapshot.
        let chunk = |total: u64, offset: u64, bytes: &[u8]| {
            let mut m = ReplicaMsg::Snapshot {
                epoch: 3,
                pos,
                total: 0,
                offset: 0,
                bytes: Vec::new(),
                fetched: false,
            }
            .encode();
            m.truncate(1 + 8 + 16);
            m.extend_from_slice(&total.to_be_bytes());
            m.extend_from_slice(&offset.to_be_bytes());
            m.extend_from_slice(bytes);
            m
        };
        assert!(ReplicaMsg::decode(&chunk(4, 0, b"abcd")).is_ok());
        assert!(ReplicaMsg::decode(&chunk(4, 2, b"abc")).is_err());
        assert!(ReplicaMsg::decode(&chunk(4, u64::MAX, b"a")).is_err());
        assert!(ReplicaMsg::decode(&chunk(4, 0, b"")).is_err());
    }

    #[test]
    fn a_message_names_its_highest_epoch_wherever_it_is() {
        let huge = u64::MAX - 5;
        let at = |epoch| Pos { epoch, seq: 1 };
        let heartbeat = |epoch, last| {
            ReplicaMsg::Heartbeat(Status {
                role: Role::Backup,
                epoch,
                last: at(last),
                in_sync: false,
                you: Standing::NotPrimary,
                mark: 1,
                echo: 0,
                primary: None,
            })
        };
        let record = |epoch| Record {
            pos: at(epoch),
            change: Vec::new(),
        };
        let replicate = |epoch, prev, records| ReplicaMsg::Replicate {
            epoch,
            prev: at(prev),
            records,
            fetched: false,
        };
        let cases = [
            (heartbeat(huge, 2), huge),
            (heartbeat(2, huge), huge),
            (replicate(3, 2, vec![record(3)]), 3),
            (replicate(3, 2, vec![record(3), record(huge)]), huge),
            (replicate(3, huge, vec![]), huge),
            (
                ReplicaMsg::Snapshot {
                    epoch: huge,
                    pos: at(2),
                    total: 0,
                    offset: 0,
                    bytes: Vec::new(),
                    fetched: false,
                },
                huge,
            ),
            (
                ReplicaMsg::Snapshot {
                    epoch: 3,
                    pos: at(huge),
                    total: 0,
                    offset: 0,
                    bytes: Vec::new(),
                    fetched: false,
                },
                huge,
            ),
            (
                ReplicaMsg::Ack {
                    epoch: huge,
                    seq: 1,
                },
                huge,
            ),
            (ReplicaMsg::Reject { epoch: huge }, huge),
            (ReplicaMsg::Need { last: at(huge) }, huge),
            (ReplicaMsg::Fetch { last: at(4) }, 4),
            (ReplicaMsg::Welcome, 0),
        ];
        for (msg, want) in cases {
            assert_eq!(msg.highest_epoch(), want, "{msg:?}");
            assert_eq!(msg.highest_epoch() > MAX_EPOCH, want == huge, "{msg:?}");
        }
    }
}
