//! The deterministic simulator of a room of [`PeerState`]s (links, losses, crashes, time) and
//! the node's tests that run on it; kept apart from `node.rs` so each file reads in one sitting.

use super::*;
use std::collections::BTreeMap;

/// A room of nodes on a simulated network: links are pairs of names, messages wait on
/// a FIFO wire, time moves only when told to.
struct Sim {
    now: Instant,
    nodes: BTreeMap<String, PeerState>,
    members: BTreeMap<String, Member>,
    links: BTreeSet<(String, String)>,
    dead: BTreeSet<String>,
    wire: VecDeque<(String, String, PeerMessage)>,
    printed: BTreeMap<String, Vec<String>>,
    finished: BTreeMap<String, Outcome>,
    /// Lose one in n chat messages put on the wire (which ones, a fixed scramble decides).
    lose_every: Option<usize>,
    msgs_seen: usize,
    /// A network split: these nodes on one side, the rest on the other; no link, no
    /// dial and no message crosses it.
    side: Option<BTreeSet<String>>,
    /// One-way cuts: what the first node of a pair sends the second is lost, the other way
    /// flows. No dial between them succeeds (a connect needs both ways); links between
    /// them stay up at both ends until the receiving end's link timeout (`cut_timeout`,
    /// in ticks) takes them down, and the sender hears the close.
    one_way: BTreeSet<(String, String)>,
    cut_timeout: Option<u64>,
}

impl Sim {
    fn new() -> Sim {
        Sim {
            now: Instant::now(),
            nodes: BTreeMap::new(),
            members: BTreeMap::new(),
            links: BTreeSet::new(),
            dead: BTreeSet::new(),
            wire: VecDeque::new(),
            printed: BTreeMap::new(),
            finished: BTreeMap::new(),
            lose_every: None,
            msgs_seen: 0,
            side: None,
            one_way: BTreeSet::new(),
            cut_timeout: None,
        }
    }

    /// Whether the split, if any, runs between nodes `a` and `b`, or a one-way cut.
    fn crosses(&self, a: &str, b: &str) -> bool {
        let pair = |x: &str, y: &str| (x.to_owned(), y.to_owned());
        self.side
            .as_ref()
            .is_some_and(|side| side.contains(a) != side.contains(b))
            || self.one_way.contains(&pair(a, b))
            || self.one_way.contains(&pair(b, a))
    }

    /// Cuts one way: what each node of `from` sends each node of `to` is lost. After
    /// `timeout` ticks (the receivers' link timeout) the links across go down at both ends.
    fn cut_one_way(&mut self, from: &[&str], to: &[&str], timeout: u64) {
        for a in from {
            for b in to {
                self.one_way.insert(((*a).to_owned(), (*b).to_owned()));
            }
        }
        self.cut_timeout = Some(timeout);
    }

    /// Takes the links across a split or a cut down at both ends, as a link timeout would.
    fn cut_links(&mut self) {
        let cut: Vec<(String, String)> = self
            .links
            .iter()
            .filter(|(a, b)| self.crosses(a, b))
            .cloned()
            .collect();
        for (a, b) in cut {
            self.links.remove(&(a.clone(), b.clone()));
            let gone = self.members[&b].clone();
            let mut out = Vec::new();
            self.nodes.get_mut(&a).unwrap().link_down(&gone, &mut out);
            self.apply(&a, out);
        }
    }

    /// Splits the network: `side` from everyone else. Links across it go down at both
    /// ends (as a link timeout would take them down), messages on them are lost.
    fn partition(&mut self, side: &[&str]) {
        self.side = Some(side.iter().map(|s| (*s).to_owned()).collect());
        self.cut_links();
        self.run();
    }

    /// The network is whole again: dials across the old split or cuts succeed.
    fn heal(&mut self) {
        self.side = None;
        self.one_way.clear();
        self.cut_timeout = None;
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.members[name].addr
    }

