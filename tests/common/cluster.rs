//! A cluster of servers run as child processes, for the real-process tests of the
//! replicated servers (`tests/messenger.rs`, `tests/messenger_majority.rs`,
//! `tests/raft_store.rs`): fixed free ports, a data directory each, optional fault proxies
//! on every peer link and in front of every server, `kill -9` and restart. Each file says
//! how a server is started ([`Launch`]); what it asks of the servers stays in that file.
//! Included with `#[path]` next to `common`.
#![allow(dead_code)]

use crate::common::ChildServer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use switchboard::bench::free_addrs;
use switchboard::proxy::FaultProxy;

/// What server `id` is told when it starts (see [`Launch::args`]).
pub struct Spawn<'a> {
    pub id: usize,
    /// Every server's own address, by id, comma-separated.
    pub peers: String,
    /// What this server dials to reach each server: the proxy of that link if there is
    /// one, else the server's own address.
    pub dial: String,
    pub data_dir: &'a Path,
}

/// How one kind of server is started: the program, its arguments for one server, and the
/// test's extra arguments (appended).
pub struct Launch {
    pub program: &'static str,
    /// A prefix of the data directories' root, naming the test file.
    pub prefix: &'static str,
    pub args: fn(&Spawn) -> Vec<String>,
    pub extra: Vec<String>,
}

impl Launch {
    pub fn new(
        program: &'static str,
        prefix: &'static str,
        args: fn(&Spawn) -> Vec<String>,
        extra: &[&str],
    ) -> Launch {
        Launch {
            program,
            prefix,
            args,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// Which proxies a cluster has.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proxies {
    None,
    /// One [`FaultProxy`] per ordered pair of servers, on the link the first dials.
    Links,
    /// Those, and one in front of each server for clients.
    LinksAndFront,
}

impl Proxies {
    /// [`Proxies::Links`] if `proxied`, else none.
    pub fn links_if(proxied: bool) -> Proxies {
        if proxied {
            Proxies::Links
        } else {
            Proxies::None
        }
    }
}

/// Servers started as child processes on fixed free ports, with data directories that are
/// removed (and processes that are killed) when the test ends.
pub struct Cluster {
    pub addrs: Vec<SocketAddr>,
    pub servers: Vec<Option<ChildServer>>,
    /// `links[i][j]`: the proxy server `i` dials to reach server `j` (`None` on the
    /// diagonal, and without proxies).
    pub links: Vec<Vec<Option<FaultProxy>>>,
    /// `front[j]`: a way in to server `j` for clients, to cut and heal (with
    /// [`Proxies::LinksAndFront`]; else empty).
    pub front: Vec<FaultProxy>,
    pub root: PathBuf,
    launch: Launch,
}

impl Cluster {
    /// `n` servers started one after the other, each once the one before says it listens.
    pub fn launch(n: usize, name: &str, proxies: Proxies, launch: Launch) -> Cluster {
        let root = std::env::temp_dir().join(format!(
            "switchboard-{}-{}-{name}",
            launch.prefix,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let addrs = free_addrs(n).unwrap();
        let proxied = proxies != Proxies::None;
        let links = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (proxied && i != j).then(|| FaultProxy::start(addrs[j]).unwrap()))
                    .collect()
            })
            .collect();
        let front = match proxies {
            Proxies::LinksAndFront => addrs
                .iter()
                .map(|&a| FaultProxy::start(a).unwrap())
                .collect(),
            _ => Vec::new(),
        };
        let mut c = Cluster {
            servers: (0..n).map(|_| None).collect(),
            addrs,
            links,
            front,
            root,
            launch,
        };
        for id in 0..n {
            c.spawn(id);
        }
        c
    }

    /// Every server's own address, by id, comma-separated.
    pub fn peers(&self) -> String {
        let peers: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
        peers.join(",")
    }

    /// Starts server `id` (again), on its address and data directory.
    pub fn spawn(&mut self, id: usize) {
        let dial: Vec<String> = (0..self.addrs.len())
            .map(|j| match &self.links[id][j] {
                Some(proxy) => proxy.local_addr().to_string(),
                None => self.addrs[j].to_string(),
            })
            .collect();
        let (peers, dial) = (self.peers(), dial.join(","));
        let data_dir = self.root.join(format!("server{id}"));
        let spawn = Spawn {
            id,
            peers,
            dial,
            data_dir: &data_dir,
        };
        let mut args = (self.launch.args)(&spawn);
        args.extend(self.launch.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ChildServer::start(self.launch.program, &args);
        assert_eq!(server.addr, self.addrs[id]);
        self.servers[id] = Some(server);
    }

    /// Kills server `id` with SIGKILL, as a crash would.
    pub fn kill9(&mut self, id: usize) {
        self.servers[id].take().expect("running").kill9();
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to server `id`.
    pub fn signal(&self, id: usize, signal: &str) {
        let pid = self.servers[id].as_ref().unwrap().child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The extra argument after `flag`, if the test gave it.
    pub fn extra(&self, flag: &str) -> Option<&str> {
        let extra = &self.launch.extra;
        let at = extra.iter().position(|a| a == flag)?;
        extra.get(at + 1).map(String::as_str)
    }

    /// Every peer-link proxy, with the (dialler, dialled) pair it carries.
    pub fn proxies(&self) -> impl Iterator<Item = ((usize, usize), &FaultProxy)> {
        self.links.iter().enumerate().flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter_map(move |(j, p)| p.as_ref().map(|p| ((i, j), p)))
        })
    }

    /// Cuts (or heals) the links between servers `i` and `j`, both ways, without closing
    /// anything.
    pub fn cut_link(&self, i: usize, j: usize, cut: bool) {
        for (a, b) in [(i, j), (j, i)] {
            let proxy = self.links[a][b].as_ref().expect("a proxied cluster");
            set_cut(proxy, cut);
        }
    }

    /// Cuts (or heals) every link into and out of server `i`, without closing anything.
    pub fn isolate(&self, i: usize, cut: bool) {
        for ((from, to), p) in self.proxies() {
            if from == i || to == i {
                set_cut(p, cut);
            }
        }
    }

    /// What server `id` has logged so far (empty if it is not running).
    pub fn log(&self, id: usize) -> String {
        self.servers[id]
            .as_ref()
            .map_or(String::new(), ChildServer::log_text)
    }

    /// The log lines of every server, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.addrs.len())
            .map(|i| format!("--- server {i}\n{}", self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn set_cut(proxy: &FaultProxy, cut: bool) {
    if cut {
        proxy.cut();
    } else {
        proxy.heal();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.servers.iter_mut().for_each(|s| drop(s.take()));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
