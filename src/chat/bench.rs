//! The fan-out benchmark behind `chat-bench`: one sender, R receivers spread round-robin
//! over one or more federated servers. Every message carries its sequence number and send
//! time; a receiver checks the order and records the delivery latency.
//!
//! The sender keeps at most `window` messages ahead of the slowest receiver (closed loop),
//! so the figures measure the servers' fan-out, not a queue growing until a receiver is
//! disconnected for falling behind.

use super::client::{ChatClient, ClientError};
use super::protocol::{Event, ServerLine};
use super::{ChatConfig, ChatServer, RunningChat};
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const SENDER: &str = "bench-sender";
/// Every read in the benchmark times out: a stuck server fails the run instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The servers; the sender is on the first, receiver `i` on `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// Receivers.
    pub receivers: usize,
    /// Messages the sender sends.
    pub messages: usize,
    /// Messages the sender may be ahead of the slowest receiver.
    pub window: usize,
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Servers used.
    pub servers: usize,
    /// Receivers.
    pub receivers: usize,
    /// Messages sent.
    pub messages: usize,
    /// Messages received, summed over receivers (`messages * receivers`).
    pub delivered: u64,
    /// From the first send to the last delivery.
    pub elapsed: Duration,
    /// Delivery latency (send to receipt) percentiles in microseconds: p50, p99, max.
    pub latency_us: [u64; 3],
}

impl BenchReport {
    /// Deliveries per second.
    pub fn per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p50, p99, max] = self.latency_us;
        write!(
            f,
            "{} messages x {} receivers on {} server(s): {} delivered in {:.3} s = {:.0} msg/s; \
             latency p50 {p50} us, p99 {p99} us, max {max} us",
            self.messages,
            self.receivers,
            self.servers,
            self.delivered,
            self.elapsed.as_secs_f64(),
            self.per_sec()
        )
    }
}

/// Resolves each `host:port`.
///
/// # Errors
/// When one does not resolve.
pub fn resolve(addrs: &[String]) -> io::Result<Vec<SocketAddr>> {
    addrs
        .iter()
        .map(|a| {
            a.to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{a} resolves to nothing")))
        })
        .collect()
}

