//! The replicated state machine, pure: accounts, their pending messages and the recent send
//! ids of each sender. The primary turns a request into a [`Decision`] (a reply, maybe a
//! [`Change`], maybe a session effect); every server applies the same changes in the same
//! order with [`State::apply`], which is deterministic and total, so replicas that apply
//! the same log hold the same state. Sessions (who is logged in where) are not here: they
//! belong to the primary's connections.
//!
//! Byte formats, used by the change log, snapshots and peer links:
//!
//! ```text
//! change  := 'R' name:str8 nonce:u64          register (nonce 0: none given)
//!          | 'D' name:str8                    delete the account and its pending messages
//!          | 'M' from:str8 to:str8 id:u64 text:str16    send; the message's number is the
//!                                             record's (epoch, sequence number)
//!          | 'K' user:str8 epoch:u64 seq:u64  confirm: drop user's messages numbered up to
//!                                             (epoch, seq), epoch first
//!          | 'C' user:str8 upto:u64           confirm, as logs before numbers carried their
//!                                             epoch wrote it: drop messages whose seq <= upto
//!          | 'E'                              a new primary's first record; changes nothing
//! state   := count:u32 account*               accounts in name order
//! account := name:str8 nonce:u64 nids:u16 id:u64*  nmsgs:u32 message*
//! message := epoch:u64 seq:u64 from:str8 text:str16
//!            (in a legacy `SWBMSNP1` snapshot: seq:u64 from:str8 text:str16, epoch 0)
//! str8    := len:u8 bytes     str16 := len:u16 bytes     integers big-endian
//! ```

use super::protocol::{self, Delivery, Glob, MessageId, Reply, Request, Violation, MAX_LIST};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;

/// The longest change a primary makes from a valid request: a send with the longest names
/// and text. Records on the wire are sized by it (see `replication`'s frame limit).
pub const MAX_CHANGE: usize = 1 + 2 * (1 + protocol::MAX_NAME) + 8 + 2 + protocol::MAX_TEXT;

/// Send ids remembered per sender at most. A client resends only its unacknowledged
/// requests, one or a few, so a window this size recognises every resend.
pub const RECENT_IDS: usize = 1024;

/// Send ids remembered per sender at least, however many accounts there are: still far
/// more than a client has unacknowledged.
pub const MIN_RECENT_IDS: usize = 64;

/// Send ids remembered over all senders, before each sender's window shrinks towards
/// [`MIN_RECENT_IDS`] (see [`recent_window`]).
pub const RECENT_TOTAL: usize = 1 << 20;

/// How many send ids a sender's window holds while `accounts` accounts exist:
/// [`RECENT_TOTAL`] shared out, within [`MIN_RECENT_IDS`]..=[`RECENT_IDS`]. The windows
/// cost memory (about 26 bytes an id with the set beside the queue), and at the full 1,024
/// each, the most accounts (100,000 by default) could have made a server hold about 3.5 GB
/// of them (the queue's allocation then doubled past the window); shared out, about 250 MB
/// at most at the default `--max-accounts` (a window shrinks only when its sender next
/// sends, so the first senders' windows may stay larger: about 1M ids in the first 1,024
/// accounts' full windows, 2.9M in those filled while 1,024 to 16,384 accounts existed,
/// and 64 in each of the rest: 9.3M), and 64 more ids (about 1.7 KB) per account past
/// it. It is a function of the replicated state only, so every replica forgets the same
/// ids at the same change.
pub fn recent_window(accounts: usize) -> usize {
    (RECENT_TOTAL / accounts.max(1)).clamp(MIN_RECENT_IDS, RECENT_IDS)
}

/// Accounts a server holds at most unless told otherwise (`--max-accounts`).
pub const DEFAULT_MAX_ACCOUNTS: usize = 100_000;

/// Messages waiting for their recipients, over all accounts, a server holds at most
/// unless told otherwise (`--max-waiting`). A waiting message takes up to about 400 bytes
/// (its sender's name, its text, its number and their bookkeeping), so the default holds
/// up to about 400 MB (twice that on a majority-mode leader, which holds the state as
/// committed and as it will be).
pub const DEFAULT_MAX_WAITING: usize = 1_000_000;

/// Bounds the primary keeps the state within when it decides a request. They are not part
/// of the replicated state: a request past one is refused where it is decided, before any
/// change is made, and every server applies every change its primary made, whatever its
/// own limits (see [`State::apply`]), so replicas never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A register while this many accounts exist is refused with
    /// [`Violation::Full`]. A search goes through every account under the server's
    /// lock, so this bounds how long one can hold it.
    pub max_accounts: usize,
    /// A send while this many messages wait, over all accounts, is refused with
    /// [`Violation::Full`], as a send to a full mailbox is: every waiting message is held
    /// in memory, and the per-account bound ([`MAX_LIST`]) times the accounts is no bound.
    pub max_waiting: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_accounts: DEFAULT_MAX_ACCOUNTS,
            max_waiting: DEFAULT_MAX_WAITING,
        }
    }
}

/// A message waiting for its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its number: the position of the change that sent it.
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// The text.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Account {
    /// The register request's nonce (0: none), so its resend is answered ok.
    nonce: u64,
    /// Messages not yet confirmed, in send order.
    mailbox: VecDeque<Message>,
    /// The last send ids of this sender (at most [`recent_window`] of the number of
    /// accounts when it last sent), oldest first, and the same as a set.
    recent: VecDeque<u64>,
    recent_set: HashSet<u64>,
}