    fn add(&mut self, name: &str, via: Option<&str>, no_direct: &[&str]) {
        let port = 4000 + self.members.len() as u16;
        let me = Member {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            inc: 1,
        };
        self.spawn(name, me, via, no_direct);
    }

    /// Starts node `key` as `me` (whose name may differ from the key).
    fn spawn(&mut self, key: &str, me: Member, via: Option<&str>, no_direct: &[&str]) {
        self.members.insert(key.into(), me.clone());
        self.dead.remove(key);
        let via = via.map(|v| self.addr(v));
        let no_direct = no_direct.iter().map(|n| self.addr(n)).collect();
        let mut out = Vec::new();
        let node = PeerState::new(me, via, no_direct, self.now, &mut out);
        self.nodes.insert(key.into(), node);
        self.apply(key, out);
    }

    fn apply(&mut self, who: &str, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(to, msg) => {
                    if let PeerMessage::Route {
                        body: Body::Msg { .. },
                        ..
                    } = msg
                    {
                        self.msgs_seen += 1;
                        // Scrambled, so that a loss never lines up with the period of
                        // the resends (every n-th exactly would lose the same resend for
                        // ever once n messages go round each second).
                        let scrambled = (self.msgs_seen as u64)
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            .rotate_left(29);
                        if self
                            .lose_every
                            .is_some_and(|n| scrambled.is_multiple_of(n as u64))
                        {
                            continue;
                        }
                    }
                    let to = self.members.iter().find(|(_, m)| **m == to);
                    if let Some((key, _)) = to {
                        if self.links.contains(&(who.into(), key.clone())) {
                            self.wire.push_back((who.into(), key.clone(), msg));
                        }
                    }
                }
                Effect::Print(line) => self.printed.entry(who.into()).or_default().push(line),
                Effect::Dial(addr) => self.dial(who, addr),
                Effect::Joined => {}
                Effect::Finish(outcome) => {
                    self.finished.insert(who.into(), outcome);
                }
            }
        }
    }

    fn dial(&mut self, who: &str, addr: SocketAddr) {
        let Some((key, target)) = self
            .members
            .iter()
            .find(|(k, m)| m.addr == addr && !self.dead.contains(*k))
            .map(|(k, m)| (k.clone(), m.clone()))
        else {
            return;
        };
        let pair = (who.to_owned(), key.clone());
        if self.links.contains(&pair) || self.crosses(who, &key) {
            return;
        }
        // Both ends check the other's room in its hello.
        let (mine, theirs) = (self.nodes[who].room(), self.nodes[&key].room());
        if !self.nodes[who].same_room(theirs) || !self.nodes[&key].same_room(mine) {
            self.nodes.get_mut(who).unwrap().other_room(addr);
            return;
        }
        let me = self.members[who].clone();
        if !self.nodes[&key].allows_direct(me.addr) {
            self.nodes.get_mut(who).unwrap().direct_refused(addr);
            return;
        }
        self.links.insert(pair);
        self.links.insert((key.clone(), who.to_owned()));
        let mut out = Vec::new();
        self.nodes.get_mut(who).unwrap().link_up(target, &mut out);
        self.apply(who, out);
        let mut out = Vec::new();
        self.nodes.get_mut(&key).unwrap().link_up(me, &mut out);
        self.apply(&key, out);
    }

    /// Delivers everything on the wire, and whatever that sends in turn.
    fn run(&mut self) {
        let mut steps = 0;
        while let Some((from, to, msg)) = self.wire.pop_front() {
            steps += 1;
            assert!(steps < 1_000_000, "messages never stop");
            let pair = (from.clone(), to.clone());
            if self.dead.contains(&to)
                || !self.links.contains(&pair)
                || self.one_way.contains(&pair)
            {
                continue;
            }
            let from = self.members[&from].clone();
            let mut out = Vec::new();
            let node = self.nodes.get_mut(&to).unwrap();
            node.receive(&from, msg, self.now, &mut out);
            self.apply(&to, out);
        }
    }

    fn tick(&mut self) {
        self.now += Duration::from_millis(100);
        if let Some(left) = &mut self.cut_timeout {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.cut_links();
                self.run();
            }
        }
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in &names {
            if self.dead.contains(name) {
                continue;
            }
            let mut out = Vec::new();
            self.nodes.get_mut(name).unwrap().tick(self.now, &mut out);
            self.apply(name, out);
            self.run();
        }
    }

    fn run_for(&mut self, secs: u64) {
        self.run();
        for _ in 0..secs * 10 {
            self.tick();
        }
    }

    fn kill(&mut self, name: &str) {
        self.dead.insert(name.into());
        let gone = self.members[name].clone();
        let neighbours: Vec<String> = self
            .links
            .iter()
            .filter(|(a, _)| a == name)
            .map(|(_, b)| b.clone())
            .collect();
        self.links.retain(|(a, b)| a != name && b != name);
        for n in neighbours {
            let mut out = Vec::new();
            self.nodes.get_mut(&n).unwrap().link_down(&gone, &mut out);
            self.apply(&n, out);
        }
        self.run();
    }

    fn say(&mut self, who: &str, text: &str) {
        let mut out = Vec::new();
        let node = self.nodes.get_mut(who).unwrap();
        node.say(text, self.now, &mut out).unwrap();
        self.apply(who, out);
    }

    fn leave(&mut self, who: &str) {
        let mut out = Vec::new();
        self.nodes.get_mut(who).unwrap().leave(self.now, &mut out);
        self.apply(who, out);
        self.run();
    }

    fn list(&self, who: &str) -> String {
        self.nodes[who].members().summary()
    }

    /// Asserts every live node holds the list of exactly `names`, and returns it.
    fn agreed(&self, names: &str) -> String {
        let lists: BTreeSet<String> = self
            .nodes
            .keys()
            .filter(|n| !self.dead.contains(*n) && !self.finished.contains_key(*n))
            .map(|n| self.list(n))
            .collect();
        assert_eq!(lists.len(), 1, "lists differ: {lists:?}");
        let list = lists.into_iter().next().unwrap();
        assert!(list.ends_with(&format!("] {names}")), "{list}");
        list
    }

    fn heard(&self, who: &str, from: &str) -> Vec<String> {
        let prefix = format!("[{from}] ");
        self.printed[who]
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    fn linked(&self, a: &str, b: &str) -> bool {
        self.links.contains(&(a.into(), b.into()))
    }
}

