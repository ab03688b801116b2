//! The `chan-pingpong` demo: `pong` answers every `{ping,N,ReplyChan}` with `{pong,N}` on
//! ReplyChan; `ping` sends pings, each with a reply channel of its own, and times the
//! round trips.

use super::{Chan, ChanError, Node, Value};
use crate::log::{Preview, PREVIEW};
use crate::log_info;
use crate::server::on_termination;
use crossbeam_channel::{select, Receiver};
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long `pong` gives the channel already registered under its name to accept a
/// connection before taking the name over.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `chan-pingpong ping` keeps looking a name up while it is not registered.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(3);
/// How often `ping` looks a name up again while waiting for it.
const LOOKUP_RETRY: Duration = Duration::from_millis(100);

/// What `pong` did before it was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PongReport {
    /// Pings answered.
    pub answered: u64,
    /// Messages that were not `{ping,N,ReplyChan}`, and pings whose reply channel is the
    /// very channel pong reads.
    pub ignored: u64,
    /// Pongs that could not be delivered.
    pub failed: u64,
}

/// Why `chan-pingpong` failed; its last log line says this.
#[derive(Debug)]
pub enum DemoError {
    /// `pong NAME` could not claim, register or serve the name.
    Pong {
        /// The name.
        name: String,
        /// Why.
        source: ChanError,
    },
    /// `ping NAME` could not look the name up.
    Ping {
        /// The name.
        name: String,
        /// Why.
        source: ChanError,
    },
    /// Some pings went unanswered (the report says how many).
    PingsFailed,
    /// The Ctrl-C / SIGTERM handler cannot be installed.
    Termination(ctrlc::Error),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::Pong { name, source } => write!(f, "pong {name}: {source}"),
            DemoError::Ping { name, source } => write!(f, "ping {name}: {source}"),
            DemoError::PingsFailed => f.write_str("pings failed"),
            DemoError::Termination(e) => write!(f, "cannot install the Ctrl-C handler: {e}"),
        }
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoError::Pong { source, .. } | DemoError::Ping { source, .. } => Some(source),
            DemoError::Termination(e) => Some(e),
            DemoError::PingsFailed => None,
        }
    }
}

/// `chan-pingpong pong NAME`: [`run_pong`] until Ctrl-C or SIGTERM, then logs what it did.
///
/// # Errors
/// As [`run_pong`], or when the signal handler cannot be installed.
pub fn pong_until_terminated(node: &Node, registry: &str, name: &str) -> Result<(), DemoError> {
    let (stop, stopped) = crossbeam_channel::bounded(1);
    on_termination(move || {
        let _ = stop.try_send(());
    })
    .map_err(DemoError::Termination)?;
    let report = run_pong(node, registry, name, &stopped).map_err(|source| DemoError::Pong {
        name: name.to_owned(),
        source,
    })?;
    log_info!("chan-pingpong: pong {name} stopped; {report}");
    Ok(())
}

/// `chan-pingpong ping NAME COUNT`: [`run_ping`], its report printed on stdout as
/// `ping NAME: ...`.
///
/// # Errors
/// As [`run_ping`]; [`DemoError::PingsFailed`] when any ping failed.
pub fn ping_and_print(
    node: &Node,
    registry: &str,
    name: &str,
    count: usize,
    wait: Duration,
) -> Result<(), DemoError> {
    let report = run_ping(node, registry, name, count, wait).map_err(|source| DemoError::Ping {
        name: name.to_owned(),
        source,
    })?;
    println!("ping {name}: {report}");
    match report.failed {
        0 => Ok(()),
        _ => Err(DemoError::PingsFailed),
    }
}

