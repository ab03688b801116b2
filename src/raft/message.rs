//! The typed messages replicas exchange, and their byte encoding: pure functions, every
//! length checked against the bytes that are there, so garbage decodes to an error and
//! never to a panic or a huge allocation.
//!
//! ```text
//! message  = from:u64 to:u64 term:u64 kind:u8 body        (all integers big-endian)
//! kind 1 PreVote               last_index:u64 last_term:u64
//! kind 3 Vote                  last_index:u64 last_term:u64 force:u8
//! kind 2 PreVoteResp / 4 VoteResp                         granted:u8
//! kind 5 Append      prev_index:u64 prev_term:u64 commit:u64 count:u32 entry*
//! kind 6 AppendResp  index:u64 reject:u8 hint_index:u64 hint_term:u64
//! kind 7 Heartbeat   commit:u64 round:u64
//! kind 8 HeartbeatResp                                    round:u64
//! kind 9 Snapshot    index:u64 term:u64 offset:u64 total:u64 len:u32 data   (one chunk)
//! kind 10 TimeoutNow
//! entry    = index:u64 term:u64 len:u32 data
//! ```

use std::fmt;

/// A replica's id: one entry of the static membership.
pub type ReplicaId = u64;

/// One log entry. An entry with empty `data` is the no-op a new leader appends (§8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its position in the log, from 1.
    pub index: u64,
    /// The term of the leader that created it.
    pub term: u64,
    /// The client's command; empty for a leader's no-op.
    pub data: Vec<u8>,
}

/// A compacted prefix of the log: everything up to `index` (whose term was `term`) as the
/// caller's state machine blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The last index the snapshot covers.
    pub index: u64,
    /// The term of the entry at `index`.
    pub term: u64,
    /// The state machine after applying every entry up to `index`.
    pub data: Vec<u8>,
}

/// One piece of an InstallSnapshot (§7, chunked as in the paper's Figure 13): bytes
/// `offset..offset + data.len()` of the blob of the snapshot at `index`, which is `total`
/// bytes long. The follower installs the snapshot once it has every byte, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotChunk {
    /// The last index the snapshot covers.
    pub index: u64,
    /// The term of the entry at `index`.
    pub term: u64,
    /// Where `data` starts in the blob.
    pub offset: u64,
    /// The whole blob's length.
    pub total: u64,
    /// The bytes from `offset`.
    pub data: Vec<u8>,
}

/// A message between two replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: ReplicaId,
    /// The receiver.
    pub to: ReplicaId,
    /// The sender's term (for a pre-vote request, the term it would campaign in).
    pub term: u64,
    /// What it says.
    pub body: Body,
}

/// What a [`Message`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// "Would you vote for me in `term`?", asked without raising anyone's term (§9.6).
    PreVote {
        /// The candidate's last log index.
        last_index: u64,
        /// The term of that entry.
        last_term: u64,
    },
    /// The answer to a [`Body::PreVote`].
    PreVoteResp {
        /// Whether the vote would be given.
        granted: bool,
    },
    /// RequestVote (§5.2).
    Vote {
        /// The candidate's last log index.
        last_index: u64,
        /// The term of that entry.
        last_term: u64,
        /// Set by a leadership transfer: the receivers drop their leader lease (§3.10).
        force: bool,
    },
    /// The answer to a [`Body::Vote`].
    VoteResp {
        /// Whether the vote was given.
        granted: bool,
    },
    /// AppendEntries with entries (§5.3).
    Append {
        /// The index just before `entries`.
        prev_index: u64,
        /// Its term, for the consistency check.
        prev_term: u64,
        /// The leader's commit index.
        commit: u64,
        /// Entries from `prev_index + 1`, possibly none.
        entries: Vec<Entry>,
    },
    /// The answer to an [`Body::Append`] or a [`Body::Snapshot`].
    AppendResp {
        /// On success, the follower's log matches the leader's up to here; on a
        /// rejection, the `prev_index` that was rejected.
        index: u64,
        /// The consistency check failed.
        reject: bool,
        /// On a rejection: where the leader should look next (fast back-off).
        hint_index: u64,
        /// On a rejection: the follower's term at `hint_index`, 0 when its log is short.
        hint_term: u64,
    },
    /// An empty AppendEntries that only asserts leadership and carries a read round.
    Heartbeat {
        /// The leader's commit index, capped at what the follower is known to match.
        commit: u64,
        /// The read-index round this heartbeat confirms, echoed in the answer.
        round: u64,
    },
    /// The answer to a [`Body::Heartbeat`].
    HeartbeatResp {
        /// The echoed round.
        round: u64,
    },
    /// One chunk of an InstallSnapshot (§7).
    Snapshot(SnapshotChunk),
    /// "Start an election now": the last step of a leadership transfer (§3.10).
    TimeoutNow,
}