/// a founds the room, b and c join through a.
fn room_of_three() -> Sim {
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    sim.add("b", Some("a"), &[]);
    sim.add("c", Some("a"), &[]);
    sim.run_for(1);
    sim.agreed("a,b,c");
    sim
}

#[test]
fn a_founder_is_alone_at_version_one() {
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    assert_eq!(sim.printed["a"], ["[MEMBERS v1 by a] a"]);
    sim.run_for(1);
    assert_eq!(sim.printed["a"].len(), 1);
}

#[test]
fn concurrent_joins_through_different_members_end_with_one_list() {
    let mut sim = room_of_three();
    for (name, via) in [("d", "a"), ("e", "b"), ("f", "c"), ("g", "b"), ("h", "c")] {
        sim.add(name, Some(via), &[]);
    }
    sim.run_for(2);
    assert_eq!(
        sim.agreed("a,b,c,d,e,f,g,h"),
        "[MEMBERS v8 by a] a,b,c,d,e,f,g,h"
    );
    // Everyone linked to everyone, one link per pair.
    assert_eq!(sim.links.len(), 8 * 7);
    // Old members announce each newcomer once; a newcomer prints only the list.
    let joins = |who: &str| {
        sim.printed[who]
            .iter()
            .filter(|l| l.starts_with("[JOIN]"))
            .count()
    };
    assert_eq!(joins("a"), 7);
    assert_eq!(joins("h"), 0);
    assert_eq!(sim.printed["h"][0], sim.list("h"));
}

