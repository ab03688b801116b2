//! One peer's state: the member list and its version, the links, the adverts of everyone
//! else's links, and the chat streams to and from every member. A state machine without
//! sockets or clocks of its own: every input (a link up or down, a received message, a
//! tick, a typed line) takes the time and appends [`Effect`]s for the wiring to carry out.

use super::protocol::{valid_name, Body, Member, MemberList, PeerMessage, MAX_MEMBERS};
use super::routing::Topology;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a member may be unreachable before the leader drops it.
pub const DOWN_GRACE: Duration = Duration::from_secs(1);
/// How often a joiner repeats `who_leads` and `join_req` until it is admitted.
pub const JOIN_RETRY: Duration = Duration::from_millis(500);
/// How often a member of the losing half of a healed split repeats its `merge` request
/// until a list holding it and the winning half arrives.
pub const MERGE_RETRY: Duration = JOIN_RETRY;
/// How long a joiner tries before it gives up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a chat message waits for its acknowledgement before it is sent again.
pub const RETRANSMIT: Duration = Duration::from_secs(1);
/// Unacknowledged messages per destination; the sender waits when one is full.
pub const WINDOW: usize = 1024;
/// Forwards a routed message may take; more than any shortest path in a sane room.
pub const MAX_HOPS: u64 = 32;
/// How long a leaving member waits for its last lines to be acknowledged before it asks
/// the leader to drop it.
pub const LEAVE_FLUSH: Duration = Duration::from_secs(1);
/// How long the chat streams of a member that left the list are kept, in case a rival
/// list puts it back (see [`MemberList::supersedes`]): both ends then carry on where
/// they were, instead of one of them starting over. (A member *lost* to a split keeps its
/// streams for as long as it is lost: see [`MAX_LOST`].)
pub const STREAM_KEEP: Duration = Duration::from_secs(60);
/// Members lost to a split (dropped from the list while out of reach from here) that a
/// peer remembers at once: it keeps dialling each, and keeps its chat streams, until it is
/// back on the list or a new run of it (or a peer of another room) holds its address. Past
/// this many the oldest is forgotten.
pub const MAX_LOST: usize = MAX_MEMBERS;
/// How long the link advert of a peer that is not on the list (a joiner, or a member that
/// left) is kept after it arrived. A joiner needs it kept while it joins (replies to it
/// are routed), and gives up after [`JOIN_TIMEOUT`]; past that it is a stale flood.
pub const STRANGER_KEEP: Duration = JOIN_TIMEOUT;
/// Adverts of peers not on the list held at once; more are ignored until some expire,
/// so adverts for made-up owners cannot grow a peer's memory.
pub const MAX_STRANGERS: usize = MAX_MEMBERS;
/// Bytes of chat lines held, over all senders, for a gap to fill. Lines past it are
/// dropped unacknowledged (their senders resend them), so the bound costs no line: it
/// only stops a peer that forges `From` for every member from holding a window each.
pub const EARLY_BYTES: usize = 16 << 20;
/// Most lines resent per tick, over all destinations. After an outage, full windows to
/// several members behind one router would otherwise land on that link at once, overflow
/// its outbox, get it closed, and be resent again: a storm instead of a recovery.
pub const RESEND_BURST: usize = 256;

/// Something the wiring must do.
// Effects live for one call in a short Vec; boxing every message would cost an allocation
// per line sent for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Queue `msg` on the link to this neighbour.
    Send(Member, PeerMessage),
    /// Print a line for the user.
    Print(String),
    /// Open a link to this address (ignored when a dial to it is already under way).
    Dial(SocketAddr),
    /// This peer has just been admitted to the room.
    Joined,
    /// This peer is done; the wiring shuts it down.
    Finish(Outcome),
}

/// How a peer's time in the room ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It left, and the leader confirmed it (or it was alone).
    Left,
    /// The leader refused to admit it (`name_taken`, `bad_name`).
    Refused(String),
    /// No leader admitted it within [`JOIN_TIMEOUT`].
    JoinTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Joining {
        deadline: Instant,
        next_try: Instant,
        leader: Option<Member>,
    },
    Joined,
    /// Waiting for the last lines to be acknowledged (`asked` false), then for the list
    /// without this peer.
    Leaving {
        since: Instant,
        asked: bool,
    },
    Done,
}

