//! The closed-loop load generator behind `store-bench`.
//!
//! Each of `conns` connections sends a batch of `pipeline` requests in one write, waits for
//! every reply, validates each, and sends the next batch. GETs and SETs are drawn by the
//! `--ratio` weights over `keys` preloaded keys; every SET writes the key's own fixed value,
//! so every GET has exactly one right answer.
//!
//! Counting `store`s, which have no reply: a batch whose last request is a `store` is
//! closed by one extra `lookup` of that key (a barrier: its reply proves every store
//! before it was applied). The barrier is not counted as an operation and its cost is
//! charged to the store protocol, so SET figures are conservative against memcached,
//! whose `set` has a reply of its own.
//!
//! Latency is per batch round trip (at depth 1, per request).

use crate::bench::{own_cpu_secs, process_cpu_split, process_rss_kib, Rng};
use crate::framing::{encode_frame, FrameReader, Framing};
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, PoisonError};
use std::time::{Duration, Instant};

/// Which protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// The classic store protocol (`store,` / `lookup,`).
    Store,
    /// memcached's text protocol (`get` / `set`), to measure memcached with the same tool.
    Memcache,
    /// etcd's v3 JSON gateway over keep-alive HTTP/1.1 (`POST /v3/kv/put` and
    /// `/v3/kv/range`, base64 keys and values), to measure etcd with the same generator. A
    /// put has its own reply (after commit), so no barrier is needed; a range is
    /// linearizable (etcd's default), as the replicated store's lookup.
    Etcd,
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "store" => Ok(Proto::Store),
            "memcache" => Ok(Proto::Memcache),
            "etcd" => Ok(Proto::Etcd),
            _ => Err(format!(
                "unknown protocol {s:?} (expected store, memcache or etcd)"
            )),
        }
    }
}

/// A `GET:SET` weight pair, e.g. `1:0` (GET only), `0:1` (SET only), `9:1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    /// Weight of GETs.
    pub get: u32,
    /// Weight of SETs.
    pub set: u32,
}

impl FromStr for Ratio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad ratio {s:?} (expected GET:SET weights such as 9:1)");
        let (g, st) = s.split_once(':').ok_or_else(bad)?;
        let r = Ratio {
            get: g.parse().map_err(|_| bad())?,
            set: st.parse().map_err(|_| bad())?,
        };
        if r.get + r.set == 0 {
            return Err(bad());
        }
        Ok(r)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Concurrent connections.
    pub conns: usize,
    /// Requests per batch.
    pub pipeline: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Distinct keys.
    pub keys: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// GET:SET mix.
    pub ratio: Ratio,
    /// Protocol.
    pub proto: Proto,
    /// Framing (store protocol only; memcached's is always lines).
    pub framing: Framing,
    /// The server's process id, to report its CPU time per operation.
    pub server_pid: Option<u32>,
    /// A cluster's servers (a replicated store's): connection `n` goes to
    /// `cluster[n % len]`; empty: every connection goes to `addr`.
    pub cluster: Vec<SocketAddr>,
}

/// Figures from one run.
#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    /// Operations completed in the measured window.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Batch round-trip latency percentiles, microseconds: p50, p99, p99.9.
    pub latency_us: [f64; 3],
    /// Server CPU (user + system) per operation, microseconds.
    pub server_cpu_us_per_op: Option<f64>,
    /// The user-space part of it: the server's own code, without the kernel's.
    pub server_user_us_per_op: Option<f64>,
    /// This generator's own CPU per operation, microseconds.
    pub bench_cpu_us_per_op: Option<f64>,
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p50, p99, p999] = self.latency_us;
        write!(
            f,
            "{:.0} ops/s  p50 {p50:.0}us  p99 {p99:.0}us  p99.9 {p999:.0}us",
            self.ops_per_sec
        )?;
        if let Some(c) = self.server_cpu_us_per_op {
            write!(f, "  server cpu {c:.2}us/op")?;
        }
        if let Some(c) = self.server_user_us_per_op {
            write!(f, " (user {c:.2})")?;
        }
        if let Some(c) = self.bench_cpu_us_per_op {
            write!(f, "  bench cpu {c:.2}us/op")?;
        }
        Ok(())
    }
}