/// Why bytes are not a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the message does.
    Truncated,
    /// The kind byte is not one of the known kinds.
    UnknownKind(u8),
    /// A flag byte is neither 0 nor 1.
    BadFlag(u8),
    /// Bytes are left after the message.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "raft message truncated"),
            DecodeError::UnknownKind(k) => write!(f, "unknown raft message kind {k}"),
            DecodeError::BadFlag(b) => write!(f, "flag byte {b} is neither 0 nor 1"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after a raft message"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes a message as bytes (see the module docs for the layout).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    put64(&mut b, msg.from);
    put64(&mut b, msg.to);
    put64(&mut b, msg.term);
    match &msg.body {
        Body::PreVote {
            last_index,
            last_term,
        } => {
            b.push(1);
            put64(&mut b, *last_index);
            put64(&mut b, *last_term);
        }
        Body::PreVoteResp { granted } => {
            b.push(2);
            b.push(u8::from(*granted));
        }
        Body::Vote {
            last_index,
            last_term,
            force,
        } => {
            b.push(3);
            put64(&mut b, *last_index);
            put64(&mut b, *last_term);
            b.push(u8::from(*force));
        }
        Body::VoteResp { granted } => {
            b.push(4);
            b.push(u8::from(*granted));
        }
        Body::Append {
            prev_index,
            prev_term,
            commit,
            entries,
        } => {
            b.push(5);
            put64(&mut b, *prev_index);
            put64(&mut b, *prev_term);
            put64(&mut b, *commit);
            put32(&mut b, entries.len());
            for e in entries {
                put64(&mut b, e.index);
                put64(&mut b, e.term);
                put_bytes(&mut b, &e.data);
            }
        }
        Body::AppendResp {
            index,
            reject,
            hint_index,
            hint_term,
        } => {
            b.push(6);
            put64(&mut b, *index);
            b.push(u8::from(*reject));
            put64(&mut b, *hint_index);
            put64(&mut b, *hint_term);
        }
        Body::Heartbeat { commit, round } => {
            b.push(7);
            put64(&mut b, *commit);
            put64(&mut b, *round);
        }
        Body::HeartbeatResp { round } => {
            b.push(8);
            put64(&mut b, *round);
        }
        Body::Snapshot(s) => {
            b.push(9);
            put64(&mut b, s.index);
            put64(&mut b, s.term);
            put64(&mut b, s.offset);
            put64(&mut b, s.total);
            put_bytes(&mut b, &s.data);
        }
        Body::TimeoutNow => b.push(10),
    }
    b
}

/// Whether `encoded` (an [`encode`]d message) is an Append with entries: the one kind a
/// link may drop when it is full of them (`links::RAFT_QUEUE`), since losing one costs a
/// resend from where the follower is. A snapshot's chunks are never dropped so: a follower
/// takes them only in order, and the leader sends them all at once, so dropping the tail
/// of a large one every time would stall it for good.
pub(crate) fn is_append(encoded: &[u8]) -> bool {
    // Three u64s (from, to, term), then the body's tag.
    encoded.get(24) == Some(&5)
}