#[test]
fn lines_arrive_once_and_in_order_despite_losses() {
    let mut sim = room_of_three();
    sim.lose_every = Some(3);
    for i in 0..30 {
        for who in ["a", "b", "c"] {
            sim.say(who, &format!("{who}{i}"));
        }
        sim.run();
    }
    sim.run_for(5);
    for who in ["a", "b", "c"] {
        for from in ["a", "b", "c"] {
            let want: Vec<String> = if who == from {
                vec![]
            } else {
                (0..30).map(|i| format!("{from}{i}")).collect()
            };
            assert_eq!(sim.heard(who, from), want, "{who} hearing {from}");
        }
    }
    // Everything was acknowledged in the end: nothing is resent any more.
    let sent = sim.msgs_seen;
    sim.run_for(2);
    assert_eq!(sim.msgs_seen, sent);
}

#[test]
fn joiners_joining_through_each_other_still_reach_the_room() {
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    sim.add("b", Some("a"), &[]);
    sim.add("c", Some("b"), &[]);
    // c's first tick comes first and links it to b before b has dialled a.
    sim.now += Duration::from_millis(100);
    let mut out = Vec::new();
    sim.nodes.get_mut("c").unwrap().tick(sim.now, &mut out);
    sim.apply("c", out);
    sim.run();
    assert!(sim.linked("b", "c") && !sim.linked("b", "a"));
    sim.run_for(2);
    sim.agreed("a,b,c");
}

#[test]
fn a_forbidden_link_is_routed_around() {
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    sim.add("b", Some("a"), &[]);
    sim.run_for(1);
    sim.add("c", Some("a"), &["b"]);
    sim.run_for(1);
    sim.agreed("a,b,c");
    assert!(!sim.linked("b", "c") && sim.linked("a", "c") && sim.linked("a", "b"));
    sim.say("b", "via a");
    sim.say("c", "back via a");
    sim.run();
    assert_eq!(sim.heard("c", "b"), ["via a"]);
    assert_eq!(sim.heard("b", "c"), ["back via a"]);
}

#[test]
fn a_joiner_forbidden_to_reach_the_leader_joins_through_a_member() {
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    sim.add("m", Some("a"), &[]);
    sim.run_for(1);
    sim.add("x", Some("m"), &["a"]);
    sim.run_for(1);
    sim.agreed("a,m,x");
    assert!(!sim.linked("x", "a"));
}

#[test]
fn a_dead_leader_is_replaced_by_the_next_smallest_who_admits_joins() {
    let mut sim = room_of_three();
    sim.add("d", Some("b"), &[]);
    sim.run_for(1);
    sim.kill("a");
    // Within the grace period nobody acts.
    sim.tick();
    sim.agreed("a,b,c,d");
    sim.run_for(2);
    assert_eq!(sim.agreed("b,c,d"), "[MEMBERS v5 by b] b,c,d");
    assert!(sim.printed["c"].contains(&"[LEAVE] a".to_owned()));
    sim.add("e", Some("d"), &[]);
    sim.run_for(1);
    sim.agreed("b,c,d,e");
    sim.say("e", "hi");
    sim.run();
    assert_eq!(sim.heard("b", "e"), ["hi"]);
}

#[test]
fn a_dead_router_is_routed_around_and_its_lost_lines_resent() {
    // x and y may not link to each other nor to a; m and n both connect them.
    let mut sim = Sim::new();
    sim.add("a", None, &[]);
    sim.add("m", Some("a"), &[]);
    sim.add("n", Some("a"), &[]);
    sim.run_for(1);
    sim.add("x", Some("m"), &["a"]);
    sim.run_for(1);
    sim.add("y", Some("n"), &["a", "x"]);
    sim.run_for(1);
    sim.agreed("a,m,n,x,y");
    sim.say("x", "one");
    sim.run();
    assert_eq!(sim.heard("y", "x"), ["one"]);
    // "two" goes to m (the smallest first hop) and dies there with it.
    sim.say("x", "two");
    sim.kill("m");
    assert_eq!(sim.heard("y", "x"), ["one"]);
    sim.say("x", "three");
    sim.run();
    assert_eq!(sim.heard("y", "x"), ["one"], "three waits for two");
    sim.run_for(2);
    assert_eq!(sim.heard("y", "x"), ["one", "two", "three"]);
    sim.agreed("a,n,x,y");
}

