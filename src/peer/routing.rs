//! Link-state routing: every peer's advertised direct links, and the next hop towards each
//! reachable peer by breadth-first search. Pure, and generic over what names a node.
//!
//! Rules:
//! - An advert replaces the one held for its owner only when its sequence number is higher,
//!   so a flood that arrives twice, or late, changes nothing.
//! - An edge between two other nodes counts only when **both** adverts list it. A dead peer
//!   cannot withdraw its own advert, but its neighbours withdraw theirs, and that is enough
//!   to cut it off. The searching node's own edges are its live links, known first hand.
//! - The search visits neighbours in ascending order, so among shortest paths the one
//!   through the smallest first hop is chosen, the same way every time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One node's advertised links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert<N> {
    /// The advert's sequence number; higher replaces lower.
    pub seq: u64,
    /// The nodes the owner has a live link to.
    pub links: BTreeSet<N>,
}

/// The adverts a node has collected from the others.
#[derive(Debug, Clone)]
pub struct Topology<N> {
    adverts: BTreeMap<N, Advert<N>>,
}

impl<N> Default for Topology<N> {
    fn default() -> Self {
        Topology {
            adverts: BTreeMap::new(),
        }
    }
}

impl<N: Ord + Clone> Topology<N> {
    /// An empty topology.
    pub fn new() -> Self {
        Topology::default()
    }

    /// Records `owner`'s advert if it is newer than the one held; returns whether it was
    /// (and so whether it should be passed on).
    pub fn advertise(&mut self, owner: N, seq: u64, links: BTreeSet<N>) -> bool {
        if self.adverts.get(&owner).is_some_and(|a| a.seq >= seq) {
            return false;
        }
        self.adverts.insert(owner, Advert { seq, links });
        true
    }

    /// Forgets `owner`'s advert (it left the room).
    pub fn remove(&mut self, owner: &N) {
        self.adverts.remove(owner);
    }

    /// Every advert held, by owner.
    pub fn adverts(&self) -> impl Iterator<Item = (&N, &Advert<N>)> {
        self.adverts.iter()
    }

    /// For every node reachable from `me`, the neighbour of `me` to hand a message to:
    /// breadth-first search over `my_links` and the edges both ends advertise.
    pub fn next_hops(&self, me: &N, my_links: &BTreeSet<N>) -> BTreeMap<N, N> {
        let mut hops: BTreeMap<N, N> = BTreeMap::new();
        let mut queue = VecDeque::new();
        for n in my_links.iter().filter(|n| *n != me) {
            hops.insert(n.clone(), n.clone());
            queue.push_back(n.clone());
        }
        while let Some(u) = queue.pop_front() {
            let Some(advert) = self.adverts.get(&u) else {
                continue;
            };
            let first = hops[&u].clone();
            for v in &advert.links {
                if v == me || hops.contains_key(v) || !self.lists(v, &u) {
                    continue;
                }
                hops.insert(v.clone(), first.clone());
                queue.push_back(v.clone());
            }
        }
        hops
    }

    /// Whether `owner`'s advert lists `other`.
    fn lists(&self, owner: &N, other: &N) -> bool {
        self.adverts
            .get(owner)
            .is_some_and(|a| a.links.contains(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nodes: &str) -> BTreeSet<char> {
        nodes.chars().collect()
    }

    /// A topology from `(owner, links)` pairs, all at sequence 1.
    fn topo(adverts: &[(char, &str)]) -> Topology<char> {
        let mut t = Topology::new();
        for &(owner, links) in adverts {
            assert!(t.advertise(owner, 1, set(links)));
        }
        t
    }

    fn hops(t: &Topology<char>, me: char, links: &str) -> String {
        t.next_hops(&me, &set(links))
            .into_iter()
            .map(|(dest, hop)| format!("{dest}{hop}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_line_is_routed_through_its_middle() {
        // a - b - c - d
        let t = topo(&[('b', "ac"), ('c', "bd"), ('d', "c")]);
        assert_eq!(hops(&t, 'a', "b"), "bb cb db");
    }

    #[test]
    fn the_shortest_path_wins_and_ties_go_to_the_smallest_first_hop() {
        // x - m - y, x - n - y, and a long way round x - p - q - y.
        let t = topo(&[
            ('m', "xy"),
            ('n', "xy"),
            ('p', "xq"),
            ('q', "py"),
            ('y', "mnq"),
        ]);
        assert_eq!(hops(&t, 'x', "pnm"), "mm nn pp qp ym");
        // Without m, the tie between n and the long way is no tie.
        assert_eq!(hops(&t, 'x', "pn"), "mn nn pp qp yn");
    }

    #[test]
    fn disconnected_parts_are_unreachable() {
        // a - b    c - d
        let t = topo(&[('b', "a"), ('c', "d"), ('d', "c")]);
        assert_eq!(hops(&t, 'a', "b"), "bb");
        assert_eq!(hops(&t, 'a', ""), "");
        assert_eq!(hops(&t, 'c', "d"), "dd");
    }

    #[test]
    fn an_edge_counts_only_when_both_ends_advertise_it() {
        // c died: its stale advert still claims b, but b has withdrawn it.
        let t = topo(&[('b', "a"), ('c', "bd"), ('d', "c")]);
        assert_eq!(hops(&t, 'a', "b"), "bb");
        // Nor does a node that has advertised nothing yet lead anywhere.
        let t = topo(&[('c', "bd"), ('d', "c")]);
        assert_eq!(hops(&t, 'a', "b"), "bb");
    }

    #[test]
    fn only_newer_adverts_replace_older_ones() {
        let mut t = topo(&[('b', "ac")]);
        assert!(!t.advertise('b', 1, set("")));
        assert!(t.advertise('b', 2, set("a")));
        assert!(!t.advertise('b', 1, set("ac")));
        assert_eq!(t.adverts().next().unwrap().1.links, set("a"));
        t.remove(&'b');
        assert_eq!(t.adverts().count(), 0);
        assert!(t.advertise('b', 1, set("a")));
    }

    #[test]
    fn my_own_links_need_no_advert() {
        let t = Topology::<char>::new();
        assert_eq!(hops(&t, 'a', "bca"), "bb cc");
    }
}
