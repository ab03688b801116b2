//! Measures the replicated messenger: acknowledged sends/s of a 3-server cluster against a
//! single server, and failover time after `kill -9` of the primary.

use argh::FromArgs;
use std::process::ExitCode;
use switchboard::messenger::bench::{self, BenchOptions};

/// Benchmark messenger-server clusters (started as child processes on free ports).
#[derive(FromArgs)]
struct Args {
    /// client threads sending at once (default 8)
    #[argh(option, default = "8")]
    clients: usize,
    /// seconds per throughput run (default 3)
    #[argh(option, default = "3.0")]
    secs: f64,
    /// runs per figure; the median is reported (default 3)
    #[argh(option, default = "3")]
    runs: usize,
    /// run the servers with --no-fsync (primary mode only)
    #[argh(switch)]
    no_fsync: bool,
    /// the servers' --quorum: primary (default; 1 and 3 servers compared) or majority
    /// (Raft; 3 servers)
    #[argh(option, default = "String::from(\"primary\")")]
    quorum: String,
    /// instead of the load and failover runs: hold this many idle clients on one server
    /// and report its memory
    #[argh(option)]
    idle: Option<usize>,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let server_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("messenger-server")))
        .filter(|p| p.exists());
    let Some(server_bin) = server_bin else {
        eprintln!("messenger-bench: messenger-server must be next to this binary (cargo build)");
        return ExitCode::FAILURE;
    };
    let options = BenchOptions {
        server_bin,
        clients: args.clients.max(1),
        secs: args.secs,
        runs: args.runs.max(1),
        fsync: !args.no_fsync,
        quorum: args.quorum,
    };
    if !matches!(options.quorum.as_str(), "primary" | "majority") {
        eprintln!("messenger-bench: --quorum is primary or majority");
        return ExitCode::FAILURE;
    }
    if let Some(n) = args.idle {
        return match bench::hold_idle(&options, n) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("messenger-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match bench::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("messenger-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