/// `chan-pingpong pong NAME`: registers a new channel of `node` as `name` in the store
/// server at `registry`, logs `listening on HOST:PORT` (its port), answers pings until
/// `stop` receives, then removes the entry (if it is still this channel's), so the name
/// does not outlive the process and point pingers at a dead port.
///
/// # Errors
/// When the name is registered to a channel that still accepts connections
/// ([`ChanError::NameTaken`]), or cannot be registered.
pub fn run_pong(
    node: &Node,
    registry: impl ToSocketAddrs + Copy,
    name: &str,
    stop: &Receiver<()>,
) -> Result<PongReport, ChanError> {
    match super::lookup(node, registry, name) {
        Ok(taken) => {
            if let Some(addr) = answering(&taken) {
                return Err(ChanError::NameTaken {
                    name: name.to_owned(),
                    addr,
                });
            }
            log_info!("pong: {name} was registered to a channel that no longer answers; taking it");
        }
        Err(ChanError::NotRegistered(_) | ChanError::NotAChan { .. }) => {}
        Err(e) => return Err(e),
    }
    let chan = node.chan();
    super::register(registry, name, &chan)?;
    let port = node.port_of(&chan).unwrap_or(0);
    let ip = node.config().advertise;
    log_info!("pong: {name} registered; listening on {ip}:{port}");
    let report = pong(&chan, stop);
    match super::registry::unregister(registry, name, &chan) {
        Ok(true) => log_info!("pong: {name} unregistered"),
        Ok(false) => log_info!("pong: {name} was registered again by another process; left as is"),
        Err(e) => log_info!("pong: cannot unregister {name}: {e}"),
    }
    Ok(report)
}

/// `HOST:PORT` of a remote channel whose port accepts a connection now (the connection
/// is closed at once, before a line, which the port listener takes as nothing).
fn answering(chan: &Chan) -> Option<String> {
    let (host, port) = chan.remote_addr()?;
    let addr = (host.to_string(), port).to_socket_addrs().ok()?.next()?;
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .ok()
        .map(|_| addr.to_string())
}

/// `chan-pingpong ping NAME COUNT`: looks `name` up in the store server at `registry`
/// (again every 100 ms for up to `wait` while it is not registered: a ponger started at
/// the same time may not have registered yet) and sends it `count` pings (see [`ping`]),
/// waiting up to 10 s for each pong.
///
/// # Errors
/// When the name cannot be looked up, or is still not registered after `wait`.
pub fn run_ping(
    node: &Node,
    registry: impl ToSocketAddrs + Copy,
    name: &str,
    count: usize,
    wait: Duration,
) -> Result<PingReport, ChanError> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    let target = loop {
        match super::lookup(node, registry, name) {
            Err(ChanError::NotRegistered(_)) if Instant::now() < deadline => {
                if !said {
                    let secs = wait.as_secs_f64();
                    log_info!("ping: {name} is not registered yet; waiting up to {secs} s");
                    said = true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(LOOKUP_RETRY.min(left));
            }
            other => break other?,
        }
    };
    Ok(ping(node, &target, count, Duration::from_secs(10)))
}

/// Pongs being delivered at once. A reply channel that accepts and never reads, or
/// trickles its answer a byte at a time, holds its pong for the node's I/O timeout (10 s
/// by default, one deadline for the whole delivery: see
/// [`NodeConfig::io_timeout`](super::NodeConfig::io_timeout)); answering on the reading thread
/// would stall every other pinger behind it, so each pong goes out on a thread of its own,
/// and this bounds those threads: past it, `pong` waits for one to finish.
pub const PONGS_IN_FLIGHT: usize = 32;

/// How long a pong waits for room in a reply channel of this process (one of its node's
/// channels, full and not read): as long as a remote one gets, the node's default I/O
/// timeout.
const LOCAL_REPLY_PATIENCE: Duration = Duration::from_secs(10);