/// A chat line waiting for its acknowledgement.
#[derive(Debug)]
struct Pending {
    seq: u64,
    text: String,
    sent: Instant,
}

/// The stream of chat lines from this peer to one member.
#[derive(Debug)]
struct Outgoing {
    next_seq: u64,
    unacked: VecDeque<Pending>,
}

/// The stream of chat lines from one member to this peer.
#[derive(Debug)]
struct Incoming {
    /// The next sequence number to print.
    expected: u64,
    /// Lines that arrived ahead of a gap, printed once it is filled.
    early: BTreeMap<u64, String>,
}

/// A typed line could not be sent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SayError {
    /// Not (or no longer) a member of the room.
    NotMember,
    /// [`WINDOW`] lines to some member are unacknowledged; try again after an ack.
    Busy,
}

/// One peer's view of the room.
#[derive(Debug)]
pub struct PeerState {
    me: Member,
    via: Option<SocketAddr>,
    no_direct: Vec<SocketAddr>,
    status: Status,
    list: MemberList,
    links: BTreeSet<Member>,
    own_seq: u64,
    topology: Topology<Member>,
    /// Addresses that refused a direct link (they were started with `--no-direct` us).
    refused: BTreeSet<SocketAddr>,
    /// Next hop per destination; `None` when links or adverts changed since computed.
    routes: Option<BTreeMap<Member, Member>>,
    /// Members of the list found unreachable, and since when.
    unreachable_since: BTreeMap<Member, Instant>,
    outgoing: BTreeMap<Member, Outgoing>,
    incoming: BTreeMap<Member, Incoming>,
    /// Members that left the list, and when: their streams are forgotten after
    /// [`STREAM_KEEP`].
    departed: BTreeMap<Member, Instant>,
    /// Owners of adverts held that are not on the list, and when their advert arrived
    /// (or they left): forgotten after [`STRANGER_KEEP`], at most [`MAX_STRANGERS`].
    strangers: BTreeMap<Member, Instant>,
    /// Bytes held in every `Incoming::early`, bounded by [`EARLY_BYTES`].
    early_bytes: usize,
    /// Members this peer has told its user it cannot reach (see `reach`).
    unreachable_shown: BTreeSet<Member>,
    /// Members lost to a split, and since when: dialled every tick (the wiring paces the
    /// dials) so that a healed network is found again; see [`MAX_LOST`].
    lost: BTreeMap<Member, Instant>,
    /// A list of this room that supersedes the one held but lacks this peer (the winning
    /// half of a healed split, or a leader that dropped this peer while it was alive), and
    /// when to ask its leader again to merge this peer's half in.
    merging: Option<(MemberList, Instant)>,
}

