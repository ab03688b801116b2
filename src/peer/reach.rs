//! What a peer tells its user about the part of the room it cannot reach: members with no
//! route for [`DOWN_GRACE`](super::DOWN_GRACE) (`[UNREACHABLE] bob`, and `[REACHABLE] bob` when a route comes
//! back), and a typed line that reaches nobody now. Without these a peer cut off from the
//! rest of the room looks, to its user, like a quiet room.

use super::{Effect, Member, PeerState, Status};
use std::time::Instant;

impl PeerState {
    /// Prints the members that became unreachable (no route for [`DOWN_GRACE`](super::DOWN_GRACE), the same
    /// test that makes a leader drop them) or reachable again since the last call.
    pub(super) fn show_reachability(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if !matches!(self.status, Status::Joined | Status::Leaving { .. }) {
            return;
        }
        self.refresh_routes(now);
        let list = &self.list;
        // A member no longer on the list is reported by `[LEAVE]`; forget it quietly.
        self.unreachable_shown.retain(|m| list.contains(m));
        let mut lost = Vec::new();
        let mut back = Vec::new();
        for m in &self.list.members {
            let down = *m != self.me && self.is_down(m, now);
            if down && !self.unreachable_shown.contains(m) {
                lost.push(m.clone());
            } else if !down && self.unreachable_shown.contains(m) {
                back.push(m.clone());
            }
        }
        for m in lost {
            out.push(Effect::Print(format!("[UNREACHABLE] {}", m.name)));
            self.unreachable_shown.insert(m);
        }
        for m in back {
            out.push(Effect::Print(format!("[REACHABLE] {}", m.name)));
            self.unreachable_shown.remove(&m);
        }
    }

    /// Tells the user when a line typed now reaches nobody: nobody else is on the list,
    /// or no member on it has a route from here. (Such a line is still held and resent to
    /// members that become reachable before they are dropped.)
    pub(super) fn show_unsent(&mut self, dests: &[Member], now: Instant, out: &mut Vec<Effect>) {
        if dests.is_empty() {
            out.push(Effect::Print(
                "[NOT SENT] nobody else is in the room".to_owned(),
            ));
            return;
        }
        let reachable = |node: &mut PeerState, d: &Member| node.next_hop(d, now).is_some();
        if !dests.iter().any(|d| reachable(self, d)) {
            let names: Vec<&str> = dests.iter().map(|m| m.name.as_str()).collect();
            out.push(Effect::Print(format!(
                "[NOT SENT] no route to {} now; resent if one comes back before it is dropped",
                names.join(",")
            )));
        }
    }
}