impl BenchResult {
    /// One `key=value` line for scripts (`interop/bench_store.py` reads it): the run's
    /// settings from `cfg`, then the figures; `-` for a CPU time that was not measured.
    pub fn result_line(&self, cfg: &BenchConfig) -> String {
        let [p50, p99, p999] = self.latency_us;
        let cpu = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.3}"));
        format!(
            "RESULT proto={:?} conns={} pipeline={} ratio={}:{} ops_per_sec={:.0} p50_us={p50} \
             p99_us={p99} p999_us={p999} server_cpu_us_per_op={} server_user_us_per_op={} \
             bench_cpu_us_per_op={}",
            cfg.proto,
            cfg.conns,
            cfg.pipeline,
            cfg.ratio.get,
            cfg.ratio.set,
            self.ops_per_sec,
            cpu(self.server_cpu_us_per_op),
            cpu(self.server_user_us_per_op),
            cpu(self.bench_cpu_us_per_op),
        )
    }
}

/// Why a run failed.
#[derive(Debug)]
pub enum BenchError {
    /// A connection failed.
    Io(io::Error),
    /// A reply was wrong: the server is broken or the keys were changed under us.
    Mismatch(String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Io(e) => write!(f, "{e}"),
            BenchError::Mismatch(m) => write!(f, "wrong reply: {m}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<io::Error> for BenchError {
    fn from(e: io::Error) -> Self {
        BenchError::Io(e)
    }
}

/// The generator's key number `i`: `key:NNNNNNNN`.
pub(super) fn key(i: usize) -> Vec<u8> {
    format!("key:{i:08}").into_bytes()
}

/// The fixed value of key `i`: its number, then filler, `size` bytes in all.
pub(super) fn value(i: usize, size: usize) -> Vec<u8> {
    let mut v = format!("{i}-").into_bytes();
    v.resize(size.max(v.len()), b'v');
    v.truncate(size);
    v
}

/// One connection's codec: writes requests, reads and checks replies.
struct Conn {
    proto: Proto,
    framing: Framing,
    writer: TcpStream,
    reader: FrameReader<TcpStream>,
    /// The etcd protocol's reader (HTTP bodies are counted bytes, not frames).
    http: Option<io::BufReader<TcpStream>>,
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// Replies due for the batch: `Some(key index)` for a GET, `None` for a SET's STORED.
    due: Vec<Option<usize>>,
    value_size: usize,
}

impl Conn {
    /// Connection number `n` of the run.
    fn open(cfg: &BenchConfig, n: usize) -> io::Result<Conn> {
        let addr = match cfg.cluster.len() {
            0 => cfg.addr,
            len => cfg.cluster[n % len],
        };
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let framing = match cfg.proto {
            Proto::Store => cfg.framing,
            Proto::Memcache | Proto::Etcd => Framing::Line,
        };
        Ok(Conn {
            proto: cfg.proto,
            framing,
            http: match cfg.proto {
                Proto::Etcd => Some(io::BufReader::new(s.try_clone()?)),
                _ => None,
            },
            writer: s.try_clone()?,
            reader: FrameReader::new(s, framing),
            out: Vec::new(),
            scratch: Vec::new(),
            due: Vec::new(),
            value_size: cfg.value_size,
        })
    }

    fn get(&mut self, i: usize) {
        match self.proto {
            Proto::Store => {
                self.scratch.clear();
                self.scratch.extend_from_slice(b"lookup,");
                self.scratch.extend_from_slice(&key(i));
                encode_frame(self.framing, &self.scratch, &mut self.out).expect("small frame");
            }
            Proto::Memcache => {
                self.out.extend_from_slice(b"get ");
                self.out.extend_from_slice(&key(i));
                self.out.extend_from_slice(b"\r\n");
            }
            Proto::Etcd => {
                let body = format!("{{\"key\":\"{}\"}}", base64(&key(i)));
                http_post(&mut self.out, "/v3/kv/range", &body);
            }
        }
        self.due.push(Some(i));
    }

    fn set(&mut self, i: usize) {
        let v = value(i, self.value_size);
        match self.proto {
            Proto::Store => {
                self.scratch.clear();
                self.scratch.extend_from_slice(b"store,");
                self.scratch.extend_from_slice(&key(i));
                self.scratch.push(b',');
                self.scratch.extend_from_slice(&v);
                encode_frame(self.framing, &self.scratch, &mut self.out).expect("small frame");
            }
            Proto::Memcache => {
                self.out.extend_from_slice(b"set ");
                self.out.extend_from_slice(&key(i));
                self.out
                    .extend_from_slice(format!(" 0 0 {}\r\n", v.len()).as_bytes());
                self.out.extend_from_slice(&v);
                self.out.extend_from_slice(b"\r\n");
                self.due.push(None);
            }
            Proto::Etcd => {
                let body = format!(
                    "{{\"key\":\"{}\",\"value\":\"{}\"}}",
                    base64(&key(i)),
                    base64(&v)
                );
                http_post(&mut self.out, "/v3/kv/put", &body);
                self.due.push(None);
            }
        }
    }

    /// Sends the batch and checks every reply.
    fn round_trip(&mut self) -> Result<(), BenchError> {
        self.writer.write_all(&self.out)?;
        self.out.clear();
        let due = std::mem::take(&mut self.due);
        for d in &due {
            self.check(*d)?;
        }
        self.due = due;
        self.due.clear();
        Ok(())
    }

    fn frame(&mut self) -> Result<Vec<u8>, BenchError> {
        match self.reader.read_frame() {
            Ok(Some(f)) => Ok(f.to_vec()),
            Ok(None) => Err(BenchError::Io(io::ErrorKind::UnexpectedEof.into())),
            Err(e) => Err(BenchError::Io(io::Error::other(e.to_string()))),
        }
    }

    fn check(&mut self, due: Option<usize>) -> Result<(), BenchError> {
        let mismatch = |what: &[u8], want: &str| {
            BenchError::Mismatch(format!(
                "{:?}, expected {want}",
                String::from_utf8_lossy(what)
            ))
        };
        match (self.proto, due) {
            (Proto::Etcd, due) => {
                let body = self.http_response()?;
                if let Some(i) = due {
                    let want = format!("\"value\":\"{}\"", base64(&value(i, self.value_size)));
                    if !String::from_utf8_lossy(&body).contains(&want) {
                        return Err(mismatch(&body, &want));
                    }
                }
            }
            (Proto::Store, Some(i)) => {
                let got = self.frame()?;
                let want = value(i, self.value_size);
                let ok = got
                    .strip_prefix(b"{just,")
                    .and_then(|r| r.strip_suffix(b"}"))
                    == Some(&want[..]);
                if !ok {
                    return Err(mismatch(
                        &got,
                        &format!("{{just,{}}}", String::from_utf8_lossy(&want)),
                    ));
                }
            }
            (Proto::Store, None) => unreachable!("store has no reply"),
            (Proto::Memcache, None) => {
                let got = self.frame()?;
                if got != b"STORED" {
                    return Err(mismatch(&got, "STORED"));
                }
            }
            (Proto::Memcache, Some(i)) => {
                let header = self.frame()?;
                let want = value(i, self.value_size);
                let expect = format!(
                    "VALUE {} 0 {}",
                    String::from_utf8_lossy(&key(i)),
                    want.len()
                );
                if header != expect.as_bytes() {
                    return Err(mismatch(&header, &expect));
                }
                let data = self.frame()?;
                if data != want {
                    return Err(mismatch(&data, &String::from_utf8_lossy(&want)));
                }
                let end = self.frame()?;
                if end != b"END" {
                    return Err(mismatch(&end, "END"));
                }
            }
        }
        Ok(())
    }

    /// Reads one HTTP/1.1 response (status 200, a `Content-Length` body) from etcd.
    fn http_response(&mut self) -> Result<Vec<u8>, BenchError> {
        use io::{BufRead, Read};
        let reader = self
            .http
            .as_mut()
            .expect("etcd connections have an HTTP reader");
        let mut line = String::new();
        let mut status = None;
        let mut length = None;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(BenchError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status.is_none() {
                status = Some(l.to_owned());
            } else if let Some((name, v)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let status = status.unwrap_or_default();
        let Some(length) = length else {
            return Err(BenchError::Mismatch(format!(
                "{status}: a response without Content-Length"
            )));
        };
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(BenchError::Mismatch(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(body)
    }

    /// Writes the next batch (not yet sent): `cfg.pipeline` requests over `cfg.keys`, GETs
    /// and SETs by `cfg.ratio`, closed as [`Conn::close_batch`] does.
    fn batch(&mut self, rng: &mut Rng, cfg: &BenchConfig) {
        let weight = u64::from(cfg.ratio.get + cfg.ratio.set);
        let mut last = None;
        for _ in 0..cfg.pipeline {
            let i = rng.below(cfg.keys as u64) as usize;
            let is_set = rng.below(weight) >= u64::from(cfg.ratio.get);
            if is_set {
                self.set(i);
            } else {
                self.get(i);
            }
            last = Some((i, is_set));
        }
        self.close_batch(last);
    }

    /// Ends a batch whose last request is a store with a barrier lookup (see module doc).
    fn close_batch(&mut self, last: Option<(usize, bool)>) {
        if let (Proto::Store, Some((i, true))) = (self.proto, last) {
            self.get(i);
        }
    }
}

/// Appends an HTTP/1.1 `POST` of a JSON `body` (keep-alive is HTTP/1.1's default).
fn http_post(out: &mut Vec<u8>, path: &str, body: &str) {
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// Standard base64 with padding (RFC 4648), as etcd's JSON gateway wants bytes.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sets every key to its value, in pipelined chunks.
///
/// # Errors
/// When the server cannot be reached or answers wrongly.
pub fn preload(cfg: &BenchConfig) -> Result<(), BenchError> {
    let mut c = Conn::open(cfg, 0)?;
    for chunk in (0..cfg.keys).collect::<Vec<_>>().chunks(256) {
        for &i in chunk {
            c.set(i);
        }
        c.close_batch(chunk.last().map(|&i| (i, true)));
        c.round_trip()?;
    }
    Ok(())
}

/// Runs the benchmark; `progress` is called about once a second with (elapsed, ops/s
/// in the last second).
///
/// # Errors
/// The first connection failure or wrong reply (the run stops there).
pub fn run(
    cfg: &BenchConfig,
    mut progress: impl FnMut(Duration, f64),
) -> Result<BenchResult, BenchError> {
    let ops = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(cfg.conns + 1));
    let mut conns = Vec::with_capacity(cfg.conns);
    for n in 0..cfg.conns {
        conns.push(Conn::open(cfg, n)?);
    }
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(n, mut c)| {
            let (ops, measuring, stop, start) =
                (ops.clone(), measuring.clone(), stop.clone(), start.clone());
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name(format!("bench-{n}"))
                .stack_size(256 << 10)
                .spawn(move || -> Result<Vec<u32>, BenchError> {
                    let mut rng = Rng::new(n as u64 + 1);
                    let mut latencies = Vec::new();
                    start.wait();
                    while !stop.load(Ordering::Relaxed) {
                        c.batch(&mut rng, &cfg);
                        let began = Instant::now();
                        c.round_trip()?;
                        if measuring.load(Ordering::Relaxed) {
                            latencies
                                .push(began.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            ops.fetch_add(cfg.pipeline as u64, Ordering::Relaxed);
                        }
                    }
                    Ok(latencies)
                })
        })
        .collect::<Result<_, _>>()?;
    start.wait();
    std::thread::sleep(cfg.warmup);
    // No --server-pid, no server figure (not this process's own time).
    let cpu_before = (cfg.server_pid.and_then(process_cpu_split), own_cpu_secs());
    measuring.store(true, Ordering::Relaxed);
    let began = Instant::now();
    let mut last = (began, 0u64);
    while began.elapsed() < cfg.duration {
        std::thread::sleep(
            Duration::from_secs(1).min(cfg.duration.saturating_sub(began.elapsed())),
        );
        let now = (Instant::now(), ops.load(Ordering::Relaxed));
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        progress(began.elapsed(), rate);
        last = now;
        if workers.iter().any(|w| w.is_finished()) {
            break;
        }
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = began.elapsed().as_secs_f64();
    let total = ops.load(Ordering::Relaxed);
    let cpu_after = (cfg.server_pid.and_then(process_cpu_split), own_cpu_secs());
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.join().expect("bench worker panicked")?);
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let at = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[at])
    };
    let per_op = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) if total > 0 => Some((a - b) * 1e6 / total as f64),
        _ => None,
    };
    Ok(BenchResult {
        ops: total,
        ops_per_sec: total as f64 / elapsed,
        latency_us: [pct(0.50), pct(0.99), pct(0.999)],
        server_cpu_us_per_op: per_op(
            cpu_before.0.map(|(u, s)| u + s),
            cpu_after.0.map(|(u, s)| u + s),
        ),
        server_user_us_per_op: per_op(cpu_before.0.map(|c| c.0), cpu_after.0.map(|c| c.0)),
        bench_cpu_us_per_op: per_op(cpu_before.1, cpu_after.1),
    })
}

/// One server of an interleaved comparison ([`compare`]): where it listens, and its
/// process, whose CPU time is read.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its address.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
}

/// What one target did in its slice of one round of [`compare`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Slice {
    /// Operations completed in the slice.
    pub ops: u64,
    /// The slice's length, seconds.
    pub secs: f64,
    /// The server's CPU time in it (every thread's run time), seconds.
    pub cpu_secs: f64,
    /// Of it, user time: from `/proc/PID/stat`, counted in clock ticks (10 ms), so a slice's
    /// figure is rough and only a sum over many slices says much.
    pub user_secs: f64,
}

