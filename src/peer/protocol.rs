//! Peer-to-peer messages: one Erlang term per line, parsed into [`PeerMessage`] and printed
//! back. Pure: no sockets, no state.
//!
//! ```text
//! member   = {Name,Addr,Inc}                   {"alice","127.0.0.1:4000",1718000000123456}
//! link     = {hello,Member,Room}               first line each way on a new link
//!          | {hello,Member}                    the same from a peer in no room yet (a joiner)
//!          | {refused,Reason}                  the acceptor's answer instead of hello
//!          | heartbeat                         sent by a link idle for 250 ms
//!          | {members,Version,Leader,[Member,...],Room}  the member list, sorted; flooded
//!          | {members,Version,Leader,[Member,...]}        (older peers; also without Leader)
//!          | {links,Member,Seq,[Member,...]}   Member's direct links; flooded
//!          | {route,From,To,Hops,Body}         forwarded hop by hop towards To
//! body     = who_leads | {leader,Member} | join_req | {join_refused,Reason}
//!          | {msg,Seq,Text} | {ack,Seq} | leave | {merge,Version,Leader,[Member,...]}
//! room     = Member                            the member that founded the room
//! ```
//!
//! `Name` and `Text` are Erlang strings (`"..."`, or a list of character codes); `Addr` is
//! the member's listening address as a `"host:port"` string; `Inc`, `Version`, `Seq` and
//! `Hops` are non-negative integers.

use crate::term::{self, Term, TermError};
use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;

/// Longest member name, in bytes.
pub const MAX_NAME: usize = 32;
/// Most members a list may hold. A longer `members` line is refused, and a leader refuses
/// joins beyond it (`room_full`): every member dials every other, so a list a peer could
/// grow at will would be a thread and memory bomb for the whole room.
pub const MAX_MEMBERS: usize = 256;
/// Longest chat line, in bytes; a `msg` with a longer text is refused.
pub const MAX_TEXT: usize = 16 << 10;
/// Longest line a link carries, in bytes: a full list (some 130 bytes a member), or a
/// `msg` of [`MAX_TEXT`] bytes written as escapes (4 bytes a character) or as an Erlang
/// code list, with room to spare. Longer lines are skipped unread.
pub const MAX_LINE: usize = 256 << 10;

/// A member of a room: its name, where it listens, and which run of the program it is.
///
/// Members are ordered by name, then address, then incarnation (the derived order, by
/// field); the smallest member of a list is its leader. Names are unique within a room,
/// so in practice the name decides.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// The name shown in front of its messages.
    pub name: String,
    /// The address it listens on for links.
    pub addr: SocketAddr,
    /// Tells successive runs at the same address apart (microseconds since the epoch at
    /// start), so a restarted peer never inherits the sequence numbers of its predecessor.
    pub inc: u64,
}

impl Member {
    fn to_term(&self) -> Term {
        Term::tuple(vec![
            Term::str(&self.name),
            Term::str(&self.addr.to_string()),
            Term::int(self.inc as i64),
        ])
    }

    fn from_term(t: &Term) -> Result<Member, ProtocolError> {
        let bad = || ProtocolError::Field("member");
        let [name, addr, inc] = t.as_tuple().ok_or_else(bad)? else {
            return Err(bad());
        };
        let name = name.as_text().filter(|n| !n.is_empty()).ok_or_else(bad)?;
        let addr = addr
            .as_text()
            .and_then(|a| a.parse().ok())
            .ok_or_else(bad)?;
        Ok(Member {
            name,
            addr,
            inc: count(inc).ok_or_else(bad)?,
        })
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// Whether `name` may name a member: 1 to [`MAX_NAME`] letters, digits, `_`, `-` or `.`
/// (no spaces or commas, so `[MEMBERS v3] a,b,c` stays unambiguous).
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A versioned member list, sorted by the member order, the leader that issued it, and the
/// room it is a list of.
///
/// A version alone does not name one list: two peers that each lost sight of the leader
/// (and of each other) both take over and issue the next version, each its own list. The
/// issuing leader is part of the label users see (`[MEMBERS v5 by bob] bob`), so two
/// different lists never show under one label; a later merge of such rooms can issue a
/// version above both under the merged room's leader.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberList {
    /// Bumped by the leader on every change; 0 means "no list yet".
    pub version: u64,
    /// The members, smallest (the leader) first, names unique.
    pub members: Vec<Member>,
    /// The leader that issued this version (`None` on a list from an older peer, which
    /// sends `{members,Version,List}`).
    pub leader: Option<Member>,
    /// The room: the member that founded it, carried by every list it descends from, so
    /// lists of two rooms are never taken for each other (`None` from an older peer).
    pub room: Option<Member>,
}

impl MemberList {
    /// A list of `members` (sorted here) at `version`.
    pub fn new(version: u64, mut members: Vec<Member>) -> MemberList {
        members.sort();
        members.dedup();
        MemberList {
            version,
            members,
            leader: None,
            room: None,
        }
    }

