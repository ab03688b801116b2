//! What the Raft log of `--quorum majority` carries, and how every server applies it, pure.
//! The leader decides requests as the primary does (`requests`) and
//! numbers each change `EPOCH.SEQ` before it proposes it; the log's order decides which
//! numbers stand. The **fence** (the epoch that leads and the last sequence number taken
//! in it) is part of the replicated state, so every server accepts and refuses the same
//! commands:
//!
//! - `Lead { node, epoch }` is accepted only if `epoch` is above the fence's: the fence
//!   moves to `(epoch, 0)` and `node` owns the epoch. A second claim of the same epoch
//!   (two leaders in a row that read the same fence, or one that proposed twice) is refused.
//! - `Change { epoch, seq, change }` is accepted only if `epoch` is the fence's and `seq`
//!   follows its last one: the fence moves to `(epoch, seq)` and the change (if any: an
//!   empty one is a barrier that only proves the epoch still leads) is applied with number
//!   `epoch.seq`. Anything else (a leader deposed, a change after a lost one) is refused
//!   and changes nothing.
//!
//! So a number names at most one message, forever: an epoch is owned by one accepted
//! Lead, and its sequence numbers are taken once each, in order. Numbers grow along the
//! log (epochs only grow; sequence numbers grow within one), which is the order clients
//! deduplicate by. And a leader may release an answer once the change it waited for is
//! accepted: everything it numbered before in its epoch was accepted before it.
//!
//! ```text
//! command  := 'L' node:u64 epoch:u64                     claim an epoch
//!           | 'C' epoch:u64 seq:u64 change?               a change numbered epoch.seq
//!                                                         (no change: a barrier)
//! snapshot := "SWBMQ1" epoch:u64 seq:u64 state            the fence, then the state as
//!                                                         `State::encode` writes it
//! ```
//! Integers big-endian; `change` as `Change::encode` writes it.

use crate::messenger::protocol::{Delivery, MessageId};
use crate::messenger::state::{Change, Corrupt, Cursor, State};

const SNAPSHOT_MAGIC: &[u8] = b"SWBMQ1";

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Server `node` (an index in `--peers`) claims `epoch`.
    Lead {
        /// Who claims it.
        node: u64,
        /// The epoch claimed: one above the fence its claimant read.
        epoch: u64,
    },
    /// A change numbered `epoch.seq`, or a barrier (no change).
    Change {
        /// The proposer's epoch.
        epoch: u64,
        /// Its place in the epoch: 1, 2, …
        seq: u64,
        /// The change, if any.
        change: Option<Change>,
    },
}

impl Command {
    /// The command's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Command::Lead { node, epoch } => {
                out.push(b'L');
                out.extend_from_slice(&node.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
            }
            Command::Change { epoch, seq, change } => {
                out.push(b'C');
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                if let Some(c) = change {
                    c.encode(&mut out);
                }
            }
        }
        out
    }

    /// Decodes a command; all of `bytes` must be used.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a command.
    pub fn decode(bytes: &[u8]) -> Result<Command, Corrupt> {
        let mut c = Cursor::new(bytes);
        match c.u8()? {
            b'L' => {
                let (node, epoch) = (c.u64()?, c.u64()?);
                c.end()?;
                Ok(Command::Lead { node, epoch })
            }
            b'C' => {
                let (epoch, seq) = (c.u64()?, c.u64()?);
                let rest = c.rest();
                let change = if rest.is_empty() {
                    None
                } else {
                    Some(Change::decode(rest)?)
                };
                Ok(Command::Change { epoch, seq, change })
            }
            _ => Err(Corrupt("unknown command type")),
        }
    }
}

/// The epoch that leads and the last sequence number accepted in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fence {
    /// The epoch of the last accepted Lead (0: none yet).
    pub epoch: u64,
    /// The last sequence number accepted in it (0: none yet).
    pub seq: u64,
}

/// What applying one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `node` now owns `epoch`.
    Led {
        /// The claimant.
        node: u64,
        /// Its epoch.
        epoch: u64,
    },
    /// `node`'s claim was refused (the fence had moved past the fence it read).
    NotLed {
        /// The claimant.
        node: u64,
    },
    /// A change (or barrier) numbered `at` was accepted; a send's message, to deliver.
    Accepted {
        /// Its number.
        at: MessageId,
        /// A send's recipient and message.
        delivered: Option<(String, Delivery)>,
    },
    /// A change of `epoch` was refused: that epoch no longer leads, or lost a change
    /// before this one.
    Refused {
        /// The proposer's epoch.
        epoch: u64,
    },
}

/// The replicated state of majority mode: the messenger's state and the fence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    /// Accounts and their pending messages.
    pub state: State,
    /// Which epoch leads, and how far it got.
    pub fence: Fence,
}