/// One state change, as logged and replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create an account.
    Register {
        /// Username.
        name: String,
        /// The request's nonce, 0 if none.
        nonce: u64,
    },
    /// Remove an account and its pending messages.
    Delete {
        /// Username.
        name: String,
    },
    /// Queue a message for `to` and remember `id` as sent by `from`.
    Send {
        /// Sender.
        from: String,
        /// Recipient.
        to: String,
        /// The client's id for this send.
        id: u64,
        /// The text.
        text: String,
    },
    /// Drop `user`'s messages numbered up to `upto`: they have arrived.
    Confirm {
        /// Recipient.
        user: String,
        /// The last message number received.
        upto: MessageId,
    },
    /// A confirm as logged before message numbers carried their epoch: drop `user`'s
    /// messages whose sequence number is up to `upto` (read from old logs only).
    ConfirmSeq {
        /// Recipient.
        user: String,
        /// Highest sequence number received.
        upto: u64,
    },
    /// Marks the start of a primary's term.
    Epoch,
}

/// What a connection's session should do after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// Nothing.
    Keep,
    /// The connection is now logged in as this user.
    LogIn(String),
    /// The connection is logged out.
    LogOut,
    /// Log out if logged in, then close the connection.
    Quit,
}

/// The primary's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The change to log, replicate and apply, if the request changes state.
    pub change: Option<Change>,
    /// The reply (none for `confirm`). For `LoggedIn`, the server follows it with the
    /// user's pending messages.
    pub reply: Option<Reply>,
    /// The session effect.
    pub session: Session,
}

impl Decision {
    fn reply(reply: Reply) -> Decision {
        Decision {
            change: None,
            reply: Some(reply),
            session: Session::Keep,
        }
    }

    fn refuse(v: Violation) -> Decision {
        Decision::reply(Reply::Refused(v))
    }
}

/// A state or change encoding that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt(pub &'static str);

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt encoding: {}", self.0)
    }
}

impl std::error::Error for Corrupt {}