    /// The same list, issued by `leader`.
    pub fn issued_by(mut self, leader: Member) -> MemberList {
        self.leader = Some(leader);
        self
    }

    /// The same list, of the room founded by `founder`.
    pub fn of_room(mut self, founder: Member) -> MemberList {
        self.room = Some(founder);
        self
    }

    /// The member whose link a list should arrive on when this peer has one: the leader
    /// that issued it, or (a list from an older peer, without one) its smallest member.
    pub fn issuer(&self) -> Option<&Member> {
        self.leader.as_ref().or(self.members.first())
    }

    /// Whether `m` is on the list.
    pub fn contains(&self, m: &Member) -> bool {
        self.members.binary_search(m).is_ok()
    }

    /// Whether this list replaces `other`: a higher version, or the same version and a
    /// member sequence that compares smaller. Two leaders that acted at once (possible only
    /// while their views of who is alive differ) may issue different lists under one
    /// version; this total order makes every peer settle on the same one of them.
    pub fn supersedes(&self, other: &MemberList) -> bool {
        match self.version.cmp(&other.version) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => (&self.members, &self.leader) < (&other.members, &other.leader),
        }
    }

    /// `[MEMBERS v7 by alice] alice,bob,carol`: what a peer prints when its list changes.
    /// The label (version and issuing leader) names one list.
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        match &self.leader {
            Some(leader) => format!(
                "[MEMBERS v{} by {}] {}",
                self.version,
                leader.name,
                names.join(",")
            ),
            None => format!("[MEMBERS v{}] {}", self.version, names.join(",")),
        }
    }
}

/// What a routed message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `who_leads`: a joiner asks a member for the current leader.
    WhoLeads,
    /// `{leader,Member}`: the answer to `who_leads`, or a non-leader's answer to `join_req`.
    Leader(Member),
    /// `join_req`: the sender (the envelope's `From`) asks to be admitted.
    JoinReq,
    /// `{join_refused,Reason}`: the leader will not admit the sender (`name_taken`, `bad_name`).
    JoinRefused(String),
    /// `{msg,Seq,Text}`: the `Seq`-th chat line from `From` to `To` (1, 2, 3, ...).
    Msg {
        /// Position in the stream from the sender to this destination.
        seq: u64,
        /// The line typed.
        text: String,
    },
    /// `{ack,Seq}`: every message up to `Seq` of the stream from `To` has been delivered.
    Ack {
        /// The highest sequence number delivered in order.
        seq: u64,
    },
    /// `leave`: the sender leaves the room; sent to the leader.
    Leave,
    /// `{merge,Version,Leader,[Member,...]}`: the sender's list, sent to the leader of a
    /// rival list of the same room that supersedes it (the other half of a healed split):
    /// admit the members of this list too.
    Merge(MemberList),
}

/// One line between two linked peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// `{hello,Member,Room}`: who is at this end of the link, and the room it is in (the
    /// room's founder; `None`, written `{hello,Member}`, for a peer not in a room yet).
    Hello(Member, Option<Member>),
    /// `{refused,Reason}`: the acceptor does not want this link.
    Refused(String),
    /// `heartbeat`: the link is alive.
    Heartbeat,
    /// `{members,Version,Leader,[Member,...],Room}`
    Members(MemberList),
    /// `{links,Owner,Seq,[Member,...]}`: `Owner`'s direct links, its `Seq`-th advert.
    Links {
        /// Whose links these are.
        owner: Member,
        /// Grows with every advert of `owner`; a peer keeps only the highest.
        seq: u64,
        /// The members `owner` has a live link to.
        links: Vec<Member>,
    },
    /// `{route,From,To,Hops,Body}`
    Route {
        /// The original sender.
        from: Member,
        /// The final destination.
        to: Member,
        /// Forwards left before the message is dropped.
        hops: u64,
        /// The payload.
        body: Body,
    },
}