#[test]
fn a_taken_name_is_refused() {
    let mut sim = room_of_three();
    let twin = Member {
        name: "b".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
        inc: 1,
    };
    sim.spawn("twin", twin, Some("c"), &[]);
    sim.run_for(1);
    assert_eq!(
        sim.finished.get("twin"),
        Some(&Outcome::Refused("name_taken".into()))
    );
    sim.agreed("a,b,c");
    assert!(!sim.printed.contains_key("twin"));
}

#[test]
fn a_restart_at_the_same_address_replaces_the_old_run() {
    let mut sim = room_of_three();
    sim.kill("c");
    let mut again = sim.members["c"].clone();
    again.inc = 2;
    sim.spawn("c", again.clone(), Some("b"), &[]);
    // Well within the grace period: the leader replaces c instead of dropping it.
    for _ in 0..3 {
        sim.tick();
    }
    assert_eq!(sim.agreed("a,b,c"), "[MEMBERS v4 by a] a,b,c");
    assert!(sim.nodes["a"].members().contains(&again));
    assert!(sim.printed["a"].ends_with(&[
        "[JOIN] c".into(),
        "[LEAVE] c".into(),
        "[MEMBERS v4 by a] a,b,c".into()
    ]));
}

#[test]
fn leaving_members_and_a_leaving_leader() {
    let mut sim = room_of_three();
    // b's last line is acknowledged by everyone before b asks to be dropped.
    sim.say("b", "bye");
    sim.leave("b");
    assert_eq!(sim.heard("c", "b"), ["bye"]);
    assert_eq!(sim.finished.get("b"), Some(&Outcome::Left));
    sim.kill("b");
    sim.agreed("a,c");
    sim.leave("a");
    assert_eq!(sim.finished.get("a"), Some(&Outcome::Left));
    sim.kill("a");
    assert_eq!(sim.list("c"), "[MEMBERS v5 by a] c");
    assert!(sim.printed["c"].ends_with(&["[LEAVE] a".into(), "[MEMBERS v5 by a] c".into()]));
    sim.run_for(2);
    assert!(!sim.finished.contains_key("c"));
}

#[test]
fn a_member_dropped_while_alive_asks_to_be_merged_back_instead_of_exiting() {
    let mut sim = room_of_three();
    let mut out = Vec::new();
    let [a, b] = ["a", "b"].map(|n| sim.members[n].clone());
    let list = MemberList::new(9, vec![a.clone(), b]).issued_by(a.clone());
    let node = sim.nodes.get_mut("c").unwrap();
    let held = node.members().clone();
    node.receive(&a, PeerMessage::Members(list), sim.now, &mut out);
    assert_eq!(node.members(), &held, "c keeps its list");
    assert!(
        !out.iter().any(|e| matches!(e, Effect::Finish(_))),
        "{out:?}"
    );
    let asks = |e: &Effect| {
        matches!(e, Effect::Send(to, PeerMessage::Route { body: Body::Merge(l), .. })
            if *to == a && *l == held)
    };
    assert!(out.iter().any(asks), "{out:?}");
}

#[test]
fn a_leader_dying_as_it_admits_leaves_no_split_room() {
    let mut sim = room_of_three();
    sim.add("d", Some("a"), &[]);
    let tick_d = |sim: &mut Sim| {
        sim.now += Duration::from_millis(100);
        let mut out = Vec::new();
        sim.nodes.get_mut("d").unwrap().tick(sim.now, &mut out);
        sim.apply("d", out);
        sim.run();
    };
    tick_d(&mut sim);
    // While b and c are out of reach, d fails to dial them and a admits d: a's new
    // list reaches d alone, and a dies.
    sim.dead.extend(["b".to_owned(), "c".to_owned()]);
    tick_d(&mut sim);
    assert_eq!(sim.list("d"), "[MEMBERS v4 by a] a,b,c,d");
    sim.dead.clear();
    sim.kill("a");
    assert_eq!(sim.list("b"), "[MEMBERS v3 by a] a,b,c");
    // b and c never heard of d, and d is larger than both: d dials them all the same.
    sim.run_for(3);
    sim.agreed("b,c,d");
}