/// How long a stopping `pong` waits for pongs still being delivered.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Answers pings read from the local channel `chan` until `stop` receives (or its sender
/// is dropped). A remote `chan` is not served. Pongs are delivered concurrently (at most
/// [`PONGS_IN_FLIGHT`] at once), so one reply channel that never reads delays no other
/// pinger; pongs still in flight when `stop` comes are counted as not delivered.
pub fn pong(chan: &Chan, stop: &Receiver<()>) -> PongReport {
    let mut report = PongReport::default();
    let Some(rx) = chan.receiver() else {
        return report;
    };
    // Each answering thread reports here whether its pong was delivered.
    let (outcomes, done) = crossbeam_channel::bounded::<bool>(PONGS_IN_FLIGHT);
    let mut in_flight = 0usize;
    let settle = |report: &mut PongReport, delivered: bool| {
        if delivered {
            report.answered += 1;
        } else {
            report.failed += 1;
        }
    };
    loop {
        let msg = select! {
            recv(stop) -> _ => break,
            recv(done) -> outcome => {
                if let Ok(delivered) = outcome {
                    in_flight -= 1;
                    settle(&mut report, delivered);
                }
                continue;
            },
            recv(rx) -> msg => match msg {
                Ok(msg) => msg.into_value(),
                Err(_) => break,
            },
        };
        let ping = match msg.tagged() {
            Some(("ping", [n, Value::Chan(reply)])) if n.as_int().is_some() => {
                Some((n.clone(), reply.clone()))
            }
            _ => None,
        };
        let Some((n, reply)) = ping else {
            log_info!("pong: ignoring {}", Preview(&msg, PREVIEW));
            report.ignored += 1;
            continue;
        };
        if reply.same_queue(chan) {
            // Its pong would come back here, and enough such pings would fill the queue
            // with pongs only this loop could take out, while it waits for their senders.
            log_info!("pong: ignoring a ping whose reply channel is pong's own");
            report.ignored += 1;
            continue;
        }
        while in_flight >= PONGS_IN_FLIGHT {
            select! {
                recv(stop) -> _ => {
                    report.failed += in_flight as u64 + 1;
                    return report;
                },
                recv(done) -> outcome => {
                    in_flight -= 1;
                    settle(&mut report, outcome.unwrap_or(false));
                },
            }
        }
        let finished = outcomes.clone();
        let spawned = std::thread::Builder::new()
            .name("pong-reply".into())
            .spawn(move || {
                let pong = Value::tuple(vec![Value::atom("pong"), n]);
                let delivered = match reply.send_timeout(pong, LOCAL_REPLY_PATIENCE) {
                    Ok(()) => true,
                    Err(e) => {
                        log_info!("pong: cannot answer: {e}");
                        false
                    }
                };
                let _ = finished.send(delivered);
            });
        match spawned {
            Ok(_) => in_flight += 1,
            Err(e) => {
                log_info!("pong: cannot start a thread to answer: {e}");
                report.failed += 1;
            }
        }
    }
    // Pongs about to be counted get a moment; those still waiting on a silent reply
    // channel after it are not waited for (their threads end by the node's I/O timeout).
    let grace = Instant::now() + STOP_GRACE;
    while in_flight > 0 {
        let left = grace.saturating_duration_since(Instant::now());
        let Ok(delivered) = done.recv_timeout(left) else {
            break;
        };
        in_flight -= 1;
        settle(&mut report, delivered);
    }
    report.failed += in_flight as u64;
    report
}

/// What `ping` measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PingReport {
    /// Pings answered with the right `{pong,N}`.
    pub passed: usize,
    /// Pings not sent, not answered in time, or answered wrongly.
    pub failed: usize,
    /// Round trips of the passed pings, sorted, each from before the ping was written
    /// (its reply channel's port listener opened) to its pong read.
    pub round_trips: Vec<Duration>,
}

impl PingReport {
    /// The round trip that `p` percent of pings beat or matched (nearest rank).
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.round_trips.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        Some(self.round_trips[rank - 1])
    }
}