/// A line that is not a peer message.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolError {
    /// Not one term of Erlang text.
    Term(TermError),
    /// A term, but no message this protocol knows.
    Unknown,
    /// A known message with a field of the wrong shape (named).
    Field(&'static str),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Term(e) => write!(f, "not a term: {e}"),
            ProtocolError::Unknown => f.write_str("unknown peer message"),
            ProtocolError::Field(what) => write!(f, "malformed {what}"),
        }
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtocolError::Term(e) => Some(e),
            _ => None,
        }
    }
}

/// `{members,Version,List}`, `{members,Version,Leader,List}` or
/// `{members,Version,Leader,List,Room}`.
fn members_message(
    version: &Term,
    leader: Option<Member>,
    list: &Term,
    room: Option<Member>,
) -> Result<MemberList, ProtocolError> {
    let version = count(version).ok_or(ProtocolError::Field("version"))?;
    let members = members_from(list)?;
    let mut list = MemberList::new(version, members.clone());
    list.leader = leader;
    list.room = room;
    // A list with a name twice cannot come from a leader; refuse it whole.
    let names_unique = list.members.windows(2).all(|w| w[0].name != w[1].name);
    if list.members.len() != members.len() || !names_unique || members.len() > MAX_MEMBERS {
        return Err(ProtocolError::Field("member list"));
    }
    Ok(list)
}

impl PeerMessage {
    /// Parses one line (without its `\n`).
    ///
    /// # Errors
    /// When the line is not a term, or not a message of this protocol.
    pub fn parse(line: &[u8]) -> Result<PeerMessage, ProtocolError> {
        let term = term::parse_bytes(line).map_err(ProtocolError::Term)?;
        if term.is_atom("heartbeat") {
            return Ok(PeerMessage::Heartbeat);
        }
        let (tag, args) = term.tagged().ok_or(ProtocolError::Unknown)?;
        Ok(match (tag, args) {
            ("hello", [m]) => PeerMessage::Hello(Member::from_term(m)?, None),
            ("hello", [m, room]) => {
                PeerMessage::Hello(Member::from_term(m)?, Some(Member::from_term(room)?))
            }
            ("refused", [reason]) => PeerMessage::Refused(reason_text(reason)?),
            ("members", [version, list]) => {
                PeerMessage::Members(members_message(version, None, list, None)?)
            }
            ("members", [version, leader, list]) => PeerMessage::Members(members_message(
                version,
                Some(Member::from_term(leader)?),
                list,
                None,
            )?),
            ("members", [version, leader, list, room]) => PeerMessage::Members(members_message(
                version,
                Some(Member::from_term(leader)?),
                list,
                Some(Member::from_term(room)?),
            )?),
            ("links", [owner, seq, list]) => PeerMessage::Links {
                owner: Member::from_term(owner)?,
                seq: count(seq).ok_or(ProtocolError::Field("seq"))?,
                links: members_from(list)?,
            },
            ("route", [from, to, hops, body]) => PeerMessage::Route {
                from: Member::from_term(from)?,
                to: Member::from_term(to)?,
                hops: count(hops).ok_or(ProtocolError::Field("hops"))?,
                body: parse_body(body)?,
            },
            _ => return Err(ProtocolError::Unknown),
        })
    }

    /// The message as one line of term text, without the `\n`.
    pub fn format(&self) -> String {
        let tagged = |tag: &str, mut rest: Vec<Term>| {
            rest.insert(0, Term::atom(tag));
            Term::tuple(rest)
        };
        let list = |ms: &[Member]| Term::list(ms.iter().map(Member::to_term).collect());
        let term = match self {
            PeerMessage::Hello(m, room) => {
                let mut fields = vec![m.to_term()];
                fields.extend(room.as_ref().map(Member::to_term));
                tagged("hello", fields)
            }
            PeerMessage::Refused(reason) => tagged("refused", vec![Term::atom(reason)]),
            PeerMessage::Heartbeat => Term::atom("heartbeat"),
            PeerMessage::Members(l) => {
                let mut fields = vec![Term::int(l.version as i64)];
                fields.extend(l.leader.as_ref().map(Member::to_term));
                fields.push(list(&l.members));
                // The room rides after a leader only: `{members,V,List,Room}` is no form.
                if l.leader.is_some() {
                    fields.extend(l.room.as_ref().map(Member::to_term));
                }
                tagged("members", fields)
            }
            PeerMessage::Links { owner, seq, links } => tagged(
                "links",
                vec![owner.to_term(), Term::int(*seq as i64), list(links)],
            ),
            PeerMessage::Route {
                from,
                to,
                hops,
                body,
            } => tagged(
                "route",
                vec![
                    from.to_term(),
                    to.to_term(),
                    Term::int(*hops as i64),
                    format_body(body),
                ],
            ),
        };
        term.to_string()
    }
}