impl PeerState {
    /// A peer that starts a new room (`via` is `None`) or joins the room of the peer at
    /// `via`. It never links directly to an address in `no_direct`.
    pub fn new(
        me: Member,
        via: Option<SocketAddr>,
        no_direct: Vec<SocketAddr>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> PeerState {
        let mut node = PeerState {
            me,
            via,
            no_direct,
            status: Status::Joining {
                deadline: now + JOIN_TIMEOUT,
                next_try: now,
                leader: None,
            },
            list: MemberList::default(),
            links: BTreeSet::new(),
            own_seq: 0,
            topology: Topology::new(),
            refused: BTreeSet::new(),
            routes: None,
            unreachable_since: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            incoming: BTreeMap::new(),
            departed: BTreeMap::new(),
            strangers: BTreeMap::new(),
            early_bytes: 0,
            unreachable_shown: BTreeSet::new(),
            lost: BTreeMap::new(),
            merging: None,
        };
        if via.is_none() {
            // The founder names the room: its identity (name, address, incarnation) is
            // unique to this run, so no two rooms ever share one.
            let founding = MemberList::new(1, vec![node.me.clone()])
                .issued_by(node.me.clone())
                .of_room(node.me.clone());
            node.adopt(founding, None, now, out);
        }
        node
    }

    /// This peer.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The member list held now.
    pub fn members(&self) -> &MemberList {
        &self.list
    }

    /// The address this peer joined through (`--via`), as given: the one address whose
    /// peer may answer under another (it advertises itself as it likes).
    pub fn via(&self) -> Option<SocketAddr> {
        self.via
    }

    /// The room this peer is in (its founder), once it holds a list.
    pub fn room(&self) -> Option<&Member> {
        self.list.room.as_ref()
    }

    /// Whether this peer is still joining through the peer at `addr` and has never held a
    /// link or a list: a failed dial to `addr` now means there is no room to join there,
    /// and the user is better told at once than after the join timeout.
    pub fn awaits_via(&self, addr: SocketAddr) -> bool {
        matches!(self.status, Status::Joining { .. })
            && self.via == Some(addr)
            && self.list.version == 0
            && self.links.is_empty()
    }

    /// Whether this peer may hold a direct link to the peer listening at `addr`.
    pub fn allows_direct(&self, addr: SocketAddr) -> bool {
        addr != self.me.addr && !self.no_direct.contains(&addr)
    }

    /// The leader as this peer sees it: the smallest member of its list that it does not
    /// consider down (itself included, never down to itself).
    pub fn leader(&mut self, now: Instant) -> Option<Member> {
        self.refresh_routes(now);
        self.list
            .members
            .iter()
            .find(|m| **m == self.me || !self.is_down(m, now))
            .cloned()
    }

    /// A link to `peer` has opened: tell everyone (a new advert), and bring `peer` up to
    /// date with the member list and every advert held.
    pub fn link_up(&mut self, peer: Member, out: &mut Vec<Effect>) {
        if !self.links.insert(peer.clone()) {
            return;
        }
        // Another run at a lost member's address: that member is gone for good.
        self.forget_lost(|m| m.addr == peer.addr && *m != peer);
        self.routes = None;
        self.advertise(out);
        self.bring_up_to_date(peer, out);
    }

    /// The link to `peer` was replaced by a newer one (both ended up dialling each other,
    /// or `peer` dialled again): the link set is unchanged, but what was queued on the old
    /// link may never arrive (its other end may have given up on it, a hello that timed
    /// out across a cut), so `peer` is brought up to date again on the new one, this
    /// peer's own advert included (at its current sequence number). Without
    /// this, a list sent only on the abandoned link leaves two halves of a split room
    /// unaware of each other for good.
    pub fn link_replaced(&mut self, peer: Member, out: &mut Vec<Effect>) {
        if self.links.contains(&peer) {
            out.push(Effect::Send(peer.clone(), self.own_advert()));
            self.bring_up_to_date(peer, out);
        } else {
            self.link_up(peer, out);
        }
    }

    /// Sends `peer` the member list and every other peer's advert held (bar its own).
    fn bring_up_to_date(&self, peer: Member, out: &mut Vec<Effect>) {
        if self.list.version > 0 {
            out.push(Effect::Send(
                peer.clone(),
                PeerMessage::Members(self.list.clone()),
            ));
        }
        for (owner, advert) in self.topology.adverts() {
            if *owner != peer {
                let msg = PeerMessage::Links {
                    owner: owner.clone(),
                    seq: advert.seq,
                    links: advert.links.iter().cloned().collect(),
                };
                out.push(Effect::Send(peer.clone(), msg));
            }
        }
    }

    /// The link to `peer` has closed.
    pub fn link_down(&mut self, peer: &Member, out: &mut Vec<Effect>) {
        if self.links.remove(peer) {
            self.routes = None;
            self.advertise(out);
        }
    }

    /// The peer at `addr` refused a direct link: do not dial it again.
    pub fn direct_refused(&mut self, addr: SocketAddr) {
        self.refused.insert(addr);
    }

    /// Handles a message that arrived on the link to `link`.
    pub fn receive(
        &mut self,
        link: &Member,
        msg: PeerMessage,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        match msg {
            PeerMessage::Hello(..) | PeerMessage::Refused(_) | PeerMessage::Heartbeat => {}
            PeerMessage::Members(mut list) => {
                if !self.may_hand_over(link, &list) {
                    return;
                }
                if list.room.is_none() {
                    list.room = self.list.room.clone();
                }
                if self.status == Status::Joined && !list.contains(&self.me) {
                    self.rival(list, now, out);
                } else {
                    self.adopt(list, Some(link), now, out);
                }
            }
            PeerMessage::Links { owner, seq, links } => {
                if owner == self.me {
                    return;
                }
                let stranger = !self.list.contains(&owner);
                if stranger
                    && !self.strangers.contains_key(&owner)
                    && self.strangers.len() >= MAX_STRANGERS
                {
                    return;
                }
                let set: BTreeSet<Member> = links.into_iter().collect();
                if self.topology.advertise(owner.clone(), seq, set.clone()) {
                    if stranger {
                        self.strangers.insert(owner.clone(), now);
                    }
                    self.routes = None;
                    let msg = PeerMessage::Links {
                        owner,
                        seq,
                        links: set.into_iter().collect(),
                    };
                    self.flood(msg, Some(link), out);
                }
            }
            PeerMessage::Route {
                from,
                to,
                hops,
                body,
            } => {
                if !self.may_come_from(link, &from) {
                    return;
                }
                if to == self.me {
                    self.handle(from, body, now, out);
                } else if hops > 0 {
                    if let Some(next) = self.next_hop(&to, now) {
                        let msg = PeerMessage::Route {
                            from,
                            to,
                            // No honest sender starts above MAX_HOPS; clamping keeps a
                            // forged count from circling a transient loop for ever.
                            hops: hops.min(MAX_HOPS) - 1,
                            body,
                        };
                        out.push(Effect::Send(next, msg));
                    }
                }
            }
        }
    }

    /// Whether the member at the end of `link` may hand this peer `list`. Only a leader
    /// issues lists, but members pass them on (a flood, a new link's greeting), and a list
    /// carries no signature; so the rules bound what a member that is not the leader can
    /// do, the way routing does for routed bodies: a list of another room is nobody's to
    /// hand over; a peer on neither list (a member long gone, a peer never admitted) hands
    /// over nothing; and a list is taken only on the link of the leader that issued it
    /// whenever this peer has a link to that leader (which floods it on every link it
    /// has), from any member only when it has none. So a member cannot rewrite the list,
    /// or drop this peer from it, in its leader's name. (A just-admitted member passes its
    /// list on before everyone holds it, so "on the list held" would refuse honest floods.)
    fn may_hand_over(&self, link: &Member, list: &MemberList) -> bool {
        if !self.list.contains(link) && !list.contains(link) {
            return false;
        }
        if !self.same_room(list.room.as_ref()) {
            return false;
        }
        match list.issuer() {
            Some(issuer) => issuer == link || !self.links.contains(issuer),
            None => true,
        }
    }

    /// Whether a routed message claiming to be from `from` may arrive on the link to
    /// `link`, by the routing rules: straight from its sender, or forwarded when this peer
    /// has no live link to the sender (who would otherwise have used it, its own links
    /// counting first hand). So a member cannot speak for another one linked to us, nor
    /// spend its sequence numbers; a message caught by a link coming up is resent.
    fn may_come_from(&self, link: &Member, from: &Member) -> bool {
        if from == link {
            return true;
        }
        if *from == self.me || self.links.contains(from) {
            return false;
        }
        true
    }

    /// The periodic work: dial missing links, retry a join, resend unacknowledged lines,
    /// and (as the leader) drop members that have been unreachable for [`DOWN_GRACE`].
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if let Status::Joining {
            deadline,
            next_try,
            leader,
        } = &mut self.status
        {
            if now >= *deadline {
                self.status = Status::Done;
                out.push(Effect::Finish(Outcome::JoinTimeout));
                return;
            }
            // Until it holds the room's list, a joiner keeps a link to its via peer: a
            // link from another joiner does not count, it may know no more than we do.
            let via = self
                .via
                .filter(|v| self.list.version == 0 && !self.links.iter().any(|l| l.addr == *v));
            out.extend(via.map(Effect::Dial));
            // Ask a member, not another joiner (which would not answer).
            let asked = self.links.iter().find(|l| self.list.contains(l)).cloned();
            if let Some(asked) = asked.filter(|_| now >= *next_try) {
                *next_try = now + JOIN_RETRY;
                let leader = leader.clone();
                self.route(asked, Body::WhoLeads, now, out);
                if let Some(leader) = leader {
                    self.route(leader, Body::JoinReq, now, out);
                }
            }
        }
        if matches!(self.status, Status::Done) {
            return;
        }
        self.dial_missing(now, out);
        self.probe_lost(out);
        self.ask_to_merge(now, out);
        self.retransmit(now, out);
        self.show_reachability(now, out);
        self.drop_down_members(now, out);
        self.ask_to_leave(now, out);
        for m in older_than(&self.departed, STREAM_KEEP, now) {
            if self.lost.contains_key(&m) {
                self.departed.remove(&m);
                continue;
            }
            self.departed.remove(&m);
            self.outgoing.remove(&m);
            if let Some(stream) = self.incoming.remove(&m) {
                self.early_bytes -= stream.early.values().map(String::len).sum::<usize>();
            }
        }
        for m in older_than(&self.strangers, STRANGER_KEEP, now) {
            self.strangers.remove(&m);
            self.topology.remove(&m);
            self.routes = None;
        }
    }