impl Slice {
    /// Server CPU per operation, microseconds (`None` for a slice without operations).
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        (self.ops > 0).then(|| self.cpu_secs * 1e6 / self.ops as f64)
    }

    /// Server user time per operation, microseconds (`None` without operations).
    pub fn user_us_per_op(&self) -> Option<f64> {
        (self.ops > 0).then(|| self.user_secs * 1e6 / self.ops as f64)
    }
}

/// The turns of a [`compare`]: whose turn it is (a target's index, or [`NOBODY`]: read
/// without the lock after every batch, changed only under it), how many of each target's
/// connections are still in a batch, and whether the run is over.
struct Turns {
    active: std::sync::atomic::AtomicUsize,
    state: std::sync::Mutex<TurnState>,
    changed: std::sync::Condvar,
}

struct TurnState {
    busy: Vec<usize>,
    stop: bool,
}

/// No target's turn.
const NOBODY: usize = usize::MAX;

impl Turns {
    fn lock(&self) -> std::sync::MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes it `t`'s turn (or nobody's), waking the connections; `_held` is the state,
    /// locked, as a connection checks the turn under the lock before it waits.
    fn give(&self, _held: &mut TurnState, t: usize) {
        self.active.store(t, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Ends the run: every connection leaves its loop.
    fn stop(&self) {
        let mut state = self.lock();
        state.stop = true;
        self.give(&mut state, NOBODY);
    }
}

/// Ends a [`compare`]'s turns however it returns, so no connection waits for ever.
struct StopTurns(Arc<Turns>);

impl Drop for StopTurns {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Drives several servers in turn with the same load, `slice` each per round, for `rounds`
/// rounds, and measures each one's operations and CPU time in its slices: an A/B
/// comparison that a noisy machine disturbs less than runs one after another, since the
/// servers take turns every fraction of a second and a change in the machine's load
/// falls on all of them alike. Every target gets `cfg.conns` connections of its own, open
/// throughout, idle while the others are driven (so each server's threads stay as they
/// were); only `cfg.addr` and `cfg.cluster` are ignored. Rounds alternate the order (ABC,
/// CBA, ...), so a drift within a round also falls on all alike, and each slice starts a
/// tenth of a slice after the turn changes, once the woken connections are under way.
/// `each` is called after every round with its slices, in target order.
///
/// The servers are loaded with the preloaded keys (see [`preload`]) by the caller.
///
/// # Errors
/// The first connection failure or wrong reply, or a target whose CPU time cannot be read.
pub fn compare(
    cfg: &BenchConfig,
    targets: &[Target],
    slice: Duration,
    rounds: usize,
    mut each: impl FnMut(usize, &[Slice]),
) -> Result<Vec<Vec<Slice>>, BenchError> {
    let unreadable = |t: &Target| {
        BenchError::Io(io::Error::other(format!(
            "cannot read the CPU time of process {} (/proc/{}/task/*/schedstat)",
            t.pid, t.pid
        )))
    };
    for t in targets {
        crate::bench::process_run_secs(t.pid).ok_or_else(|| unreadable(t))?;
    }
    let turns = Arc::new(Turns {
        active: std::sync::atomic::AtomicUsize::new(NOBODY),
        state: std::sync::Mutex::new(TurnState {
            busy: vec![0; targets.len()],
            stop: false,
        }),
        changed: std::sync::Condvar::new(),
    });
    let stop = StopTurns(Arc::clone(&turns));
    let ops: Arc<Vec<AtomicU64>> = Arc::new(targets.iter().map(|_| AtomicU64::new(0)).collect());
    let mut workers = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let one = BenchConfig {
            addr: target.addr,
            cluster: Vec::new(),
            ..cfg.clone()
        };
        for n in 0..cfg.conns {
            let mut c = Conn::open(&one, n)?;
            let (turns, ops, cfg) = (Arc::clone(&turns), Arc::clone(&ops), one.clone());
            let worker = std::thread::Builder::new()
                .name(format!("bench-{t}-{n}"))
                .stack_size(256 << 10)
                .spawn(move || -> Result<(), BenchError> {
                    let mut rng = Rng::new((t * cfg.conns + n) as u64 + 1);
                    let mut state = turns.lock();
                    loop {
                        while turns.active.load(Ordering::Relaxed) != t && !state.stop {
                            state = turns
                                .changed
                                .wait(state)
                                .unwrap_or_else(PoisonError::into_inner);
                        }
                        if state.stop {
                            return Ok(());
                        }
                        state.busy[t] += 1;
                        drop(state);
                        let result = (|| -> Result<(), BenchError> {
                            while turns.active.load(Ordering::Relaxed) == t {
                                c.batch(&mut rng, &cfg);
                                c.round_trip()?;
                                ops[t].fetch_add(cfg.pipeline as u64, Ordering::Relaxed);
                            }
                            Ok(())
                        })();
                        state = turns.lock();
                        state.busy[t] -= 1;
                        if let Err(e) = result {
                            state.stop = true;
                            turns.give(&mut state, NOBODY);
                            return Err(e);
                        }
                        turns.changed.notify_all();
                    }
                })
                .map_err(BenchError::Io)?;
            workers.push(worker);
        }
    }
    let mut all = Vec::with_capacity(rounds);
    'rounds: for round in 0..rounds {
        let mut slices = vec![Slice::default(); targets.len()];
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for t in order {
            let target = &targets[t];
            {
                let mut state = turns.lock();
                if state.stop {
                    // A connection failed: its error is returned below.
                    break 'rounds;
                }
                turns.give(&mut state, t);
            }
            std::thread::sleep(slice / 10);
            let read = || {
                Ok::<_, BenchError>((
                    Instant::now(),
                    ops[t].load(Ordering::Relaxed),
                    crate::bench::process_run_secs(target.pid).ok_or_else(|| unreadable(target))?,
                    process_cpu_split(target.pid).map_or(0.0, |(user, _)| user),
                ))
            };
            let before = read()?;
            std::thread::sleep(slice);
            let after = read()?;
            slices[t] = Slice {
                ops: after.1 - before.1,
                secs: after.0.duration_since(before.0).as_secs_f64(),
                cpu_secs: after.2 - before.2,
                user_secs: after.3 - before.3,
            };
            // The next target's turn starts once this one's batches in flight are done.
            let mut state = turns.lock();
            turns.give(&mut state, NOBODY);
            while state.busy[t] > 0 && !state.stop {
                state = turns
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        each(round, &slices);
        all.push(slices);
    }
    drop(stop);
    let mut first_error = None;
    for w in workers {
        if let Err(e) = w.join().expect("bench worker panicked") {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(all), Err)
}

/// One target's figures over all the rounds of a [`compare`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compared {
    /// Operations per second over its slices.
    pub ops_per_sec: f64,
    /// Server CPU per operation over its slices, microseconds.
    pub cpu_us_per_op: f64,
    /// Of it, user time (from clock ticks: see [`Slice::user_secs`]).
    pub user_us_per_op: f64,
    /// Its CPU per operation over the first target's, from the totals.
    pub vs_first: f64,
    /// The same ratio taken round by round: the median, and the middle half's bounds.
    pub rounds_vs_first: [f64; 3],
}

/// Sums up the rounds of a [`compare`], target by target (`None` when a target did
/// nothing, or there were no rounds).
pub fn summarize(rounds: &[Vec<Slice>]) -> Option<Vec<Compared>> {
    let targets = rounds.first()?.len();
    let total = |t: usize| {
        rounds.iter().fold(Slice::default(), |sum, r| Slice {
            ops: sum.ops + r[t].ops,
            secs: sum.secs + r[t].secs,
            cpu_secs: sum.cpu_secs + r[t].cpu_secs,
            user_secs: sum.user_secs + r[t].user_secs,
        })
    };
    let first = total(0).cpu_us_per_op()?;
    (0..targets)
        .map(|t| {
            let sum = total(t);
            let mut ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|r| Some(r[t].cpu_us_per_op()? / r[0].cpu_us_per_op()?))
                .collect();
            ratios.sort_by(f64::total_cmp);
            let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
            Some(Compared {
                ops_per_sec: sum.ops as f64 / sum.secs,
                cpu_us_per_op: sum.cpu_us_per_op()?,
                user_us_per_op: sum.user_us_per_op()?,
                vs_first: sum.cpu_us_per_op()? / first,
                rounds_vs_first: [at(0.5), at(0.25), at(0.75)],
            })
        })
        .collect()
}

/// What [`hold_idle`] measured.
#[derive(Debug, Clone, Copy)]
pub struct IdleReport {
    /// Connections held open.
    pub held: usize,
    /// The server's resident memory before opening them, KiB.
    pub rss_before_kib: Option<u64>,
    /// The server's resident memory while holding them, KiB.
    pub rss_held_kib: Option<u64>,
    /// Connect-and-lookup time of new clients while they are held: median and worst, µs.
    pub new_client_us: [f64; 2],
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib =
            |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        write!(
            f,
            "{} idle connections: server RSS {} before, {} held; new client connect+lookup \
             median {:.0}us, worst {:.0}us",
            self.held,
            mib(self.rss_before_kib),
            mib(self.rss_held_kib),
            self.new_client_us[0],
            self.new_client_us[1]
        )
    }
}

