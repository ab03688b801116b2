//! The measurements behind `messenger-bench`: sends per second acknowledged by a cluster of
//! `messenger-server` processes against a single server (the cost of replication), failover
//! time (from `kill -9` of the primary to the first send acknowledged by the new one), and the
//! memory an idle client costs. Servers run as child processes, so a kill is a real crash.

use super::client::{Client, ClientError};
use crate::bench::{free_addrs, process_rss_kib};
use crate::framing::{encode_frame, FrameReader, Framing};
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// A cluster of `messenger-server` child processes, killed (and their data removed) when
/// dropped.
pub struct Cluster {
    /// Server addresses, by id.
    pub addrs: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    server_bin: PathBuf,
    root: PathBuf,
    fsync: bool,
    /// `--quorum`: `primary` or `majority`.
    quorum: String,
}

impl Cluster {
    /// Starts `n` servers with data directories under `root`.
    ///
    /// # Errors
    /// When ports cannot be found or a server cannot be started.
    pub fn start(server_bin: &Path, n: usize, root: &Path, fsync: bool) -> io::Result<Cluster> {
        Cluster::start_with(server_bin, n, root, fsync, "primary")
    }

    /// As [`Cluster::start`], with `--quorum quorum` (`primary` or `majority`).
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub fn start_with(
        server_bin: &Path,
        n: usize,
        root: &Path,
        fsync: bool,
        quorum: &str,
    ) -> io::Result<Cluster> {
        let mut cluster = Cluster {
            addrs: free_addrs(n)?,
            children: (0..n).map(|_| None).collect(),
            server_bin: server_bin.to_owned(),
            root: root.to_owned(),
            fsync,
            quorum: quorum.to_owned(),
        };
        for id in 0..n {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    /// (Re)starts server `id` from its data directory.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(&mut self, id: usize) -> io::Result<()> {
        let peers: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
        std::fs::create_dir_all(&self.root)?;
        // Appended to across restarts: the last lines are this life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let mut cmd = Command::new(&self.server_bin);
        cmd.args(["--id", &id.to_string(), "--peers", &peers.join(",")])
            .args(["--quorum", &self.quorum])
            .arg("--data-dir")
            .arg(self.root.join(format!("server{id}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.fsync {
            cmd.arg("--no-fsync");
        }
        self.children[id] = Some(cmd.spawn()?);
        Ok(())
    }

    fn log_path(&self, id: usize) -> PathBuf {
        self.root.join(format!("server{id}.log"))
    }

    /// In majority mode, the server whose log says it leads ([`claimant_of_newest_epoch`]
    /// of the running servers' logs): the one a client connection of any server is
    /// served by.
    pub fn leader(&self) -> Option<usize> {
        let logs: Vec<String> = (0..self.addrs.len())
            .map(|id| std::fs::read_to_string(self.log_path(id)).unwrap_or_default())
            .collect();
        claimant_of_newest_epoch(&logs, |id| self.children[id].is_some())
    }

    /// Stops server `id` with SIGSTOP: a hung process, whose kernel still accepts
    /// connections and keeps its sockets open.
    pub fn freeze(&mut self, id: usize) {
        if let Some(c) = &self.children[id] {
            let _ = Command::new("kill")
                .args(["-STOP", &c.id().to_string()])
                .status();
        }
    }

    /// The process id of server `id`, while it runs.
    pub fn pid(&self, id: usize) -> Option<u32> {
        self.children[id].as_ref().map(Child::id)
    }

    /// Kills server `id` with SIGKILL, as a crash would.
    pub fn kill(&mut self, id: usize) {
        if let Some(mut c) = self.children[id].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the cluster acknowledges a request (a registration).
    ///
    /// # Errors
    /// When it does not within `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let mut c = Client::new(self.addrs.clone());
        c.timeout = timeout;
        c.register(&format!("probe{}", super::client::random_id() % 1_000_000))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 0..self.children.len() {
            self.kill(id);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Closed-loop load: `clients` threads, each logged in as its own user, each sending to
/// the next user and waiting for the acknowledgement before the next send. Returns the
/// sends acknowledged and the time taken.
///
/// # Errors
/// The first client error (a registration or login refused, or the cluster unavailable).
pub fn load(
    servers: &[SocketAddr],
    clients: usize,
    duration: Duration,
    tag: &str,
) -> Result<(u64, Duration), ClientError> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (servers, barrier) = (servers.to_vec(), Arc::clone(&barrier));
            let (me, to) = (format!("{tag}u{i}"), format!("{tag}u{}", (i + 1) % clients));
            thread::spawn(move || -> Result<u64, ClientError> {
                let mut c = Client::new(servers);
                let ready = c.register(&me).and_then(|()| c.login(&me).map(drop));
                barrier.wait();
                ready?;
                let deadline = Instant::now() + duration;
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    c.send(&to, &format!("message {sent} from {me}"))?;
                    sent += 1;
                    c.deliveries().try_iter().for_each(drop);
                }
                Ok(sent)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut total = 0;
    let mut first_error = None;
    for t in threads {
        match t.join().unwrap_or(Err(ClientError::Unavailable)) {
            Ok(n) => total += n,
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((total, started.elapsed())),
    }
}

/// How the primary fails in [`failover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: the process dies and its kernel closes its sockets.
    Kill,
    /// SIGSTOP: the process hangs; only silence gives it away.
    Freeze,
}

/// Sends through the cluster, makes the primary fail between two sends, and returns the
/// time from the fault to the first send acknowledged by another server.
///
/// # Errors
/// A description of what failed.
pub fn failover(cluster: &mut Cluster, tag: &str, fault: Fault) -> Result<Duration, String> {
    let mut c = Client::new(cluster.addrs.clone());
    let me = format!("{tag}f");
    c.register(&me).map_err(|e| e.to_string())?;
    c.login(&me).map_err(|e| e.to_string())?;
    // A second of sends first: a cluster in its first half second after start still
    // waits for peers it has not heard from (see the rules), which is not failover.
    let warm = Instant::now() + Duration::from_secs(1);
    for i in 0.. {
        c.send(&me, &format!("warm-up {i}"))
            .map_err(|e| e.to_string())?;
        if Instant::now() >= warm {
            break;
        }
    }
    // In majority mode every server serves (followers forward): the leader is the one
    // to fail.
    let primary = if cluster.quorum == "majority" {
        cluster.leader().ok_or("no server leads")?
    } else {
        c.server().ok_or("no server answered")?
    };
    let killed = Instant::now();
    match fault {
        Fault::Kill => cluster.kill(primary),
        Fault::Freeze => cluster.freeze(primary),
    }
    for i in 0.. {
        c.send(&me, &format!("after {i}"))
            .map_err(|e| e.to_string())?;
        if c.server() != Some(primary) {
            return Ok(killed.elapsed());
        }
    }
    unreachable!("the loop only ends by returning")
}

/// What [`hold_idle`] measured.
#[derive(Debug, Clone, Copy)]
pub struct IdleReport {
    /// Client connections held open.
    pub held: usize,
    /// The server's resident memory before they connected, KiB.
    pub rss_before_kib: Option<u64>,
    /// The server's resident memory while holding them, KiB.
    pub rss_held_kib: Option<u64>,
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib =
            |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        write!(
            f,
            "{} idle clients: server RSS {} before, {} held",
            self.held,
            mib(self.rss_before_kib),
            mib(self.rss_held_kib)
        )?;
        if let (Some(before), Some(held)) = (self.rss_before_kib, self.rss_held_kib) {
            let per = held.saturating_sub(before) as f64 / self.held.max(1) as f64;
            write!(f, " ({per:.1} KiB per client)")?;
        }
        Ok(())
    }
}

/// One search on a fresh connection, answered: the connection, to hold idle.
fn searched(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut frame = Vec::new();
    encode_frame(Framing::U32, b"\x03nobody", &mut frame).map_err(io::Error::other)?;
    (&stream).write_all(&frame)?;
    let mut reader = FrameReader::new(&stream, Framing::U32);
    match reader.read_frame() {
        Ok(Some(reply)) if reply.first() == Some(&super::protocol::status::FOUND) => {}
        other => {
            let got = other.map(|f| f.map(<[u8]>::to_vec));
            return Err(io::Error::other(format!("search answered {got:?}")));
        }
    }
    drop(reader);
    Ok(stream)
}

/// Starts one server, opens `n` client connections that each make one search and then stay
/// idle, and samples the server's resident memory before and while they are held.
///
/// # Errors
/// When the server cannot be started or a connection fails.
pub fn hold_idle(o: &BenchOptions, n: usize) -> Result<IdleReport, String> {
    let root = std::env::temp_dir().join(format!("switchboard-msgidle-{}", std::process::id()));
    let cluster = Cluster::start(&o.server_bin, 1, &root, o.fsync).map_err(|e| e.to_string())?;
    cluster
        .wait_ready(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let pid = cluster.pid(0);
    let rss_before_kib = pid.and_then(process_rss_kib);
    let held = (0..n)
        .map(|_| searched(cluster.addrs[0]))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    // Each connection has had its answer; give the threads a moment to reach their idle
    // reads before sampling (a figure, not a check: no readiness signal is needed).
    thread::sleep(Duration::from_millis(500));
    let rss_held_kib = pid.and_then(process_rss_kib);
    drop(held);
    Ok(IdleReport {
        held: n,
        rss_before_kib,
        rss_held_kib,
    })
}

/// What `messenger-bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `messenger-server` binary.
    pub server_bin: PathBuf,
    /// Client threads.
    pub clients: usize,
    /// Seconds per load run.
    pub secs: f64,
    /// Runs per figure (the median is reported).
    pub runs: usize,
    /// Servers fsync their logs.
    pub fsync: bool,
    /// `--quorum` of the servers: `primary` (1 and 3 servers compared) or `majority` (3
    /// servers only: Raft needs 3 or 5).
    pub quorum: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Majority mode: sends/s of clients that know only the leader against clients that know
/// only a follower (served by forwarding), in one cluster, the two alternating run by run
/// so a change of machine load hits both.
fn through_a_follower(o: &BenchOptions, root: &Path, duration: Duration) -> Result<(), String> {
    let cluster = Cluster::start_with(&o.server_bin, 3, &root.join("forward"), o.fsync, "majority")
        .map_err(|e| e.to_string())?;
    cluster
        .wait_ready(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let leader = cluster.leader().ok_or("no server leads")?;
    let follower = (leader + 1) % 3;
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    for run in 0..o.runs {
        for (to, rates, way) in [(leader, &mut direct, "l"), (follower, &mut forwarded, "f")] {
            let (sent, took) = load(
                &[cluster.addrs[to]],
                o.clients,
                duration,
                &format!("{way}{run}"),
            )
            .map_err(|e| e.to_string())?;
            rates.push(sent as f64 / took.as_secs_f64());
        }
    }
    if cluster.leader() != Some(leader) {
        return Err("the leader changed during the runs; try again".into());
    }
    let (d, f) = (median(direct.clone()), median(forwarded.clone()));
    let round = |v: &[f64]| v.iter().map(|r| r.round()).collect::<Vec<_>>();
    println!(
        "3 servers, --quorum majority, {} clients: {d:.0} acknowledged sends/s through the \
         leader (median of {:?}), {f:.0} through a follower, forwarded (median of {:?}): \
         {:.0}%",
        o.clients,
        round(&direct),
        round(&forwarded),
        100.0 * f / d
    );
    Ok(())
}

/// Runs the throughput comparison and the failover measurement, printing each figure.
///
/// # Errors
/// When a cluster cannot be started or a measurement fails.
pub fn run(o: &BenchOptions) -> Result<(), String> {
    let root = std::env::temp_dir().join(format!("switchboard-msgbench-{}", std::process::id()));
    let duration = Duration::from_secs_f64(o.secs);
    let fsync = if o.fsync { "fsync" } else { "no fsync" };
    let mut per_sec = Vec::new();
    let sizes: &[usize] = if o.quorum == "majority" {
        &[3]
    } else {
        &[1, 3]
    };
    for &n in sizes {
        let mut rates = Vec::new();
        for run in 0..o.runs {
            let dir = root.join(format!("load-{n}-{run}"));
            let cluster = Cluster::start_with(&o.server_bin, n, &dir, o.fsync, &o.quorum)
                .map_err(|e| e.to_string())?;
            cluster
                .wait_ready(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let (sent, took) = load(&cluster.addrs, o.clients, duration, &format!("r{run}"))
                .map_err(|e| e.to_string())?;
            rates.push(sent as f64 / took.as_secs_f64());
        }
        let m = median(rates.clone());
        println!(
            "{n} server(s), --quorum {}, {} clients, {fsync}: {m:.0} acknowledged sends/s \
             (median of {:?})",
            o.quorum,
            o.clients,
            rates.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
        per_sec.push(m);
    }
    if o.quorum == "majority" {
        through_a_follower(o, &root, duration)?;
    }
    if let [one, three] = per_sec[..] {
        println!(
            "replication cost: a 3-server cluster acknowledges {:.0}% of a single server's \
             sends/s",
            100.0 * three / one
        );
    }
    for (fault, what) in [
        (Fault::Kill, "kill -9 of the primary"),
        (Fault::Freeze, "SIGSTOP of the primary (hung)"),
    ] {
        let mut times = Vec::new();
        for run in 0..o.runs {
            let dir = root.join(format!("failover-{run}"));
            let mut cluster = Cluster::start_with(&o.server_bin, 3, &dir, o.fsync, &o.quorum)
                .map_err(|e| e.to_string())?;
            cluster
                .wait_ready(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let took = failover(&mut cluster, &format!("f{run}"), fault)?;
            times.push(took.as_secs_f64() * 1000.0);
        }
        println!(
            "failover, {what} to the first send acknowledged by another server: {:.0} ms \
             (median of {:?})",
            median(times.clone()),
            times.iter().map(|t| t.round()).collect::<Vec<_>>()
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Of majority-mode servers' logs (by id, every run of each), the `running` server that
/// claimed the newest epoch any log names (`leading epoch N`) in its current run (since
/// its last `listening on`) and has not stepped down since. A former leader whose log
/// still shows its older claim is not taken: it steps down (and says so) only once its
/// Raft notices, and meanwhile answers clients by forwarding.
pub fn claimant_of_newest_epoch(logs: &[String], running: impl Fn(usize) -> bool) -> Option<usize> {
    // The epoch a log last claimed, and whether it has not stepped down since.
    let claim = |log: &str| -> Option<(u64, bool)> {
        let at = log.rfind("leading epoch ")?;
        let epoch = log[at + "leading epoch ".len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        Some((epoch, log.rfind("stepping down") < Some(at)))
    };
    let newest = logs.iter().filter_map(|l| claim(l)).map(|(e, _)| e).max()?;
    (0..logs.len()).find(|&id| {
        let log = &logs[id];
        let this_run = log.rfind("listening on").map_or(&log[..], |at| &log[at..]);
        running(id) && claim(this_run) == Some((newest, true))
    })
}

#[cfg(test)]
mod leader_tests {
    use super::claimant_of_newest_epoch;

    #[test]
    fn the_leader_is_the_claimant_of_the_newest_epoch_in_its_current_run() {
        let log = |lines: &[&str]| lines.join("\n");
        // A double election: 1 led epoch 1 and has not noticed 2 leads epoch 2.
        let logs = [
            log(&["messenger-0: listening on a"]),
            log(&[
                "messenger-1: listening on b",
                "messenger-1: leading epoch 1",
            ]),
            log(&[
                "messenger-2: listening on c",
                "messenger-2: leading epoch 2",
            ]),
        ];
        assert_eq!(claimant_of_newest_epoch(&logs, |_| true), Some(2));
        // 2 stopped: nobody leads until someone claims epoch 3.
        assert_eq!(claimant_of_newest_epoch(&logs, |i| i != 2), None);
        // 2 restarted: its claim was in its last run.
        let mut restarted = logs.clone();
        restarted[2].push_str("\nmessenger-2: listening on c");
        assert_eq!(claimant_of_newest_epoch(&restarted, |_| true), None);
        // 0 claims epoch 3, then steps down for 1's epoch 4.
        let mut later = restarted.clone();
        later[0].push_str("\nmessenger-0: leading epoch 3");
        assert_eq!(claimant_of_newest_epoch(&later, |_| true), Some(0));
        later[0].push_str("\nmessenger-0: stepping down from epoch 3: server 1 leads epoch 4");
        later[1].push_str("\nmessenger-1: stepping down from epoch 1: a newer claim of mine");
        later[1].push_str("\nmessenger-1: leading epoch 4");
        assert_eq!(claimant_of_newest_epoch(&later, |_| true), Some(1));
        assert_eq!(claimant_of_newest_epoch(&[], |_| true), None);
    }
}
