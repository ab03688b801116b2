//! `echo-bench`: closed-loop throughput and latency of an echo server.

use argh::FromArgs;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::echo::{bench, BenchConfig, DEFAULT_ADDR};
use switchboard::framing::Framing;

/// Drives an echo server with C closed-loop connections (each sends a message, waits for
/// the echo, checks it) and prints messages/s and p50/p99/p99.9 round-trip latency.
#[derive(FromArgs)]
struct Args {
    /// the echo server (default 127.0.0.1:12345)
    #[argh(option, default = "DEFAULT_ADDR.to_owned()")]
    addr: String,
    /// concurrent connections (default 1)
    #[argh(option, default = "1")]
    conns: usize,
    /// seconds to measure (default 3)
    #[argh(option, default = "3.0", from_str_fn(seconds))]
    duration: f64,
    /// seconds to run before measuring (default 0.5)
    #[argh(option, default = "0.5", from_str_fn(seconds))]
    warmup: f64,
    /// payload bytes per message (default 64)
    #[argh(option, default = "64")]
    size: usize,
    /// line, ascii10 (default), u16 or u32
    #[argh(option, default = "Framing::Ascii10")]
    framing: Framing,
    /// write header and payload in two calls, as the seed's message.py (the Nagle trap)
    #[argh(switch)]
    two_writes: bool,
    /// set TCP_NODELAY on the client sockets (the course's clients do not)
    #[argh(switch)]
    nodelay: bool,
    /// the server's process id: also report its and this program's CPU time per message
    #[argh(option)]
    server_pid: Option<u32>,
    /// hostile clients alongside: each floods messages and never reads, reconnecting when
    /// dropped (default 0)
    #[argh(option, default = "0")]
    flooders: usize,
    /// payload bytes of each flooder message (default 65536)
    #[argh(option, default = "65536")]
    flood_size: usize,
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!("expected a number of seconds, got {text:?}")),
    }
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    if args.conns == 0 || args.duration == 0.0 {
        eprintln!("echo-bench: --conns and --duration must be greater than 0");
        return ExitCode::FAILURE;
    }
    let config = BenchConfig {
        addr: args.addr,
        conns: args.conns,
        size: args.size,
        framing: args.framing,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        two_writes: args.two_writes,
        nodelay: args.nodelay,
        server_pid: args.server_pid,
        flooders: args.flooders,
        flood_size: args.flood_size,
        ..BenchConfig::default()
    };
    println!("echo-bench: {config}");
    match bench(&config) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("echo-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