/// One lookup on a fresh connection; returns the connection (to hold) and the time taken.
fn one_lookup(cfg: &BenchConfig, i: usize) -> Result<(TcpStream, Duration), BenchError> {
    let began = Instant::now();
    let s = TcpStream::connect(cfg.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let mut payload = b"lookup,".to_vec();
    payload.extend_from_slice(&key(i % cfg.keys));
    encode_frame(cfg.framing, &payload, &mut req).expect("small frame");
    (&s).write_all(&req)?;
    let mut reader = FrameReader::new(&s, cfg.framing);
    match reader.read_frame() {
        Ok(Some(reply)) if reply.starts_with(b"{just,") => {}
        Ok(other) => {
            return Err(BenchError::Mismatch(format!(
                "{:?}, expected {{just,...}}",
                other.map(String::from_utf8_lossy)
            )))
        }
        Err(e) => return Err(BenchError::Io(io::Error::other(e.to_string()))),
    }
    drop(reader);
    Ok((s, began.elapsed()))
}

/// Opens `n` connections, each doing one lookup and then idling, and measures the server's
/// memory and how fast a new client is answered while they are held.
///
/// # Errors
/// When a connection fails or a reply is wrong.
pub fn hold_idle(cfg: &BenchConfig, n: usize) -> Result<IdleReport, BenchError> {
    let pid = cfg.server_pid;
    let rss_before_kib = pid.and_then(process_rss_kib);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(one_lookup(cfg, i)?.0);
    }
    // Let the newest connections' threads reach their idle read.
    std::thread::sleep(Duration::from_millis(500));
    let rss_held_kib = pid.and_then(process_rss_kib);
    let mut times: Vec<f64> = (0..50)
        .map(|i| one_lookup(cfg, i).map(|(_, t)| t.as_secs_f64() * 1e6))
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    drop(held);
    Ok(IdleReport {
        held: n,
        rss_before_kib,
        rss_held_kib,
        new_client_us: [times[times.len() / 2], times[times.len() - 1]],
    })
}