impl Machine {
    /// Applies one command (deterministic: every server applying the same log agrees).
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            &Command::Lead { node, epoch } => {
                if epoch > self.fence.epoch {
                    self.fence = Fence { epoch, seq: 0 };
                    Applied::Led { node, epoch }
                } else {
                    Applied::NotLed { node }
                }
            }
            Command::Change { epoch, seq, change } => {
                let next = self.fence.seq.checked_add(1);
                if *epoch != self.fence.epoch || Some(*seq) != next {
                    return Applied::Refused { epoch: *epoch };
                }
                self.fence.seq = *seq;
                let at = MessageId {
                    epoch: *epoch,
                    seq: *seq,
                };
                let delivered = change.as_ref().and_then(|c| self.state.apply(at, c));
                Applied::Accepted { at, delivered }
            }
        }
    }

    /// The snapshot's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&self.fence.epoch.to_be_bytes());
        out.extend_from_slice(&self.fence.seq.to_be_bytes());
        self.state.encode(&mut out);
        out
    }

    /// Decodes a snapshot.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a snapshot of this format.
    pub fn decode(bytes: &[u8]) -> Result<Machine, Corrupt> {
        let mut c = Cursor::new(bytes);
        if c.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
            return Err(Corrupt("not a majority-mode snapshot"));
        }
        let fence = Fence {
            epoch: c.u64()?,
            seq: c.u64()?,
        };
        let state = State::decode(c.rest())?;
        Ok(Machine { state, fence })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Rng;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn send(id: u64) -> Option<Change> {
        Some(Change::Send {
            from: "ann".into(),
            to: "bob".into(),
            id,
            text: format!("m{id}"),
        })
    }

    fn register(name: &str) -> Option<Change> {
        Some(Change::Register {
            name: name.into(),
            nonce: 1,
        })
    }

    #[test]
    fn an_epoch_is_claimed_once_and_its_numbers_taken_once_in_order() {
        let mut m = Machine::default();
        let lead = |node, epoch| Command::Lead { node, epoch };
        let change = |epoch, seq, change| Command::Change { epoch, seq, change };
        assert_eq!(m.apply(&lead(0, 1)), Applied::Led { node: 0, epoch: 1 });
        // The same epoch claimed again, by anyone: refused.
        assert_eq!(m.apply(&lead(2, 1)), Applied::NotLed { node: 2 });
        assert_eq!(m.apply(&lead(0, 1)), Applied::NotLed { node: 0 });
        for (seq, c) in [(1, register("ann")), (2, register("bob")), (3, None)] {
            assert!(matches!(
                m.apply(&change(1, seq, c)),
                Applied::Accepted { .. }
            ));
        }
        // A number taken, or one after a gap: refused, nothing changes.
        let before = m.clone();
        assert_eq!(
            m.apply(&change(1, 3, send(9))),
            Applied::Refused { epoch: 1 }
        );
        assert_eq!(
            m.apply(&change(1, 5, send(9))),
            Applied::Refused { epoch: 1 }
        );
        assert_eq!(m, before);
        let Applied::Accepted { at, delivered } = m.apply(&change(1, 4, send(9))) else {
            panic!("seq 4 follows 3");
        };
        assert_eq!(at, MessageId { epoch: 1, seq: 4 });
        assert_eq!(delivered.unwrap().1.id, at);
        // Server 1 claims epoch 2: epoch 1's later changes are refused.
        assert_eq!(m.apply(&lead(1, 2)), Applied::Led { node: 1, epoch: 2 });
        assert_eq!(
            m.apply(&change(1, 5, send(10))),
            Applied::Refused { epoch: 1 }
        );
        assert!(matches!(
            m.apply(&change(2, 1, send(11))),
            Applied::Accepted { .. }
        ));
        let ids: Vec<MessageId> = m.state.mailbox("bob").map(|x| x.id).collect();
        assert_eq!(
            ids,
            [
                MessageId { epoch: 1, seq: 4 },
                MessageId { epoch: 2, seq: 1 }
            ]
        );
        // An epoch below the fence's is refused too.
        assert_eq!(m.apply(&lead(0, 1)), Applied::NotLed { node: 0 });
    }

    #[test]
    fn commands_and_snapshots_round_trip() {
        let commands = [
            Command::Lead { node: 2, epoch: 7 },
            Command::Change {
                epoch: 7,
                seq: 1,
                change: register("ann"),
            },
            Command::Change {
                epoch: 7,
                seq: 2,
                change: None,
            },
            Command::Change {
                epoch: 7,
                seq: 3,
                change: send(5),
            },
        ];
        let mut m = Machine::default();
        for c in &commands {
            assert_eq!(&Command::decode(&c.encode()).unwrap(), c);
            m.apply(c);
        }
        assert_eq!(m.fence, Fence { epoch: 7, seq: 3 });
        let snap = m.encode();
        assert_eq!(Machine::decode(&snap).unwrap(), m);
        assert!(Machine::decode(&snap[..snap.len() - 1]).is_err());
        assert!(Machine::decode(b"SWBMQ0").is_err());
        assert!(Command::decode(b"L\0").is_err());
        assert!(Command::decode(b"X").is_err());
    }

    /// A leader's view in the simulation: its epoch, the numbers it gave out, and the
    /// answers it holds (released once their number is accepted).
    struct Leader {
        node: u64,
        epoch: Option<u64>,
        next: u64,
        /// Held answers: number → send id.
        held: BTreeMap<u64, u64>,
    }

    /// Leaders that read stale fences, proposals lost, duplicated and delayed, in random
    /// orders: whatever the log ends up holding, no number names two messages, numbers
    /// grow along the log, and every send whose answer a leader released (its number
    /// accepted, as the service releases answers) is in the state.
    #[test]
    fn whatever_the_log_holds_numbers_are_unique_and_released_answers_are_applied() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let mut m = Machine::default();
            let mut leaders: Vec<Leader> = (0..3)
                .map(|node| Leader {
                    node,
                    epoch: None,
                    next: 1,
                    held: BTreeMap::new(),
                })
                .collect();
            // Proposals in flight, in no particular order.
            let mut flight: Vec<Command> = Vec::new();
            let mut numbers: HashMap<MessageId, u64> = HashMap::new();
            let mut last = MessageId::default();
            let mut released: HashSet<u64> = HashSet::new();
            m.apply(&Command::Change {
                epoch: 0,
                seq: 1,
                change: register("bob"),
            });
            m.apply(&Command::Change {
                epoch: 0,
                seq: 2,
                change: register("ann"),
            });
            let mut id = 0;
            for _ in 0..400 {
                let who = rng.below(3) as usize;
                match rng.below(10) {
                    // Claim an epoch from the fence as this leader last read it (possibly
                    // long ago: a stale read).
                    0 => flight.push(Command::Lead {
                        node: leaders[who].node,
                        epoch: m.fence.epoch + 1 + rng.below(2),
                    }),
                    // A send, numbered by a leader that believes it owns its epoch.
                    1..=4 => {
                        let l = &mut leaders[who];
                        if let Some(epoch) = l.epoch {
                            id += 1;
                            let seq = l.next;
                            l.next += 1;
                            l.held.insert(seq, id);
                            flight.push(Command::Change {
                                epoch,
                                seq,
                                change: send(id),
                            });
                        }
                    }
                    // Lose or duplicate a proposal.
                    5 if !flight.is_empty() => {
                        let at = rng.below(flight.len() as u64) as usize;
                        if rng.below(2) == 0 {
                            flight.remove(at);
                        } else {
                            flight.push(flight[at].clone());
                        }
                    }
                    // The log takes one proposal in flight, and every server applies it.
                    _ if !flight.is_empty() => {
                        let at = rng.below(flight.len() as u64) as usize;
                        let c = flight.remove(at);
                        match m.apply(&c) {
                            Applied::Led { node, epoch } => {
                                // As the service: a new epoch, numbers from 1. The
                                // others go on as they were (stale) until refused.
                                let l = &mut leaders[node as usize];
                                (l.epoch, l.next) = (Some(epoch), 1);
                                l.held.clear();
                            }
                            Applied::NotLed { .. } => {}
                            Applied::Accepted { at, delivered } => {
                                assert!(at > last, "seed {seed}: {at} after {last}");
                                last = at;
                                if let Some((_, d)) = delivered {
                                    let Command::Change {
                                        change: Some(Change::Send { id, .. }),
                                        ..
                                    } = &c
                                    else {
                                        unreachable!()
                                    };
                                    let old = numbers.insert(d.id, *id);
                                    assert!(old.is_none(), "seed {seed}: {} twice", d.id);
                                }
                                for l in &mut leaders {
                                    if l.epoch == Some(at.epoch) {
                                        while let Some(e) = l.held.first_entry() {
                                            if *e.key() > at.seq {
                                                break;
                                            }
                                            released.insert(e.remove());
                                        }
                                    }
                                }
                            }
                            Applied::Refused { epoch } => {
                                // The service steps down: its held answers are dropped.
                                for l in &mut leaders {
                                    if l.epoch == Some(epoch) {
                                        l.epoch = None;
                                        l.held.clear();
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            let kept: HashSet<u64> = numbers.values().copied().collect();
            let in_state: HashSet<u64> = m
                .state
                .mailbox("bob")
                .map(|x| x.text[1..].parse().unwrap())
                .collect();
            assert_eq!(kept, in_state, "seed {seed}");
            assert!(released.is_subset(&in_state), "seed {seed}");
        }
    }
}