impl fmt::Display for PongReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "answered {} ping(s); ignored {} other message(s); {} pong(s) could not be delivered",
            self.answered, self.ignored, self.failed
        )
    }
}

impl fmt::Display for PingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        let micros = |p| self.percentile(p).map_or(0, |d| d.as_micros());
        if !self.round_trips.is_empty() {
            write!(
                f,
                "; round trip p50 {} us, p90 {} us, p99 {} us, max {} us",
                micros(50.0),
                micros(90.0),
                micros(99.0),
                micros(100.0)
            )?;
        }
        Ok(())
    }
}

/// Sends `count` pings to `target`, one at a time, each `{ping,N,ReplyChan}` with a new
/// reply channel of `node`, and waits up to `timeout` for each `{pong,N}`.
pub fn ping(node: &Node, target: &Chan, count: usize, timeout: Duration) -> PingReport {
    let mut report = PingReport::default();
    for n in 0..count as i64 {
        let reply = node.chan();
        let started = Instant::now();
        let msg = Value::tuple(vec![
            Value::atom("ping"),
            Value::int(n),
            Value::from(&reply),
        ]);
        let answer = target.send(msg).and_then(|()| reply.recv_timeout(timeout));
        let elapsed = started.elapsed();
        match answer {
            Ok(pong) if pong == Value::tuple(vec![Value::atom("pong"), Value::int(n)]) => {
                report.passed += 1;
                report.round_trips.push(elapsed);
            }
            Ok(other) => {
                log_info!("ping {n}: unexpected answer {}", Preview(&other, PREVIEW));
                report.failed += 1;
            }
            Err(e) => {
                log_info!("ping {n}: {e}");
                report.failed += 1;
            }
        }
    }
    report.round_trips.sort_unstable();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_whose_reply_channel_is_pongs_own_queue_are_ignored() {
        // Each one's pong would be aimed back at that queue: with a writer keeping the
        // queue full, the pongs would block on a queue only pong reads, and 32 of them
        // stop it (how they block is a race, so this checks that none is answered).
        let node = crate::chan::Node::new(crate::chan::NodeConfig {
            capacity: 4,
            ..crate::chan::NodeConfig::default()
        });
        let chan = node.chan();
        let (stop_tx, stop) = crossbeam_channel::bounded(1);
        let served = chan.clone();
        let pong = std::thread::spawn(move || pong(&served, &stop));
        let ping = |n: i64, reply: &Chan| {
            Value::tuple(vec![
                Value::atom("ping"),
                Value::int(n),
                Value::Chan(reply.clone()),
            ])
        };
        for n in 0..100 {
            chan.send_timeout(ping(n, &chan), Duration::from_secs(10))
                .expect("pong stopped reading its queue");
        }
        let reply = node.chan();
        chan.send_timeout(ping(7, &reply), Duration::from_secs(10))
            .unwrap();
        let answer = reply.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            answer,
            Value::tuple(vec![Value::atom("pong"), Value::int(7)])
        );
        stop_tx.send(()).unwrap();
        let report = pong.join().unwrap();
        assert_eq!((report.answered, report.ignored), (1, 100));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let report = PingReport {
            passed: 10,
            failed: 0,
            round_trips: (1..=10).map(Duration::from_micros).collect(),
        };
        assert_eq!(report.percentile(50.0), Some(Duration::from_micros(5)));
        assert_eq!(report.percentile(90.0), Some(Duration::from_micros(9)));
        assert_eq!(report.percentile(99.0), Some(Duration::from_micros(10)));
        assert_eq!(report.percentile(0.0), Some(Duration::from_micros(1)));
        assert_eq!(PingReport::default().percentile(50.0), None);
        assert_eq!(
            report.to_string(),
            "10 passed, 0 failed; round trip p50 5 us, p90 9 us, p99 10 us, max 10 us"
        );
        assert_eq!(PingReport::default().to_string(), "0 passed, 0 failed");
    }
}
