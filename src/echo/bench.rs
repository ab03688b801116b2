//! The closed-loop echo benchmark: C connections, each sending one message, waiting for its
//! echo, checking it and timing the round trip, over and over for a fixed duration.

use super::client::connect;
use super::EchoError;
use crate::bench::{own_cpu_secs, process_cpu_secs};
use crate::framing::{encode_frame, FrameReader, Framing};
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The echo server (`host:port`).
    pub addr: String,
    /// Connections, each with one message in flight.
    pub conns: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// The server's framing.
    pub framing: Framing,
    /// How long to measure, after the warmup.
    pub duration: Duration,
    /// How long to run before measuring (round trips in it are not counted).
    pub warmup: Duration,
    /// Send the header and the payload (for `line`: the payload and the `\n`) in two
    /// `write` calls, as the seed's `message.py` does: the Nagle trap.
    pub two_writes: bool,
    /// Set `TCP_NODELAY` on the client sockets (the course's clients do not).
    pub nodelay: bool,
    /// Limit on every socket operation; a server that stops answering fails the run.
    pub timeout: Duration,
    /// The server's process id, to report its CPU time per message (Linux `/proc`).
    pub server_pid: Option<u32>,
    /// Hostile clients running alongside the measured ones: each sends `flood_size`-byte
    /// messages as fast as it can and never reads a reply; when the server drops it (or
    /// its write stalls for a second), it reconnects and starts again.
    pub flooders: usize,
    /// Payload bytes of each flooder message.
    pub flood_size: usize,
}

impl Default for BenchConfig {
    /// One connection to the seed's address, 64-byte `ascii10` messages, 3 s after 0.5 s.
    fn default() -> Self {
        BenchConfig {
            addr: super::DEFAULT_ADDR.to_owned(),
            conns: 1,
            size: 64,
            framing: Framing::Ascii10,
            duration: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            two_writes: false,
            nodelay: false,
            timeout: Duration::from_secs(10),
            server_pid: None,
            flooders: 0,
            flood_size: 64 << 10,
        }
    }
}

impl fmt::Display for BenchConfig {
    /// `16 connections to ADDR, 64-byte ascii10 messages, 3 s after 0.5 s warmup`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connection{} to {}, {}-byte {} messages{}{}, {} s after {} s warmup",
            self.conns,
            if self.conns == 1 { "" } else { "s" },
            self.addr,
            self.size,
            self.framing,
            if self.two_writes {
                ", two writes each"
            } else {
                ""
            },
            if self.nodelay { ", TCP_NODELAY" } else { "" },
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64()
        )?;
        if self.flooders > 0 {
            write!(
                f,
                ", {} flooders sending {}-byte messages and never reading",
                self.flooders, self.flood_size
            )?;
        }
        Ok(())
    }
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Round trips completed in the measured window.
    pub messages: u64,
    /// The measured window.
    pub elapsed: Duration,
    /// Round-trip latency percentiles: p50, p99, p99.9.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The server's CPU time (user + system) per message in the measured window, when its
    /// process id was given and its `/proc` entry could be read.
    pub server_cpu: Option<Duration>,
    /// This benchmark's own CPU time per message, likewise: the client's share of the cost,
    /// which bounds what any server can reach on the same cores.
    pub client_cpu: Option<Duration>,
}

impl BenchReport {
    /// Round trips per second over the measured window.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn from_samples(mut samples: Vec<Duration>, elapsed: Duration) -> BenchReport {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(i - 1).copied().unwrap_or_default()
        };
        BenchReport {
            messages: samples.len() as u64,
            elapsed,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            server_cpu: None,
            client_cpu: None,
        }
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "{:.0} messages/s ({} in {:.2} s)  p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs",
            self.rate(),
            self.messages,
            self.elapsed.as_secs_f64(),
            us(self.p50),
            us(self.p99),
            us(self.p999)
        )?;
        if let Some(cpu) = self.server_cpu {
            write!(f, "  server CPU {:.2} µs/message", us(cpu))?;
        }
        if let Some(cpu) = self.client_cpu {
            write!(f, "  client CPU {:.2} µs/message", us(cpu))?;
        }
        Ok(())
    }
}