    /// Sends a typed line to every other member.
    ///
    /// # Errors
    /// [`SayError::NotMember`] before admission or after leaving; [`SayError::Busy`] when
    /// the window to some member is full (nothing is sent then).
    pub fn say(&mut self, text: &str, now: Instant, out: &mut Vec<Effect>) -> Result<(), SayError> {
        if self.status != Status::Joined {
            return Err(SayError::NotMember);
        }
        let dests: Vec<Member> = self.others().cloned().collect();
        let full = |d: &Member| {
            self.outgoing
                .get(d)
                .is_some_and(|o| o.unacked.len() >= WINDOW)
        };
        if dests.iter().any(full) {
            return Err(SayError::Busy);
        }
        self.show_unsent(&dests, now, out);
        for dest in dests {
            let stream = self.outgoing.entry(dest.clone()).or_insert(Outgoing {
                next_seq: 1,
                unacked: VecDeque::new(),
            });
            let seq = stream.next_seq;
            stream.next_seq += 1;
            stream.unacked.push_back(Pending {
                seq,
                text: text.to_owned(),
                sent: now,
            });
            let text = text.to_owned();
            self.route(dest, Body::Msg { seq, text }, now, out);
        }
        Ok(())
    }

    /// Leaves the room. Once every line sent is acknowledged (or after [`LEAVE_FLUSH`]),
    /// the leader issues a list without itself, and any other member asks the leader to.
    /// [`Outcome::Left`] follows once a list without this peer is held.
    pub fn leave(&mut self, now: Instant, out: &mut Vec<Effect>) {
        match self.status {
            Status::Joined => {
                self.status = Status::Leaving {
                    since: now,
                    asked: false,
                };
                self.ask_to_leave(now, out);
            }
            Status::Joining { .. } => {
                self.status = Status::Done;
                out.push(Effect::Finish(Outcome::Left));
            }
            Status::Leaving { .. } | Status::Done => {}
        }
    }