fn parse_body(t: &Term) -> Result<Body, ProtocolError> {
    let bad = || ProtocolError::Field("route body");
    if let Some(atom) = t.as_atom() {
        return match atom {
            "who_leads" => Ok(Body::WhoLeads),
            "join_req" => Ok(Body::JoinReq),
            "leave" => Ok(Body::Leave),
            _ => Err(bad()),
        };
    }
    let (tag, args) = t.tagged().ok_or_else(bad)?;
    Ok(match (tag, args) {
        ("leader", [m]) => Body::Leader(Member::from_term(m)?),
        ("join_refused", [reason]) => Body::JoinRefused(reason_text(reason)?),
        ("msg", [seq, text]) => Body::Msg {
            seq: count(seq).ok_or(ProtocolError::Field("seq"))?,
            // Bounded here so a receiver's reorder buffer holds lines of a known size.
            text: text
                .as_text()
                .filter(|t| t.len() <= MAX_TEXT)
                .ok_or(ProtocolError::Field("text"))?,
        },
        ("ack", [seq]) => Body::Ack {
            seq: count(seq).ok_or(ProtocolError::Field("seq"))?,
        },
        ("merge", [version, leader, list]) => Body::Merge(members_message(
            version,
            Some(Member::from_term(leader)?),
            list,
            None,
        )?),
        _ => return Err(bad()),
    })
}

fn format_body(body: &Body) -> Term {
    let tagged = |tag: &str, rest: Term| Term::tuple(vec![Term::atom(tag), rest]);
    match body {
        Body::WhoLeads => Term::atom("who_leads"),
        Body::Leader(m) => tagged("leader", m.to_term()),
        Body::JoinReq => Term::atom("join_req"),
        Body::JoinRefused(reason) => tagged("join_refused", Term::atom(reason)),
        Body::Msg { seq, text } => Term::tuple(vec![
            Term::atom("msg"),
            Term::int(*seq as i64),
            Term::str(text),
        ]),
        Body::Ack { seq } => tagged("ack", Term::int(*seq as i64)),
        Body::Leave => Term::atom("leave"),
        Body::Merge(l) => Term::tuple(vec![
            Term::atom("merge"),
            Term::int(l.version as i64),
            // Every list this peer sends was issued by someone; a leaderless one (from an
            // older peer) names its smallest member, whom the receiver takes for it.
            l.issuer()
                .map_or_else(|| Term::list(vec![]), Member::to_term),
            Term::list(l.members.iter().map(Member::to_term).collect()),
        ]),
    }
}

fn members_from(t: &Term) -> Result<Vec<Member>, ProtocolError> {
    t.as_list()
        .ok_or(ProtocolError::Field("member list"))?
        .iter()
        .map(Member::from_term)
        .collect()
}

/// The largest count (version, sequence number, hop count, incarnation) taken from a
/// line: far below `i64::MAX`, so that the next one (a leader's next version, a sender's
/// next sequence number) is still written as a non-negative integer. Taken at `i64::MAX`,
/// a version's successor was written as a negative number, which every peer skipped as
/// malformed: no list, join or leave went anywhere again.
pub const MAX_COUNT: u64 = 1 << 62;

/// A non-negative integer, at most [`MAX_COUNT`].
fn count(t: &Term) -> Option<u64> {
    t.as_int()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n <= MAX_COUNT)
}