/// Runs the benchmark: connects every connection first, then drives them all together.
///
/// # Errors
/// When a connection cannot be made, a socket fails or times out, the server closes a
/// connection, or a reply is not the echo of its request.
pub fn bench(config: &BenchConfig) -> Result<BenchReport, EchoError> {
    let conns = config.conns.max(1);
    let streams = (0..conns)
        .map(|_| {
            let s = connect(&config.addr, config.timeout)?;
            s.set_nodelay(config.nodelay)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>, EchoError>>()?;
    let start = Arc::new(Barrier::new(conns + 1));
    let measure_from = Arc::new(OnceLock::new());
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let (config, start) = (config.clone(), Arc::clone(&start));
            let measure_from = Arc::clone(&measure_from);
            thread::spawn(move || {
                start.wait();
                let from = *measure_from.get_or_init(|| Instant::now() + config.warmup);
                drive(&config, i, &stream, from, from + config.duration)
            })
        })
        .collect();
    start.wait();
    let from = *measure_from.get_or_init(|| Instant::now() + config.warmup);
    let flooders: Vec<_> = (0..config.flooders)
        .map(|_| {
            let config = config.clone();
            thread::spawn(move || flood(&config, from + config.duration))
        })
        .collect();
    // CPU time over the same window the connections count their round trips in.
    let cpu = || (config.server_pid.and_then(process_cpu_secs), own_cpu_secs());
    thread::sleep(from.saturating_duration_since(Instant::now()));
    let before = cpu();
    thread::sleep((from + config.duration).saturating_duration_since(Instant::now()));
    let after = cpu();
    for flooder in flooders {
        let _ = flooder.join();
    }
    let mut samples = Vec::new();
    let mut failure = None;
    for w in workers {
        match w.join() {
            Ok(Ok(mine)) => samples.extend(mine),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            let mut report = BenchReport::from_samples(samples, config.duration);
            let per_message = |before: Option<f64>, after: Option<f64>| {
                let secs = after? - before?;
                Some(Duration::from_secs_f64(
                    secs.max(0.0) / report.messages.max(1) as f64,
                ))
            };
            report.server_cpu = per_message(before.0, after.0);
            report.client_cpu = per_message(before.1, after.1);
            Ok(report)
        }
    }
}

/// One connection's loop; returns the round-trip times of the measured window.
fn drive(
    config: &BenchConfig,
    conn: usize,
    stream: &std::net::TcpStream,
    measure_from: Instant,
    stop_at: Instant,
) -> Result<Vec<Duration>, EchoError> {
    let framing = config.framing;
    let mut reader = FrameReader::new(stream, framing);
    let (mut payload, mut wire) = (Vec::with_capacity(config.size), Vec::new());
    let mut samples = Vec::new();
    for seq in 0u64.. {
        let sent_at = Instant::now();
        if sent_at >= stop_at {
            break;
        }
        fill_payload(&mut payload, config.size, conn, seq);
        wire.clear();
        encode_frame(framing, &payload, &mut wire)?;
        let mut out = stream;
        if config.two_writes {
            let split = match framing.header_len() {
                0 => wire.len() - 1,
                h => h,
            };
            out.write_all(&wire[..split])?;
            out.write_all(&wire[split..])?;
        } else {
            out.write_all(&wire)?;
        }
        let reply = reader.read_frame()?.ok_or(EchoError::Closed)?;
        if reply != payload {
            return Err(EchoError::Mismatch {
                conn,
                sent: payload,
                got: reply.to_vec(),
            });
        }
        if sent_at >= measure_from {
            samples.push(sent_at.elapsed());
        }
    }
    Ok(samples)
}

/// A flooder: sends messages without reading until `stop_at`, reconnecting whenever the
/// server drops it or a write stalls for a second (the server has stopped reading it).
fn flood(config: &BenchConfig, stop_at: Instant) {
    let mut wire = Vec::new();
    let payload = vec![b'F'; config.flood_size];
    if encode_frame(config.framing, &payload, &mut wire).is_err() {
        return;
    }
    while Instant::now() < stop_at {
        let Ok(stream) = connect(&config.addr, config.timeout) else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        while Instant::now() < stop_at && (&stream).write_all(&wire).is_ok() {}
    }
}

/// A distinct message of `size` bytes: `CONN:SEQ:` then `X`s, cut to size. Digits, `:` and
/// `X` are their own upper case and hold no `\n`, so the check works for every transform
/// and framing.
fn fill_payload(payload: &mut Vec<u8>, size: usize, conn: usize, seq: u64) {
    payload.clear();
    let _ = write!(payload, "{conn}:{seq}:");
    payload.resize(size, b'X');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_sample_at_or_above_the_rank() {
        let samples = (1..=1000).map(Duration::from_micros).collect();
        let r = BenchReport::from_samples(samples, Duration::from_secs(2));
        assert_eq!(r.messages, 1000);
        assert_eq!(r.rate(), 500.0);
        assert_eq!(r.p50, Duration::from_micros(500));
        assert_eq!(r.p99, Duration::from_micros(990));
        assert_eq!(r.p999, Duration::from_micros(999));
        let empty = BenchReport::from_samples(Vec::new(), Duration::from_secs(1));
        assert_eq!(empty.p99, Duration::ZERO);
    }

    #[test]
    fn payloads_are_distinct_sized_and_upper_case() {
        let mut p = Vec::new();
        fill_payload(&mut p, 64, 3, 12);
        assert_eq!(p.len(), 64);
        assert!(p.starts_with(b"3:12:XXX"));
        assert_eq!(&*super::super::upper(&p), &p[..]);
        fill_payload(&mut p, 2, 3, 12);
        assert_eq!(p, b"3:");
    }
}