/// A node that holds `list` (itself included), with links to none of them.
fn member_of(me: &Member, list: &[Member]) -> PeerState {
    let mut out = Vec::new();
    let via = list.iter().find(|m| *m != me).unwrap();
    let now = Instant::now();
    let mut node = PeerState::new(me.clone(), Some(via.addr), vec![], now, &mut out);
    let list = MemberList::new(2, list.to_vec());
    node.receive(via, PeerMessage::Members(list), now, &mut out);
    assert_eq!(node.status, Status::Joined);
    node
}

fn member(name: &str, port: u16) -> Member {
    Member {
        name: name.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        inc: 1,
    }
}

#[test]
fn adverts_of_strangers_are_bounded_and_expire() {
    let (me, other) = (member("a", 1), member("b", 2));
    let mut node = member_of(&me, &[me.clone(), other.clone()]);
    let now = Instant::now();
    let mut out = Vec::new();
    for i in 0..MAX_STRANGERS + 50 {
        let owner = member(&format!("fake{i}"), 10_000 + i as u16);
        let msg = PeerMessage::Links {
            owner,
            seq: 1,
            links: vec![other.clone()],
        };
        node.receive(&other, msg, now, &mut out);
    }
    let held = || node.topology.adverts().count();
    assert_eq!(held(), MAX_STRANGERS);
    // A member's advert is always taken.
    let msg = PeerMessage::Links {
        owner: other.clone(),
        seq: 1,
        links: vec![me.clone()],
    };
    node.receive(&other, msg, now, &mut out);
    assert_eq!(node.topology.adverts().count(), MAX_STRANGERS + 1);
    node.tick(now + STRANGER_KEEP, &mut out);
    assert_eq!(node.topology.adverts().count(), 1);
    assert!(node.strangers.is_empty());
}

#[test]
fn lines_held_for_a_gap_are_bounded_in_bytes_and_none_is_lost() {
    let me = member("a", 1);
    let senders = [member("b", 2), member("c", 3)];
    let mut list = senders.to_vec();
    list.push(me.clone());
    let mut node = member_of(&me, &list);
    let now = Instant::now();
    let text = |seq: u64| format!("{seq:>width$}", width = crate::peer::MAX_TEXT);
    let mut out = Vec::new();
    // Two senders (one may forge the other) each send a full window past a gap.
    for from in &senders {
        for seq in 2..=WINDOW as u64 {
            node.handle(
                from.clone(),
                Body::Msg {
                    seq,
                    text: text(seq),
                },
                now,
                &mut out,
            );
        }
    }
    let held: usize = node
        .incoming
        .values()
        .flat_map(|s| s.early.values())
        .map(String::len)
        .sum();
    assert_eq!(held, node.early_bytes);
    assert!(held <= EARLY_BYTES, "{held} bytes held");
    // Filling the gap prints what was held; the rest comes when its sender resends.
    for from in &senders {
        out.clear();
        node.handle(
            from.clone(),
            Body::Msg {
                seq: 1,
                text: text(1),
            },
            now,
            &mut out,
        );
        let printed = out.iter().filter(|e| matches!(e, Effect::Print(_))).count();
        for seq in printed as u64 + 1..=WINDOW as u64 {
            node.handle(
                from.clone(),
                Body::Msg {
                    seq,
                    text: text(seq),
                },
                now,
                &mut out,
            );
        }
        assert_eq!(node.incoming[from].expected, WINDOW as u64 + 1);
    }
    assert_eq!(node.early_bytes, 0);
}