/// Accounts and their pending messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    accounts: BTreeMap<String, Account>,
    /// Messages waiting, over all accounts: the sum of the mailboxes' lengths.
    waiting: usize,
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// Whether the account exists.
    pub fn exists(&self, name: &str) -> bool {
        self.accounts.contains_key(name)
    }

    /// Number of accounts.
    pub fn accounts(&self) -> usize {
        self.accounts.len()
    }

    /// Number of messages waiting for their recipients, over all accounts.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// The user's pending messages, oldest first.
    pub fn mailbox(&self, name: &str) -> impl Iterator<Item = &Message> {
        self.accounts
            .get(name)
            .into_iter()
            .flat_map(|a| a.mailbox.iter())
    }

    /// Usernames matching `pattern`, in order, at most [`MAX_LIST`]. It runs under the
    /// server's lock, through every account: at most `len(pattern) + 2 × len(name)` byte
    /// comparisons for each (see [`Glob`]), so its cost is bounded by the number of
    /// accounts, which [`Limits::max_accounts`] bounds.
    pub fn search(&self, pattern: &str) -> Vec<String> {
        self.search_counting(pattern, &mut 0)
    }

    /// [`State::search`], adding the byte comparisons it made to `steps`.
    fn search_counting(&self, pattern: &str, steps: &mut u64) -> Vec<String> {
        let glob = Glob::new(pattern);
        self.accounts
            .keys()
            .filter(|n| glob.matches_counting(n, steps))
            .take(MAX_LIST)
            .cloned()
            .collect()
    }

    /// Decides a request from a connection logged in as `me`; `online` says whether a user
    /// is logged in on some connection in a session this request may not take over (see
    /// [`Request::Login`]). Checks run in this order, first failure answered:
    ///
    /// - register: logged in → `AlreadyLoggedIn`; name exists → `NameTaken` (unless the
    ///   nonce is the one the account was registered with: a resend, answered ok);
    ///   [`Limits::max_accounts`] accounts exist → `Full`.
    /// - login: logged in → `AlreadyLoggedIn`; no account → `NoSuchUser`; logged in
    ///   elsewhere → `InUse`.
    /// - send: logged out → `NotLoggedIn`; FROM not me → `WrongUser`; no such recipient →
    ///   `NoSuchUser`; id seen recently from me → ok, nothing changes (a resend); recipient
    ///   has [`MAX_LIST`] waiting, or [`Limits::max_waiting`] wait over all accounts →
    ///   `Full`.
    /// - logout, delete: logged out → `NotLoggedIn`; NAME not me → `WrongUser`.
    /// - confirm: ignored unless logged in; never answered.
    /// - search, quit: always allowed.
    pub fn decide(
        &self,
        limits: Limits,
        me: Option<&str>,
        online: impl Fn(&str) -> bool,
        req: &Request,
    ) -> Decision {
        match req {
            Request::Register { name, nonce } => {
                if me.is_some() {
                    return Decision::refuse(Violation::AlreadyLoggedIn);
                }
                if let Some(account) = self.accounts.get(name) {
                    let resend = matches!(nonce, Some(n) if *n != 0 && *n == account.nonce);
                    return if resend {
                        Decision::reply(Reply::Ok)
                    } else {
                        Decision::refuse(Violation::NameTaken)
                    };
                }
                if self.accounts.len() >= limits.max_accounts {
                    return Decision::refuse(Violation::Full);
                }
                Decision {
                    change: Some(Change::Register {
                        name: name.clone(),
                        nonce: nonce.unwrap_or(0),
                    }),
                    reply: Some(Reply::Ok),
                    session: Session::Keep,
                }
            }
            Request::Login { name, .. } => {
                if me.is_some() {
                    return Decision::refuse(Violation::AlreadyLoggedIn);
                }
                let Some(account) = self.accounts.get(name) else {
                    return Decision::refuse(Violation::NoSuchUser);
                };
                if online(name) {
                    return Decision::refuse(Violation::InUse);
                }
                Decision {
                    change: None,
                    reply: Some(Reply::LoggedIn {
                        count: account.mailbox.len() as u16,
                    }),
                    session: Session::LogIn(name.clone()),
                }
            }
            Request::Search { pattern } => Decision::reply(Reply::Found(self.search(pattern))),
            Request::Send { from, to, id, text } => {
                let Some(me) = me else {
                    return Decision::refuse(Violation::NotLoggedIn);
                };
                if from != me {
                    return Decision::refuse(Violation::WrongUser);
                }
                let Some(recipient) = self.accounts.get(to) else {
                    return Decision::refuse(Violation::NoSuchUser);
                };
                if self
                    .accounts
                    .get(me)
                    .is_some_and(|a| a.recent_set.contains(id))
                {
                    return Decision::reply(Reply::Ok);
                }
                if recipient.mailbox.len() >= MAX_LIST || self.waiting >= limits.max_waiting {
                    return Decision::refuse(Violation::Full);
                }
                Decision {
                    change: Some(Change::Send {
                        from: from.clone(),
                        to: to.clone(),
                        id: *id,
                        text: text.clone(),
                    }),
                    reply: Some(Reply::Ok),
                    session: Session::Keep,
                }
            }
            Request::Logout { name } | Request::Delete { name } => {
                let Some(me) = me else {
                    return Decision::refuse(Violation::NotLoggedIn);
                };
                if name != me {
                    return Decision::refuse(Violation::WrongUser);
                }
                let change = matches!(req, Request::Delete { .. })
                    .then(|| Change::Delete { name: name.clone() });
                Decision {
                    change,
                    reply: Some(Reply::Ok),
                    session: Session::LogOut,
                }
            }
            Request::Quit => Decision {
                change: None,
                reply: Some(Reply::Ok),
                session: Session::Quit,
            },
            Request::Confirm { upto } => {
                let pending = me
                    .and_then(|me| self.accounts.get(me))
                    .and_then(|a| a.mailbox.front())
                    .is_some_and(|m| m.id <= *upto);
                Decision {
                    change: pending.then(|| Change::Confirm {
                        user: me.unwrap_or_default().to_owned(),
                        upto: *upto,
                    }),
                    reply: None,
                    session: Session::Keep,
                }
            }
        }
    }

    /// Applies the change at `at` (its record's epoch and sequence number, which number a
    /// message); returns the message to deliver at once, if it is a send (the caller knows
    /// whether the recipient is online). Total: a change that no longer fits the state (a
    /// send to a deleted account) changes what it still can. [`Limits`] are not checked
    /// here: a register is applied however many accounts exist, for the primary that made
    /// it decided it against its own limits, and replicas must agree.
    pub fn apply(&mut self, at: MessageId, change: &Change) -> Option<(String, Delivery)> {
        match change {
            Change::Register { name, nonce } => {
                self.accounts
                    .entry(name.clone())
                    .or_insert_with(|| Account {
                        nonce: *nonce,
                        ..Account::default()
                    });
                None
            }
            Change::Delete { name } => {
                if let Some(account) = self.accounts.remove(name) {
                    self.waiting -= account.mailbox.len();
                }
                None
            }
            Change::Send { from, to, id, text } => {
                let window = recent_window(self.accounts.len());
                if let Some(sender) = self.accounts.get_mut(from) {
                    if !sender.recent_set.contains(id) {
                        // The oldest go first, so that the queue never outgrows the
                        // window (and its allocation never doubles past it).
                        while sender.recent.len() >= window {
                            let old = sender.recent.pop_front().unwrap_or_default();
                            sender.recent_set.remove(&old);
                        }
                        sender.recent.push_back(*id);
                        sender.recent_set.insert(*id);
                        if sender.recent_set.capacity() > 4 * window {
                            // A window that shrank gives its memory back.
                            sender.recent_set.shrink_to(window);
                            sender.recent.shrink_to(window);
                        }
                    }
                }
                let recipient = self.accounts.get_mut(to)?;
                recipient.mailbox.push_back(Message {
                    id: at,
                    from: from.clone(),
                    text: text.clone(),
                });
                self.waiting += 1;
                let delivery = Delivery {
                    id: at,
                    from: from.clone(),
                    text: text.clone(),
                };
                Some((to.clone(), delivery))
            }
            Change::Confirm { user, upto } => {
                if let Some(account) = self.accounts.get_mut(user) {
                    while account.mailbox.front().is_some_and(|m| m.id <= *upto) {
                        account.mailbox.pop_front();
                        self.waiting -= 1;
                    }
                }
                None
            }
            Change::ConfirmSeq { user, upto } => {
                if let Some(account) = self.accounts.get_mut(user) {
                    while account.mailbox.front().is_some_and(|m| m.id.seq <= *upto) {
                        account.mailbox.pop_front();
                        self.waiting -= 1;
                    }
                }
                None
            }
            Change::Epoch => None,
        }
    }

    /// Appends the state's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.accounts.len() as u32).to_be_bytes());
        for (name, a) in &self.accounts {
            put_str8(out, name);
            out.extend_from_slice(&a.nonce.to_be_bytes());
            out.extend_from_slice(&(a.recent.len() as u16).to_be_bytes());
            for id in &a.recent {
                out.extend_from_slice(&id.to_be_bytes());
            }
            out.extend_from_slice(&(a.mailbox.len() as u32).to_be_bytes());
            for m in &a.mailbox {
                out.extend_from_slice(&m.id.epoch.to_be_bytes());
                out.extend_from_slice(&m.id.seq.to_be_bytes());
                put_str8(out, &m.from);
                put_str16(out, &m.text);
            }
        }
    }

    /// Decodes a state encoding; all of `bytes` must be used.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a state encoding.
    pub fn decode(bytes: &[u8]) -> Result<State, Corrupt> {
        State::decode_as(bytes, true)
    }

    /// Decodes a state encoding of a legacy (`SWBMSNP1`) snapshot, whose message numbers
    /// are sequence numbers only: they are read as epoch 0, below every number since.
    ///
    /// # Errors
    /// As [`State::decode`].
    pub fn decode_legacy(bytes: &[u8]) -> Result<State, Corrupt> {
        State::decode_as(bytes, false)
    }

    fn decode_as(bytes: &[u8], epochs: bool) -> Result<State, Corrupt> {
        let mut c = Cursor::new(bytes);
        let mut state = State::new();
        for _ in 0..c.u32()? {
            let name = c.str8()?;
            let mut account = Account {
                nonce: c.u64()?,
                ..Account::default()
            };
            for _ in 0..c.u16()? {
                let id = c.u64()?;
                if account.recent_set.insert(id) {
                    account.recent.push_back(id);
                }
            }
            for _ in 0..c.u32()? {
                let epoch = if epochs { c.u64()? } else { 0 };
                let id = MessageId {
                    epoch,
                    seq: c.u64()?,
                };
                let (from, text) = (c.str8()?, c.str16()?);
                account.mailbox.push_back(Message { id, from, text });
            }
            state.waiting += account.mailbox.len();
            if let Some(old) = state.accounts.insert(name, account) {
                state.waiting -= old.mailbox.len();
            }
        }
        c.end()?;
        Ok(state)
    }
}