/// What [`amid_silence`] measured.
#[derive(Debug, Clone, Copy)]
pub struct SilenceReport {
    /// Silent connections opened.
    pub silent: usize,
    /// New clients timed meanwhile.
    pub clients: usize,
    /// Their connect-and-lookup time: median, 99th percentile and worst, µs.
    pub new_client_us: [f64; 3],
    /// New clients timed afterwards, for [`HOLD_ALL`], with every silent connection open.
    pub clients_after: usize,
    /// Their connect-and-lookup time: median, 99th percentile and worst, µs.
    pub after_us: [f64; 3],
}

impl fmt::Display for SilenceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p50, p99, max] = self.new_client_us;
        let [a50, a99, amax] = self.after_us;
        write!(
            f,
            "{} silent connections, one every {}ms: {} new clients' connect+lookup median \
             {p50:.0}us, p99 {p99:.0}us, worst {max:.0}us; then with all {} open, {} new \
             clients: median {a50:.0}us, p99 {a99:.0}us, worst {amax:.0}us",
            self.silent,
            SILENT_EVERY.as_millis(),
            self.clients,
            self.silent,
            self.clients_after
        )
    }
}

/// How often [`amid_silence`] opens a silent connection.
const SILENT_EVERY: Duration = Duration::from_millis(5);