/// Starts `count` federated servers on loopback, in this process, and waits until each
/// lists them all.
///
/// # Errors
/// When a server cannot bind, join or start, or the member lists do not converge in 10 s.
pub fn spawn_federation(count: usize) -> io::Result<Vec<RunningChat>> {
    let mut running: Vec<RunningChat> = Vec::new();
    for _ in 0..count.max(1) {
        let server = ChatServer::bind("127.0.0.1:0", ChatConfig::default())?;
        if let Some(first) = running.first() {
            let boot = first.handle().local_addr().to_string();
            server.join(&boot).map_err(io::Error::other)?;
        }
        running.push(server.spawn()?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while running
        .iter()
        .any(|r| r.handle().members().len() != running.len())
    {
        if Instant::now() > deadline {
            return Err(io::Error::other("the member lists did not converge"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(running)
}

/// Runs the benchmark once.
///
/// # Errors
/// When a client cannot join, a connection fails, or a receiver sees a message out of order.
pub fn run(config: &BenchConfig) -> Result<BenchReport, ClientError> {
    if config.addrs.is_empty() || config.receivers == 0 || config.messages == 0 {
        return Err(ClientError::Io(io::Error::other(
            "need a server, a receiver and a message",
        )));
    }
    let epoch = Instant::now();
    // Messages each receiver has read; the last slot is the sender reading its own.
    let progress: Arc<Vec<AtomicUsize>> = Arc::new(
        (0..=config.receivers)
            .map(|_| AtomicUsize::new(0))
            .collect(),
    );
    let ready = Arc::new(AtomicUsize::new(0));
    let mut receivers = Vec::new();
    for i in 0..config.receivers {
        let addr = config.addrs[i % config.addrs.len()];
        let client = ChatClient::join(addr, &format!("bench-r{i}"), Some(READ_TIMEOUT))?;
        let (progress, ready, messages) =
            (Arc::clone(&progress), Arc::clone(&ready), config.messages);
        receivers.push(thread::spawn(move || {
            receive(client, epoch, messages, &progress[i], &ready)
        }));
    }
    let ChatClient {
        writer: mut sender,
        reader: mut echoes,
    } = ChatClient::join(config.addrs[0], SENDER, Some(READ_TIMEOUT))?;
    // The sender gets its own messages too, and must keep up with them like anyone else.
    let echoed = Arc::clone(&progress);
    let echo = thread::spawn(move || {
        let mut count = 0;
        while let Ok(Some(line)) = echoes.next_line() {
            if matches!(line, ServerLine::Event(Event::Message { .. })) {
                count += 1;
                echoed[echoed.len() - 1].store(count, Ordering::Release);
            }
        }
    });
    let deadline = Instant::now() + READ_TIMEOUT;
    while ready.load(Ordering::Acquire) < config.receivers {
        if Instant::now() > deadline {
            return Err(ClientError::Closed);
        }
        thread::sleep(Duration::from_millis(1));
    }

    let started = epoch.elapsed();
    let mut slowest = 0;
    for seq in 0..config.messages {
        let waiting = Instant::now();
        while seq >= slowest + config.window.max(1) {
            slowest = progress
                .iter()
                .map(|p| p.load(Ordering::Acquire))
                .min()
                .unwrap_or(0);
            if seq >= slowest + config.window.max(1) {
                // A receiver whose connection failed stops advancing for good: fail the
                // run rather than wait for it forever.
                if waiting.elapsed() > READ_TIMEOUT {
                    return Err(ClientError::Unexpected(format!(
                        "no receiver progress past message {slowest} in {READ_TIMEOUT:?}"
                    )));
                }
                thread::sleep(Duration::from_micros(20));
            }
        }
        let sent_at = epoch.elapsed().as_nanos();
        sender.send(&format!("{seq} {sent_at}"))?;
    }
    let mut latencies = Vec::with_capacity(config.messages * config.receivers);
    let mut finished = started;
    for receiver in receivers {
        let (mut own, last) = receiver.join().map_err(|_| ClientError::Closed)??;
        latencies.append(&mut own);
        finished = finished.max(last);
    }
    sender.leave()?;
    let _ = echo.join();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(BenchReport {
        servers: config.addrs.len(),
        receivers: config.receivers,
        messages: config.messages,
        delivered: latencies.len() as u64,
        elapsed: finished - started,
        latency_us: [at(0.50), at(0.99), at(1.0)],
    })
}

/// One receiver: waits for the sender's join, then reads every message, checking the
/// order. Returns its latencies (µs) and when the last message arrived.
fn receive(
    mut client: ChatClient,
    epoch: Instant,
    messages: usize,
    progress: &AtomicUsize,
    ready: &AtomicUsize,
) -> Result<(Vec<u64>, Duration), ClientError> {
    let mut latencies = Vec::with_capacity(messages);
    loop {
        match client.reader.next_line()? {
            Some(ServerLine::Event(Event::Join(name))) if name == SENDER => {
                ready.fetch_add(1, Ordering::AcqRel);
            }
            Some(ServerLine::Event(Event::Message { name, text })) if name == SENDER => {
                let now = epoch.elapsed();
                let mut fields = text.split(' ').map(str::parse::<u128>);
                let (Some(Ok(seq)), Some(Ok(sent_at))) = (fields.next(), fields.next()) else {
                    return Err(ClientError::Unexpected(format!("text {text:?}")));
                };
                if seq != latencies.len() as u128 {
                    let expected = latencies.len();
                    return Err(ClientError::Unexpected(format!(
                        "message {seq} arrived where {expected} was due"
                    )));
                }
                let latency = now.as_nanos().saturating_sub(sent_at) / 1000;
                latencies.push(u64::try_from(latency).unwrap_or(u64::MAX));
                progress.store(latencies.len(), Ordering::Release);
                if latencies.len() == messages {
                    let _ = client.writer.leave();
                    return Ok((latencies, now));
                }
            }
            Some(_) => {}
            None => return Err(ClientError::Closed),
        }
    }
}

/// The median of each figure over `runs`: deliveries per second, and p50, p99 and max
/// latency in microseconds.
pub fn medians(runs: &[BenchReport]) -> Option<(f64, [u64; 3])> {
    if runs.is_empty() {
        return None;
    }
    let mut rates: Vec<f64> = runs.iter().map(BenchReport::per_sec).collect();
    rates.sort_by(f64::total_cmp);
    let latency = [0, 1, 2].map(|i| {
        let mut v: Vec<u64> = runs.iter().map(|r| r.latency_us[i]).collect();
        v.sort_unstable();
        v[v.len() / 2]
    });
    Some((rates[rates.len() / 2], latency))
}
