//! Rooms and splits: which links and lists belong to this peer's room, the members lost
//! to a split (dialled for as long as they are lost), and the merge of two halves of a
//! room once they can talk again (see `mod.rs`, *Splits heal*).

use super::{
    valid_name, Body, Effect, Instant, Member, MemberList, PeerState, SocketAddr, Status,
    MAX_MEMBERS, MERGE_RETRY,
};

impl PeerState {
    /// Whether a link to a peer that says it is in `room` may stay: not when both ends are
    /// in a room and the rooms differ (two rooms never merge by accident, whatever dials
    /// whom). A peer in no room yet (a joiner) links to anyone.
    pub fn same_room(&self, room: Option<&Member>) -> bool {
        match (self.room(), room) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => true,
        }
    }

    /// The peer at `addr` is in another room: a member lost there is gone for good (its
    /// port serves someone else now); stop dialling it.
    pub fn other_room(&mut self, addr: SocketAddr) {
        self.forget_lost(|m| m.addr == addr);
    }

    /// Members lost to a split, still dialled.
    pub fn lost(&self) -> impl Iterator<Item = &Member> {
        self.lost.keys()
    }

    /// `list`, of this room, lacks this (joined) peer: the winning half of a healed split
    /// (or a leader that dropped this peer while it was alive) if it supersedes the list
    /// held. This peer does not take it (that would drop its own half); it asks that list's
    /// leader to merge this half in, and takes the merged list when it comes. A rival that
    /// does not supersede is the losing half: its members ask us.
    pub(super) fn rival(&mut self, list: MemberList, now: Instant, out: &mut Vec<Effect>) {
        if !list.supersedes(&self.list) || list.members.is_empty() {
            return;
        }
        if let Some((known, _)) = &self.merging {
            if !list.supersedes(known) {
                return;
            }
        }
        self.merging = Some((list, now));
        self.ask_to_merge(now, out);
    }

    /// Sends `merge` to the smallest member of the rival list (its leader unless that one
    /// is down, and then the next list comes), every [`MERGE_RETRY`] until the list held
    /// has caught up with the rival.
    pub(super) fn ask_to_merge(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Some((rival, next_try)) = &mut self.merging else {
            return;
        };
        if self.status != Status::Joined || !rival.supersedes(&self.list) {
            self.merging = None;
            return;
        }
        if now < *next_try {
            return;
        }
        *next_try = now + MERGE_RETRY;
        let target = rival.members[0].clone();
        let body = Body::Merge(self.list.clone());
        self.route(target, body, now, out);
    }

    /// As the leader of the winning half: admits every member of `theirs` (the list of the
    /// half `from` is in) whose name is free, in one new version, above both halves'
    /// versions. Only a list this one supersedes is merged in (the other way round, this
    /// half is the one to ask), and only from a member of it.
    pub(super) fn merge(
        &mut self,
        from: &Member,
        theirs: MemberList,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        if self.status != Status::Joined
            || !theirs.contains(from)
            || !self.list.supersedes(&theirs)
            || self.leader(now).as_ref() != Some(&self.me)
        {
            return;
        }
        self.drop_down_members(now, out);
        let mut next = self.list.members.clone();
        for m in theirs.members {
            if next.len() < MAX_MEMBERS
                && valid_name(&m.name)
                && !next.iter().any(|n| n.name == m.name)
            {
                next.push(m);
            }
        }
        if next.len() > self.list.members.len() {
            self.issue(next, now, out);
        }
    }

    /// Forgets the lost members `gone` picks (a new run holds their address or name, or
    /// another room does): no more dials, and their streams expire as a departed member's.
    pub(super) fn forget_lost(&mut self, gone: impl Fn(&Member) -> bool) {
        let forgotten: Vec<(Member, Instant)> = self
            .lost
            .iter()
            .filter(|(m, _)| gone(m))
            .map(|(m, at)| (m.clone(), *at))
            .collect();
        for (m, at) in forgotten {
            self.lost.remove(&m);
            self.departed.insert(m, at);
        }
    }

    /// Dials every member lost to a split that this peer may link to and has no link to:
    /// each tick, for as long as it is lost; the wiring paces the dials of one address
    /// (`link::Backoff`, at most 1 s apart) and ignores one while a dial is under way.
    pub(super) fn probe_lost(&self, out: &mut Vec<Effect>) {
        for m in self.lost.keys() {
            if !self.links.contains(m)
                && self.allows_direct(m.addr)
                && !self.refused.contains(&m.addr)
            {
                out.push(Effect::Dial(m.addr));
            }
        }
    }
}
