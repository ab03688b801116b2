//! Chat fan-out benchmark: one sender, many receivers, over one or several federated
//! servers; prints delivered messages per second and delivery latency.

use argh::FromArgs;
use std::process::ExitCode;
use switchboard::chat::bench::{self, BenchConfig};

/// One sender, RECEIVERS receivers spread over the servers; reports deliveries/s and
/// p50/p99/max delivery latency, per run and as medians.
#[derive(FromArgs)]
struct Args {
    /// a running server (repeat for several); without any, --spawn servers are started here
    #[argh(option)]
    addr: Vec<String>,
    /// federated servers to start in this process when no --addr is given (default 1)
    #[argh(option, default = "1")]
    spawn: usize,
    /// receivers (default 100)
    #[argh(option, default = "100")]
    receivers: usize,
    /// messages per run (default 2000)
    #[argh(option, default = "2000")]
    messages: usize,
    /// messages the sender may be ahead of the slowest receiver (default 256)
    #[argh(option, default = "256")]
    window: usize,
    /// runs (default 3)
    #[argh(option, default = "3")]
    runs: usize,
}

fn main() -> ExitCode {
    let a: Args = argh::from_env();
    let spawned = if a.addr.is_empty() {
        match bench::spawn_federation(a.spawn) {
            Ok(servers) => servers,
            Err(e) => return fail(&format!("cannot start the servers: {e}")),
        }
    } else {
        Vec::new()
    };
    let addrs = if spawned.is_empty() {
        match bench::resolve(&a.addr) {
            Ok(addrs) => addrs,
            Err(e) => return fail(&format!("bad --addr: {e}")),
        }
    } else {
        spawned.iter().map(|s| s.handle().local_addr()).collect()
    };
    let config = BenchConfig {
        addrs,
        receivers: a.receivers,
        messages: a.messages,
        window: a.window,
    };
    let mut runs = Vec::new();
    for run in 1..=a.runs.max(1) {
        match bench::run(&config) {
            Ok(report) => {
                println!("run {run}: {report}");
                runs.push(report);
            }
            Err(e) => return fail(&format!("run {run}: {e}")),
        }
    }
    if let Some((rate, [p50, p99, max])) = bench::medians(&runs) {
        println!(
            "RESULT servers={} receivers={} messages={} window={} runs={} msgs_per_sec={rate:.0} \
             p50_us={p50} p99_us={p99} max_us={max}",
            config.addrs.len(),
            a.receivers,
            a.messages,
            a.window,
            runs.len()
        );
    }
    ExitCode::SUCCESS
}

fn fail(message: &str) -> ExitCode {
    eprintln!("chat-bench: {message}");
    ExitCode::FAILURE
}