    fn ask_to_leave(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Status::Leaving { since, asked } = &mut self.status else {
            return;
        };
        let list = &self.list;
        let flushed = self
            .outgoing
            .iter()
            .all(|(dest, o)| o.unacked.is_empty() || !list.contains(dest));
        if *asked || (!flushed && now.duration_since(*since) < LEAVE_FLUSH) {
            return;
        }
        *asked = true;
        match self.leader(now) {
            Some(leader) if leader == self.me => {
                let rest = self.others().cloned().collect();
                self.issue(rest, now, out);
            }
            Some(leader) => self.route(leader, Body::Leave, now, out),
            None => {}
        }
    }

    fn handle(&mut self, from: Member, body: Body, now: Instant, out: &mut Vec<Effect>) {
        match body {
            Body::WhoLeads => {
                if self.status == Status::Joined {
                    if let Some(leader) = self.leader(now) {
                        self.route(from, Body::Leader(leader), now, out);
                    }
                }
            }
            Body::Leader(new) => {
                if let Status::Joining { leader, .. } = &mut self.status {
                    if leader.as_ref() != Some(&new) {
                        *leader = Some(new.clone());
                        self.route(new, Body::JoinReq, now, out);
                    }
                }
            }
            Body::JoinReq => self.admit(from, now, out),
            Body::JoinRefused(reason) => {
                if matches!(self.status, Status::Joining { .. }) {
                    self.status = Status::Done;
                    out.push(Effect::Finish(Outcome::Refused(reason)));
                }
            }
            Body::Msg { seq, text } => self.deliver(from, seq, text, now, out),
            Body::Ack { seq } => {
                if let Some(stream) = self.outgoing.get_mut(&from) {
                    while stream.unacked.front().is_some_and(|p| p.seq <= seq) {
                        stream.unacked.pop_front();
                    }
                }
                self.ask_to_leave(now, out);
            }
            Body::Leave => {
                if self.status == Status::Joined
                    && self.list.contains(&from)
                    && self.leader(now).as_ref() == Some(&self.me)
                {
                    let rest = self.list.members.iter().filter(|m| **m != from);
                    let rest = rest.cloned().collect();
                    self.issue(rest, now, out);
                }
            }
            Body::Merge(theirs) => self.merge(&from, theirs, now, out),
        }
    }