/// Decodes one whole message.
///
/// # Errors
/// [`DecodeError`] when `bytes` are short, long, or not a message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let from = r.u64()?;
    let to = r.u64()?;
    let term = r.u64()?;
    let body = match r.u8()? {
        1 => Body::PreVote {
            last_index: r.u64()?,
            last_term: r.u64()?,
        },
        2 => Body::PreVoteResp { granted: r.flag()? },
        3 => Body::Vote {
            last_index: r.u64()?,
            last_term: r.u64()?,
            force: r.flag()?,
        },
        4 => Body::VoteResp { granted: r.flag()? },
        5 => {
            let prev_index = r.u64()?;
            let prev_term = r.u64()?;
            let commit = r.u64()?;
            let count = r.u32()?;
            // Each entry takes at least 20 bytes: a count the bytes cannot hold is a lie,
            // and must not size an allocation.
            if count > r.left() / 20 {
                return Err(DecodeError::Truncated);
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(Entry {
                    index: r.u64()?,
                    term: r.u64()?,
                    data: r.bytes()?,
                });
            }
            Body::Append {
                prev_index,
                prev_term,
                commit,
                entries,
            }
        }
        6 => Body::AppendResp {
            index: r.u64()?,
            reject: r.flag()?,
            hint_index: r.u64()?,
            hint_term: r.u64()?,
        },
        7 => Body::Heartbeat {
            commit: r.u64()?,
            round: r.u64()?,
        },
        8 => Body::HeartbeatResp { round: r.u64()? },
        9 => Body::Snapshot(SnapshotChunk {
            index: r.u64()?,
            term: r.u64()?,
            offset: r.u64()?,
            total: r.u64()?,
            data: r.bytes()?,
        }),
        10 => Body::TimeoutNow,
        k => return Err(DecodeError::UnknownKind(k)),
    };
    if r.left() > 0 {
        return Err(DecodeError::TrailingBytes(r.left()));
    }
    Ok(Message {
        from,
        to,
        term,
        body,
    })
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut Vec<u8>, n: usize) {
    // Entry counts and blob lengths above 4 GiB are not representable; a message that
    // large is a caller's bug long before it is an encoding question.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    b.extend_from_slice(&n.to_be_bytes());
}

fn put_bytes(b: &mut Vec<u8>, data: &[u8]) {
    put32(b, data.len());
    b.extend_from_slice(data);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.left() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::BadFlag(b)),
        }
    }

    fn u32(&mut self) -> Result<usize, DecodeError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a) as usize)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()?;
        Ok(self.take(n)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::rng::Rng;

    fn samples() -> Vec<Message> {
        let e = |index, term, data: &[u8]| Entry {
            index,
            term,
            data: data.to_vec(),
        };
        let bodies = vec![
            Body::PreVote {
                last_index: 7,
                last_term: 3,
            },
            Body::PreVoteResp { granted: true },
            Body::Vote {
                last_index: u64::MAX,
                last_term: 0,
                force: true,
            },
            Body::VoteResp { granted: false },
            Body::Append {
                prev_index: 4,
                prev_term: 2,
                commit: 3,
                entries: vec![e(5, 2, b""), e(6, 3, b"store,k,v")],
            },
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                commit: 0,
                entries: vec![],
            },
            Body::AppendResp {
                index: 9,
                reject: true,
                hint_index: 4,
                hint_term: 1,
            },
            Body::Heartbeat {
                commit: 12,
                round: 5,
            },
            Body::HeartbeatResp { round: 5 },
            Body::Snapshot(SnapshotChunk {
                index: 100,
                term: 4,
                offset: 1 << 20,
                total: 3 << 20,
                data: vec![0xff; 300],
            }),
            Body::TimeoutNow,
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Message {
                from: i as u64,
                to: 2,
                term: 11,
                body,
            })
            .collect()
    }

    #[test]
    fn every_kind_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m)), Ok(m));
        }
    }

    #[test]
    fn every_proper_prefix_is_truncated_and_a_longer_buffer_has_trailing_bytes() {
        for m in samples() {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Truncated), "{m:?}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(decode(&long), Err(DecodeError::TrailingBytes(1)));
        }
    }

    #[test]
    fn bad_kinds_and_flags_are_errors() {
        let mut b = encode(&samples()[1]);
        b[24] = 0;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(0)));
        let mut b = encode(&samples()[1]);
        b[25] = 2;
        assert_eq!(decode(&b), Err(DecodeError::BadFlag(2)));
    }

    #[test]
    fn a_lying_entry_count_is_refused_before_it_allocates() {
        let mut b = encode(&samples()[5]);
        let at = b.len() - 4;
        b[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&b), Err(DecodeError::Truncated));
    }

    /// Random bytes, and valid messages with random bytes flipped, never panic; whatever
    /// decodes re-encodes to the same bytes.
    #[test]
    fn decode_fuzz_never_panics() {
        let mut rng = Rng::new(0x5eed);
        let samples: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        for round in 0..20_000 {
            let bytes = if round % 2 == 0 {
                let len = rng.below(80) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if len > 24 {
                    b[24] = rng.below(12) as u8;
                }
                b
            } else {
                let mut b = samples[rng.below(samples.len() as u64) as usize].clone();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next() as u8;
                }
                b
            };
            if let Ok(m) = decode(&bytes) {
                assert_eq!(encode(&m), bytes, "round {round}");
            }
        }
    }
}