impl Change {
    /// Appends the change's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Change::Register { name, nonce } => {
                out.push(b'R');
                put_str8(out, name);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Change::Delete { name } => {
                out.push(b'D');
                put_str8(out, name);
            }
            Change::Send { from, to, id, text } => {
                out.push(b'M');
                put_str8(out, from);
                put_str8(out, to);
                out.extend_from_slice(&id.to_be_bytes());
                put_str16(out, text);
            }
            Change::Confirm { user, upto } => {
                out.push(b'K');
                put_str8(out, user);
                out.extend_from_slice(&upto.epoch.to_be_bytes());
                out.extend_from_slice(&upto.seq.to_be_bytes());
            }
            Change::ConfirmSeq { user, upto } => {
                out.push(b'C');
                put_str8(out, user);
                out.extend_from_slice(&upto.to_be_bytes());
            }
            Change::Epoch => out.push(b'E'),
        }
    }

    /// The change's encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a change; all of `bytes` must be used.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a change encoding.
    pub fn decode(bytes: &[u8]) -> Result<Change, Corrupt> {
        let mut c = Cursor::new(bytes);
        let change = match c.u8()? {
            b'R' => Change::Register {
                name: c.str8()?,
                nonce: c.u64()?,
            },
            b'D' => Change::Delete { name: c.str8()? },
            b'M' => Change::Send {
                from: c.str8()?,
                to: c.str8()?,
                id: c.u64()?,
                text: c.str16()?,
            },
            b'K' => Change::Confirm {
                user: c.str8()?,
                upto: MessageId {
                    epoch: c.u64()?,
                    seq: c.u64()?,
                },
            },
            b'C' => Change::ConfirmSeq {
                user: c.str8()?,
                upto: c.u64()?,
            },
            b'E' => Change::Epoch,
            _ => return Err(Corrupt("unknown change type")),
        };
        c.end()?;
        Ok(change)
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    // Names are at most 50 bytes (checked at the protocol boundary).
    out.push(s.len().min(255) as u8);
    out.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

/// Reads big-endian integers and length-prefixed strings off a byte slice.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self.at.checked_add(n).ok_or(Corrupt("length overflow"))?;
        let s = self.bytes.get(self.at..end).ok_or(Corrupt("truncated"))?;
        self.at = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Corrupt> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Corrupt> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Corrupt> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self, n: usize) -> Result<String, Corrupt> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Corrupt("string is not UTF-8"))
    }

    pub(crate) fn str8(&mut self) -> Result<String, Corrupt> {
        let n = self.u8()? as usize;
        self.string(n)
    }

    pub(crate) fn str16(&mut self) -> Result<String, Corrupt> {
        let n = self.u16()? as usize;
        self.string(n)
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let r = &self.bytes[self.at..];
        self.at = self.bytes.len();
        r
    }

    pub(crate) fn end(&self) -> Result<(), Corrupt> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(Corrupt("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record `seq` of epoch 1.
    fn at(seq: u64) -> MessageId {
        MessageId { epoch: 1, seq }
    }

    fn register(s: &mut State, seq: u64, name: &str) {
        s.apply(
            at(seq),
            &Change::Register {
                name: name.into(),
                nonce: seq,
            },
        );
    }

    fn send(from: &str, to: &str, id: u64) -> Request {
        Request::Send {
            from: from.into(),
            to: to.into(),
            id,
            text: format!("m{id}"),
        }
    }

    #[test]
    fn login_rules_in_order() {
        let mut s = State::new();
        register(&mut s, 1, "ann");
        let login = Request::Login {
            name: "ann".into(),
            session: None,
        };
        let refused = |d: Decision| d.reply.unwrap();
        assert_eq!(
            refused(s.decide(Limits::default(), Some("bob"), |_| false, &login)),
            Reply::Refused(Violation::AlreadyLoggedIn)
        );
        assert_eq!(
            refused(s.decide(
                Limits::default(),
                None,
                |_| false,
                &Request::Login {
                    name: "zed".into(),
                    session: None
                }
            )),
            Reply::Refused(Violation::NoSuchUser)
        );
        assert_eq!(
            refused(s.decide(Limits::default(), None, |n| n == "ann", &login)),
            Reply::Refused(Violation::InUse)
        );
        let d = s.decide(Limits::default(), None, |_| false, &login);
        assert_eq!(d.session, Session::LogIn("ann".into()));
        assert_eq!(d.reply, Some(Reply::LoggedIn { count: 0 }));
        assert_eq!(d.change, None);
    }

    #[test]
    fn register_is_refused_when_taken_unless_it_is_the_same_request_again() {
        let mut s = State::new();
        let r = Request::Register {
            name: "ann".into(),
            nonce: Some(77),
        };
        let d = s.decide(Limits::default(), None, |_| false, &r);
        s.apply(at(1), d.change.as_ref().unwrap());
        let again = s.decide(Limits::default(), None, |_| false, &r);
        assert_eq!((again.change, again.reply), (None, Some(Reply::Ok)));
        let other = Request::Register {
            name: "ann".into(),
            nonce: Some(78),
        };
        assert_eq!(
            s.decide(Limits::default(), None, |_| false, &other).reply,
            Some(Reply::Refused(Violation::NameTaken))
        );
        let bare = Request::Register {
            name: "ann".into(),
            nonce: None,
        };
        assert_eq!(
            s.decide(Limits::default(), None, |_| false, &bare).reply,
            Some(Reply::Refused(Violation::NameTaken))
        );
    }

    #[test]
    fn a_register_past_the_account_limit_is_refused_and_changes_nothing() {
        let limits = Limits {
            max_accounts: 2,
            ..Limits::default()
        };
        let off = |_: &str| false;
        let reg = |name: &str, nonce| Request::Register {
            name: name.into(),
            nonce: Some(nonce),
        };
        let mut s = State::new();
        for (seq, name) in [(1, "ann"), (2, "bob")] {
            let d = s.decide(limits, None, off, &reg(name, seq));
            assert_eq!(d.reply, Some(Reply::Ok));
            s.apply(at(seq), d.change.as_ref().unwrap());
        }
        let before = s.clone();
        let d = s.decide(limits, None, off, &reg("cat", 3));
        assert_eq!(
            (d.change, d.reply, d.session),
            (None, Some(Reply::Refused(Violation::Full)), Session::Keep)
        );
        // At the limit, a resend of a register that made it is still ok, a taken name
        // still taken, and everything else as it was.
        let d = s.decide(limits, None, off, &reg("ann", 1));
        assert_eq!((d.change, d.reply), (None, Some(Reply::Ok)));
        let d = s.decide(limits, None, off, &reg("bob", 9));
        assert_eq!(d.reply, Some(Reply::Refused(Violation::NameTaken)));
        assert_eq!(
            s.decide(limits, Some("ann"), off, &reg("cat", 3)).reply,
            Some(Reply::Refused(Violation::AlreadyLoggedIn))
        );
        assert_eq!(s, before);
        // A delete makes room again.
        let d = s.decide(
            limits,
            Some("bob"),
            off,
            &Request::Delete { name: "bob".into() },
        );
        s.apply(at(3), d.change.as_ref().unwrap());
        let d = s.decide(limits, None, off, &reg("cat", 3));
        assert_eq!(d.reply, Some(Reply::Ok));
        s.apply(at(4), d.change.as_ref().unwrap());
        // The limit is the deciding server's: a register its primary made is applied
        // here whatever the number of accounts, so that replicas agree.
        register(&mut s, 5, "dan");
        assert_eq!(s.accounts(), 3);
        assert!(s.exists("dan"));
        assert_eq!(
            s.decide(limits, None, off, &reg("eve", 6)).reply,
            Some(Reply::Refused(Violation::Full))
        );
    }

    /// `max_waiting` bounds the messages waiting over all accounts: a send past it is
    /// refused with `Full` and changes nothing, a confirm or a delete makes room, and the
    /// count is kept through every change and through a snapshot's encoding.
    #[test]
    fn a_send_past_the_waiting_limit_is_refused_and_confirms_and_deletes_make_room() {
        let limits = Limits {
            max_waiting: 3,
            ..Limits::default()
        };
        let off = |_: &str| false;
        let mut s = State::new();
        for (seq, name) in [(1, "ann"), (2, "bob"), (3, "cat")] {
            register(&mut s, seq, name);
        }
        let mut seq = 3;
        let mut send = |s: &mut State, to: &str, id: u64| {
            let req = Request::Send {
                from: "ann".into(),
                to: to.into(),
                id,
                text: format!("m{id}"),
            };
            let d = s.decide(limits, Some("ann"), off, &req);
            if let Some(change) = &d.change {
                seq += 1;
                s.apply(at(seq), change);
            }
            d.reply
        };
        let ok = Some(Reply::Ok);
        let full = Some(Reply::Refused(Violation::Full));
        assert_eq!(send(&mut s, "bob", 1), ok);
        assert_eq!(send(&mut s, "bob", 2), ok);
        assert_eq!(send(&mut s, "cat", 3), ok);
        assert_eq!(s.waiting(), 3);
        let before = s.clone();
        assert_eq!(send(&mut s, "ann", 4), full);
        assert_eq!(s, before);
        // A resend of a send that was taken is still ok, and changes nothing.
        assert_eq!(send(&mut s, "bob", 2), ok);
        assert_eq!(s, before);
        // The count survives a snapshot.
        let mut bytes = Vec::new();
        s.encode(&mut bytes);
        assert_eq!(State::decode(&bytes).unwrap().waiting(), 3);
        // bob confirms his first message: room for one.
        s.apply(
            at(100),
            &Change::Confirm {
                user: "bob".into(),
                upto: at(4),
            },
        );
        assert_eq!(s.waiting(), 2);
        assert_eq!(send(&mut s, "ann", 5), ok);
        assert_eq!(send(&mut s, "ann", 6), full);
        // cat's account goes, with its message: room again.
        s.apply(at(101), &Change::Delete { name: "cat".into() });
        assert_eq!(s.waiting(), 2);
        assert_eq!(send(&mut s, "bob", 7), ok);
        assert_eq!(send(&mut s, "bob", 8), full);
        let mailboxes: usize = ["ann", "bob", "cat"]
            .iter()
            .map(|n| s.mailbox(n).count())
            .sum();
        assert_eq!(s.waiting(), mailboxes);
        // Applied whatever the count: a replica applies what its primary decided.
        s.apply(
            at(102),
            &Change::Send {
                from: "bob".into(),
                to: "ann".into(),
                id: 1,
                text: "over".into(),
            },
        );
        assert_eq!(s.waiting(), 4);
    }

    /// A search runs under the server's lock through every account. Over the most
    /// accounts a server takes by default, with patterns that match nothing and that made
    /// the backtracking matcher try every split of every name, it makes at most
    /// `len(pattern) + 2 × len(name)` byte comparisons per account (counted, not timed).
    /// The backtracking matcher made hundreds per account on these (see protocol's
    /// `a_hostile_pattern_costs_the_linear_matcher_linear_time`).
    #[test]
    fn a_search_through_the_most_accounts_makes_a_bounded_number_of_comparisons() {
        let most = Limits::default().max_accounts;
        let mut s = State::new();
        // Long runs of `a`, told apart by the last digits.
        for i in 0..most {
            let name = format!("{}{i:06}", "a".repeat(protocol::MAX_NAME - 6));
            s.apply(at(i as u64 + 1), &Change::Register { name, nonce: 0 });
        }
        assert_eq!(s.accounts(), most);
        let hostile = [
            format!("*{}b", "a".repeat(24)),
            format!("{}b", "*a".repeat(24)),
            format!("*{}b*", "a".repeat(24)),
            format!("*{}b*", "a".repeat(47)),
        ];
        let per_account = |p: &str| (p.len() + 2 * protocol::MAX_NAME) as u64;
        for p in &hostile {
            assert!(protocol::valid_pattern(p), "{p}");
            let mut steps = 0;
            assert!(s.search_counting(p, &mut steps).is_empty());
            assert!(
                steps <= most as u64 * per_account(p),
                "{p}: {steps} comparisons over {most} accounts"
            );
        }
        // A pattern that matches everything stops at the most a reply can count, and the
        // reply encodes and decodes with that many names.
        let mut steps = 0;
        let all = s.search_counting("*", &mut steps);
        assert_eq!(all.len(), MAX_LIST);
        assert_eq!(steps, 0, "`*` matches without a comparison");
        let mut bytes = Vec::new();
        protocol::encode_reply(&Reply::Found(all.clone()), &mut bytes);
        assert_eq!(&bytes[..3], [0x22, 0xff, 0xff]);
        assert_eq!(protocol::decode_reply(&bytes), Some(Reply::Found(all)));
    }

    #[test]
    fn send_rules_dedup_and_offline_order() {
        let mut s = State::new();
        register(&mut s, 1, "ann");
        register(&mut s, 2, "bob");
        let off = |_: &str| false;
        let refused = |d: Decision| d.reply.unwrap();
        assert_eq!(
            refused(s.decide(Limits::default(), None, off, &send("ann", "bob", 1))),
            Reply::Refused(Violation::NotLoggedIn)
        );
        assert_eq!(
            refused(s.decide(Limits::default(), Some("bob"), off, &send("ann", "bob", 1))),
            Reply::Refused(Violation::WrongUser)
        );
        assert_eq!(
            refused(s.decide(Limits::default(), Some("ann"), off, &send("ann", "cat", 1))),
            Reply::Refused(Violation::NoSuchUser)
        );
        for (seq, id) in [(3, 10), (4, 11), (5, 12)] {
            let d = s.decide(Limits::default(), Some("ann"), off, &send("ann", "bob", id));
            let delivered = s.apply(at(seq), d.change.as_ref().unwrap()).unwrap();
            assert_eq!(delivered.0, "bob");
            assert_eq!(delivered.1.id, at(seq));
        }
        // A resend is acknowledged and changes nothing.
        let d = s.decide(Limits::default(), Some("ann"), off, &send("ann", "bob", 11));
        assert_eq!((d.change, d.reply), (None, Some(Reply::Ok)));
        let ids: Vec<u64> = s.mailbox("bob").map(|m| m.id.seq).collect();
        assert_eq!(ids, [3, 4, 5]);
        let texts: Vec<&str> = s.mailbox("bob").map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["m10", "m11", "m12"]);
        // Confirm drops up to the id given; confirming nothing new changes nothing.
        let d = s.decide(
            Limits::default(),
            Some("bob"),
            off,
            &Request::Confirm { upto: at(4) },
        );
        assert_eq!(d.reply, None);
        s.apply(at(6), d.change.as_ref().unwrap());
        assert_eq!(s.mailbox("bob").count(), 1);
        assert_eq!(
            s.decide(
                Limits::default(),
                Some("bob"),
                off,
                &Request::Confirm { upto: at(4) }
            )
            .change,
            None
        );
        assert_eq!(
            s.decide(
                Limits::default(),
                None,
                off,
                &Request::Confirm { upto: at(9) }
            )
            .change,
            None
        );
    }

    #[test]
    fn numbers_carry_their_epoch_and_confirms_compare_epoch_first() {
        let mut s = State::new();
        register(&mut s, 1, "bob");
        let send = |id| Change::Send {
            from: "bob".into(),
            to: "bob".into(),
            id,
            text: "x".into(),
        };
        // Seq 7 of epoch 3 and seq 5 of epoch 4 (a later primary that started from a
        // shorter log): different messages, ordered by epoch first.
        let (old, new) = (
            MessageId { epoch: 3, seq: 7 },
            MessageId { epoch: 4, seq: 5 },
        );
        assert_eq!(s.apply(old, &send(1)).unwrap().1.id, old);
        assert_eq!(s.apply(new, &send(2)).unwrap().1.id, new);
        assert!(old < new);
        let confirm = |upto| Change::Confirm {
            user: "bob".into(),
            upto,
        };
        s.apply(at(20), &confirm(MessageId { epoch: 3, seq: 9 }));
        let left: Vec<MessageId> = s.mailbox("bob").map(|m| m.id).collect();
        assert_eq!(left, [new], "seq 9 of epoch 3 is below seq 5 of epoch 4");
        // The state encoding keeps both halves; a legacy encoding reads as epoch 0.
        let mut enc = Vec::new();
        s.encode(&mut enc);
        assert_eq!(State::decode(&enc).unwrap(), s);
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&1u32.to_be_bytes());
        put_str8(&mut legacy, "ann");
        legacy.extend_from_slice(&[0; 8]);
        legacy.extend_from_slice(&0u16.to_be_bytes());
        legacy.extend_from_slice(&1u32.to_be_bytes());
        legacy.extend_from_slice(&9u64.to_be_bytes());
        put_str8(&mut legacy, "bob");
        put_str16(&mut legacy, "hi");
        let old = State::decode_legacy(&legacy).unwrap();
        let ids: Vec<MessageId> = old.mailbox("ann").map(|m| m.id).collect();
        assert_eq!(ids, [MessageId { epoch: 0, seq: 9 }]);
    }

    #[test]
    fn the_longest_change_is_max_change() {
        let name = "n".repeat(protocol::MAX_NAME);
        let send = Change::Send {
            from: name.clone(),
            to: name.clone(),
            id: u64::MAX,
            text: "t".repeat(protocol::MAX_TEXT),
        };
        assert_eq!(send.to_bytes().len(), MAX_CHANGE);
        let confirm = Change::Confirm {
            user: name,
            upto: MessageId::default(),
        };
        assert!(confirm.to_bytes().len() < MAX_CHANGE);
    }

    #[test]
    fn the_recent_window_forgets_the_oldest_ids() {
        let mut s = State::new();
        register(&mut s, 1, "ann");
        for id in 0..RECENT_IDS as u64 + 5 {
            let c = Change::Send {
                from: "ann".into(),
                to: "ann".into(),
                id,
                text: "x".into(),
            };
            s.apply(at(10 + id), &c);
        }
        let a = &s.accounts["ann"];
        assert_eq!(a.recent.len(), RECENT_IDS);
        assert!(!a.recent_set.contains(&4) && a.recent_set.contains(&5));
    }

    /// The windows are shared out as accounts grow, so that the most accounts cannot make
    /// a server hold 1,024 ids each; a window shrinks (and gives back its memory) when its
    /// sender next sends, and a replica applying the same changes forgets the same ids.
    #[test]
    fn the_recent_windows_shrink_as_accounts_grow() {
        assert_eq!(recent_window(1), RECENT_IDS);
        assert_eq!(recent_window(RECENT_TOTAL / RECENT_IDS), RECENT_IDS);
        assert_eq!(recent_window(RECENT_TOTAL / 100), 100);
        assert_eq!(recent_window(DEFAULT_MAX_ACCOUNTS), MIN_RECENT_IDS);
        let send = |id: u64| Change::Send {
            from: "ann".into(),
            to: "ann".into(),
            id,
            text: "x".into(),
        };
        let mut s = State::new();
        register(&mut s, 1, "ann");
        let mut seq = 10;
        for id in 0..RECENT_IDS as u64 {
            seq += 1;
            s.apply(at(seq), &send(id));
        }
        assert_eq!(s.accounts["ann"].recent.len(), RECENT_IDS);
        // Enough accounts that each window is 100 ids.
        let many = RECENT_TOTAL / 100;
        for i in 1..many {
            seq += 1;
            s.apply(
                at(seq),
                &Change::Register {
                    name: format!("u{i}"),
                    nonce: 0,
                },
            );
        }
        assert_eq!(s.accounts(), many);
        let mut replica = State::decode(&{
            let mut bytes = Vec::new();
            s.encode(&mut bytes);
            bytes
        })
        .unwrap();
        for state in [&mut s, &mut replica] {
            state.apply(at(seq + 1), &send(5000));
            let a = &state.accounts["ann"];
            assert_eq!(a.recent.len(), 100);
            assert_eq!(a.recent.front(), Some(&(RECENT_IDS as u64 - 99)));
            assert!(a.recent_set.contains(&5000) && !a.recent_set.contains(&0));
            assert!(
                a.recent_set.capacity() < 4 * 100,
                "{}",
                a.recent_set.capacity()
            );
        }
        assert_eq!(s, replica);
        // A resend of an id still in the window is recognised; one forgotten is not.
        let resend = |id| Request::Send {
            from: "ann".into(),
            to: "ann".into(),
            id,
            text: "x".into(),
        };
        let d = s.decide(
            Limits::default(),
            Some("ann"),
            |_| false,
            &resend(RECENT_IDS as u64 - 1),
        );
        assert_eq!((d.change, d.reply), (None, Some(Reply::Ok)));
        let d = s.decide(Limits::default(), Some("ann"), |_| false, &resend(0));
        assert!(d.change.is_some());
    }

    #[test]
    fn logout_delete_and_search() {
        let mut s = State::new();
        for (i, n) in ["alice", "alfred", "bob", "carla"].iter().enumerate() {
            register(&mut s, i as u64 + 1, n);
        }
        assert_eq!(s.search("al*"), ["alfred", "alice"]);
        assert_eq!(s.search("*a"), ["carla"]);
        assert_eq!(s.search("*l*"), ["alfred", "alice", "carla"]);
        assert!(s.search("z*").is_empty());
        let del = Request::Delete { name: "bob".into() };
        assert_eq!(
            s.decide(Limits::default(), None, |_| false, &del).reply,
            Some(Reply::Refused(Violation::NotLoggedIn))
        );
        assert_eq!(
            s.decide(Limits::default(), Some("alice"), |_| false, &del)
                .reply,
            Some(Reply::Refused(Violation::WrongUser))
        );
        let d = s.decide(Limits::default(), Some("bob"), |_| false, &del);
        assert_eq!(d.session, Session::LogOut);
        s.apply(at(9), d.change.as_ref().unwrap());
        assert!(!s.exists("bob"));
        let out = s.decide(
            Limits::default(),
            Some("alice"),
            |_| false,
            &Request::Logout {
                name: "alice".into(),
            },
        );
        assert_eq!((out.change, out.session), (None, Session::LogOut));
    }

    #[test]
    fn state_and_changes_round_trip_and_replicas_agree() {
        let changes = [
            Change::Register {
                name: "ann".into(),
                nonce: 5,
            },
            Change::Register {
                name: "bob".into(),
                nonce: 0,
            },
            Change::Send {
                from: "ann".into(),
                to: "bob".into(),
                id: 99,
                text: "hi | there ~".into(),
            },
            Change::Epoch,
            Change::Send {
                from: "bob".into(),
                to: "ann".into(),
                id: 1,
                text: "back".into(),
            },
            Change::Confirm {
                user: "bob".into(),
                upto: at(3),
            },
            Change::ConfirmSeq {
                user: "ann".into(),
                upto: 4,
            },
            Change::Delete { name: "zed".into() },
        ];
        let (mut a, mut b) = (State::new(), State::new());
        for (i, c) in changes.iter().enumerate() {
            let bytes = c.to_bytes();
            assert_eq!(&Change::decode(&bytes).unwrap(), c);
            a.apply(at(i as u64 + 1), c);
            b.apply(at(i as u64 + 1), &Change::decode(&bytes).unwrap());
        }
        assert_eq!(a, b);
        let mut enc = Vec::new();
        a.encode(&mut enc);
        assert_eq!(State::decode(&enc).unwrap(), a);
        assert!(State::decode(&enc[..enc.len() - 1]).is_err());
        enc.push(0);
        assert!(State::decode(&enc).is_err());
        assert!(Change::decode(b"Q").is_err());
        assert!(Change::decode(b"D\x05ab").is_err());
    }
}