    /// The leader's side of a join. Joins are serialised by the lock the wiring holds
    /// around every call, so each admission sees the list the previous one issued.
    fn admit(&mut self, joiner: Member, now: Instant, out: &mut Vec<Effect>) {
        if self.status != Status::Joined {
            return;
        }
        self.drop_down_members(now, out);
        let Some(leader) = self.leader(now) else {
            return;
        };
        if leader != self.me {
            self.route(joiner, Body::Leader(leader), now, out);
            return;
        }
        if self.list.contains(&joiner) {
            return;
        }
        if !valid_name(&joiner.name) {
            self.route(joiner, Body::JoinRefused("bad_name".into()), now, out);
            return;
        }
        let holder = self.list.members.iter().find(|m| m.name == joiner.name);
        // The same name at the same address is a restart of that member: the old run
        // cannot be alive, the new one holds its port. Anywhere else the name is taken.
        if holder.is_some_and(|m| m.addr != joiner.addr) {
            self.route(joiner, Body::JoinRefused("name_taken".into()), now, out);
            return;
        }
        let mut next: Vec<Member> = self.list.members.clone();
        next.retain(|m| m.name != joiner.name);
        // Every peer refuses a longer list as malformed: issuing one would split the room.
        if next.len() >= MAX_MEMBERS {
            self.route(joiner, Body::JoinRefused("room_full".into()), now, out);
            return;
        }
        next.push(joiner);
        self.issue(next, now, out);
    }

    /// Prints, exactly once and in order, the lines of `from`'s stream to this peer, and
    /// acknowledges what has been printed.
    fn deliver(
        &mut self,
        from: Member,
        seq: u64,
        text: String,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        // Not a member yet, or the sender not yet on our list: no ack, so the sender
        // resends it once the lists agree.
        if !matches!(self.status, Status::Joined | Status::Leaving { .. })
            || !self.list.contains(&from)
        {
            return;
        }
        let stream = self.incoming.entry(from.clone()).or_insert(Incoming {
            expected: 1,
            early: BTreeMap::new(),
        });
        if seq == stream.expected {
            out.push(Effect::Print(chat_line(&from.name, &text)));
            stream.expected += 1;
            while let Some(text) = stream.early.remove(&stream.expected) {
                self.early_bytes -= text.len();
                out.push(Effect::Print(chat_line(&from.name, &text)));
                stream.expected += 1;
            }
        } else if seq > stream.expected
            && seq < stream.expected + WINDOW as u64
            && !stream.early.contains_key(&seq)
            && self.early_bytes + text.len() <= EARLY_BYTES
        {
            self.early_bytes += text.len();
            stream.early.insert(seq, text);
        }
        let seq = stream.expected - 1;
        self.route(from, Body::Ack { seq }, now, out);
    }