/// How long [`amid_silence`] goes on timing new clients once every silent connection is
/// open.
pub const HOLD_ALL: Duration = Duration::from_secs(3);

/// Opens `n` connections that never send a byte, one every 5 ms (held until the end), and
/// meanwhile times new clients' connect + lookup, one after another, and again for
/// [`HOLD_ALL`] once all are open: what silent connections cost a server that keeps
/// arrival order across connections.
///
/// # Errors
/// When a connection fails or a reply is wrong.
pub fn amid_silence(cfg: &BenchConfig, n: usize) -> Result<SilenceReport, BenchError> {
    let done = Arc::new(AtomicBool::new(false));
    let opener = {
        let (addr, done) = (cfg.addr, Arc::clone(&done));
        std::thread::spawn(move || -> io::Result<Vec<TcpStream>> {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                held.push(TcpStream::connect(addr)?);
                std::thread::sleep(SILENT_EVERY);
            }
            done.store(true, Ordering::SeqCst);
            Ok(held)
        })
    };
    let mut times = Vec::new();
    let mut i = 0;
    while !done.load(Ordering::SeqCst) || times.is_empty() {
        times.push(one_lookup(cfg, i)?.1.as_secs_f64() * 1e6);
        i += 1;
    }
    let held = opener
        .join()
        .map_err(|_| BenchError::Mismatch("the silent-connection thread panicked".into()))??;
    let mut after = Vec::new();
    let until = Instant::now() + HOLD_ALL;
    while Instant::now() < until {
        after.push(one_lookup(cfg, i)?.1.as_secs_f64() * 1e6);
        i += 1;
    }
    drop(held);
    let pcts = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        [pct(0.5), pct(0.99), pct(1.0)]
    };
    Ok(SilenceReport {
        silent: n,
        clients: times.len(),
        new_client_us: pcts(&mut times),
        clients_after: after.len(),
        after_us: pcts(&mut after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_sums_slices_and_takes_ratios_round_by_round() {
        let slice = |ops, cpu_secs| Slice {
            ops,
            secs: 0.5,
            cpu_secs,
            user_secs: cpu_secs / 10.0,
        };
        // Target 1 costs 1.1x target 0 in every round, although the machine's speed
        // changes from round to round; target 2 does nothing in the last round.
        let rounds = vec![
            vec![slice(1000, 0.010), slice(1000, 0.011), slice(500, 0.005)],
            vec![slice(2000, 0.010), slice(2000, 0.011), slice(500, 0.0025)],
            vec![slice(1000, 0.020), slice(1000, 0.022), slice(0, 0.001)],
        ];
        let s = summarize(&rounds).unwrap();
        assert_eq!(s.len(), 3);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(s[0].vs_first, 1.0) && close(s[1].vs_first, 1.1),
            "{s:?}"
        );
        assert!(s[1].rounds_vs_first.iter().all(|&r| close(r, 1.1)), "{s:?}");
        assert!(close(s[0].ops_per_sec, 4000.0 / 1.5));
        assert!(close(s[0].cpu_us_per_op, 0.040 * 1e6 / 4000.0));
        assert!(close(s[0].user_us_per_op, 0.004 * 1e6 / 4000.0));
        // Rounds without an operation count in the totals, not among the ratios.
        assert!(close(s[2].cpu_us_per_op, 0.0085 * 1e6 / 1000.0), "{s:?}");
        assert!(s[2].rounds_vs_first.iter().all(|&r| close(r, 1.0)), "{s:?}");
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[vec![slice(0, 0.1)]]).is_none());
    }

    #[test]
    fn values_have_the_asked_size_and_differ_by_key() {
        assert_eq!(value(7, 32).len(), 32);
        assert_eq!(value(123_456, 4).len(), 4);
        assert_ne!(value(1, 32), value(2, 32));
        assert_eq!(key(5), b"key:00000005");
    }

    #[test]
    fn ratios_parse() {
        assert_eq!("9:1".parse::<Ratio>().unwrap(), Ratio { get: 9, set: 1 });
        assert!("0:0".parse::<Ratio>().is_err());
        assert!("9".parse::<Ratio>().is_err());
        assert_eq!("memcache".parse::<Proto>().unwrap(), Proto::Memcache);
        assert_eq!("etcd".parse::<Proto>().unwrap(), Proto::Etcd);
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }
}