fn reason_text(t: &Term) -> Result<String, ProtocolError> {
    t.as_atom()
        .map(str::to_owned)
        .or_else(|| t.as_text())
        .ok_or(ProtocolError::Field("reason"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            inc: 7,
        }
    }

    fn round_trip(msg: PeerMessage) -> String {
        let line = msg.format();
        assert_eq!(PeerMessage::parse(line.as_bytes()).unwrap(), msg, "{line}");
        line
    }

    #[test]
    fn every_message_round_trips_in_exact_text() {
        let (a, b) = (m("a", 4000), m("b", 4001));
        assert_eq!(
            round_trip(PeerMessage::Hello(a.clone(), None)),
            r#"{hello,{"a","127.0.0.1:4000",7}}"#
        );
        assert_eq!(
            round_trip(PeerMessage::Hello(a.clone(), Some(b.clone()))),
            r#"{hello,{"a","127.0.0.1:4000",7},{"b","127.0.0.1:4001",7}}"#
        );
        assert_eq!(
            round_trip(PeerMessage::Members(
                MemberList::new(3, vec![a.clone()])
                    .issued_by(a.clone())
                    .of_room(b.clone())
            )),
            r#"{members,3,{"a","127.0.0.1:4000",7},[{"a","127.0.0.1:4000",7}],{"b","127.0.0.1:4001",7}}"#
        );
        assert_eq!(
            round_trip(PeerMessage::Refused("no_direct".into())),
            "{refused,no_direct}"
        );
        assert_eq!(round_trip(PeerMessage::Heartbeat), "heartbeat");
        assert_eq!(
            round_trip(PeerMessage::Members(MemberList::new(
                3,
                vec![b.clone(), a.clone()]
            ))),
            r#"{members,3,[{"a","127.0.0.1:4000",7},{"b","127.0.0.1:4001",7}]}"#
        );
        assert_eq!(
            round_trip(PeerMessage::Links {
                owner: a.clone(),
                seq: 12,
                links: vec![b.clone()],
            }),
            r#"{links,{"a","127.0.0.1:4000",7},12,[{"b","127.0.0.1:4001",7}]}"#
        );
        let route = |body| PeerMessage::Route {
            from: a.clone(),
            to: b.clone(),
            hops: 32,
            body,
        };
        let prefix = r#"{route,{"a","127.0.0.1:4000",7},{"b","127.0.0.1:4001",7},32,"#;
        for (body, text) in [
            (Body::WhoLeads, "who_leads".to_string()),
            (
                Body::Leader(a.clone()),
                r#"{leader,{"a","127.0.0.1:4000",7}}"#.into(),
            ),
            (Body::JoinReq, "join_req".into()),
            (
                Body::JoinRefused("name_taken".into()),
                "{join_refused,name_taken}".into(),
            ),
            (
                Body::Msg {
                    seq: 5,
                    text: "hi, \"you\"\n".into(),
                },
                r#"{msg,5,"hi, \"you\"\n"}"#.into(),
            ),
            (Body::Ack { seq: 5 }, "{ack,5}".into()),
            (Body::Leave, "leave".into()),
            (
                Body::Merge(MemberList::new(6, vec![a.clone()]).issued_by(a.clone())),
                r#"{merge,6,{"a","127.0.0.1:4000",7},[{"a","127.0.0.1:4000",7}]}"#.into(),
            ),
        ] {
            assert_eq!(round_trip(route(body)), format!("{prefix}{text}}}"));
        }
    }

    #[test]
    fn erlang_spellings_are_accepted() {
        let line = br#"{route,{[97],"127.0.0.1:1",0},{"b","[::1]:2",1},3,{msg,1,[104,105]}}."#;
        let PeerMessage::Route { from, to, body, .. } = PeerMessage::parse(line).unwrap() else {
            panic!("not a route");
        };
        assert_eq!(from.name, "a");
        assert_eq!(to.addr.to_string(), "[::1]:2");
        assert_eq!(
            body,
            Body::Msg {
                seq: 1,
                text: "hi".into()
            }
        );
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let err = |line: &str| PeerMessage::parse(line.as_bytes()).unwrap_err();
        assert!(matches!(err("{hello"), ProtocolError::Term(_)));
        assert_eq!(err("{hi,there}"), ProtocolError::Unknown);
        assert_eq!(err("nonsense"), ProtocolError::Unknown);
        assert_eq!(
            err(r#"{hello,{"a","nowhere",1}}"#),
            ProtocolError::Field("member")
        );
        assert_eq!(
            err(r#"{hello,{"","127.0.0.1:1",1}}"#),
            ProtocolError::Field("member")
        );
        assert_eq!(
            err(r#"{hello,{"a","127.0.0.1:1",-1}}"#),
            ProtocolError::Field("member")
        );
        assert_eq!(err("{members,-1,[]}"), ProtocolError::Field("version"));
        let past = format!("{{members,{},[]}}", MAX_COUNT + 1);
        assert_eq!(err(&past), ProtocolError::Field("version"));
        let at = format!("{{members,{MAX_COUNT},[]}}");
        assert!(PeerMessage::parse(at.as_bytes()).is_ok());
        let twice = r#"{members,2,[{"a","127.0.0.1:1",1},{"a","127.0.0.1:2",1}]}"#;
        assert_eq!(err(twice), ProtocolError::Field("member list"));
        let a = r#"{"a","127.0.0.1:1",1}"#;
        assert_eq!(
            err(&format!("{{route,{a},{a},1,shout}}")),
            ProtocolError::Field("route body")
        );
        assert_eq!(
            err(&format!("{{route,{a},{a},1,{{msg,1,{{x}}}}}}")),
            ProtocolError::Field("text")
        );
    }

    #[test]
    fn oversized_lists_and_texts_are_refused_and_the_largest_legal_lines_fit() {
        let err = |line: &str| PeerMessage::parse(line.as_bytes()).unwrap_err();
        // The longest member term: a 32-byte name, the longest IPv6 address, a 19-digit inc
        // (as many digits as i64::MAX).
        let wide = |i: usize| Member {
            name: format!("{i:0>32}"),
            addr: format!("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:{i:x}]:65535")
                .parse()
                .unwrap(),
            inc: MAX_COUNT,
        };
        let full = MemberList::new(1, (0..MAX_MEMBERS).map(wide).collect());
        let line = round_trip(PeerMessage::Members(full.clone()));
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        let mut over = full;
        over.members.push(wide(MAX_MEMBERS));
        assert_eq!(
            err(&PeerMessage::Members(over).format()),
            ProtocolError::Field("member list")
        );
        let msg = |text: String| PeerMessage::Route {
            from: wide(1),
            to: wide(2),
            hops: 32,
            body: Body::Msg { seq: 1, text },
        };
        // Control characters print as four bytes each: the worst case still fits.
        let line = round_trip(msg("\u{1}".repeat(MAX_TEXT)));
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        assert_eq!(
            err(&msg("x".repeat(MAX_TEXT + 1)).format()),
            ProtocolError::Field("text")
        );
    }

    #[test]
    fn lists_sort_and_supersede_by_version_then_members() {
        let l = MemberList::new(2, vec![m("c", 3), m("a", 1), m("b", 2)]);
        assert_eq!(l.summary(), "[MEMBERS v2] a,b,c");
        assert!(l.contains(&m("b", 2)) && !l.contains(&m("b", 9)));
        let newer = MemberList::new(3, vec![m("z", 9)]);
        assert!(newer.supersedes(&l) && !l.supersedes(&newer));
        let rival = MemberList::new(2, vec![m("b", 2), m("c", 3)]);
        assert!(l.supersedes(&rival) && !rival.supersedes(&l));
        assert!(!l.supersedes(&l.clone()));
        assert!(l.supersedes(&MemberList::default()));
    }

    #[test]
    fn a_list_carries_the_leader_that_issued_it() {
        let (a, b) = (m("a", 1), m("b", 2));
        let by_a = MemberList::new(5, vec![a.clone(), b.clone()]).issued_by(a.clone());
        let line = PeerMessage::Members(by_a.clone()).format();
        assert_eq!(
            line,
            r#"{members,5,{"a","127.0.0.1:1",7},[{"a","127.0.0.1:1",7},{"b","127.0.0.1:2",7}]}"#
        );
        assert_eq!(
            PeerMessage::parse(line.as_bytes()).unwrap(),
            PeerMessage::Members(by_a.clone())
        );
        assert_eq!(by_a.summary(), "[MEMBERS v5 by a] a,b");
        // Same version, same members, another leader: a different label, and still one
        // total order for every peer to settle by.
        let by_b = by_a.clone().issued_by(b);
        assert_eq!(by_b.summary(), "[MEMBERS v5 by b] a,b");
        assert!(by_a.supersedes(&by_b) && !by_b.supersedes(&by_a));
    }

    #[test]
    fn names_are_short_plain_words() {
        assert!(valid_name("alice") && valid_name("bob-2.x_y"));
        for bad in ["", "a b", "a,b", "é", &"x".repeat(MAX_NAME + 1)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