    /// Takes `list` if it supersedes the one held, passes it on, and reports the change.
    fn adopt(
        &mut self,
        list: MemberList,
        link: Option<&Member>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        // Only a leader leaving a room of one issues an empty list; nobody takes one.
        if (list.members.is_empty() && link.is_some()) || !list.supersedes(&self.list) {
            return;
        }
        // Who is out of reach from here now, judged before the list changes: a member
        // removed while out of reach is lost to a split (or dead), not gone by choice.
        self.refresh_routes(now);
        let routes = self.routes.clone().unwrap_or_default();
        let old = std::mem::replace(&mut self.list, list);
        self.flood(PeerMessage::Members(self.list.clone()), link, out);
        self.routes = None;
        let added: Vec<Member> = self
            .list
            .members
            .iter()
            .filter(|m| !old.contains(m))
            .cloned()
            .collect();
        let removed: Vec<&Member> = old
            .members
            .iter()
            .filter(|m| !self.list.contains(m))
            .collect();
        for gone in &removed {
            // Its advert expires as a stranger's rather than going now: a late flood of it
            // would otherwise be taken again and kept for good, and should a rival list put
            // it back, routes through it keep working. Unless the strangers are full.
            if self.strangers.len() < MAX_STRANGERS {
                self.strangers.insert((*gone).clone(), now);
            } else {
                self.topology.remove(gone);
            }
            self.unreachable_since.remove(*gone);
            let out_of_reach = !self.links.contains(*gone) && !routes.contains_key(*gone);
            if out_of_reach && !matches!(self.status, Status::Joining { .. }) {
                self.lost.insert((*gone).clone(), now);
            } else {
                self.departed.insert((*gone).clone(), now);
            }
        }
        while self.lost.len() > MAX_LOST {
            let oldest = self
                .lost
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(m, _)| m.clone());
            self.forget_lost(|m| Some(m) == oldest.as_ref());
        }
        for new in &added {
            self.strangers.remove(new);
            self.departed.remove(new);
            self.lost.remove(new);
            // A new run of a lost member (its name or its address, another incarnation).
            self.forget_lost(|m| m != new && (m.name == new.name || m.addr == new.addr));
            // A new member (or a new run at an old address) gets a fresh chance to link.
            self.refused.remove(&new.addr);
        }
        let in_list = self.list.contains(&self.me);
        match (&self.status, in_list) {
            (Status::Joining { .. }, true) => {
                self.status = Status::Joined;
                out.push(Effect::Joined);
                out.push(Effect::Print(self.list.summary()));
                // Our adverts so far were a stranger's, which a peer may have refused (too
                // many strangers) or let expire; a member's is always taken.
                self.advertise(out);
            }
            (Status::Joined | Status::Leaving { .. }, true) => {
                for m in added.iter().filter(|m| **m != self.me) {
                    out.push(Effect::Print(format!("[JOIN] {}", m.name)));
                }
                self.refresh_routes(now);
                for m in &removed {
                    // A member with no route from here for the grace period (the leader's
                    // own test for dropping it) did not say goodbye, as far as anyone here
                    // can tell: it was dropped, and the user is told so.
                    let line = if self.unreachable_shown.contains(m) || self.is_down(m, now) {
                        format!("[DROPPED] {}: unreachable", m.name)
                    } else {
                        format!("[LEAVE] {}", m.name)
                    };
                    out.push(Effect::Print(line));
                }
                out.push(Effect::Print(self.list.summary()));
            }
            (Status::Leaving { .. }, false) => {
                self.status = Status::Done;
                out.push(Effect::Finish(Outcome::Left));
            }
            // A joined peer takes no list without itself (`receive` makes it a rival).
            (Status::Joining { .. } | Status::Joined | Status::Done, false)
            | (Status::Done, true) => {}
        }
    }

    /// As the leader: the next version of the list, with `members`, of the room held.
    fn issue(&mut self, members: Vec<Member>, now: Instant, out: &mut Vec<Effect>) {
        let mut list = MemberList::new(self.list.version + 1, members).issued_by(self.me.clone());
        list.room = self.list.room.clone();
        self.adopt(list, None, now, out);
    }

    /// As the leader: drops every member unreachable for [`DOWN_GRACE`].
    fn drop_down_members(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.status != Status::Joined || self.leader(now).as_ref() != Some(&self.me) {
            return;
        }
        let (down, alive): (Vec<Member>, Vec<Member>) = self
            .list
            .members
            .iter()
            .cloned()
            .partition(|m| *m != self.me && self.is_down(m, now));
        if !down.is_empty() {
            self.issue(alive, now, out);
        }
    }

    /// Links are dialled by the smaller member of each pair (so two members do not dial
    /// each other at once), by a joiner to every member it knows of, and by the larger
    /// member too when it has no route at all to the smaller one: that one may not know
    /// of it (a list that reached only the peer it admitted, from a leader that died), and
    /// without a link neither would ever learn the other's list.
    fn dial_missing(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let joining = matches!(self.status, Status::Joining { .. });
        self.refresh_routes(now);
        let routes = self.routes.as_ref();
        for m in &self.list.members {
            let cut_off = routes.is_some_and(|r| !r.contains_key(m));
            if *m != self.me
                && (joining || self.me < *m || cut_off)
                && !self.links.contains(m)
                && self.allows_direct(m.addr)
                && !self.refused.contains(&m.addr)
            {
                out.push(Effect::Dial(m.addr));
            }
        }
    }

    /// Resends lines unacknowledged for [`RETRANSMIT`], oldest first, at most
    /// [`RESEND_BURST`] a tick; a line with no route now stays due and goes once one
    /// appears.
    fn retransmit(&mut self, now: Instant, out: &mut Vec<Effect>) {
        self.refresh_routes(now);
        let routes = self.routes.as_ref();
        let mut resend = Vec::new();
        for (dest, stream) in &mut self.outgoing {
            let reachable =
                self.links.contains(dest) || routes.is_some_and(|r| r.contains_key(dest));
            if !self.list.contains(dest) || !reachable {
                continue;
            }
            for p in stream.unacked.iter_mut() {
                if resend.len() >= RESEND_BURST {
                    break;
                }
                if now.duration_since(p.sent) >= RETRANSMIT {
                    p.sent = now;
                    resend.push((dest.clone(), p.seq, p.text.clone()));
                }
            }
        }
        for (dest, seq, text) in resend {
            self.route(dest, Body::Msg { seq, text }, now, out);
        }
    }

    /// Sends `body` from this peer to `to` along the first hop of a shortest path; drops
    /// it when there is none (every sender retries what matters).
    fn route(&mut self, to: Member, body: Body, now: Instant, out: &mut Vec<Effect>) {
        if let Some(next) = self.next_hop(&to, now) {
            let msg = PeerMessage::Route {
                from: self.me.clone(),
                to,
                hops: MAX_HOPS,
                body,
            };
            out.push(Effect::Send(next, msg));
        }
    }

    fn next_hop(&mut self, to: &Member, now: Instant) -> Option<Member> {
        if self.links.contains(to) {
            return Some(to.clone());
        }
        self.refresh_routes(now);
        self.routes.as_ref().and_then(|r| r.get(to)).cloned()
    }

    /// Recomputes the routes if links or adverts changed, and with them which members are
    /// unreachable (and since when).
    fn refresh_routes(&mut self, now: Instant) {
        if self.routes.is_some() {
            return;
        }
        let routes = self.topology.next_hops(&self.me, &self.links);
        for m in &self.list.members {
            if *m == self.me || routes.contains_key(m) {
                self.unreachable_since.remove(m);
            } else {
                self.unreachable_since.entry(m.clone()).or_insert(now);
            }
        }
        self.routes = Some(routes);
    }

    fn is_down(&self, m: &Member, now: Instant) -> bool {
        self.unreachable_since
            .get(m)
            .is_some_and(|since| now.duration_since(*since) >= DOWN_GRACE)
    }

    /// Floods this peer's own links, under a new sequence number.
    fn advertise(&mut self, out: &mut Vec<Effect>) {
        self.own_seq += 1;
        self.flood(self.own_advert(), None, out);
    }

    /// This peer's links, at its current advert's sequence number.
    fn own_advert(&self) -> PeerMessage {
        PeerMessage::Links {
            owner: self.me.clone(),
            seq: self.own_seq,
            links: self.links.iter().cloned().collect(),
        }
    }

    /// Sends `msg` on every link but the one it came from.
    fn flood(&self, msg: PeerMessage, except: Option<&Member>, out: &mut Vec<Effect>) {
        for link in self.links.iter().filter(|l| Some(*l) != except) {
            out.push(Effect::Send(link.clone(), msg.clone()));
        }
    }

    fn others(&self) -> impl Iterator<Item = &Member> {
        self.list.members.iter().filter(|m| **m != self.me)
    }
}

/// `[Name] text`, with control characters (a newline a peer smuggled into a string)
/// shown as spaces so one message is one line of output.
fn chat_line(name: &str, text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("[{name}] {text}")
}

/// The members recorded in `since` at least `keep` before `now`.
fn older_than(since: &BTreeMap<Member, Instant>, keep: Duration, now: Instant) -> Vec<Member> {
    since
        .iter()
        .filter(|(_, at)| now.duration_since(**at) >= keep)
        .map(|(m, _)| m.clone())
        .collect()
}

#[path = "reach.rs"]
mod reach;

#[path = "splits.rs"]
mod splits;

#[cfg(test)]
#[path = "sim.rs"]
mod tests;