#[test]
fn resends_after_an_outage_come_in_bounded_bursts() {
    let me = member("a", 1);
    let others = [member("b", 2), member("c", 3), member("d", 4)];
    let mut list = others.to_vec();
    list.push(me.clone());
    let mut node = member_of(&me, &list);
    let mut now = Instant::now();
    let mut out = Vec::new();
    for m in &others {
        node.link_up(m.clone(), &mut out);
    }
    for i in 0..WINDOW {
        node.say(&format!("line {i}"), now, &mut out).unwrap();
    }
    let msgs = |out: &[Effect]| {
        out.iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Send(
                        _,
                        PeerMessage::Route {
                            body: Body::Msg { .. },
                            ..
                        }
                    )
                )
            })
            .count()
    };
    let mut resent = 0;
    now += RETRANSMIT;
    while resent < others.len() * WINDOW {
        out.clear();
        node.tick(now, &mut out);
        assert!(
            (1..=RESEND_BURST).contains(&msgs(&out)),
            "{} at once",
            msgs(&out)
        );
        resent += msgs(&out);
        now += Duration::from_millis(100);
    }
    assert_eq!(resent, others.len() * WINDOW);
}

#[test]
fn a_leader_refuses_a_joiner_past_the_largest_room() {
    let me = member("a", 1);
    let mut list: Vec<Member> = (1..MAX_MEMBERS)
        .map(|i| member(&format!("m{i:03}"), 1 + i as u16))
        .collect();
    list.push(me.clone());
    let mut node = member_of(&me, &list);
    let now = Instant::now();
    let joiner = member("z", 9999);
    let mut out = Vec::new();
    node.link_up(joiner.clone(), &mut out);
    out.clear();
    node.handle(joiner.clone(), Body::JoinReq, now, &mut out);
    assert_eq!(node.members().members.len(), MAX_MEMBERS);
    let refused = |e: &Effect| match e {
        Effect::Send(to, PeerMessage::Route { body, .. }) => {
            *to == joiner && *body == Body::JoinRefused("room_full".into())
        }
        _ => false,
    };
    assert!(out.iter().any(refused), "{out:?}");
    // A restart of a member replaces it even in a full room.
    let mut again = list[0].clone();
    again.inc = 2;
    node.handle(again.clone(), Body::JoinReq, now, &mut out);
    assert!(node.members().contains(&again));
}

#[test]
fn a_forged_hop_count_is_clamped() {
    let (me, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let mut node = member_of(&me, &[me.clone(), b.clone(), c.clone()]);
    let mut out = Vec::new();
    node.link_up(c.clone(), &mut out);
    out.clear();
    let msg = PeerMessage::Route {
        from: b.clone(),
        to: c.clone(),
        hops: i64::MAX as u64,
        body: Body::WhoLeads,
    };
    node.receive(&b, msg, Instant::now(), &mut out);
    let [Effect::Send(to, PeerMessage::Route { hops, .. })] = &out[..] else {
        panic!("not forwarded: {out:?}");
    };
    assert_eq!((to, *hops), (&c, MAX_HOPS - 1));
}

#[test]
fn rival_lists_of_one_version_settle_on_the_smaller() {
    let mut sim = room_of_three();
    let [a, b, c] = ["a", "b", "c"].map(|n| sim.members[n].clone());
    let mut out = Vec::new();
    // As if b had wrongly taken over while a admitted someone: both issue v4.
    let from_b = MemberList::new(4, vec![b.clone(), c.clone()]).of_room(a.clone());
    let from_a = MemberList::new(4, vec![a.clone(), b.clone(), c.clone()]).of_room(a.clone());
    let node = sim.nodes.get_mut("c").unwrap();
    node.receive(&b, PeerMessage::Members(from_b.clone()), sim.now, &mut out);
    assert_eq!(node.members(), &from_b);
    node.receive(&a, PeerMessage::Members(from_a.clone()), sim.now, &mut out);
    assert_eq!(node.members(), &from_a);
    node.receive(&b, PeerMessage::Members(from_b), sim.now, &mut out);
    assert_eq!(node.members(), &from_a);
}

#[path = "sim_views.rs"]
mod views;

#[path = "sim_splits.rs"]
mod splits;
